//! `klein-bench`: component timings with random weights of the real klein-4B configs
//! (`components`), and writers of a random-weight diffusers pipeline (`write-pipeline`) and of
//! a random LoRA for it (`write-lora`) for timing the real services end to end.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod components;
mod kernels;
mod lora;
mod model;
mod pipeline;
mod random;
mod step;

use std::{path::PathBuf, process::ExitCode};

use candle_core::DType;
use clap::{Parser, Subcommand};
use denoiser_svc::config::Quantize;
use klein_runtime::{
    bytesize::ByteSize,
    device::{DTypeSpec, DeviceSpec},
};
use vae_svc::config::{ConvAlgorithm, ConvPrecision};

#[derive(Debug, Parser)]
#[command(name = "klein-bench")]
struct Args {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", global = true)]
    device: DeviceSpec,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time the text encoder, transformer and VAE; prints a markdown table and JSON.
    Components(Box<ComponentsArgs>),
    /// Time each fused kernel against the composition it replaces (klein-4B shapes, bf16).
    Kernels {
        /// Timed iterations per case.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// The card's device-to-device copy rate, GB/s (the elementwise floors).
        #[arg(long, default_value_t = 2956.0)]
        copy_gbps: f64,
        /// The card's dense bf16 matmul rate, TFLOP/s (the attention floor).
        #[arg(long, default_value_t = 766.0)]
        matmul_tflops: f64,
        /// Time only the kernels whose name contains this (e.g. `flash_attention`).
        #[arg(long)]
        only: Option<String>,
        /// Also time the 1024² step's attention (4608 queries) against these numbers of keys:
        /// the same work items with fewer or more key tiles each, whose times give a key
        /// tile's cost (the slope) and an item's and the launch's (the intercept).
        #[arg(long, value_delimiter = ',')]
        attention_keys: Vec<usize>,
        /// Write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Where a 1024² klein-4B transformer step goes: each GEMM, attention and kernel of a step at
    /// its real shape, times its count per step.
    Step {
        /// Timed iterations per part.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write a diffusers pipeline folder with random weights of the real klein-4B or klein-9B shapes.
    WritePipeline {
        /// Output folder.
        out: PathBuf,
        /// Tiny pipeline to take the tokenizer, scheduler and model_index.json from.
        #[arg(long, default_value = "tests/fixtures/tiny-klein-4b")]
        template: PathBuf,
        /// Whose shapes to write.
        #[arg(long, value_enum, default_value = "klein-4b")]
        model: model::Model,
    },
    /// Write a random bf16 LoRA (diffusers' layout) over every block projection of a pipeline's
    /// transformer, for timing the load-time merge.
    WriteLora {
        /// Output file.
        out: PathBuf,
        /// Diffusers pipeline folder whose transformer it adapts.
        #[arg(long)]
        pipeline: PathBuf,
        /// The adapter's rank.
        #[arg(long, default_value_t = 32)]
        rank: usize,
    },
}

/// `components`' flags.
#[derive(Debug, clap::Args)]
struct ComponentsArgs {
    /// Timed iterations per case.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Image sides to time, pixels.
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    sizes: Vec<usize>,
    /// Transformer batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    batches: Vec<usize>,
    /// What the transformer's freed memory does between steps; each listed one is timed:
    /// `keep` stays in the pool (denoiser-svc while runs are active), `release` goes back
    /// to the driver after every step (the pool's default).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "keep")]
    denoiser_pool: Vec<components::Pool>,
    /// Components to time: text_encoder, transformer, vae (or only its decode or encode:
    /// vae_decode, vae_encode); vae_tiled (not by default): the f32 decode in bands of
    /// `--vae-tile-rows` (or as planned for `--vae-capacity-bytes`), its statistics
    /// passes in one TF32 pass (as vae-svc) and in the model's arithmetic.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "text_encoder,transformer,vae"
    )]
    only: Vec<String>,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cuDNN algorithm of the VAE convolutions (as vae-svc's --conv-algorithm).
    #[arg(long, value_enum, default_value = "implicit-precomp-gemm")]
    vae_conv_algorithm: ConvAlgorithm,
    /// Arithmetic of the VAE's f32 convolutions (as vae-svc's --conv-precision); each
    /// listed one is timed.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "split-tf32")]
    vae_conv_precision: Vec<ConvPrecision>,
    /// VAE dtypes to time.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    vae_dtypes: Vec<DTypeSpec>,
    /// The VAE's working-set bound per operation (as vae-svc's --op-chunk-bytes): a
    /// convolution or norm whose temporaries would exceed it runs in bands.
    #[arg(long, default_value = "128MiB")]
    vae_op_bytes: ByteSize,
    /// Token rows of vae_tiled's bands (the 16 GB plan's 1024² decode: 27, with
    /// `--vae-op-bytes 256MiB --vae-global-blocks 3`; before the global blocks, 28 with
    /// `--vae-op-bytes 512MiB`).
    #[arg(long, default_value_t = 28)]
    vae_tile_rows: usize,
    /// Up blocks vae_tiled runs on the whole image before the bands (the 16 GB plan's
    /// 1024² decode: 3, with `--vae-tile-rows 27 --vae-op-bytes 256MiB`); each listed
    /// count is timed.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    vae_global_blocks: Vec<usize>,
    /// Instead of bands: vae_tiled decodes as vae-svc plans it for this many bytes of
    /// activations (the 16 GB plan's VAE: 1811000000).
    #[arg(long)]
    vae_capacity_bytes: Option<u64>,
    /// Whose text encoder and transformer to time.
    #[arg(long, value_enum, default_value = "klein-4b")]
    model: model::Model,
    /// Load-time quantization of the transformer's block projections (as denoiser-svc's
    /// --quantize); each listed one is timed: none, q4k, q4_0, q4_1, q6k, q8_0.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    transformer_quantize: Vec<Quantize>,
    /// Reference images of the transformer step, each of the step's size (multi-reference
    /// editing); each listed count is timed.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    references: Vec<usize>,
    /// Whether the transformer's steps replay CUDA graphs (as denoiser-svc's --cuda-graphs);
    /// each listed one is timed, its case marked "CUDA graph" when one was captured.
    #[arg(long, value_delimiter = ',', default_value = "true")]
    transformer_graphs: Vec<bool>,
    /// Rank of a random LoRA adapter over every block projection, applied per request
    /// (unmerged, as denoiser-svc's `--adapter`; its steps eager); 0: none. Each listed one is
    /// timed.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    lora_ranks: Vec<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dev = match args.device.open() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("klein-bench: {e}");
            return ExitCode::from(64);
        }
    };
    let result = match args.command {
        Command::WritePipeline {
            out,
            template,
            model,
        } => pipeline::write(&out, &template, model, &dev),
        Command::WriteLora {
            out,
            pipeline,
            rank,
        } => lora::write(&out, &pipeline, rank),
        Command::Kernels {
            iters,
            copy_gbps,
            matmul_tflops,
            only,
            attention_keys,
            json,
        } => (|| {
            let rates = kernels::Rates {
                copy_gbps,
                matmul_tflops,
            };
            let rows = kernels::run(&dev, iters, rates, only.as_deref(), &attention_keys)?;
            println!(
                "| kernel | case | fused ms | composition ms | speed-up | floor ms ({copy_gbps} GB/s, {matmul_tflops} TFLOP/s) | fused / floor |\n|---|---|---|---|---|---|---|"
            );
            for r in &rows {
                println!(
                    "| {} | {} | {:.3} | {:.3} | {:.1}× | {:.3} ({}) | {:.2} |",
                    r.kernel,
                    r.case,
                    r.fused_ms,
                    r.reference_ms,
                    r.reference_ms / r.fused_ms,
                    r.floor_ms,
                    r.bound,
                    r.fused_ms / r.floor_ms
                );
            }
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&rows).expect("json"))?;
            }
            Ok(())
        })(),
        Command::Step { iters, json } => (|| {
            // Each GEMM shape is tuned at its first call, as denoiser-svc's warm-up tunes.
            let (rows, tuned) =
                klein_kernels::tune_linear(&Default::default(), || step::run(&dev, iters))?;
            for t in tuned {
                eprintln!("GEMM tuned: {t}");
            }
            println!(
                "| part | kind | per step | ms each | TFLOP/s | ms per step |\n|---|---|---|---|---|---|"
            );
            for r in &rows {
                let tflops = r.tflops.map_or("–".to_owned(), |t| format!("{t:.0}"));
                println!(
                    "| {} | {} | {} | {:.3} | {tflops} | {:.2} |",
                    r.part,
                    r.kind,
                    r.count,
                    r.ms,
                    r.step_ms()
                );
            }
            for kind in ["gemm", "attention", "kernel"] {
                let ms: f64 = rows
                    .iter()
                    .filter(|r| r.kind == kind)
                    .map(|r| r.step_ms())
                    .sum();
                println!("{kind}: {ms:.1} ms per step");
            }
            let total: f64 = rows.iter().map(step::PartRow::step_ms).sum();
            println!("sum of the parts: {total:.1} ms per step");
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&rows).expect("json"))?;
            }
            Ok(())
        })(),
        Command::Components(args) => (|| {
            let ComponentsArgs {
                iters,
                sizes,
                batches,
                denoiser_pool,
                only,
                json,
                vae_conv_algorithm,
                vae_conv_precision,
                vae_dtypes,
                vae_op_bytes,
                vae_tile_rows,
                vae_global_blocks,
                vae_capacity_bytes,
                model,
                transformer_quantize,
                references,
                transformer_graphs,
                lora_ranks,
            } = *args;
            let wanted = |c: &str| only.iter().any(|o| o == c);
            let vae_chunking = |precision: ConvPrecision| vae_svc::model::Chunking {
                conv_algo: vae_conv_algorithm.cudnn(),
                op_bytes: vae_op_bytes.0,
                conv_precision: precision.kernel(),
                ..vae_svc::model::Chunking::default()
            };
            let float = if dev.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            };
            let mut rows = Vec::new();
            let mut emit = |r: components::Row| {
                let gib = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}"));
                println!(
                    "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} |",
                    r.component,
                    r.case,
                    r.dtype,
                    r.median_ms,
                    r.min_ms,
                    r.host_ms,
                    gib(r.resident_gib),
                    gib(r.activation_gib),
                    r.estimate_gib
                );
                rows.push(r);
            };
            println!(
                "| component | case | dtype | median ms | min ms | host ms | resident GiB | activation peak GiB | estimate GiB |\n|---|---|---|---|---|---|---|---|---|"
            );
            if wanted("text_encoder") {
                emit(components::encoder(&dev, model, float, false, iters)?);
                emit(components::encoder(&dev, model, float, true, iters)?);
            }
            for &quantize in transformer_quantize
                .iter()
                .filter(|_| wanted("transformer"))
            {
                for &px in &sizes {
                    for &b in &batches {
                        for (&pool, &refs) in denoiser_pool
                            .iter()
                            .flat_map(|p| references.iter().map(move |r| (p, r)))
                        {
                            for (&graphs, &rank) in transformer_graphs
                                .iter()
                                .flat_map(|g| lora_ranks.iter().map(move |r| (g, r)))
                            {
                                emit(components::transformer(
                                    &dev,
                                    (model, quantize, rank),
                                    float,
                                    (px, b, refs),
                                    iters,
                                    (pool, graphs),
                                )?);
                            }
                        }
                    }
                }
            }
            let (decode, encode) = (
                wanted("vae") || wanted("vae_decode"),
                wanted("vae") || wanted("vae_encode"),
            );
            for &px in sizes.iter().filter(|_| decode || encode) {
                for &dtype in &vae_dtypes {
                    for &precision in &vae_conv_precision {
                        let chunking = vae_chunking(precision);
                        let dtype = DType::from(dtype);
                        if decode {
                            emit(components::vae(&dev, dtype, px, true, iters, chunking)?);
                        }
                        if encode {
                            emit(components::vae(&dev, dtype, px, false, iters, chunking)?);
                        }
                    }
                }
            }
            for &px in sizes.iter().filter(|_| wanted("vae_tiled")) {
                for &precision in &vae_conv_precision {
                    let chunking = vae_chunking(precision);
                    let tiles: Vec<components::Tiles> = match vae_capacity_bytes {
                        Some(capacity) => vec![components::Tiles::Planned { capacity }],
                        None => vae_global_blocks
                            .iter()
                            .map(|&global_blocks| components::Tiles::Bands {
                                rows: vae_tile_rows,
                                global_blocks,
                            })
                            .collect(),
                    };
                    for &tiles in &tiles {
                        for tf32_statistics in [true, false] {
                            emit(components::vae_tiled(
                                &dev,
                                px,
                                tiles,
                                tf32_statistics,
                                iters,
                                chunking,
                            )?);
                        }
                    }
                }
            }
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&rows).expect("json"))?;
            }
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("klein-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
