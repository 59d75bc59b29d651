//! How many activations a ResNet block and the mid block's attention keep alive, counted by the
//! allocator (candle's CPU tensors live in the process heap): each intermediate goes as soon as
//! the next one exists, as the memory plan counts. The twelfth session's prologue work kept conv1's output alive through
//! conv2, one activation more than the plan, and the 16 GB plan's tiled decodes ran out of GPU
//! memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Activations (of `activation` bytes) that `forward` holds at its peak beyond what was alive
/// before it, after one warm-up call (lazily built state is not counted), checking that the
/// output keeps the input's shape.
fn peak_activations(x: &Tensor, activation: usize, forward: impl Fn() -> Tensor) -> f64 {
    drop(forward());
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = forward();
    let extra = PEAK.load(Ordering::SeqCst) - before;
    assert_eq!(out.dims(), x.dims());
    extra as f64 / activation as f64
}

#[test]
fn a_resnet_block_holds_two_activations_besides_its_input() {
    let dev = Device::Cpu;
    let mut cfg = Config::default();
    // Convolution bands of a few rows: their temporaries stay small next to an activation.
    cfg.chunking.op_bytes = 64 << 10;
    let (c, h, w) = (32, 96, 96);
    let activation = c * h * w * 4;
    let vb = VarBuilder::from_tensors(
        [
            ("norm1.weight", Tensor::ones(c, DType::F32, &dev).unwrap()),
            ("norm1.bias", Tensor::zeros(c, DType::F32, &dev).unwrap()),
            (
                "conv1.weight",
                Tensor::randn(0f32, 0.05, (c, c, 3, 3), &dev).unwrap(),
            ),
            ("conv1.bias", Tensor::zeros(c, DType::F32, &dev).unwrap()),
            ("norm2.weight", Tensor::ones(c, DType::F32, &dev).unwrap()),
            ("norm2.bias", Tensor::zeros(c, DType::F32, &dev).unwrap()),
            (
                "conv2.weight",
                Tensor::randn(0f32, 0.05, (c, c, 3, 3), &dev).unwrap(),
            ),
            ("conv2.bias", Tensor::zeros(c, DType::F32, &dev).unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        DType::F32,
        &dev,
    );
    let block = ResnetBlock2D::new(&cfg, c, c, vb).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, c, h, w), &dev).unwrap();
    let peak = peak_activations(&x, activation, || {
        block.forward(&x, &mut NormStats::Local).unwrap()
    });
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
    let dev = Device::Cpu;
    let mut cfg = Config::default();
    // Score blocks of a few query rows: small next to an activation.
    cfg.chunking.attention_bytes = 256 << 10;
    let (c, h, w) = (32, 96, 96);
    let activation = c * h * w * 4;
    let mut tensors = vec![
        (
            "group_norm.weight".to_string(),
            Tensor::ones(c, DType::F32, &dev).unwrap(),
        ),
        (
            "group_norm.bias".to_string(),
            Tensor::zeros(c, DType::F32, &dev).unwrap(),
        ),
    ];
    for name in ["to_q", "to_k", "to_v", "to_out.0"] {
        let weight = Tensor::randn(0f32, 0.1, (c, c), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.1, c, &dev).unwrap();
        tensors.push((format!("{name}.weight"), weight));
        tensors.push((format!("{name}.bias"), bias));
    }
    let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
    let attention = Attention::new(&cfg, c, vb).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, c, h, w), &dev).unwrap();
    let peak = peak_activations(&x, activation, || attention.forward(&x).unwrap());
    println!("attention: peak beyond the input {peak:.2} activations");
    assert!(
        peak < 5.0,
        "{peak:.2} activations alive at once besides the input (the plan: 5 and the score blocks)"
    );
}
