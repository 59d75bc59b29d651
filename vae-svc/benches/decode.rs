//! Decode benchmark with the released VAE configuration (84 M parameters) and random weights
//! (timing does not depend on weight values): wall time and peak memory per case, next to the
//! service's activation estimate.
//!
//! `cargo bench -p vae-svc --bench decode` (all cases), `... -- 512` (cases whose name
//! contains 512), `... -- --device cuda:0` (with `--features cuda`). Peak memory on the CPU is
//! the resident-set high-water mark above the resident set before the case (Linux
//! `/proc/self/status` VmHWM, reset through `/proc/self/clear_refs`), so it covers
//! activations, not the weights; on CUDA it is not measured here (sample `nvidia-smi`).

use std::{fs, time::Instant};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use klein_runtime::device::DeviceSpec;
use vae_svc::{
    image,
    memory::MemoryModel,
    model::{AutoencoderKLFlux2, Config},
};

/// Random weights: 1/sqrt(fan_in)-scaled normals for convolutions and projections, unit norm
/// gains and BatchNorm variances, zero biases and means.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(0f32, (1.0 / (fan_in as f64).sqrt()) as f32, s, dev)?
        } else if name.ends_with("running_var") || name.ends_with("weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            Tensor::zeros(s, DType::F32, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: shape needed")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn status_kib(key: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1));
    let spec: DeviceSpec = device
        .map_or(Ok(DeviceSpec::Cpu), |d| d.parse())
        .expect("--device cpu | cuda:N");
    let filter = args
        .iter()
        .find(|a| !a.starts_with('-') && Some(*a) != device)
        .cloned()
        .unwrap_or_default();
    let cfg = Config::default();
    let dev = spec.open().expect("device opens");
    let dtype = DType::F32;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone());
    let model = AutoencoderKLFlux2::new(&cfg, vb).expect("model builds");
    let memory = MemoryModel::new(&cfg, dtype);
    let decode = |grid: (usize, usize)| -> Vec<u8> {
        let latents = Tensor::randn(0f32, 1.0, (1, grid.0 * grid.1, 128), &dev).unwrap();
        let z = model.unpack_latents(&latents, grid).unwrap();
        image::to_u8(&model.decode(&z).unwrap()).unwrap()
    };
    // Loads the kernels (CUDA) and warms the allocator.
    decode((4, 4));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "AutoencoderKLFlux2, class-default config, random weights, f32, {spec} ({threads} CPU threads)\n"
    );
    println!("| case | time (s) | peak RSS above start (MiB) | estimate (MiB) |");
    println!("|---|---|---|---|");
    for side in [512usize, 1024] {
        let name = format!("decode {side}x{side}");
        if !name.contains(&filter) {
            continue;
        }
        let before = status_kib("VmRSS:") * 1024;
        // Resets VmHWM to the current RSS (Linux >= 4.0).
        let _ = fs::write("/proc/self/clear_refs", "5");
        let started = Instant::now();
        let pixels = decode((side / 16, side / 16));
        let seconds = started.elapsed().as_secs_f64();
        let peak = (status_kib("VmHWM:") * 1024).saturating_sub(before);
        assert_eq!(pixels.len(), side * side * 3);
        let estimate = memory.decode_request((side / 16, side / 16), 1);
        let measured = if dev.is_cpu() {
            format!("{:.0}", mib(peak))
        } else {
            "n/a".into()
        };
        println!(
            "| {name} | {seconds:.2} | {measured} | {:.0} |",
            mib(estimate)
        );
    }
}
