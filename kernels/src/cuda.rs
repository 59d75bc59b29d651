//! What the CUDA forwards share: the compiled PTX modules, typed views of storage at a layout's
//! offset, launch shapes.

use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig};
use candle_core::{CudaStorage, Layout, Result, cuda::CudaDType};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// A PTX module: its name in the device's module cache and its text.
pub struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
}

pub const ELEMENTWISE: Module = Module {
    name: "klein_elementwise",
    ptx: ptx::ELEMENTWISE,
};

pub const DEQUANTIZE: Module = Module {
    name: "klein_dequantize",
    ptx: ptx::DEQUANTIZE,
};

/// Load-time quantization into ggml blocks, the host quantizer's bytes.
pub const QUANTIZE: Module = Module {
    name: "klein_quantize",
    ptx: ptx::QUANTIZE,
};

pub const FLASH_ATTENTION: Module = Module {
    name: "klein_flash_attention",
    ptx: ptx::FLASH_ATTENTION,
};

/// The f32 flash attention of one 512-wide head (split TF32, mma.sync).
pub const FLASH_ATTENTION_F32: Module = Module {
    name: "klein_flash_attention_f32",
    ptx: ptx::FLASH_ATTENTION_F32,
};

/// Hopper's flash attention (wgmma); its kernel is empty in a build for another architecture.
pub const FLASH_ATTENTION_SM90: Module = Module {
    name: "klein_flash_attention_sm90",
    ptx: ptx::FLASH_ATTENTION_SM90,
};

/// The elements of `s` from the start of `l` on.
pub fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// One warp per item, 4 warps a block (the row kernels hold a row in ~160 registers a thread:
/// small blocks let three share an SM).
pub fn warp_per_item(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(4) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of `width` bf16 values, a thread per 8 of them (the kernels' 16-byte
/// accesses), at most 384 threads a block.
pub fn block_per_row(rows: usize, width: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (
            (width.div_ceil(8).next_multiple_of(32)).clamp(32, 384) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    }
}

/// One block of 128 threads per row of a norm that holds its row in registers (`BLOCK_ROW_VECS`
/// 16-byte vectors a thread in elementwise.cu): small blocks keep many rows in flight on an SM
/// between the row's reductions.
const NORM_ROW_THREADS: usize = 128;

/// One [`NORM_ROW_THREADS`]-thread block per row.
pub fn norm_block_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (NORM_ROW_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block row per (batch, channel) plane of `hw` elements (`PLANE_LOOP` in elementwise.cu):
/// `planes` blocks along x, up to four elements per thread along y.
pub fn plane_grid(planes: usize, hw: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            planes as u32,
            hw.div_ceil(4 * 256).clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Enough 1-D blocks of `threads` threads for `items` items, `per_block` items a block.
pub fn blocks_for(items: usize, per_block: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(per_block) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `items` threads' work.
pub fn grid_stride(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
