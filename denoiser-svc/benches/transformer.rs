//! Transformer forward and whole-run timings with the real klein-4B configuration and
//! placeholder (zero) weights — timing does not depend on weight values.
//!
//! `cargo bench -p denoiser-svc --bench transformer` (bf16 on the CPU; add `-- f32` for f32,
//! which needs ~16 GB of RAM for the weights). Prints a markdown table.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use denoiser_svc::{
    model::{Config, Flux2Transformer2DModel, grid_ids, text_ids},
    sampler::{self, Grid, Mode, Request, Shift},
};

/// Peak resident memory of this process, MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> candle_core::Result<()> {
    let dtype = if std::env::args().any(|a| a == "f32") {
        DType::F32
    } else {
        DType::BF16
    };
    let dev = Device::Cpu;
    let cfg = Config::klein_4b();
    let started = Instant::now();
    let model = Flux2Transformer2DModel::new(&cfg, VarBuilder::zeros(dtype, &dev))?;
    let build = started.elapsed().as_secs_f64();
    println!(
        "klein-4B ({} params), {dtype:?}, CPU ({} threads), built in {build:.1} s",
        cfg.param_count(),
        candle_core::utils::get_num_threads()
    );
    println!();
    println!("| case | tokens (text+image) | time | peak RSS |");
    println!("|---|---|---|---|");
    for side in [8usize, 16] {
        let n = side * side;
        let x = Tensor::zeros((1, n, 128), dtype, &dev)?;
        let ctx = Tensor::zeros((1, 512, cfg.joint_attention_dim), dtype, &dev)?;
        let mut ids = text_ids(512);
        ids.extend(grid_ids(0, side, side));
        let rope = model.rope(&ids, &dev)?;
        model.forward(&x, &ctx, &[1000.0], &rope)?;
        let t = Instant::now();
        model.forward(&x, &ctx, &[968.0], &rope)?;
        let secs = t.elapsed().as_secs_f64();
        let px = side * 16;
        let rss = peak_rss_mib().map_or("n/a".into(), |m| format!("{m:.0} MiB"));
        println!("| one forward, {px}x{px} | 512+{n} | {secs:.2} s | {rss} |");
    }
    let side = 8;
    let req = Request {
        prompt_embeds: Tensor::zeros((1, 512, cfg.joint_attention_dim), dtype, &dev)?,
        guidance: None,
        noise: Tensor::zeros((1, side * side, 128), dtype, &dev)?,
        grid: Grid {
            height: side,
            width: side,
        },
        references: vec![],
        mode: Mode::TextToImage,
        num_steps: 4,
        shift: Shift::Empirical,
    };
    let t = Instant::now();
    sampler::sample(&model, req, |_, _| {})?;
    let secs = t.elapsed().as_secs_f64();
    let rss = peak_rss_mib().map_or("n/a".into(), |m| format!("{m:.0} MiB"));
    println!("| T2I 4 steps, 128x128 | 512+64 | {secs:.2} s | {rss} |");
    Ok(())
}
