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
};

use crate::{
    budget::{
        activation_bytes, activation_capacity, dequantize_reserve_bytes, host_quant_scratch_bytes,
    },
    cache::{CacheKey, CachedEmbedding, PromptCache},
    config::Config,
    engine::{Encoder, ModelSpec, embedding_bytes},
    error::EncoderError,
    model::{qwen3, weights::WeightReport},
    prompt::{PromptIds, PromptTokenizer, SEQ_LEN},
    request::{RequestLimits, ValidEncodeRequest},
};

/// Room kept in every response for everything but the embedding bytes.
const RESPONSE_HEADROOM_BYTES: usize = 1 << 20;

/// What was loaded, fixed for the life of the service.
struct Loaded {
    cfg: qwen3::Config,
    dtype: DType,
    report: WeightReport,
    device: String,
    quantization: String,
    budget_bytes: u64,
    /// What one prompt reserves from the budget.
    per_prompt: u64,
}

/// The running encoder: model engine, tokenizer, cache and budget.
pub struct EncoderService {
    engine: Engine<Encoder>,
    tokenizer: Arc<PromptTokenizer>,
    cache: PromptCache,
    budget: MemoryBudget,
    model: Arc<str>,
    variant: Arc<str>,
    limits: RequestLimits,
    loaded: Loaded,
}

impl EncoderService {
    /// Loads the tokenizer and the model (on the engine thread), sizes the budget, and warms
    /// the model up with one encode.
    pub async fn start(config: &Config) -> Result<Self, EncoderError> {
        config.validate()?;
        let model_dir = config.model_dir.clone().unwrap_or_default();
        let tokenizer = Arc::new(PromptTokenizer::from_file(
            &model_dir.join("tokenizer").join("tokenizer.json"),
        )?);
        let spec = ModelSpec {
            model_dir,
            gguf: config.gguf.clone(),
            dtype: config.server.dtype.into(),
            quantize: config.quantize.plan(),
        };
        let device_spec = config.server.device;
        let pad_id = tokenizer.pad_id();
        let started = Instant::now();
        let engine = tokio::task::spawn_blocking(move || {
            Engine::spawn(&format!("encoder-{device_spec}"), move || {
                let device = device_spec.open()?;
                Encoder::load(&spec, pad_id, &device)
            })
        })
        .await
        .map_err(|e| EncoderError::Engine(EngineError::Panicked(e.to_string())))??;
        let (cfg, dtype, report) = engine
            .run(|e| {
                (
                    e.model().config().clone(),
                    e.model().dtype(),
                    e.report().clone(),
                )
            })
            .await?;
        tracing::info!(elapsed = ?started.elapsed(), "text encoder ready on the engine thread");

        let quantized = report.has_quantized();
        let on_cuda = config.server.device != DeviceSpec::Cpu;
        let per_prompt = activation_bytes(&cfg, dtype, 1, SEQ_LEN)
            + if quantized && !on_cuda {
                host_quant_scratch_bytes(&cfg, SEQ_LEN)
            } else {
                0
            };
        let scratch = if quantized && on_cuda {
            dequantize_reserve_bytes(&cfg, dtype, SEQ_LEN)
        } else {
            0
        };
        let capacity = activation_capacity(
            config.server.gpu_memory_budget.0,
            report.total_bytes(),
            config.runtime_overhead.0 + scratch,
            per_prompt,
        )?;
        let budget = MemoryBudget::new("encoder", capacity, config.server.max_queue_depth);
        let max_embeddings =
            (MAX_MESSAGE_BYTES - RESPONSE_HEADROOM_BYTES) / embedding_bytes(&cfg, dtype) as usize;
        if config.max_batch > max_embeddings {
            tracing::warn!(
                max_batch = config.max_batch,
                max_embeddings,
                "max_batch exceeds what one response can carry; requests are capped at max_embeddings"
            );
        }
        let quantization = match &config.gguf {
            Some(_) => "gguf".to_owned(),
            None => config.quantize.to_string(),
        };
        let service = Self {
            engine,
            tokenizer,
            cache: PromptCache::new(config.cache_bytes.0),
            budget,
            model: config.model_id().into(),
            variant: format!("{}/{quantization}", config.server.dtype).into(),
            limits: RequestLimits {
                model_id: config.model_id(),
                max_batch: config.max_batch.min(max_embeddings),
                max_prompt_bytes: config.max_prompt_bytes,
                max_embeddings,
            },
            loaded: Loaded {
                cfg,
                dtype,
                report,
                device: device_spec.to_string(),
                quantization,
                budget_bytes: config.server.gpu_memory_budget.0,
                per_prompt,
            },
        };
        service.warm_up().await?;
        Ok(service)
    }

    async fn warm_up(&self) -> Result<(), EncoderError> {
        let started = Instant::now();
        let ids = self.tokenizer.encode("")?;
        self.engine.run(move |e| e.encode(&[ids])).await??;
        tracing::info!(elapsed = ?started.elapsed(), "warm-up encode done");
        // The libraries are loaded now: what is free is what activations really have.
        let budget = self.budget.clone();
        self.engine
            .run(move |e| {
                gpu_memory::fit_budget(&budget, e.model().device(), gpu_memory::FIT_MARGIN_BYTES)
            })
            .await?;
        Ok(())
    }

    /// Request bounds, for validation.
    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    fn key(&self, prompt: &str) -> CacheKey {
        CacheKey {
            model: self.model.clone(),
            variant: self.variant.clone(),
            prompt: prompt.to_owned(),
        }
    }

    /// Embeddings for a validated request.
    pub async fn encode(
        &self,
        req: ValidEncodeRequest,
    ) -> Result<pb::TextEncoderServiceEncodeResponse, EncoderError> {
        let mut found: HashMap<&str, (CachedEmbedding, bool)> = HashMap::new();
        let mut todo: Vec<(&str, PromptIds)> = Vec::new();
        for p in req.prompts.iter().chain(&req.negative_prompts) {
            if found.contains_key(p.as_str()) || todo.iter().any(|(q, _)| q == p) {
                continue;
            }
            match self.cache.get(&self.key(p)) {
                Some(hit) => {
                    found.insert(p, (hit, true));
                }
                None => todo.push((p, self.tokenizer.encode(p)?)),
            }
        }
        metrics::counter!("klein_encoder_prompts_total")
            .increment((req.prompts.len() + req.negative_prompts.len()) as u64);
        if !todo.is_empty() {
            for (p, e) in self.run_model(&todo).await? {
                self.cache.insert(self.key(p), e.clone());
                found.insert(p, (e, false));
            }
        }
        let assemble =
            |list: &[String]| -> Result<(Option<pb::Tensor>, Vec<pb::PromptTokens>), EncoderError> {
                if list.is_empty() {
                    return Ok((None, Vec::new()));
                }
                let per = embedding_bytes(&self.loaded.cfg, self.loaded.dtype) as usize;
                let mut data = BytesMut::with_capacity(per * list.len());
                let mut tokens = Vec::with_capacity(list.len());
                for p in list {
                    let (e, hit) = &found[p.as_str()];
                    data.extend_from_slice(&e.data);
                    tokens.push(pb::PromptTokens {
                        token_count: e.token_count,
                        truncated: e.truncated,
                        cache_hit: *hit,
                    });
                }
                let tensor = pb::Tensor {
                    dtype: dtype_to_wire(self.loaded.dtype)? as i32,
                    shape: vec![
                        list.len() as u64,
                        SEQ_LEN as u64,
                        self.loaded.cfg.output_dim() as u64,
                    ],
                    data: data.freeze(),
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
            model_id: self.model.to_string(),
        })
    }

    /// Runs the model on `todo` under a budget reservation; one cache value per prompt.
    async fn run_model<'p>(
        &self,
        todo: &[(&'p str, PromptIds)],
    ) -> Result<Vec<(&'p str, CachedEmbedding)>, EncoderError> {
        let estimate = self.loaded.per_prompt * todo.len() as u64;
        let reservation = self.budget.reserve(estimate).await?;
        let ids: Vec<PromptIds> = todo.iter().map(|(_, ids)| ids.clone()).collect();
        let started = Instant::now();
        // The reservation moves into the job: it is held until the model work is done, even
        // if this request is cancelled while the job waits or runs.
        let out = self
            .engine
            .run(move |e| {
                let _held = reservation;
                e.encode(&ids)
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
                let value = CachedEmbedding {
                    data: Bytes::copy_from_slice(&data[i * per..(i + 1) * per]),
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
        let cfg = &self.loaded.cfg;
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
            model_id: self.model.to_string(),
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
        }
    }
}
