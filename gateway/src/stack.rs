//! The one-command stack: the three model services and the gateway in one process, sharing
//! one device, each with its own memory budget, talking real gRPC over loopback (the same
//! code path as the Kubernetes deployment, where each runs in its own pod).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use klein_runtime::{
    bytesize::ByteSize,
    config::ServerConfig,
    device::{DTypeSpec, DeviceSpec},
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use encoder_svc::{config::Quantize, model::quant::QuantFormat};

use crate::config::Config as GatewayConfig;

/// The measured plans for one 16 GB GPU (deploy/components/gpu-16gb, docs/performance.md):
/// which one a pipeline needs follows from its transformer's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpu16Gb {
    /// klein-4B: 4-bit Qwen3-4B in 2880 MiB, bf16 denoiser in 10048 MiB, f32 VAE in 3328 MiB.
    Klein4b,
    /// klein-9B: 4-bit Qwen3-8B in 4800 MiB, the denoiser with its block projections in q4k
    /// (5.6 GB of weights instead of 18.2) in 8128 MiB, f32 VAE in 3328 MiB.
    Klein9b,
}

impl Gpu16Gb {
    /// The plan for a transformer configuration: klein-9B's for one wider than klein-4B's.
    pub fn for_config(cfg: &denoiser_svc::model::Config) -> Self {
        if cfg.hidden_size() > denoiser_svc::model::Config::klein_4b().hidden_size() {
            Self::Klein9b
        } else {
            Self::Klein4b
        }
    }

    /// The plan for the transformer at `path`: a pipeline, its `transformer/` folder or a
    /// single file (klein-4B's where it cannot be read: the denoiser then says what is wrong
    /// with it).
    pub fn for_model(path: &Path) -> Self {
        denoiser_svc::weights::Checkpoint::locate(path)
            .map_or(Self::Klein4b, |c| Self::for_config(&c.config))
    }

    /// The encoder's, the denoiser's and the VAE's budgets: 16256 of the 16376 MiB a 16 GB
    /// card has.
    pub fn budgets(self) -> [ByteSize; 3] {
        let mib = |m: u64| ByteSize(m << 20);
        match self {
            Self::Klein4b => [mib(2880), mib(10048), mib(3328)],
            Self::Klein9b => [mib(4800), mib(8128), mib(3328)],
        }
    }

    /// The transformer's load-time quantization.
    pub fn transformer_quantize(self) -> Quantize {
        match self {
            Self::Klein4b => Quantize::None,
            Self::Klein9b => Quantize::Format(QuantFormat::Q4K),
        }
    }
}

/// Everything the stack needs; [`StackOptions::new`] fills sensible defaults.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Gateway listen address.
    pub listen: SocketAddr,
    /// Encoder settings (model_dir, device, budget, quantization, ...).
    pub encoder: encoder_svc::Config,
    /// Denoiser settings.
    pub denoiser: denoiser_svc::Config,
    /// VAE settings.
    pub vae: vae_svc::Config,
    /// Gateway settings (stage addresses are filled in by [`start`]).
    pub gateway: GatewayConfig,
}

impl StackOptions {
    /// A stack serving the diffusers pipeline folder `model_dir` on `device`.
    pub fn new(model_dir: &Path, device: DeviceSpec, listen: SocketAddr) -> Self {
        let mut encoder = encoder_svc::Config::default();
        let mut denoiser = denoiser_svc::Config::default();
        let mut vae = vae_svc::Config::default();
        encoder.model_dir = Some(model_dir.to_owned());
        denoiser.model_dir = Some(model_dir.to_owned());
        vae.model_dir = Some(model_dir.to_owned());
        for server in [&mut encoder.server, &mut denoiser.server, &mut vae.server] {
            server.device = device;
        }
        if device != DeviceSpec::Cpu {
            encoder.server.dtype = DTypeSpec::Bf16;
            denoiser.server.dtype = DTypeSpec::Bf16;
        }
        vae.server.dtype = DTypeSpec::F32;
        let mut gateway = GatewayConfig::default();
        gateway.server.listen = listen;
        Self {
            listen,
            encoder,
            denoiser,
            vae,
            gateway,
        }
    }

    /// Also serves the pipeline folder `path` as model `id`: its transformer in the denoiser,
    /// its text encoder in the encoder (the VAE is shared by every klein model).
    pub fn add_model(mut self, id: &str, path: &Path) -> Self {
        self.encoder.models.push(encoder_svc::config::ModelEntry {
            id: Some(id.to_owned()),
            path: path.to_owned(),
            gguf: None,
        });
        self.denoiser.models.push(denoiser_svc::config::ModelEntry {
            id: Some(id.to_owned()),
            path: path.to_owned(),
            is_distilled: None,
            text_encoder: Some(id.to_owned()),
            lora: Vec::new(),
            adapters: Vec::new(),
        });
        self
    }

    /// Serves the transformer file at `path` (BFL safetensors or GGUF, e.g. a pre-quantized
    /// `flux-2-klein-9b-Q4_K_M.gguf`) in place of the pipeline's own `transformer/`, under the
    /// pipeline's name; whether it is step-distilled comes from the pipeline's
    /// `model_index.json`.
    pub fn transformer(mut self, path: &Path) -> Self {
        if let Some(root) = self.denoiser.model_dir.take() {
            self.denoiser.is_distilled = denoiser_svc::weights::pipeline_is_distilled(&root)
                .ok()
                .flatten();
            self.denoiser.model_id = root.file_name().and_then(|n| n.to_str()).map(Into::into);
        }
        self.denoiser.model_dir = Some(path.to_owned());
        self
    }

    /// Takes the text encoder's weights from the pre-quantized Qwen3 GGUF file at `path`
    /// (llama.cpp's layout; the tokenizer still comes from the pipeline), so nothing is
    /// quantized at start-up.
    pub fn text_encoder_gguf(mut self, path: &Path) -> Self {
        self.encoder.gguf = Some(path.to_owned());
        self.encoder.quantize = Quantize::None;
        self
    }

    /// The `klein quantize` commands that write, once, what this stack quantizes at every
    /// start when that includes the transformer (its projections unless it is a GGUF file, and
    /// the text encoder's unless they come from one), and the `serve` flags that then read the
    /// files; `None` when the transformer is not quantized at start-up: a text encoder alone
    /// quantizes on the GPU about as fast as its GGUF file loads, while a transformer's
    /// quantization still costs seconds at every start (docs/performance.md, thirtieth
    /// session).
    pub fn quantize_once_hint(&self) -> Option<String> {
        let encoder = self
            .encoder
            .quantize
            .format()
            .filter(|_| self.encoder.gguf.is_none())
            .zip(self.encoder.model_dir.as_deref());
        let transformer = self
            .denoiser
            .quantize
            .format()
            .zip(self.denoiser.model_dir.as_deref())
            .filter(|(_, path)| !klein_runtime::weights::gguf::is_gguf(path));
        let (out, text_out) = ("transformer.gguf", "text-encoder.gguf");
        let device = match self.denoiser.server.device {
            DeviceSpec::Cpu => String::new(),
            gpu => format!(" --device {gpu}"),
        };
        let command = |format: QuantFormat, dir: &Path, outs: &str| {
            format!(
                "  klein quantize --model-dir {} --format {format}{device}{outs}",
                dir.display()
            )
        };
        let (tf, tdir) = transformer?;
        let (commands, flags) = match encoder {
            None => (
                command(tf, tdir, &format!(" --out {out}")),
                format!("--transformer {out}"),
            ),
            Some((ef, edir)) => {
                let flags = format!("--transformer {out} --text-encoder-gguf {text_out}");
                if (tf, tdir) == (ef, edir) {
                    let outs = format!(" --out {out} --text-encoder-out {text_out}");
                    (command(tf, tdir, &outs), flags)
                } else {
                    let t = command(tf, tdir, &format!(" --out {out}"));
                    let e = command(ef, edir, &format!(" --text-encoder-out {text_out}"));
                    (format!("{t}\n{e}"), flags)
                }
            }
        };
        Some(format!(
            "weights were quantized at start-up; write them once with\n{commands}\nand start \
             with {flags} to load them in seconds"
        ))
    }

    /// Caps the host RAM the encoder's and the denoiser's model weights may take (each).
    pub fn host_memory_caps(mut self, encoder: ByteSize, denoiser: ByteSize) -> Self {
        self.encoder.residency.host_memory_cap = Some(encoder);
        self.denoiser.residency.host_memory_cap = Some(denoiser);
        self
    }

    /// The settings `plan` was measured with (deploy/components/gpu-16gb, gpu-16gb-9b): a 4-bit
    /// encoder, the plan's transformer quantization, 128 MiB attention score chunks and the
    /// measured runtime overheads. Budgets are set separately ([`StackOptions::budgets`],
    /// [`Gpu16Gb::budgets`]).
    pub fn gpu_16gb_settings(mut self, plan: Gpu16Gb) -> Self {
        self.encoder.quantize = Quantize::Format(QuantFormat::Q4K);
        self.denoiser.quantize = plan.transformer_quantize();
        self.encoder.runtime_overhead = ByteSize(448 << 20);
        self.denoiser.attention_chunk_bytes = ByteSize(128 << 20);
        self.denoiser.runtime_overhead = ByteSize(704 << 20);
        self.vae.runtime_overhead = ByteSize(1280 << 20);
        self
    }

    /// Sets the three services' budgets.
    pub fn budgets(mut self, encoder: ByteSize, denoiser: ByteSize, vae: ByteSize) -> Self {
        self.encoder.server.gpu_memory_budget = encoder;
        self.denoiser.server.gpu_memory_budget = denoiser;
        self.vae.server.gpu_memory_budget = vae;
        self
    }
}

/// Why the stack stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("encoder: {0}")]
    Encoder(#[from] encoder_svc::EncoderError),
    #[error("denoiser: {0}")]
    Denoiser(#[from] denoiser_svc::DenoiseError),
    #[error("vae: {0}")]
    Vae(#[from] vae_svc::VaeError),
    #[error("gateway: {0}")]
    Gateway(#[from] crate::Error),
}

/// A running stack.
pub struct RunningStack {
    /// Gateway address.
    pub addr: SocketAddr,
    /// HTTP API address, when `gateway.http_listen` was set.
    pub http_addr: Option<SocketAddr>,
    /// Internal service addresses: encoder, denoiser, VAE.
    pub stage_addrs: [SocketAddr; 3],
    stop: CancellationToken,
    tasks: JoinSet<Result<(), StackError>>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StackError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StackError::Listen { addr, source })
}

/// Starts the services on loopback ports and the gateway on `opts.listen`.
pub async fn start(opts: StackOptions) -> Result<RunningStack, StackError> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (el, dl, vl) = (
        bind(loopback).await?,
        bind(loopback).await?,
        bind(loopback).await?,
    );
    let gl = bind(opts.listen).await?;
    let stage_addrs = [el.local_addr(), dl.local_addr(), vl.local_addr()]
        .map(|a| a.expect("a bound listener has an address"));
    let gateway_addr = gl.local_addr().map_err(|source| StackError::Listen {
        addr: opts.listen,
        source,
    })?;
    let hl = match opts.gateway.http_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let http_addr = hl.as_ref().and_then(|l| l.local_addr().ok());
    // A stage serving TLS is reached by name: its certificate names localhost.
    let url = |a: SocketAddr, server: &ServerConfig| {
        vec![match server.tls_cert {
            Some(_) => format!("https://localhost:{}", a.port()),
            None => format!("http://{a}"),
        }]
    };
    let mut gateway = opts.gateway;
    gateway.encoder_addrs = url(stage_addrs[0], &opts.encoder.server);
    gateway.denoiser_addrs = url(stage_addrs[1], &opts.denoiser.server);
    gateway.vae_addrs = url(stage_addrs[2], &opts.vae.server);
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let s = stop.clone();
    tasks
        .spawn(async move { Ok(encoder_svc::serve(opts.encoder, el, s.cancelled_owned()).await?) });
    let s = stop.clone();
    tasks.spawn(
        async move { Ok(denoiser_svc::serve(opts.denoiser, dl, s.cancelled_owned()).await?) },
    );
    let s = stop.clone();
    tasks.spawn(async move { Ok(vae_svc::serve(opts.vae, vl, s.cancelled_owned()).await?) });
    let s = stop.clone();
    tasks.spawn(
        async move { Ok(crate::serve_with_http(gateway, gl, hl, s.cancelled_owned()).await?) },
    );
    Ok(RunningStack {
        addr: gateway_addr,
        http_addr,
        stage_addrs,
        stop,
        tasks,
    })
}

impl RunningStack {
    /// Waits until the gateway reports SERVING, or a component fails, or `timeout` passes.
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), StackError> {
        let url = format!("http://{}", self.addr);
        let poll = async {
            loop {
                if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone())
                    .expect("valid url")
                    .connect()
                    .await
                {
                    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
                    let req = tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    };
                    if let Ok(resp) = health.check(req).await
                        && resp.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            () = poll => Ok(()),
            Some(done) = self.tasks.join_next() => Err(match done {
                Ok(Err(e)) => e,
                Ok(Ok(())) => StackError::Gateway(crate::Error::Stopped),
                Err(join) => StackError::Gateway(crate::Error::Panicked(join.to_string())),
            }),
            () = tokio::time::sleep(timeout) => Err(StackError::Gateway(crate::Error::NotReady(timeout))),
        }
    }

    /// Runs until `shutdown` resolves or a component stops; then stops everything (drain).
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), StackError> {
        let first = tokio::select! {
            () = shutdown => None,
            Some(done) = self.tasks.join_next() => Some(done),
        };
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        match first {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(join)) => Err(StackError::Gateway(crate::Error::Panicked(
                join.to_string(),
            ))),
        }
    }

    /// Stops every component and waits for them.
    pub async fn stop(self) -> Result<(), StackError> {
        self.run_until(async {}).await
    }
}

/// The bundled tiny random-weight pipeline (`tests/fixtures/tiny-klein-4b` of this checkout).
pub fn bundled_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-klein-4b")
}

/// Resolves `org/name` in the local Hugging Face cache (`$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) to its `refs/main` snapshot folder.
pub fn hf_cache_snapshot(repo: &str) -> Option<PathBuf> {
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        })?;
    let dir = hub.join(format!("models--{}", repo.replace('/', "--")));
    let rev = std::fs::read_to_string(dir.join("refs/main")).ok()?;
    let snap = dir.join("snapshots").join(rev.trim());
    snap.join("model_index.json").is_file().then_some(snap)
}

#[cfg(test)]
mod tests {
    use denoiser_svc::model::Config;

    use super::*;

    #[test]
    fn the_16gb_plan_follows_the_transformer_width() {
        assert_eq!(Gpu16Gb::for_config(&Config::klein_4b()), Gpu16Gb::Klein4b);
        assert_eq!(Gpu16Gb::for_config(&Config::klein_9b()), Gpu16Gb::Klein9b);
        assert_eq!(Gpu16Gb::for_model(&bundled_model()), Gpu16Gb::Klein4b);
        assert_eq!(
            Gpu16Gb::for_model(Path::new("/nonexistent")),
            Gpu16Gb::Klein4b
        );
        for plan in [Gpu16Gb::Klein4b, Gpu16Gb::Klein9b] {
            let total: u64 = plan.budgets().iter().map(|b| b.0).sum();
            assert_eq!(total, 16256 << 20, "{plan:?}");
        }
        assert_eq!(Gpu16Gb::Klein4b.transformer_quantize(), Quantize::None);
        assert_eq!(
            Gpu16Gb::Klein9b.transformer_quantize(),
            Quantize::Format(QuantFormat::Q4K)
        );
        let listen = ([127, 0, 0, 1], 0).into();
        let opts = StackOptions::new(&bundled_model(), DeviceSpec::Cuda(0), listen);
        for plan in [Gpu16Gb::Klein4b, Gpu16Gb::Klein9b] {
            let set = opts.clone().gpu_16gb_settings(plan);
            assert_eq!(set.denoiser.quantize, plan.transformer_quantize());
            assert_eq!(set.encoder.quantize, Quantize::Format(QuantFormat::Q4K));
        }
    }

    /// The hint names what is quantized at start-up when the transformer is, in one command
    /// when both come from the pipeline in one format, and nothing once both are read from
    /// files or only the text encoder is quantized.
    #[test]
    fn quantizing_once_is_suggested_for_what_is_quantized_at_start_up() {
        let listen = ([127, 0, 0, 1], 0).into();
        let dir = bundled_model();
        let opts = StackOptions::new(&dir, DeviceSpec::Cuda(0), listen);
        assert_eq!(opts.quantize_once_hint(), None);
        let nine = opts.clone().gpu_16gb_settings(Gpu16Gb::Klein9b);
        let hint = nine.quantize_once_hint().unwrap();
        let one = format!(
            "klein quantize --model-dir {} --format q4k --device cuda:0 --out transformer.gguf \
             --text-encoder-out text-encoder.gguf",
            dir.display()
        );
        assert!(hint.contains(&one), "{hint}");
        assert!(
            hint.contains("--transformer transformer.gguf --text-encoder-gguf text-encoder.gguf")
        );
        let four = opts.clone().gpu_16gb_settings(Gpu16Gb::Klein4b);
        assert_eq!(four.quantize_once_hint(), None, "the encoder alone");

        let tmp = std::env::temp_dir().join(format!("klein-hint-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let gguf = tmp.join("t.gguf");
        std::fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
        let files = nine
            .clone()
            .transformer(&gguf)
            .text_encoder_gguf(&tmp.join("e.gguf"));
        assert_eq!(files.quantize_once_hint(), None);
        let mut apart = nine.transformer(&tmp.join("flux-2-klein-9b-fp8.safetensors"));
        apart.denoiser.quantize = Quantize::Format(QuantFormat::Q8_0);
        let hint = apart.quantize_once_hint().unwrap();
        assert!(
            hint.contains(
                "flux-2-klein-9b-fp8.safetensors --format q8_0 --device cuda:0 --out transformer.gguf\n"
            ),
            "{hint}"
        );
        assert!(
            hint.contains("--format q4k --device cuda:0 --text-encoder-out text-encoder.gguf\n"),
            "{hint}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn transformer_and_text_encoder_files_replace_the_pipelines() {
        let listen = ([127, 0, 0, 1], 0).into();
        let file = Path::new("/models/flux-2-klein-4b-Q4_K.gguf");
        let opts = StackOptions::new(&bundled_model(), DeviceSpec::Cpu, listen).transformer(file);
        assert_eq!(opts.denoiser.model_dir.as_deref(), Some(file));
        let name = bundled_model()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(opts.denoiser.model_id, Some(name));
        assert_eq!(opts.denoiser.is_distilled, Some(true));
        assert_eq!(opts.encoder.model_dir, Some(bundled_model()));
        let qwen = Path::new("/models/Qwen3-8B-Q4_K_M.gguf");
        let opts = opts
            .gpu_16gb_settings(Gpu16Gb::Klein9b)
            .text_encoder_gguf(qwen);
        assert_eq!(opts.encoder.gguf.as_deref(), Some(qwen));
        assert_eq!(opts.encoder.quantize, Quantize::None);
    }
}
