//! The f32 flash attention (`flash_attention_f32.cu`, split TF32 on the tensor cores): the VAE
//! mid block's attention over the image's positions, one head of 512 (32 in the tiny test VAE).

use candle_core::cuda::WrapErr;
use candle_core::cuda::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg, sys};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

use super::{Dims, KernelStrides};
use crate::cuda::{FLASH_ATTENTION_F32, view};

/// The head dims the kernel is instantiated for.
pub const HEAD_DIMS: [usize; 2] = [32, 512];
/// Query rows per block, keys per K/V tile, threads (`flash_attention_f32.cu`).
const BLOCK_M: usize = 32;
const BLOCK_N: usize = 32;
const THREADS: u32 = 256;

/// Q, K and V tiles (rows padded by 4, 4 and 8 floats), four 32 × 36 partial score tiles and 32
/// row scales, f32: 212.9 KiB at head dim 512.
const fn shared_bytes(hd: usize) -> usize {
    4 * (BLOCK_M * (hd + 4) + BLOCK_N * (hd + 4 + hd + 8) + BLOCK_M * (4 * 36 + 1))
}

/// Whether the kernel takes head dim `hd` on `dev`: an instantiated one whose shared memory the
/// card gives a block (at 512: Hopper and A100-class cards; not consumer cards, ~100 KiB).
pub fn applies(dev: &CudaDevice, hd: usize) -> bool {
    HEAD_DIMS.contains(&hd)
        && dev
            .cuda_stream()
            .context()
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .is_ok_and(|bytes| bytes as usize >= shared_bytes(hd))
}

/// Unmasked attention, H_kv = H, head dim d.hd, into a fresh (B, S_q, H · hd) buffer.
pub(super) fn forward(
    dev: &CudaDevice,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    strides: [KernelStrides; 3],
    d: Dims,
    scale: f32,
) -> Result<CudaSlice<f32>> {
    let smem = shared_bytes(d.hd);
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
    let (q, k, v) = (
        view::<f32>(qs, ql)?,
        view::<f32>(ks, kl)?,
        view::<f32>(vs, vl)?,
    );
    let out = unsafe { dev.alloc::<f32>(d.b * d.s_q * d.cols)? };
    let (s_q, s_kv, heads) = (d.s_q as i32, d.s_kv as i32, d.h as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let (batch_stride, row_stride) = ((d.s_q * d.cols) as i64, d.cols as i64);
    let cfg = LaunchConfig {
        grid_dim: (d.s_q.div_ceil(BLOCK_M) as u32, (d.b * d.h) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let [q_strides, k_strides, v_strides] = strides;
    let mut launch = func.builder();
    launch.arg(&q).arg(&k).arg(&v).arg(&out);
    launch.arg(&q_strides).arg(&k_strides).arg(&v_strides);
    launch.arg(&s_q).arg(&s_kv).arg(&heads).arg(&scale_log2);
    launch.arg(&batch_stride).arg(&row_stride);
    unsafe { launch.launch(cfg) }.w()?;
    Ok(out)
}
