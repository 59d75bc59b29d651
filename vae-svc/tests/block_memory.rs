//! How many activations a ResNet block and the mid block's attention keep alive, counted by the
//! allocator (candle's CPU tensors live in the process heap): each intermediate goes as soon as
//! the next one exists, as the memory plan counts. The twelfth session's prologue work kept conv1's output alive through
//! conv2, one activation more than the plan, and the 16 GB plan's tiled decodes ran out of GPU
//! memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::{
    Mutex, MutexGuard, PoisonError,
    atomic::{AtomicUsize, Ordering},
};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vae_svc::model::{
    attention::Attention, config::Config, norm_stats::NormStats, resnet::ResnetBlock2D,
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counters are the whole process's: tests run one at a time, or one test's allocations
/// (or its reset of the peak) land in another's measurement.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Channels and side of the blocks' input: (1, C, SIDE, SIDE) f32, one "activation".
const C: usize = 32;
const SIDE: usize = 96;

/// Activations that `forward` holds at its peak beyond what was alive before it, on a random
/// input, checking that the output keeps the input's shape. Lazily built state is not counted:
/// after a warm-up call, the least over one call more than candle has threads, since a
/// rayon worker's first matrix product allocates its scratch (gemm's per-thread L2 slab, ~1 MiB,
/// 0.9 activations here) in whichever call first hands it work (once on CI: 3.11 instead of 2.22).
fn peak_activations(forward: impl Fn(&Tensor) -> Tensor) -> f64 {
    let x = Tensor::randn(0f32, 1.0, (1, C, SIDE, SIDE), &Device::Cpu).unwrap();
    drop(forward(&x));
    let calls = candle_core::utils::get_num_threads() + 1;
    let extra = (0..calls)
        .map(|_| {
            let before = CURRENT.load(Ordering::SeqCst);
            PEAK.store(before, Ordering::SeqCst);
            let out = forward(&x);
            assert_eq!(out.dims(), x.dims());
            PEAK.load(Ordering::SeqCst) - before
        })
        .min()
        .unwrap_or(0);
    extra as f64 / (C * SIDE * SIDE * 4) as f64
}

/// `{prefix}.weight` (ones) and `{prefix}.bias` (zeros) of a C-channel group norm.
fn group_norm(prefix: &str) -> [(String, Tensor); 2] {
    let dev = Device::Cpu;
    [
        (
            format!("{prefix}.weight"),
            Tensor::ones(C, DType::F32, &dev).unwrap(),
        ),
        (
            format!("{prefix}.bias"),
            Tensor::zeros(C, DType::F32, &dev).unwrap(),
        ),
    ]
}

#[test]
fn a_resnet_block_holds_two_activations_besides_its_input() {
    let _serial = one_at_a_time();
    let dev = Device::Cpu;
    let mut cfg = Config::default();
    // Convolution bands of a few rows: their temporaries stay small next to an activation.
    cfg.chunking.op_bytes = 64 << 10;
    let mut tensors: Vec<(String, Tensor)> = [group_norm("norm1"), group_norm("norm2")]
        .into_iter()
        .flatten()
        .collect();
    for conv in ["conv1", "conv2"] {
        let weight = Tensor::randn(0f32, 0.05, (C, C, 3, 3), &dev).unwrap();
        tensors.push((format!("{conv}.weight"), weight));
        tensors.push((
            format!("{conv}.bias"),
            Tensor::zeros(C, DType::F32, &dev).unwrap(),
        ));
    }
    let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
    let block = ResnetBlock2D::new(&cfg, C, C, vb).unwrap();
    let peak = peak_activations(|x| block.forward(x, &mut NormStats::Local).unwrap());
    println!("peak beyond the input: {peak:.2} activations");
    assert!(
        peak < 2.5,
        "{peak:.2} activations alive at once besides the input (at most 2 and the bands' temporaries)"
    );
}

/// The attention's live set beyond its input: the normed x with the q/k/v product (or the
/// composition's three products), then q, k, v with the output, then the output projection;
/// the plan counts 5 activations and the score blocks. The fifteenth session's first version
/// held the product through the output projection and copied k and v out of it: 7.2.
#[test]
fn the_attention_lets_its_product_go_before_the_output_projection() {
    let _serial = one_at_a_time();
    let dev = Device::Cpu;
    let mut cfg = Config::default();
    // Score blocks of a few query rows: small next to an activation.
    cfg.chunking.attention_bytes = 256 << 10;
    let mut tensors = Vec::from(group_norm("group_norm"));
    for name in ["to_q", "to_k", "to_v", "to_out.0"] {
        let weight = Tensor::randn(0f32, 0.1, (C, C), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.1, C, &dev).unwrap();
        tensors.push((format!("{name}.weight"), weight));
        tensors.push((format!("{name}.bias"), bias));
    }
    let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
    let attention = Attention::new(&cfg, C, vb).unwrap();
    let peak = peak_activations(|x| attention.forward(x).unwrap());
    println!("attention: peak beyond the input {peak:.2} activations");
    assert!(
        peak < 5.0,
        "{peak:.2} activations alive at once besides the input (the plan: 5 and the score blocks)"
    );
}
