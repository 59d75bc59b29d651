//! The f32 flash attention (`flash_attention_f32.cu`, split fp16 on the tensor cores): the VAE
//! mid block's attention over the image's positions, one head of 512 (32 in the tiny test VAE).
//! A pre-pass scales each of Q, K and V by a power of two and splits it into fp16 high and low
//! parts; the kernel runs three fp16 products per pair.

use candle_core::cuda::WrapErr;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg, sys,
};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};
use half::f16;

use super::{Dims, KernelStrides};
use crate::cuda::{FLASH_ATTENTION_F32, view};

/// The head dims the kernel is instantiated for, with their 16-row query tiles per block (the
/// other warps split the head dim: `8 / row groups` slices).
const TILINGS: [(usize, usize); 2] = [(32, 4), (512, 2)];
/// The head dims the kernel takes.
pub const HEAD_DIMS: [usize; 2] = [TILINGS[0].0, TILINGS[1].0];
/// Keys per K/V tile, threads (`flash_attention_f32.cu`).
const BLOCK_N: usize = 32;
const THREADS: u32 = 256;

/// The 16-row query tiles of a block at head dim `hd` (its other warps split the head dim into
/// `8 / row groups` slices); `None` where the kernel is not instantiated.
fn row_groups(hd: usize) -> Option<usize> {
    TILINGS
        .iter()
        .find(|t| t.0 == hd)
        .map(|&(_, groups)| groups)
}

/// K and V tiles and the block's Q, each as fp16 high and low parts, and one f32 partial score
/// tile (rows of 40) per head-dim slice: 212 KiB at head dim 512.
fn shared_bytes(hd: usize, row_groups: usize) -> usize {
    let (m, slices) = (16 * row_groups, 8 / row_groups);
    2 * 2 * (2 * BLOCK_N + m) * hd + 4 * slices * m * (BLOCK_N + 8)
}

/// Whether the kernel takes head dim `hd` on `dev`: an instantiated one whose shared memory the
/// card gives a block (at 512: Hopper and A100-class cards; not consumer cards, ~100 KiB).
pub fn applies(dev: &CudaDevice, hd: usize) -> bool {
    row_groups(hd).is_some_and(|groups| {
        dev.cuda_stream()
            .context()
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .is_ok_and(|bytes| bytes as usize >= shared_bytes(hd, groups))
    })
}

/// One operand's fp16 high and low parts, contiguous (B·H, rows, hd).
struct SplitOperand {
    hi: CudaSlice<f16>,
    lo: CudaSlice<f16>,
}

/// Blocks of the pre-pass grid per head (grid-stride loops over the rest).
fn prepass(rows: usize, d: Dims) -> LaunchConfig {
    let blocks = (rows * d.hd / 4).div_ceil(THREADS as usize).clamp(1, 512);
    LaunchConfig {
        grid_dim: (blocks as u32, (d.b * d.h) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Q, K and V scaled and split (their largest magnitudes' bits in `max_bits`, Q, K, V).
fn split(
    dev: &CudaDevice,
    operands: [(CudaView<'_, f32>, KernelStrides, usize); 3],
    d: Dims,
    max_bits: &mut CudaSlice<u32>,
) -> Result<[SplitOperand; 3]> {
    let absmax = dev.get_or_load_custom_func(
        "attention_absmax_f32",
        FLASH_ATTENTION_F32.name,
        FLASH_ATTENTION_F32.ptx,
    )?;
    let split_f16 = dev.get_or_load_custom_func(
        "attention_split_f16",
        FLASH_ATTENTION_F32.name,
        FLASH_ATTENTION_F32.ptx,
    )?;
    // Both kernels start with (x, strides, heads, rows, hd).
    let dims = operands
        .each_ref()
        .map(|o| [d.h as i32, o.2 as i32, d.hd as i32]);
    fn operand<'a>(
        launch: &mut LaunchArgs<'a>,
        (x, strides, _): &'a (CudaView<'_, f32>, KernelStrides, usize),
        [heads, rows, hd]: &'a [i32; 3],
    ) {
        launch.arg(x).arg(strides).arg(heads).arg(rows).arg(hd);
    }
    for i in 0..3 {
        let mut bits = max_bits.slice_mut(i..i + 1);
        let mut launch = absmax.builder();
        operand(&mut launch, &operands[i], &dims[i]);
        launch.arg(&mut bits);
        unsafe { launch.launch(prepass(operands[i].2, d)) }.w()?;
    }
    let split_one = |i: usize| -> Result<SplitOperand> {
        let len = d.b * d.h * operands[i].2 * d.hd;
        let mut part = SplitOperand {
            hi: unsafe { dev.alloc::<f16>(len)? },
            lo: unsafe { dev.alloc::<f16>(len)? },
        };
        let bits = max_bits.slice(i..i + 1);
        let mut launch = split_f16.builder();
        operand(&mut launch, &operands[i], &dims[i]);
        launch.arg(&bits).arg(&mut part.hi).arg(&mut part.lo);
        unsafe { launch.launch(prepass(operands[i].2, d)) }.w()?;
        Ok(part)
    };
    Ok([split_one(0)?, split_one(1)?, split_one(2)?])
}

/// Unmasked attention, H_kv = H, head dim d.hd, into a fresh (B, S_q, H · hd) buffer.
pub(super) fn forward(
    dev: &CudaDevice,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    [q_strides, k_strides, v_strides]: [KernelStrides; 3],
    d: Dims,
    scale: f32,
) -> Result<CudaSlice<f32>> {
    let Some(groups) = row_groups(d.hd) else {
        candle_core::bail!("f32 flash attention: no kernel for head dim {}", d.hd);
    };
    let mut max_bits = dev.alloc_zeros::<u32>(3)?;
    let [q, k, v] = split(
        dev,
        [
            (view::<f32>(qs, ql)?, q_strides, d.s_q),
            (view::<f32>(ks, kl)?, k_strides, d.s_kv),
            (view::<f32>(vs, vl)?, v_strides, d.s_kv),
        ],
        d,
        &mut max_bits,
    )?;
    let smem = shared_bytes(d.hd, groups);
    let func = dev.get_or_load_custom_func(
        &format!("flash_attention_f32_hd{}", d.hd),
        FLASH_ATTENTION_F32.name,
        FLASH_ATTENTION_F32.ptx,
    )?;
    func.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    let mut out = unsafe { dev.alloc::<f32>(d.b * d.s_q * d.cols)? };
    let (s_q, s_kv, heads) = (d.s_q as i32, d.s_kv as i32, d.h as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let (batch_stride, row_stride) = ((d.s_q * d.cols) as i64, d.cols as i64);
    let cfg = LaunchConfig {
        grid_dim: (d.s_q.div_ceil(16 * groups) as u32, (d.b * d.h) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut launch = func.builder();
    launch
        .arg(&q.hi)
        .arg(&q.lo)
        .arg(&k.hi)
        .arg(&k.lo)
        .arg(&v.hi)
        .arg(&v.lo);
    launch.arg(&mut out).arg(&max_bits);
    launch.arg(&s_q).arg(&s_kv).arg(&heads).arg(&scale_log2);
    launch.arg(&batch_stride).arg(&row_stride);
    unsafe { launch.launch(cfg) }.w()?;
    Ok(out)
}
