//! The encoder service behind the gRPC handlers: cache lookups, admission, engine jobs and the
//! response tensors.
//!
//! One `Encode` call: every distinct prompt (positives and negatives) is looked up in the
//! prompt cache; the misses are tokenized, reserve their activation estimate in the memory
//! budget, run as one batch on the engine thread, and enter the cache; the response is
//! assembled from cached bytes in request order.

use std::{collections::HashMap, sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use candle_core::DType;
use klein_proto::{MAX_MESSAGE_BYTES, pb, tensor::dtype_to_wire};
use klein_runtime::{
    budget::MemoryBudget,
    device::DeviceSpec,
    engine::{Engine, EngineError},
    gpu_memory,
    models::{Caps, ModelSource, Registry, RegistryStatus},
};

use crate::{
    budget::{
        activation_bytes, activation_capacity, dequantize_reserve_bytes, host_quant_scratch_bytes,
    },
    cache::{CacheKey, CachedEmbedding, PromptCache},
    config::Config,
    engine::{EncoderSource, ModelSpec, embedding_bytes},
    error::EncoderError,
    model::{
        qwen3,
        weights::{QuantPlan, WeightReport},
    },
    prompt::{PromptIds, PromptTokenizer, SEQ_LEN},
    request::{RequestLimits, ValidEncodeRequest},
};

/// Room kept in every response for everything but the embedding bytes.
const RESPONSE_HEADROOM_BYTES: usize = 1 << 20;

/// What was loaded, fixed for the life of the service.
struct Loaded {
    dtype: DType,
    /// Weights of the default model as loaded at startup.
    report: WeightReport,
    device: String,
    quantization: String,
    budget_bytes: u64,
}

/// One configured model: its tokenizer, shape and what one prompt reserves.
struct Served {
    id: Arc<str>,
    tokenizer: Arc<PromptTokenizer>,
    cfg: qwen3::Config,
    per_prompt: u64,
    info: pb::ModelInfo,
}

/// `qwen3-4b` / `qwen3-8b` for the released shapes, `custom` for any other.
fn variant(cfg: &qwen3::Config) -> &'static str {
    match (cfg.hidden_size, cfg.num_hidden_layers) {
        (2560, 36) => "qwen3-4b",
        (4096, 36) => "qwen3-8b",
        _ => "custom",
    }
}

/// The running encoder: model engine, tokenizers, cache and budget.
pub struct EncoderService {
    engine: Engine<Registry<EncoderSource>>,
    models: Vec<Served>,
    status: RegistryStatus,
    cache: PromptCache,
    budget: MemoryBudget,
    variant: Arc<str>,
    limits: RequestLimits,
    loaded: Loaded,
}

impl EncoderService {
    /// Reads every model's tokenizer and config, loads the models that fit (on the engine
    /// thread), sizes the budget, and warms the default model up with one encode.
    pub async fn start(config: &Config) -> Result<Self, EncoderError> {
        config.validate()?;
        let dtype: DType = config.server.dtype.into();
        let on_cuda = config.server.device != DeviceSpec::Cpu;
        let mut models = Vec::new();
        let mut sources = Vec::new();
        let mut scratch = 0;
        for entry in config.model_entries() {
            let tokenizer = Arc::new(PromptTokenizer::from_file(
                &entry.path.join("tokenizer").join("tokenizer.json"),
            )?);
            let spec = ModelSpec {
                model_dir: entry.path.clone(),
                gguf: entry.gguf.clone(),
                dtype,
                quantize: QuantPlan::of(config.quantize),
            };
            let cfg = spec.config()?;
            let quantized = spec.quantize.is_some() || spec.gguf.is_some();
            let per_prompt = activation_bytes(&cfg, dtype, 1, SEQ_LEN)
                + if quantized && !on_cuda {
                    host_quant_scratch_bytes(&cfg, SEQ_LEN)
                } else {
                    0
                };
            if quantized && on_cuda {
                scratch = scratch.max(dequantize_reserve_bytes(&cfg, dtype, SEQ_LEN));
            }
            let id = entry.id();
            let source = EncoderSource {
                spec,
                config: cfg.clone(),
                pad_id: tokenizer.pad_id(),
            };
            let details = [
                ("hidden_size", cfg.hidden_size.to_string()),
                ("num_hidden_layers", cfg.num_hidden_layers.to_string()),
                ("output_dim", cfg.output_dim().to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            let info = pb::ModelInfo {
                id: id.clone(),
                variant: variant(&cfg).into(),
                weight_bytes: source.device_bytes(),
                details,
                ..Default::default()
            };
            sources.push((id.clone(), source));
            models.push(Served {
                id: id.into(),
                tokenizer,
                cfg,
                per_prompt,
                info,
            });
        }
        let weight_cap = config.residency.device_weight_cap.map_or_else(
            || {
                sources
                    .iter()
                    .map(|(_, s)| s.device_bytes())
                    .max()
                    .unwrap_or(0)
            },
            |b| b.0,
        );
        let caps = Caps {
            device: weight_cap,
            host: config.residency.host_memory_cap.map_or(u64::MAX, |b| b.0),
        };
        let largest_prompt = models.iter().map(|m| m.per_prompt).max().unwrap_or(0);
        let capacity = activation_capacity(
            config.server.gpu_memory_budget.0,
            weight_cap,
            config.runtime_overhead.0 + scratch,
            largest_prompt,
        )?;
        let device_spec = config.server.device;
        let started = Instant::now();
        let engine = tokio::task::spawn_blocking(move || {
            Engine::spawn(&format!("encoder-{device_spec}"), move || {
                let device = device_spec.open()?;
                let mut registry = Registry::new("encoder", device, caps, sources)?;
                registry.preload()?;
                Ok::<_, EncoderError>(registry)
            })
        })
        .await
        .map_err(|e| EncoderError::Engine(EngineError::Panicked(e.to_string())))??;
        let (status, report) = engine
            .run(|r| {
                let report = r.get(r.default_id()).map(|e| e.report().clone());
                (r.status(), report.unwrap_or_default())
            })
            .await?;
        tracing::info!(elapsed = ?started.elapsed(), models = models.len(), "text encoders ready on the engine thread");

        let budget = MemoryBudget::new("encoder", capacity, config.server.max_queue_depth);
        let widest = models
            .iter()
            .map(|m| embedding_bytes(&m.cfg, dtype))
            .max()
            .unwrap_or(1);
        let max_embeddings = (MAX_MESSAGE_BYTES - RESPONSE_HEADROOM_BYTES) / widest as usize;
        if config.max_batch > max_embeddings {
            tracing::warn!(
                max_batch = config.max_batch,
                max_embeddings,
                "max_batch exceeds what one response can carry; requests are capped at max_embeddings"
            );
        }
        let quantization = if config.model_entries().iter().any(|m| m.gguf.is_some()) {
            "gguf".to_owned()
        } else {
            config.quantize.to_string()
        };
        let service = Self {
            engine,
            limits: RequestLimits {
                model_ids: models.iter().map(|m| m.id.to_string()).collect(),
                max_batch: config.max_batch.min(max_embeddings),
                max_prompt_bytes: config.max_prompt_bytes,
                max_embeddings,
            },
            models,
            status,
            cache: PromptCache::new(config.cache_bytes.0),
            budget,
            variant: format!("{}/{quantization}", config.server.dtype).into(),
            loaded: Loaded {
                dtype,
                report,
                device: device_spec.to_string(),
                quantization,
                budget_bytes: config.server.gpu_memory_budget.0,
            },
        };
        service.warm_up().await?;
        Ok(service)
    }

    async fn warm_up(&self) -> Result<(), EncoderError> {
        let started = Instant::now();
        let ids = self.models[0].tokenizer.encode("")?;
        self.engine
            .run(move |r| r.resident("")?.encode(&[ids]))
            .await??;
        tracing::info!(elapsed = ?started.elapsed(), "warm-up encode done");
        // The libraries are loaded now: what is free is what activations really have.
        let budget = self.budget.clone();
        self.engine
            .run(move |r| gpu_memory::fit_budget(&budget, r.device(), gpu_memory::FIT_MARGIN_BYTES))
            .await?;
        Ok(())
    }

    /// Request bounds, for validation.
    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    fn served(&self, id: &str) -> &Served {
        self.models
            .iter()
            .find(|m| &*m.id == id)
            .unwrap_or(&self.models[0])
    }

    fn key(&self, model: &Served, prompt: &str) -> CacheKey {
        CacheKey {
            model: model.id.clone(),
            variant: self.variant.clone(),
            prompt: prompt.to_owned(),
        }
    }

    /// Embeddings for a validated request.
    pub async fn encode(
        &self,
        req: ValidEncodeRequest,
    ) -> Result<pb::TextEncoderServiceEncodeResponse, EncoderError> {
        let model = self.served(&req.model);
        let mut found: HashMap<&str, (CachedEmbedding, bool)> = HashMap::new();
        let mut todo: Vec<(&str, PromptIds)> = Vec::new();
        for p in req.prompts.iter().chain(&req.negative_prompts) {
            if found.contains_key(p.as_str()) || todo.iter().any(|(q, _)| q == p) {
                continue;
            }
            match self.cache.get(&self.key(model, p)) {
                Some(hit) => {
                    found.insert(p, (hit, true));
                }
                None => todo.push((p, model.tokenizer.encode(p)?)),
            }
        }
        metrics::counter!("klein_encoder_prompts_total")
            .increment((req.prompts.len() + req.negative_prompts.len()) as u64);
        if !todo.is_empty() {
            for (p, e) in self.run_model(model, &todo).await? {
                self.cache.insert(self.key(model, p), e.clone());
                found.insert(p, (e, false));
            }
        }
        let assemble =
            |list: &[String]| -> Result<(Option<pb::Tensor>, Vec<pb::PromptTokens>), EncoderError> {
                if list.is_empty() {
                    return Ok((None, Vec::new()));
                }
                let tokens = list
                    .iter()
                    .map(|p| {
                        let (e, hit) = &found[p.as_str()];
                        pb::PromptTokens {
                            token_count: e.token_count,
                            truncated: e.truncated,
                            cache_hit: *hit,
                        }
                    })
                    .collect();
                // One prompt's embeddings go out as the bytes the cache holds, uncopied.
                let data = match list {
                    [p] => found[p.as_str()].0.data.clone(),
                    _ => {
                        let per = embedding_bytes(&model.cfg, self.loaded.dtype) as usize;
                        let mut data = BytesMut::with_capacity(per * list.len());
                        for p in list {
                            data.extend_from_slice(&found[p.as_str()].0.data);
                        }
                        data.freeze()
                    }
                };
                let tensor = pb::Tensor {
                    dtype: dtype_to_wire(self.loaded.dtype)? as i32,
                    shape: vec![
                        list.len() as u64,
                        SEQ_LEN as u64,
                        model.cfg.output_dim() as u64,
                    ],
                    data,
                };
                Ok((Some(tensor), tokens))
            };
        let (prompt_embeds, prompts) = assemble(&req.prompts)?;
        let (negative_prompt_embeds, negative_prompts) = assemble(&req.negative_prompts)?;
        Ok(pb::TextEncoderServiceEncodeResponse {
            prompt_embeds,
            negative_prompt_embeds,
            prompts,
            negative_prompts,
            model_id: model.id.to_string(),
        })
    }

    /// Runs the model on `todo` under a budget reservation; one cache value per prompt.
    async fn run_model<'p>(
        &self,
        model: &Served,
        todo: &[(&'p str, PromptIds)],
    ) -> Result<Vec<(&'p str, CachedEmbedding)>, EncoderError> {
        let estimate = model.per_prompt * todo.len() as u64;
        let id = model.id.clone();
        let reservation = self.budget.reserve(estimate).await?;
        let ids: Vec<PromptIds> = todo.iter().map(|(_, ids)| ids.clone()).collect();
        let started = Instant::now();
        // The reservation moves into the job: it is held until the model work is done, even
        // if this request is cancelled while the job waits or runs.
        let out = self
            .engine
            .run(move |r| {
                let _held = reservation;
                r.resident(&id)?.encode(&ids)
            })
            .await??;
        metrics::histogram!("klein_encoder_encode_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("klein_encoder_encoded_prompts_total").increment(todo.len() as u64);
        let data = klein_proto::tensor::encode(&out)?.data;
        let per = data.len() / todo.len();
        Ok(todo
            .iter()
            .enumerate()
            .map(|(i, (p, ids))| {
                // A batch's prompts are copied apart, so that each cache entry holds (and is
                // counted for) its own bytes only; a lone prompt keeps the encoded bytes.
                let data = if todo.len() == 1 {
                    data.clone()
                } else {
                    Bytes::copy_from_slice(&data[i * per..(i + 1) * per])
                };
                let value = CachedEmbedding {
                    data,
                    token_count: ids.ids.len() as u32,
                    truncated: ids.truncated,
                };
                (*p, value)
            })
            .collect())
    }

    /// The service description for the Info RPC.
    pub fn info(&self) -> pb::ServiceInfo {
        let budget = self.budget.snapshot();
        let cache = self.cache.stats();
        let status = self.status.models();
        let cfg = &self.models[0].cfg;
        let mut details: HashMap<String, String> = [
            ("hidden_size", cfg.hidden_size.to_string()),
            ("num_hidden_layers", cfg.num_hidden_layers.to_string()),
            ("layers_run", qwen3::LAYERS_RUN.to_string()),
            (
                "hidden_state_layers",
                qwen3::HIDDEN_STATE_LAYERS.map(|k| k.to_string()).join(","),
            ),
            ("vocab_size", cfg.vocab_size.to_string()),
            ("sequence_length", SEQ_LEN.to_string()),
            ("output_dim", cfg.output_dim().to_string()),
            ("max_prompt_bytes", self.limits.max_prompt_bytes.to_string()),
            (
                "max_embeddings_per_response",
                self.limits.max_embeddings.to_string(),
            ),
            ("weight_formats", self.loaded.report.summary()),
            ("cache_capacity_bytes", cache.capacity.to_string()),
            ("cache_bytes", cache.bytes.to_string()),
            ("cache_entries", cache.entries.to_string()),
            ("cache_hits", cache.hits.to_string()),
            ("cache_misses", cache.misses.to_string()),
            ("cache_evictions", cache.evictions.to_string()),
            ("activation_capacity_bytes", budget.capacity.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (format, (_, bytes)) in self.loaded.report.by_format() {
            details.insert(format!("weight_bytes.{format}"), bytes.to_string());
        }
        pb::ServiceInfo {
            service: "encoder".into(),
            model_id: self.models[0].id.to_string(),
            dtype: dtype_to_wire(self.loaded.dtype).map_or(0, |d| d as i32),
            device: self.loaded.device.clone(),
            quantization: self.loaded.quantization.clone(),
            memory_budget_bytes: self.loaded.budget_bytes,
            weight_bytes: self.loaded.report.total_bytes(),
            reserved_bytes: budget.reserved,
            queue_depth: budget.queued as u32,
            max_queue_depth: budget.max_queue as u32,
            max_batch: self.limits.max_batch as u32,
            max_image_side: 0,
            max_image_pixels: 0,
            details,
            models: self
                .models
                .iter()
                .map(|m| {
                    let mut info = m.info.clone();
                    if let Some(s) = status.iter().find(|s| *s.id == *m.id) {
                        s.fill(&mut info);
                    }
                    info
                })
                .collect(),
        }
    }
}
