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
    // Warm-up: one forward so that lazily built state is not counted below.
    drop(block.forward(&x, &mut NormStats::Local).unwrap());
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = block.forward(&x, &mut NormStats::Local).unwrap();
    let extra = PEAK.load(Ordering::SeqCst) - before;
    println!(
        "peak beyond the input: {extra} bytes = {:.2} activations",
        extra as f64 / activation as f64
    );
    assert_eq!(out.dims(), x.dims());
    assert!(
        extra < activation * 5 / 2,
        "{:.2} activations alive at once besides the input (at most 2 and the bands' temporaries)",
        extra as f64 / activation as f64
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
    drop(attention.forward(&x).unwrap());
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = attention.forward(&x).unwrap();
    let extra = PEAK.load(Ordering::SeqCst) - before;
    println!(
        "attention: peak beyond the input {extra} bytes = {:.2} activations",
        extra as f64 / activation as f64
    );
    assert_eq!(out.dims(), x.dims());
    assert!(
        extra < activation * 5,
        "{:.2} activations alive at once besides the input (the plan: 5 and the score blocks)",
        extra as f64 / activation as f64
    );
}
