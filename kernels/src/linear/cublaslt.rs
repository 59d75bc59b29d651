//! cuBLASLt's side of [`super::XWt`] and [`super::XWtAdd`] (its addend as C, β = 1): bf16
//! operands, f32 accumulation, one rounding to bf16. Row-major x (rows × K) · Wᵀ is
//! column-major Wᵀ (N × K, transposed) · x (K × rows), so W is operand A, x operand B, and a
//! strided batch of x items shares W (batch stride 0).
//!
//! Each thread keeps, per device, a handle, a workspace and the algorithm of every shape it has
//! run. A shape's algorithm is the heuristic's first choice (the kernel cuBLAS's own GEMM call
//! picks) unless the shape is first met inside [`tuning`] and is large enough: then every
//! candidate of the heuristic whose output is bit-identical to the first choice's is timed,
//! round-robin after 300 ms of the first choice, each taking ~10 ms turns back to back so that
//! all of them run in the sustained, power-capped state of a real step (short bursts
//! over-promise: docs/performance.md), and the one with the least median time is kept if it
//! beats the first choice by at least 4 %. A shape whose choice the scope's [`TuningCache`]
//! remembers for this card keeps it without timing, once its output is checked bit-identical
//! to the first choice's. Tuning changes which kernel runs, never a bit of the result.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, hash_map::Entry},
    ffi::c_void,
    mem,
    ptr::null_mut,
};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cublaslt::{result, sys};
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    sys::{CUdeviceptr, CUevent_flags},
};
use candle_core::cuda::{DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, bail};
use half::bf16;

use super::tuning::{TUNED_FLOP, Tuned, TuningCache, choose, median};
use crate::cuda::{ELEMENTWISE, view};

/// Workspace bytes per thread and device (NVIDIA's advice for Hopper, what cuBLAS itself takes).
const WORKSPACE: usize = 32 << 20;
/// Candidates asked of the heuristic.
const CANDIDATES: usize = 8;
/// Milliseconds of the first choice's calls that bring the card to its sustained state.
const HEAT_MS: f32 = 300.0;
/// Timed rounds over the candidates.
const ROUNDS: usize = 5;
/// Milliseconds of back-to-back calls in one candidate's turn.
const TURN_MS: f32 = 10.0;
/// Shapes a thread remembers; it starts over when full.
const MAX_SHAPES: usize = 4096;

type Algo = sys::cublasLtMatmulAlgo_t;

/// What a product's algorithm depends on: the device, (batch, rows, K, N, x's row stride, x's
/// batch stride), the alignments of W, x and the output, and whether it reads an addend.
type Key = (DeviceId, [usize; 6], [u32; 3], bool);

thread_local! {
    static LT: RefCell<HashMap<DeviceId, Lt>> = RefCell::new(HashMap::new());
    static TUNING: Cell<bool> = const { Cell::new(false) };
    /// What the innermost [`tuning`] scope has tuned so far.
    static TUNED: RefCell<Vec<Tuned>> = const { RefCell::new(Vec::new()) };
    /// The choices the innermost [`tuning`] scope was given.
    static KNOWN: RefCell<TuningCache> = RefCell::new(TuningCache::default());
}

/// Runs `f` with tuning on (see the module's doc); also returns what it tuned.
pub fn tuning<T>(cache: &TuningCache, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Tuned>)> {
    let was = TUNING.replace(true);
    let outer = TUNED.take();
    let outer_known = KNOWN.replace(cache.clone());
    let out = f();
    TUNING.set(was);
    KNOWN.set(outer_known);
    let tuned = TUNED.replace(outer);
    Ok((out?, tuned))
}

fn lt_error(e: result::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("linear: cuBLASLt: {e:?}"))
}

/// A handle, a workspace and the algorithms chosen so far, for one thread and device.
struct Lt {
    handle: sys::cublasLtHandle_t,
    /// The device's name, compute capability and cuBLASLt's version ([`Tuned::card`]).
    card: String,
    workspace: CudaSlice<u8>,
    algos: HashMap<Key, Algo>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        // At thread exit the context may be gone already; nothing is left to free then.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// The three pointers of a product.
#[derive(Clone, Copy)]
struct Operands {
    w: CUdeviceptr,
    x: CUdeviceptr,
    y: CUdeviceptr,
    /// C of y = x Wᵀ + C (laid out as y), read in the product's epilogue.
    c: Option<CUdeviceptr>,
}

/// The operation and layouts of one shape, freed on drop.
struct Problem {
    dims: [usize; 6],
    /// The alignments of W, x and the output ([`alignment`]).
    align: [u32; 3],
    op: sys::cublasLtMatmulDesc_t,
    w: sys::cublasLtMatrixLayout_t,
    x: sys::cublasLtMatrixLayout_t,
    y: sys::cublasLtMatrixLayout_t,
}

impl Drop for Problem {
    fn drop(&mut self) {
        unsafe {
            for layout in [self.w, self.x, self.y] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            if !self.op.is_null() {
                let _ = result::destroy_matmul_desc(self.op);
            }
        }
    }
}

/// A matrix layout of bf16 `rows` × `cols` (column-major, leading dimension `ld`), `batch` of
/// them `stride` elements apart.
fn layout(
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: usize,
) -> Result<sys::cublasLtMatrixLayout_t> {
    let l = result::create_matrix_layout(
        sys::cudaDataType::CUDA_R_16BF,
        rows as u64,
        cols as u64,
        ld as i64,
    )
    .map_err(lt_error)?;
    if batch > 1 {
        let (count, offset) = (batch as i32, stride as i64);
        let set = unsafe {
            result::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                mem::size_of::<i32>(),
            )
            .and_then(|()| {
                result::set_matrix_layout_attribute(
                    l,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    (&offset as *const i64).cast(),
                    mem::size_of::<i64>(),
                )
            })
        };
        if let Err(e) = set {
            let _ = unsafe { result::destroy_matrix_layout(l) };
            return Err(lt_error(e));
        }
    }
    Ok(l)
}

impl Problem {
    fn new(dims: [usize; 6], align: [u32; 3]) -> Result<Self> {
        let [b, s, k, n, sr, sb] = dims;
        let mut p = Self {
            dims,
            align,
            op: null_mut(),
            w: null_mut(),
            x: null_mut(),
            y: null_mut(),
        };
        p.op = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(lt_error)?;
        // cublasOperation_t's CUBLAS_OP_T (cudarc's cuBLASLt bindings leave that enum out).
        let transpose = 1i32;
        unsafe {
            result::set_matmul_desc_attribute(
                p.op,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose as *const i32).cast(),
                mem::size_of::<i32>(),
            )
            .map_err(lt_error)?;
        }
        p.w = layout(k, n, k, b, 0)?;
        p.x = layout(k, s, sr, b, sb)?;
        p.y = layout(n, s, n, b, s * n)?;
        Ok(p)
    }
}

/// The largest power of two (at most 256) dividing a pointer.
fn alignment(p: CUdeviceptr) -> u32 {
    1 << p.trailing_zeros().min(8)
}

impl Lt {
    fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Self> {
        let context = stream.context();
        let (major, minor) = context.compute_capability().w()?;
        let card = format!(
            "{} sm_{major}{minor} cuBLASLt {}",
            context.name().w()?,
            unsafe { sys::cublasLtGetVersion() }
        );
        let handle = result::create_handle().map_err(lt_error)?;
        let workspace = match unsafe { stream.alloc::<u8>(WORKSPACE) } {
            Ok(w) => w,
            Err(e) => {
                let _ = unsafe { result::destroy_handle(handle) };
                return Err(e).w();
            }
        };
        Ok(Self {
            handle,
            card,
            workspace,
            algos: HashMap::new(),
        })
    }

    /// The heuristic's candidates for `p`, best first.
    fn candidates(&self, p: &Problem) -> Result<Vec<Algo>> {
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let pref = result::create_matmul_pref().map_err(lt_error)?;
        let set = |attr, value: *const c_void, size| unsafe {
            result::set_matmul_pref_attribute(pref, attr, value, size)
        };
        let bytes = WORKSPACE as u64;
        let mut status = set(
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&bytes as *const u64).cast(),
            mem::size_of::<u64>(),
        );
        for (attr, a) in [
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ]
        .into_iter()
        .zip([p.align[0], p.align[1], p.align[2], p.align[2]])
        {
            status = status.and_then(|()| set(attr, (&a as *const u32).cast(), 4));
        }
        let mut found: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] =
            unsafe { mem::zeroed() };
        let mut count = 0;
        let status = status.and_then(|()| unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                p.op,
                p.w,
                p.x,
                p.y,
                p.y,
                pref,
                CANDIDATES as i32,
                found.as_mut_ptr(),
                &mut count,
            )
            .result()
        });
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        status.map_err(lt_error)?;
        Ok(found[..count.max(0) as usize]
            .iter()
            .filter(|f| f.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|f| f.algo)
            .collect())
    }

    /// Enqueues y = x Wᵀ (+ C) with `algo`.
    fn run(&mut self, p: &Problem, algo: &Algo, o: Operands, stream: &CudaStream) -> Result<()> {
        let (alpha, beta) = (1f32, if o.c.is_some() { 1f32 } else { 0f32 });
        let (workspace, _guard) = self.workspace.device_ptr_mut(stream);
        unsafe {
            result::matmul(
                self.handle,
                p.op,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                o.w as *const c_void,
                p.w,
                o.x as *const c_void,
                p.x,
                o.c.unwrap_or(o.y) as *const c_void,
                p.y,
                o.y as *mut c_void,
                p.y,
                algo,
                workspace as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(lt_error)
    }

    /// Milliseconds per call of `calls` back-to-back calls.
    fn time(
        &mut self,
        p: &Problem,
        algo: &Algo,
        o: Operands,
        stream: &CudaStream,
        calls: usize,
    ) -> Result<f32> {
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timed).w()?;
        for _ in 0..calls {
            self.run(p, algo, o, stream)?;
        }
        let end = stream.record_event(timed).w()?;
        Ok(start.elapsed_ms(&end).w()? / calls as f32)
    }

    /// The candidate of `found` that `cached` names (a rank) if its output is bit-identical to
    /// the first's, else the fastest of `found` at the power cap among those whose output is
    /// (the first unless another is clearly faster); leaves that output in y.
    fn tune(
        &mut self,
        p: &Problem,
        found: &[Algo],
        cached: Option<usize>,
        o: Operands,
        dev: &CudaDevice,
        y: &CudaSlice<bf16>,
    ) -> Result<(Algo, Tuned)> {
        let stream = dev.cuda_stream();
        self.run(p, &found[0], o, &stream)?;
        let reference = fingerprint(dev, y)?;
        let card = self.card.clone();
        let tuned = |candidates, chosen: usize, algo: &Algo| Tuned {
            card: card.clone(),
            dims: p.dims,
            align: p.align,
            candidates,
            first_ms: f32::NAN,
            chosen,
            chosen_ms: f32::NAN,
            tile: tile(algo),
            cached: false,
        };
        if let Some((rank, algo)) = cached.and_then(|r| Some((r, *found.get(r)?)))
            && (rank == 0
                || (self.run(p, &algo, o, &stream).is_ok() && fingerprint(dev, y)? == reference))
        {
            let kept = Tuned {
                cached: true,
                ..tuned(found.len(), rank, &algo)
            };
            return Ok((algo, kept));
        }
        let mut same = vec![found[0]];
        for algo in &found[1..] {
            if self.run(p, algo, o, &stream).is_ok() && fingerprint(dev, y)? == reference {
                same.push(*algo);
            }
        }
        let only = tuned(1, 0, &same[0]);
        if same.len() == 1 {
            // y holds the last candidate's output, which differed: the first's again.
            self.run(p, &same[0], o, &stream)?;
            return Ok((same[0], only));
        }
        let one = self.time(p, &same[0], o, &stream, 2)?;
        let calls = |ms: f32| (ms / one.max(1e-3)).ceil().clamp(1.0, 10_000.0) as usize;
        // The card into its sustained, power-capped state (a warm-up's first products find it
        // cool and boosting), then the timed rounds.
        self.time(p, &same[0], o, &stream, calls(HEAT_MS))?;
        let mut ms = vec![Vec::with_capacity(ROUNDS); same.len()];
        for _ in 0..ROUNDS {
            for (algo, times) in same.iter().zip(&mut ms) {
                times.push(self.time(p, algo, o, &stream, calls(TURN_MS))?);
            }
        }
        let medians: Vec<f32> = ms.iter_mut().map(|t| median(t)).collect();
        let chosen = choose(&medians);
        let rank = found.iter().position(|a| *a == same[chosen]).unwrap_or(0);
        Ok((
            same[chosen],
            Tuned {
                first_ms: medians[0],
                chosen_ms: medians[chosen],
                ..tuned(same.len(), rank, &same[chosen])
            },
        ))
    }
}

/// cuBLASLt's tile id of `algo` (0 where it does not say).
fn tile(algo: &Algo) -> i32 {
    let (mut tile, mut written) = (0i32, 0usize);
    let status = unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_TILE_ID,
            (&mut tile as *mut i32).cast(),
            mem::size_of::<i32>(),
            &mut written,
        )
    };
    if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        tile
    } else {
        0
    }
}

/// The fingerprint of a bf16 buffer's bits (`fingerprint_u16` in elementwise.cu).
fn fingerprint(dev: &CudaDevice, y: &CudaSlice<bf16>) -> Result<u64> {
    let stream = dev.cuda_stream();
    let func = dev.get_or_load_custom_func("fingerprint_u16", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    let out = stream.alloc_zeros::<u64>(1).w()?;
    let n = y.len() as i64;
    let mut launch = func.builder();
    launch.arg(y).arg(&n).arg(&out);
    let cfg = LaunchConfig {
        grid_dim: ((y.len().div_ceil(256 * 8)).clamp(1, 1024) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(cfg) }.w()?;
    Ok(stream.clone_dtoh(&out).w()?[0])
}

/// x Wᵀ for the dimensions of [`super::dims`], into a new buffer.
pub fn x_wt(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    dims: [usize; 6],
) -> Result<CudaStorage> {
    product(xs, xl, ws, wl, None, dims)
}

/// x Wᵀ + c for the dimensions of [`super::dims`], c contiguous in the product's shape, into a
/// new buffer: c read in the product's epilogue, the sum rounded once.
pub fn x_wt_add(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    (cs, cl): (&CudaStorage, &Layout),
    dims: [usize; 6],
) -> Result<CudaStorage> {
    product(xs, xl, ws, wl, Some((cs, cl)), dims)
}

fn product(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    c: Option<(&CudaStorage, &Layout)>,
    [b, s, k, n, sr, sb]: [usize; 6],
) -> Result<CudaStorage> {
    // Batch items one row stride apart are one matrix.
    let (b, s) = if b > 1 && sb == s * sr {
        (1, b * s)
    } else {
        (b, s)
    };
    let dims = [b, s, k, n, sr, if b == 1 { s * sr } else { sb }];
    let dev = xs.device().clone();
    let stream = dev.cuda_stream();
    let (x, w) = (view::<bf16>(xs, xl)?, view::<bf16>(ws, wl)?);
    let c = c.map(|(cs, cl)| view::<bf16>(cs, cl)).transpose()?;
    let mut y = unsafe { dev.alloc::<bf16>(b * s * n)? };
    let ((xp, _gx), (wp, _gw)) = (x.device_ptr(&stream), w.device_ptr(&stream));
    let (cp, _gc) = match &c {
        Some(c) => {
            let (p, g) = c.device_ptr(&stream);
            (Some(p), Some(g))
        }
        None => (None, None),
    };
    let yp = y.device_ptr_mut(&stream).0;
    let o = Operands {
        w: wp,
        x: xp,
        y: yp,
        c: cp,
    };
    // C is read with D's layout and alignment: the lower of the two counts.
    let out_align = cp.map_or(alignment(yp), |c| alignment(yp).min(alignment(c)));
    let align = [alignment(wp), alignment(xp), out_align];
    let key = (dev.id(), dims, align, cp.is_some());
    // A product with an addend takes the algorithm of the same product without one once that
    // is known (tuned, say): any algorithm applies β. Its own key keeps its choice from
    // standing in for the plain product's, which may still be tuned.
    let plain = (dev.id(), dims, align, false);
    let problem = Problem::new(dims, align)?;
    LT.with(|lt| -> Result<()> {
        let mut lts = lt.borrow_mut();
        let lt = match lts.entry(dev.id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Lt::new(&stream)?),
        };
        if let Some(algo) = lt.algos.get(&key).or_else(|| lt.algos.get(&plain)).copied() {
            return lt.run(&problem, &algo, o, &stream);
        }
        let found = lt.candidates(&problem)?;
        if found.is_empty() {
            bail!("linear: cuBLASLt has no algorithm for x Wᵀ of {dims:?}");
        }
        let flop = 2.0 * (b * s * k * n) as f64;
        // Products with C take the heuristic's first choice: the tuner's bit checks compare
        // products alone.
        let algo = if TUNING.get() && flop >= TUNED_FLOP && found.len() > 1 && cp.is_none() {
            let cached = KNOWN.with(|k| k.borrow().rank(&lt.card, dims, align));
            let (algo, tuned) = lt.tune(&problem, &found, cached, o, &dev, &y)?;
            TUNED.with(|t| t.borrow_mut().push(tuned));
            algo
        } else {
            lt.run(&problem, &found[0], o, &stream)?;
            found[0]
        };
        if lt.algos.len() >= MAX_SHAPES {
            lt.algos.clear();
        }
        lt.algos.insert(key, algo);
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}
