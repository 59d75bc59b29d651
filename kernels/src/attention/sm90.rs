//! Hopper's flash attention (`flash_attention_sm90.cu`): Q, K and V reach the kernel as tensor
//! maps, which the copy engine reads in place through the tensors' strides.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, sys,
};
use candle_core::cuda::{DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};
use half::bf16;

use super::Dims;
use super::schedule::{BLOCK_M, KeyTiles, Schedule};
use crate::cuda::{FLASH_ATTENTION_SM90, view};

/// Threads per block: two consumer warpgroups and a producer one (`flash_attention_sm90.cu`).
const THREADS: u32 = 384;

/// Floats of one partial result: per consumer warpgroup, its 64 rows' unnormalised O and each
/// row's max and sum (`PART_FLOATS` in the kernel).
const PART_FLOATS: usize = 2 * (64 * 128 + 4 * 128);

/// The driver's opaque tensor-map descriptor, passed by value.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(sys::CUtensorMap);
// SAFETY: a plain 128-byte struct, the kernel's `const __grid_constant__ CUtensorMap`.
unsafe impl DeviceRepr for TensorMap {}

/// The tensor map of a (B, H, S, 128) bf16 input at `ptr` laid out as `l`: dimensions (column,
/// row, head, batch), innermost first, with the layout's strides; boxes of 64 columns × `rows`
/// rows (one 128-byte-swizzled half tile); rows past S read as zeros.
fn tensor_map(ptr: sys::CUdeviceptr, l: &Layout, rows: usize) -> Result<TensorMap> {
    let (b, h, s, hd) = l.shape().dims4()?;
    let st = l.stride();
    let dims = [hd, s, h, b].map(|d| d as u64);
    let strides = [st[2], st[1], st[0]].map(|s| (s * 2) as u64);
    let boxes = [64, rows as u32, 1, 1];
    let unit = [1u32; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: every array holds the rank (4) entries the call reads; `ptr` is the device address
    // of the tensor's first element, 16-byte aligned with 16-byte-multiple strides
    // (`super::strides`).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            unit.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .w()?;
        Ok(TensorMap(map.assume_init()))
    }
}

/// What the kernel needs to normalise and rotate Q itself ([`super::QNorm`] on the device), with
/// Q's tail's weight where the queries come in two parts.
pub(super) struct QNormArgs<'a> {
    pub weight: CudaView<'a, bf16>,
    pub tail_weight: Option<CudaView<'a, bf16>>,
    pub cos: CudaView<'a, f32>,
    pub sin: CudaView<'a, f32>,
    pub rope_offset: i32,
    pub eps: f32,
}

thread_local! {
    /// Per device, the split tiles' arrival counters of this thread's launches, which candle
    /// queues on the thread's own stream: zeroed once, and each tile's last part resets its
    /// counters, so they are zero again for the next launch (no memset per call). The last
    /// buffer is the one in use; the smaller ones it replaced are kept, since a CUDA graph
    /// captured earlier (`klein_runtime::graph`) still launches on them.
    static ARRIVALS: RefCell<HashMap<DeviceId, Vec<CudaSlice<u32>>>> = RefCell::new(HashMap::new());
}

/// The address of at least `n` zeroed arrival counters ([`ARRIVALS`]), a new zeroed buffer of
/// twice the size (at least) when the one in use is short.
fn zeroed_counters(dev: &CudaDevice, n: usize) -> Result<u64> {
    ARRIVALS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let buffers = cache.entry(dev.id()).or_default();
        if buffers.last().is_none_or(|b| b.len() < n) {
            buffers.push(dev.alloc_zeros::<u32>(n.max(64).next_power_of_two())?);
        }
        Ok(buffers[buffers.len() - 1].device_ptr(&dev.cuda_stream()).0)
    })
}

/// Unmasked attention with head dim 128 (H_kv = H) into a fresh (B, S_q, d.cols) buffer; with
/// `v_tail`, the values of the keys past v's rows come from it (v's rows a multiple of
/// [`super::SM90_V_STRIP`]); with `q_norm`, q holds raw heads that the kernel normalises and
/// rotates, and with `q_tail` (heads laid out as q's) the queries past q's rows (a multiple of
/// [`BLOCK_M`]) come from it, normalised with `q_norm`'s tail weight.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    dev: &CudaDevice,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    v_tail: Option<(&CudaStorage, &Layout)>,
    q_tail: Option<(&CudaStorage, &Layout)>,
    q_norm: Option<QNormArgs<'_>>,
    d: Dims,
    scale: f32,
) -> Result<CudaSlice<bf16>> {
    let tiles_of = KeyTiles::for_keys(d.s_kv);
    let func = dev.get_or_load_custom_func(
        tiles_of.kernel,
        FLASH_ATTENTION_SM90.name,
        FLASH_ATTENTION_SM90.ptx,
    )?;
    func.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        tiles_of.shared_bytes() as i32,
    )
    .w()?;
    let stream = dev.cuda_stream();
    let (q, k, v) = (
        view::<bf16>(qs, ql)?,
        view::<bf16>(ks, kl)?,
        view::<bf16>(vs, vl)?,
    );
    let ((q_ptr, _q_sync), (k_ptr, _k_sync), (v_ptr, _v_sync)) = (
        q.device_ptr(&stream),
        k.device_ptr(&stream),
        v.device_ptr(&stream),
    );
    let keys = tiles_of.keys;
    let strip = super::SM90_V_STRIP;
    let maps = (
        tensor_map(q_ptr, ql, BLOCK_M)?,
        tensor_map(k_ptr, kl, keys)?,
        tensor_map(v_ptr, vl, keys)?,
    );
    let tail = match v_tail {
        Some((ts, tl)) => Some((view::<bf16>(ts, tl)?, tl)),
        None => None,
    };
    let tail_ptr = tail.as_ref().map(|(t, tl)| (t.device_ptr(&stream), *tl));
    let v_strips = tensor_map(v_ptr, vl, strip)?;
    // Without a tail every key's row is below v_split (the tail's maps are v's, never read).
    let (tail_map, tail_strips, v_split) = match &tail_ptr {
        Some(((ptr, _), tl)) => {
            let v_rows = vl.dims()[2];
            if !v_rows.is_multiple_of(strip) {
                candle_core::bail!(
                    "flash attention: v's {v_rows} rows before its tail are not whole {strip}-row strips"
                );
            }
            (
                tensor_map(*ptr, tl, keys)?,
                tensor_map(*ptr, tl, strip)?,
                v_rows as i32,
            )
        }
        None => (maps.2, v_strips, i32::MAX),
    };
    let q_tail = match q_tail {
        Some((ts, tl)) => Some((view::<bf16>(ts, tl)?, tl)),
        None => None,
    };
    let q_tail_ptr = q_tail.as_ref().map(|(t, tl)| (t.device_ptr(&stream), *tl));
    // Without a tail every query row is below q_split (the tail's map is q's, never read).
    let (q_tail_map, q_split) = match &q_tail_ptr {
        Some(((ptr, _), tl)) => {
            let q_rows = ql.dims()[2];
            if !q_rows.is_multiple_of(BLOCK_M) {
                candle_core::bail!(
                    "flash attention: q's {q_rows} rows before its tail are not whole {BLOCK_M}-row tiles"
                );
            }
            (tensor_map(*ptr, tl, BLOCK_M)?, q_rows as i32)
        }
        None => (maps.0, i32::MAX),
    };
    let out = unsafe { dev.alloc::<bf16>(d.b * d.s_q * d.cols)? };
    let (s_q, s_kv, heads) = (d.s_q as i32, d.s_kv as i32, d.h as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let (batch_stride, row_stride) = ((d.s_q * d.cols) as i64, d.cols as i64);
    let q_tiles = d.s_q.div_ceil(BLOCK_M);
    let tiles = q_tiles * d.b * d.h;
    let sms = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let plan = Schedule::new(tiles, d.s_kv.div_ceil(keys), sms as usize);
    // Every part's slot is written before it is read; the arrival counters are zero (and the
    // kernel leaves them so).
    let partials = unsafe { dev.alloc::<f32>((plan.part_slots() * PART_FLOATS).max(1))? };
    let arrivals = zeroed_counters(dev, 2 * plan.split_tiles())?;
    let (q_tiles, tiles, rounds, split_blocks) = (
        q_tiles as i32,
        tiles as i32,
        plan.rounds as i32,
        plan.split_blocks as i32,
    );
    let cfg = LaunchConfig {
        grid_dim: (plan.blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: tiles_of.shared_bytes() as u32,
    };
    let mut launch = func.builder();
    launch
        .arg(&maps.0)
        .arg(&maps.1)
        .arg(&maps.2)
        .arg(&tail_map)
        .arg(&v_strips)
        .arg(&tail_strips)
        .arg(&v_split);
    launch.arg(&out);
    launch.arg(&s_q).arg(&s_kv).arg(&heads).arg(&scale_log2);
    launch.arg(&batch_stride).arg(&row_stride);
    launch
        .arg(&q_tiles)
        .arg(&tiles)
        .arg(&rounds)
        .arg(&split_blocks);
    launch.arg(&partials).arg(&arrivals);
    // Null pointers for "Q as it comes".
    let none = 0u64;
    let (no_offset, no_eps) = (0i32, 0f32);
    match &q_norm {
        Some(n) => launch
            .arg(&n.weight)
            .arg(&n.cos)
            .arg(&n.sin)
            .arg(&n.rope_offset)
            .arg(&n.eps),
        None => launch
            .arg(&none)
            .arg(&none)
            .arg(&none)
            .arg(&no_offset)
            .arg(&no_eps),
    };
    launch.arg(&q_tail_map).arg(&q_split);
    match q_norm.as_ref().and_then(|n| n.tail_weight.as_ref()) {
        Some(w) => launch.arg(w),
        None => launch.arg(&none),
    };
    unsafe { launch.launch(cfg) }.w()?;
    Ok(out)
}
