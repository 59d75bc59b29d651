//! What a captured graph holds, and its small memsets turned into kernels (CUDA builds).
//!
//! cuBLASLt clears a 4-byte word before each product of several of its Hopper kernels (68 a
//! 1024² transformer step). In a graph a kernel follows a kernel ~0.25 µs after it ends, but a
//! memset node costs ~1.4 µs before it and ~2.4 µs after it (docs/performance.md, thirty-third
//! session), so small memsets get a node of candle's fill kernel in their place. A graph with
//! memory nodes (every capture of candle's stream-ordered allocations) may not lose nodes or
//! edges, so the fill kernel is added beside its memset, with the memset's dependencies and
//! dependents, and the executable graph disables the memset. The fill's own edges carry the
//! order: on an H200 (CUDA 13.0 driver) the dependents of a disabled memset no longer waited
//! for its dependencies (the step's products ran concurrently from the graph's start).
#![allow(unsafe_code)]

use std::{mem::MaybeUninit, ptr::addr_of};

use candle_core::{
    Result,
    cuda::{
        CudaDevice, WrapErr,
        cudarc::driver::{
            CudaFunction, DriverError,
            sys::{
                CUDA_KERNEL_NODE_PARAMS, CUDA_MEMCPY3D, CUDA_MEMSET_NODE_PARAMS, CUgraph,
                CUgraphExec, CUgraphNode, CUgraphNodeType, CUmemorytype, cuGraphAddDependencies_v2,
                cuGraphAddKernelNode_v2, cuGraphGetNodes, cuGraphMemcpyNodeGetParams,
                cuGraphMemsetNodeGetParams, cuGraphNodeGetDependencies_v2,
                cuGraphNodeGetDependentNodes_v2, cuGraphNodeGetType, cuGraphNodeSetEnabled,
            },
        },
        kernels::FILL,
    },
};

/// The graph's operations by kind.
#[derive(Debug, Default)]
pub struct Census {
    pub kernels: usize,
    pub memsets: usize,
    pub device_copies: usize,
    /// Copies from or to host memory (or whose side the driver does not say).
    pub host_copies: usize,
    pub allocations: usize,
    pub frees: usize,
    pub other: usize,
}

/// Node kinds as the driver numbers them (`CUgraphNodeType`), read as raw numbers so that a
/// kind newer than these bindings is "other".
const KERNEL: u32 = 0;
const MEMCPY: u32 = 1;
const MEMSET: u32 = 2;
const MEM_ALLOC: u32 = 10;
const MEM_FREE: u32 = 11;

pub fn census(graph: CUgraph) -> Result<Census> {
    let mut census = Census::default();
    for node in graph_nodes(graph)? {
        match kind(node)? {
            KERNEL => census.kernels += 1,
            MEMCPY if is_device_copy(node).w()? => census.device_copies += 1,
            MEMCPY => census.host_copies += 1,
            MEMSET => census.memsets += 1,
            MEM_ALLOC => census.allocations += 1,
            MEM_FREE => census.frees += 1,
            _ => census.other += 1,
        }
    }
    Ok(census)
}

/// Memsets of at most this many bytes become kernels; larger ones cost their bandwidth, not
/// their scheduling.
const MAX_FILL_BYTES: usize = 64 << 10;

/// Threads a block of a fill kernel.
const FILL_THREADS: usize = 256;

/// The memsets a graph's executable instance must disable ([`Fills::disable`]) and the
/// kernels that do their work; the instance must not outlive them (they keep candle's fill
/// module loaded).
pub struct Fills {
    memsets: Vec<CUgraphNode>,
    _kernels: Vec<CudaFunction>,
}

impl Fills {
    /// Memsets whose work a kernel does.
    pub fn replaced(&self) -> usize {
        self.memsets.len()
    }

    /// Disables the replaced memsets in `exec`, an instance of the graph they belong to.
    pub fn disable(&self, exec: CUgraphExec) -> Result<()> {
        for &memset in &self.memsets {
            // SAFETY: `memset` is a memset node of the graph `exec` was instantiated from.
            unsafe { cuGraphNodeSetEnabled(exec, memset, 0) }
                .result()
                .w()?;
        }
        Ok(())
    }
}

/// Puts a kernel node of candle's `fill_u8` / `fill_u32` beside each contiguous memset of 1-
/// or 4-byte elements and at most [`MAX_FILL_BYTES`] in `graph`, with the memset's
/// dependencies and dependents. A memset whose edges carry data (programmatic launches) is
/// left as it is.
pub fn memsets_as_kernels(graph: CUgraph, dev: &CudaDevice) -> Result<Fills> {
    let (mut u8_fill, mut u32_fill) = (None, None);
    let mut memsets = Vec::new();
    for node in graph_nodes(graph)? {
        if kind(node)? != MEMSET {
            continue;
        }
        let mut p = MaybeUninit::<CUDA_MEMSET_NODE_PARAMS>::zeroed();
        // SAFETY: a memset node of the graph; the driver fills in its parameters.
        unsafe { cuGraphMemsetNodeGetParams(node, p.as_mut_ptr()) }
            .result()
            .w()?;
        // SAFETY: written by the driver above (all plain integers).
        let p = unsafe { p.assume_init() };
        let size = p.elementSize as usize;
        let contiguous = p.height == 1 || p.pitch == p.width * size;
        let numel = p.width * p.height;
        if !contiguous || numel * size > MAX_FILL_BYTES {
            continue;
        }
        let slot = match size {
            1 => (&mut u8_fill, "fill_u8"),
            4 => (&mut u32_fill, "fill_u32"),
            _ => continue,
        };
        let fill = match slot.0 {
            Some(f) => f,
            empty => empty.insert(dev.get_or_load_func(slot.1, &FILL)?.into_cuda_function()),
        };
        let (Ok(before), Ok(after)) = (edges(node, Side::Before), edges(node, Side::After)) else {
            continue;
        };
        let mut dst = p.dst;
        let (mut byte, mut word) = (p.value as u8, p.value);
        let value: *mut std::ffi::c_void = if size == 1 {
            (&raw mut byte).cast()
        } else {
            (&raw mut word).cast()
        };
        let mut n = numel;
        let mut args = [(&raw mut dst).cast(), value, (&raw mut n).cast()];
        let threads = FILL_THREADS.min(numel.next_multiple_of(32));
        // SAFETY: zero is a valid value of every field (null pointers, zero dimensions).
        let mut params: CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
        params.func = fill.cu_function();
        params.gridDimX = numel.div_ceil(threads).min(65_535) as u32;
        (params.gridDimY, params.gridDimZ) = (1, 1);
        params.blockDimX = threads as u32;
        (params.blockDimY, params.blockDimZ) = (1, 1);
        params.kernelParams = args.as_mut_ptr();
        let mut kernel: CUgraphNode = std::ptr::null_mut();
        // SAFETY: the driver copies the arguments while adding the node; `before` are nodes
        // of the graph.
        unsafe {
            cuGraphAddKernelNode_v2(&mut kernel, graph, before.as_ptr(), before.len(), &params)
        }
        .result()
        .w()?;
        for next in &after {
            // SAFETY: both nodes belong to the graph; default edge data.
            unsafe { cuGraphAddDependencies_v2(graph, &kernel, next, std::ptr::null(), 1) }
                .result()
                .w()?;
        }
        memsets.push(node);
    }
    Ok(Fills {
        memsets,
        _kernels: u8_fill.into_iter().chain(u32_fill).collect(),
    })
}

fn graph_nodes(graph: CUgraph) -> Result<Vec<CUgraphNode>> {
    let mut count = 0usize;
    // SAFETY: a live graph handle; a null array asks for the count.
    unsafe { cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count) }
        .result()
        .w()?;
    let mut nodes: Vec<CUgraphNode> = vec![std::ptr::null_mut(); count];
    // SAFETY: `nodes` has room for `count` handles.
    unsafe { cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut count) }
        .result()
        .w()?;
    nodes.truncate(count);
    Ok(nodes)
}

fn kind(node: CUgraphNode) -> Result<u32> {
    let mut kind = 0u32;
    // SAFETY: the node belongs to a live graph; the driver writes one enum value.
    unsafe { cuGraphNodeGetType(node, (&raw mut kind).cast::<CUgraphNodeType>()) }
        .result()
        .w()?;
    Ok(kind)
}

/// Which edges of a node [`edges`] lists.
#[derive(Clone, Copy)]
enum Side {
    /// The nodes it depends on.
    Before,
    /// The nodes that depend on it.
    After,
}

/// A node's neighbours on `side`. Without an edge-data array the driver refuses to list
/// edges that carry data (`CUDA_ERROR_LOSSY_QUERY`).
fn edges(node: CUgraphNode, side: Side) -> std::result::Result<Vec<CUgraphNode>, DriverError> {
    let list = |out: *mut CUgraphNode, count: &mut usize| {
        let data = std::ptr::null_mut();
        // SAFETY: the node belongs to a live graph; `out` is null (count only) or has room
        // for `count` handles.
        unsafe {
            match side {
                Side::Before => cuGraphNodeGetDependencies_v2(node, out, data, count),
                Side::After => cuGraphNodeGetDependentNodes_v2(node, out, data, count),
            }
        }
        .result()
    };
    let mut count = 0usize;
    list(std::ptr::null_mut(), &mut count)?;
    let mut nodes: Vec<CUgraphNode> = vec![std::ptr::null_mut(); count];
    list(nodes.as_mut_ptr(), &mut count)?;
    nodes.truncate(count);
    Ok(nodes)
}

fn is_device_copy(node: CUgraphNode) -> std::result::Result<bool, DriverError> {
    let mut params = MaybeUninit::<CUDA_MEMCPY3D>::zeroed();
    // SAFETY: the node is a memcpy node of the graph; the driver fills in its parameters.
    unsafe { cuGraphMemcpyNodeGetParams(node, params.as_mut_ptr()) }.result()?;
    let p = params.as_ptr();
    // SAFETY: the memory types are read as the raw numbers the driver wrote (starting
    // from zeroed memory), never as a Rust enum that might not hold them.
    let (src, dst) = unsafe {
        (
            addr_of!((*p).srcMemoryType).cast::<u32>().read(),
            addr_of!((*p).dstMemoryType).cast::<u32>().read(),
        )
    };
    let device = CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;
    Ok(src == device && dst == device)
}
