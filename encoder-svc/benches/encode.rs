//! Qwen3-4B text encoder with the real configuration and random weights on the CPU.
//!
//! `cargo bench -p encoder-svc --bench encode [-- cuda:0]` (CPU by default, needs ~10 GB of
//! RAM; a CUDA build takes a device argument and times 1 warm-up + 5 encodes). Prints markdown
//! tables:
//! 1. bf16 vs 4-bit (`--quantize q4k`: q4k projections, q8_0 embedding): weight bytes,
//!    load/quantize time, one 512-token encode, the 4-bit output's rel-L2 against bf16, and the
//!    activation estimate next to the growth of resident memory during the first encode (CPU
//!    only; it includes candle's repacked copy of q4k weights, made on first use, and misses
//!    whatever malloc reuses from earlier frees);
//! 2. every quantization format on two real-width projections of layer 0 (gate_proj, 2560
//!    wide, and down_proj, 9728 wide) against an f32 matmul on the host: bits per weight and
//!    rel-L2.
//!
//! Timing does not depend on weight values; the values matter only for the accuracy columns.

use std::{collections::HashMap, time::Instant};

use candle_core::{
    DType, Device, Module, Result, Tensor,
    quantized::{QMatMul, QTensor},
};
use candle_nn::VarBuilder;
use encoder_svc::{
    budget::{activation_bytes, dequantize_reserve_bytes, host_quant_scratch_bytes},
    config::Quantize,
    model::{
        quant::QuantFormat,
        qwen3::{Config, LAYERS_RUN, TextEncoder},
        weights::{QuantPlan, Weights},
    },
    prompt::SEQ_LEN,
};
use klein_runtime::device::DeviceSpec;
use klein_test_support::rel_l2;

/// A line of `/proc/self/status` (`VmHWM`, `VmRSS`), MiB.
fn proc_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Random bf16 weights on `dev` for the embedding and the 27 layers the encoder runs;
/// projections are N(0, 1/in) like a trained model's scale, norm gains N(1, 0.1).
fn random_weights(cfg: &Config, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let (d, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut w = HashMap::new();
    let mut put = |key: String, shape: (usize, usize), std: f64| -> Result<()> {
        let t = Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(DType::BF16)?;
        w.insert(key, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), (cfg.vocab_size, d), 1.0)?;
    for l in 0..LAYERS_RUN {
        let p = format!("model.layers.{l}");
        let proj = [
            ("self_attn.q_proj", h * hd, d),
            ("self_attn.k_proj", kv * hd, d),
            ("self_attn.v_proj", kv * hd, d),
            ("self_attn.o_proj", d, h * hd),
            ("mlp.gate_proj", i, d),
            ("mlp.up_proj", i, d),
            ("mlp.down_proj", d, i),
        ];
        for (name, out, inp) in proj {
            put(
                format!("{p}.{name}.weight"),
                (out, inp),
                (inp as f64).powf(-0.5),
            )?;
        }
    }
    for l in 0..LAYERS_RUN {
        let p = format!("model.layers.{l}");
        for (name, size) in [
            ("input_layernorm", d),
            ("post_attention_layernorm", d),
            ("self_attn.q_norm", hd),
            ("self_attn.k_norm", hd),
        ] {
            let t = (Tensor::randn(0f32, 0.1, size, dev)? + 1.0)?.to_dtype(DType::BF16)?;
            w.insert(format!("{p}.{name}.weight"), t);
        }
    }
    Ok(w)
}

struct Run {
    output: Tensor,
    row: String,
}

fn run(
    name: &str,
    cfg: &Config,
    weights: &HashMap<String, Tensor>,
    quantize: Quantize,
    dev: &Device,
) -> Result<Run> {
    let dtype = DType::BF16;
    let started = Instant::now();
    let vb = VarBuilder::from_tensors(weights.clone(), dtype, dev);
    let source = Weights::safetensors(vb, QuantPlan::of(quantize));
    let model = TextEncoder::new(cfg, source.clone())?;
    dev.synchronize()?;
    let load = started.elapsed().as_secs_f64();
    let report = source.report();
    let ids: Vec<u32> = (0..SEQ_LEN as u32)
        .map(|i| (i * 7919 + 13) % 150_000)
        .collect();
    let ids = Tensor::from_vec(ids, (1, SEQ_LEN), dev)?;
    let mask = Tensor::ones((1, SEQ_LEN), DType::U32, dev)?;
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = proc_mib("VmRSS:");
    let mut output = model.forward(&ids, &mask)?;
    dev.synchronize()?;
    let grew = proc_mib("VmHWM:") - rss_before;
    let iters = if dev.is_cpu() { 1 } else { 5 };
    let started = Instant::now();
    for _ in 0..iters {
        output = model.forward(&ids, &mask)?;
    }
    dev.synchronize()?;
    let ms = started.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let scratch = match (QuantPlan::of(quantize).is_some(), dev.is_cpu()) {
        (false, _) => 0,
        (true, true) => host_quant_scratch_bytes(cfg, SEQ_LEN),
        (true, false) => dequantize_reserve_bytes(cfg, dtype, SEQ_LEN),
    };
    let estimate = (activation_bytes(cfg, dtype, 1, SEQ_LEN) + scratch) as f64 / (1 << 20) as f64;
    let growth = if dev.is_cpu() {
        format!("{:.0} MiB", grew.max(0.0))
    } else {
        "n/a (device)".into()
    };
    let row = format!(
        "| {name} | {:.3} GB ({}) | {load:.1} s | {ms:.1} ms | {estimate:.0} MiB / {growth} |",
        report.total_bytes() as f64 / 1e9,
        report.summary(),
    );
    Ok(Run { output, row })
}

fn formats_table(weights: &HashMap<String, Tensor>) -> Result<()> {
    println!();
    println!("| projection | format | bits/weight | rel-L2 vs f32 matmul |");
    println!("|---|---|---|---|");
    for name in ["mlp.gate_proj", "mlp.down_proj"] {
        let w = weights[&format!("model.layers.0.{name}.weight")]
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let (n, k) = w.dims2()?;
        let x = Tensor::randn(0f32, 1.0, (SEQ_LEN, k), &Device::Cpu)?;
        let exact = x.matmul(&w.t()?)?;
        for f in QuantFormat::ALL {
            let q = QTensor::quantize(&w, f.ggml())?;
            let bits = q.storage_size_in_bytes() as f64 * 8.0 / (n * k) as f64;
            let y = QMatMul::from_qtensor(q)?.forward(&x)?;
            let err = rel_l2(&y, &exact);
            println!("| {name} ({n}x{k}) | {f} | {bits:.2} | {err:.4} |");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let spec: DeviceSpec = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map_or(Ok(DeviceSpec::Cpu), |a| a.parse())
        .map_err(candle_core::Error::wrap)?;
    let dev = spec.open().map_err(candle_core::Error::wrap)?;
    let cfg = Config::qwen3_4b();
    let started = Instant::now();
    let weights = random_weights(&cfg, &dev)?;
    println!(
        "Qwen3-4B ({LAYERS_RUN} of {} layers), random bf16 weights built in {:.1} s; {spec}, {} host threads",
        cfg.num_hidden_layers,
        started.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    println!();
    println!(
        "| weights | bytes (per format) | load | encode 512 tokens | activations estimate / RSS growth in first encode |"
    );
    println!("|---|---|---|---|---|");
    let q4 = run(
        "4-bit (q4k)",
        &cfg,
        &weights,
        Quantize::Format(QuantFormat::Q4K),
        &dev,
    )?;
    println!("{}", q4.row);
    let dense = run("bf16", &cfg, &weights, Quantize::None, &dev)?;
    println!("{}", dense.row);
    println!();
    println!(
        "4-bit vs bf16 output rel-L2 (random weights): {:.4}; peak RSS {:.0} MiB",
        rel_l2(&q4.output, &dense.output),
        proc_mib("VmHWM:")
    );
    formats_table(&weights)
}
