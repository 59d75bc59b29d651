//! Activation-memory estimates for encode and decode, and the decode tile plan.
//!
//! # The estimate
//! The model processes one image at a time and frees every intermediate as soon as the next
//! exists, so its peak is the largest *live set* of any single step. [`MemoryModel`] walks the
//! network with the configured widths and, for every step, adds up the tensors alive at that
//! moment (bytes = channels x pixels x dtype size) plus that step's bounded temporaries:
//!
//! | step (input `X` = c_in·p, output `O` = c_out·p) | live set |
//! |---|---|
//! | GroupNorm + SiLU | `X + out + norm_chunk` |
//! | ResNet conv1 | `X + silu(X) + O + conv_band` |
//! | ResNet norm2 / conv2 / shortcut | `X + 2·O + (norm_chunk or conv_band)` |
//! | ResNet residual add | `X + 3·O` with a shortcut conv, `X + 2·O` without |
//! | mid attention (c at p = H·W/64) | `5·c·p` (x, normed x, the q/k/v product; then q) and `6·c·p + f32 k, v + max(score block, 12·c·p bytes)` (x, product, q, output) |
//! | upsample (c at p) | `c·p + 4·c·p + 4·c·p + conv_band` (f32: `+ 256·c²` bytes, the phase filters; on cuDNN's TF32 path, which runs the phases in bands, the upsampled `4·c·p` never exists) |
//!
//! `norm_chunk` <= `op_chunk_bytes` (f32 temporaries of a few groups), `conv_band` <=
//! `op_chunk_bytes` (one band of output rows, including the im2col buffer a CUDA convolution
//! materialises), `score block` <= `attention_chunk_bytes`; each is at least one group / one
//! row / one query row; where the f32 flash kernel runs the attention (CUDA, head dim 512) there
//! is no score block: its split operands (fp16 high and low parts of q, k, v) take `12·c·p`
//! bytes instead. For the released VAE the decode peak is
//! reached by the first ResNet of the last up block (256 -> 128 channels at full resolution):
//!
//! `decode_peak(H, W) ≈ 640 · H · W · dtype_bytes + op_chunk_bytes`
//!
//! (f32: 2.5 KiB per pixel plus one chunk: 2.63 GiB at 1024², 0.75 GiB at 512²), and
//! `encode_peak(H, W) ≈ 3 · 128 · H · W · dtype_bytes + op_chunk_bytes` (first down block:
//! input, normed activation and output of a 128-channel convolution plus its band; measured
//! on an H100, f32 1024², CUDA pool peak 1.56 GiB against 1.63 estimated).
//! Requests also reserve their inputs and outputs; see [`MemoryModel::decode_request`].
//! Checked against the CPU backend (`benches/decode.rs`, resident-set high-water mark above
//! the weights): 739 MiB measured vs 768 MiB reserved at 512², 2561 vs 2687 MiB at 1024².
//! The CPU convolution never materialises a whole im2col band, so the estimate (which
//! counts the band CUDA materialises) stays a little above it.
//!
//! # The operation chunk of a job
//! `op_chunk_bytes` is what every job may take. Where a larger chunk pays (cuDNN's implicit
//! GEMM, whose bands bound only copies), each encode and untiled decode plans the largest chunk
//! of [`MemoryModel::op_chunk_ladder`] (up to `max_op_chunk_bytes`, halving) whose reservation
//! fits the activation capacity, and runs with it ([`crate::model::config::with_op_bytes`]);
//! a tiled decode takes `op_chunk_bytes`. Like the tile choice, it depends on the capacity,
//! not on the current load.
//!
//! # Tiling
//! A decode whose untiled reservation exceeds the whole activation capacity is decoded in
//! tiles of latent tokens ([`crate::tiling`]): [`plan_decode`] picks, of the tile shapes whose
//! reservation fits (so the result does not depend on the current load), the fewest tiles and
//! then the largest (bands across the whole width where they fit), or square tiles of the
//! configured side when the request forces tiling. A tiled decode reserves
//! `max(mid_peak(H, W), mid_out(H, W) + mid_out(tile) + up_peak(tile))` plus the f32 blending
//! accumulators `16 · H · W` bytes: the mid block runs on the whole (1/64-size) latent, the up
//! blocks one tile at a time.

use std::cmp::Reverse;

use candle_core::DType;

use crate::{
    model::{Config, attention::query_rows, layers::ConvShape, norm, sampling::DOWNSAMPLE_PADDING},
    tiling::{TilePlan, TilingConfig, min_overlap, tile_starts},
    validate::PIXELS_PER_TOKEN,
};

/// Live-set walker: tracks the largest sum seen.
struct Walk<'a> {
    cfg: &'a Config,
    s: u64,
    max: u64,
}

impl Walk<'_> {
    fn at(&mut self, bytes: u64) {
        self.max = self.max.max(bytes);
    }

    /// Bytes of a tensor of `c` channels over `p` pixels in the model dtype.
    fn t(&self, c: usize, p: u64) -> u64 {
        c as u64 * p * self.s
    }

    fn norm_temp(&self, c: usize, p: u64) -> u64 {
        let groups = self.cfg.norm_num_groups;
        norm::temp_bytes(
            c as u64 / groups as u64 * p,
            groups,
            self.cfg.chunking.op_bytes,
        )
    }

    /// Temporaries of a convolution producing `out_h` x `out_w` from an input `in_w` wide.
    fn conv_temp(
        &self,
        (c_in, c_out, kernel, stride): (usize, usize, usize, usize),
        in_w: usize,
        out: (usize, usize),
        pad_w: usize,
    ) -> u64 {
        let shape = ConvShape {
            batch: 1,
            c_in,
            c_out,
            kernel,
            stride,
            in_w,
            out_w: out.1,
            out_h: out.0,
            im2col: self.cfg.chunking.conv_im2col,
            // Same padding on every side: 2p = k − 1 (the downsamplers pad one side only).
            copies: self
                .cfg
                .chunking
                .conv_copies
                .of(stride, pad_w + 1 == kernel),
        };
        shape.temp_bytes(pad_w, self.s, self.cfg.chunking.op_bytes)
    }

    /// A same-size 3x3 convolution with padding 1 over `base` bytes held by callers.
    fn conv3(&mut self, base: u64, c_in: usize, c_out: usize, (h, w): (usize, usize)) {
        let p = (h * w) as u64;
        let temp = self.conv_temp((c_in, c_out, 3, 1), w, (h, w), 2);
        self.at(base + self.t(c_in, p) + self.t(c_out, p) + temp);
    }

    /// An f32 upsampler's phase filters, built for its call on cuDNN
    /// ([`klein_kernels::upsample_conv2d`]): their split parts in f32 and fp16 and the summed
    /// filter they come from, 256 bytes per channel pair bound the ~194 measured.
    fn phase_filters(&self, c: usize) -> u64 {
        if self.s == 4 { 256 * (c * c) as u64 } else { 0 }
    }

    fn norm_silu(&mut self, base: u64, c: usize, p: u64) {
        self.at(base + 2 * self.t(c, p) + self.norm_temp(c, p));
    }

    fn resnet(&mut self, c_in: usize, c_out: usize, (h, w): (usize, usize)) {
        let p = (h * w) as u64;
        let (x, o) = (self.t(c_in, p), self.t(c_out, p));
        self.norm_silu(0, c_in, p);
        self.at(2 * x + o + self.conv_temp((c_in, c_out, 3, 1), w, (h, w), 2));
        self.at(x + 2 * o + self.norm_temp(c_out, p));
        self.at(x + 2 * o + self.conv_temp((c_out, c_out, 3, 1), w, (h, w), 2));
        // With a channel change the 1x1 shortcut of the input takes the block output as its
        // residual (the input, the block output and the sum alive); otherwise conv2 took the
        // input as its residual. `x + 3o` stays as a bound for the unfused sum of a bf16 model
        // on the CPU.
        if c_in != c_out {
            self.at(x + 2 * o + self.conv_temp((c_in, c_out, 1, 1), w, (h, w), 0));
            self.at(x + 3 * o);
        } else {
            self.at(x + 2 * o);
        }
    }

    fn attention(&mut self, c: usize, (h, w): (usize, usize)) {
        let p = (h * w) as u64;
        let x = self.t(c, p);
        self.at(3 * x + self.norm_temp(c, p));
        // x, the normed x and the q, k, v product; then q with its bias beside the product.
        self.at(5 * x);
        let f32_kv = if self.s == 4 { 0 } else { 2 * c as u64 * p * 4 };
        let rows = query_rows(1, h * w, self.cfg.chunking.attention_bytes) as u64;
        let block = rows * p * 4 * 2 + 2 * rows * c as u64 * 4;
        // Or, where the f32 flash kernel runs, its fp16 high and low parts of q, k and v.
        let split = 3 * 4 * c as u64 * p;
        // x, the product, q and the output, with the kernel's or the composition's temporaries.
        self.at(6 * x + f32_kv + block.max(split));
    }

    fn mid(&mut self, c: usize, hw: (usize, usize)) {
        self.resnet(c, c, hw);
        if self.cfg.mid_block_add_attention {
            self.attention(c, hw);
        }
        self.resnet(c, c, hw);
    }
}

/// Activation estimates for one model configuration and dtype.
#[derive(Debug, Clone)]
pub struct MemoryModel {
    cfg: Config,
    dtype_bytes: u64,
    /// The largest operation chunk a job may plan ([`Self::op_chunk_ladder`]); the smallest is
    /// the configuration's.
    max_op_bytes: u64,
}

impl MemoryModel {
    /// Estimates at the configuration's operation chunk, which every job takes.
    pub fn new(cfg: &Config, dtype: DType) -> Self {
        Self {
            cfg: cfg.clone(),
            dtype_bytes: dtype.size_in_bytes() as u64,
            max_op_bytes: cfg.chunking.op_bytes,
        }
    }

    /// The same estimates, with jobs free to plan operation chunks up to `max_op_bytes`.
    pub fn with_max_op_bytes(self, max_op_bytes: u64) -> Self {
        Self {
            max_op_bytes: max_op_bytes.max(self.cfg.chunking.op_bytes),
            ..self
        }
    }

    /// The same estimates at an operation chunk of `op_bytes`.
    fn at_op_bytes(&self, op_bytes: u64) -> Self {
        let mut m = self.clone();
        m.cfg.chunking.op_bytes = op_bytes;
        m
    }

    /// The largest operation chunk a job may plan.
    pub fn max_op_bytes(&self) -> u64 {
        self.max_op_bytes
    }

    /// The operation chunks a job may take, largest first: the maximum, halving while above the
    /// configured chunk, then the configured chunk. Taller convolution bands (fewer, larger
    /// passes, fewer copies) make a decode faster: docs/performance.md, ninth session.
    pub fn op_chunk_ladder(&self) -> Vec<u64> {
        let min = self.cfg.chunking.op_bytes;
        let mut ladder = Vec::new();
        let mut bytes = self.max_op_bytes;
        while bytes > min {
            ladder.push(bytes);
            bytes /= 2;
        }
        ladder.push(min);
        ladder
    }

    /// The largest operation chunk of the ladder whose reservation `need` fits `capacity`, with
    /// that reservation; else the configured chunk's.
    fn largest_fitting(&self, capacity: u64, need: impl Fn(&Self) -> u64) -> (u64, u64) {
        let mut plan = (0, 0);
        // The ladder ends with the configured chunk: the fallback is the last one tried.
        for op_bytes in self.op_chunk_ladder() {
            plan = (op_bytes, need(&self.at_op_bytes(op_bytes)));
            if plan.1 <= capacity {
                break;
            }
        }
        plan
    }

    fn walk(&self) -> Walk<'_> {
        Walk {
            cfg: &self.cfg,
            s: self.dtype_bytes,
            max: 0,
        }
    }

    /// Peak bytes of decoding one `height` x `width` pixel image (multiples of 16).
    pub fn decode_peak(&self, height: usize, width: usize) -> u64 {
        self.decode_mid_peak(height, width)
            .max(self.decode_up_peak(height, width))
    }

    /// Bytes of the decoder's mid-block output for a `height` x `width` image.
    fn mid_output(&self, height: usize, width: usize) -> u64 {
        let f = self.cfg.vae_scale_factor();
        let c = self.cfg.decoder_channels()[self.cfg.decoder_channels().len() - 1];
        (c * (height / f) * (width / f)) as u64 * self.dtype_bytes
    }

    /// Peak of the global part: `post_quant_conv`, `conv_in` and the mid block.
    fn decode_mid_peak(&self, height: usize, width: usize) -> u64 {
        let cfg = &self.cfg;
        let f = cfg.vae_scale_factor();
        let (h, w) = (height / f, width / f);
        let mut walk = self.walk();
        let lc = cfg.latent_channels;
        let z = walk.t(lc, (h * w) as u64);
        walk.at(3 * z);
        let c = cfg.decoder_channels()[cfg.decoder_channels().len() - 1];
        walk.conv3(z, lc, c, (h, w));
        walk.mid(c, (h, w));
        walk.max
    }

    /// Peak of the up blocks and output layers producing `height` x `width` pixels.
    fn decode_up_peak(&self, height: usize, width: usize) -> u64 {
        let cfg = &self.cfg;
        let f = cfg.vae_scale_factor();
        let (mut h, mut w) = (height / f, width / f);
        let mut walk = self.walk();
        let rev: Vec<usize> = cfg.decoder_channels().iter().rev().copied().collect();
        for (i, &c_out) in rev.iter().enumerate() {
            let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
            for j in 0..=cfg.layers_per_block {
                walk.resnet(if j == 0 { c_in } else { c_out }, c_out, (h, w));
            }
            if i + 1 < rev.len() {
                let x = walk.t(c_out, (h * w) as u64);
                (h, w) = (2 * h, 2 * w);
                let temp = walk.conv_temp((c_out, c_out, 3, 1), w, (h, w), 2);
                let phases = walk.phase_filters(c_out);
                walk.at(x + 2 * walk.t(c_out, (h * w) as u64) + temp + phases);
            }
        }
        let first = rev[rev.len() - 1];
        let p = (h * w) as u64;
        walk.norm_silu(0, first, p);
        walk.conv3(0, first, cfg.out_channels, (h, w));
        let pixels = walk.t(cfg.out_channels, p);
        walk.at(3 * pixels + 2 * cfg.out_channels as u64 * p * 4);
        walk.max
    }

    /// Peak bytes of encoding one `height` x `width` pixel image (multiples of 16).
    pub fn encode_peak(&self, height: usize, width: usize) -> u64 {
        let cfg = &self.cfg;
        let (mut h, mut w) = (height, width);
        let mut walk = self.walk();
        let ch = &cfg.block_out_channels;
        let p = (h * w) as u64;
        // The f32 input and its copy in the model dtype.
        let input = cfg.in_channels as u64 * p * 4 + walk.t(cfg.in_channels, p);
        walk.conv3(input, cfg.in_channels, ch[0], (h, w));
        for (i, &c_out) in ch.iter().enumerate() {
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            for j in 0..cfg.layers_per_block {
                walk.resnet(if j == 0 { c_in } else { c_out }, c_out, (h, w));
            }
            if i + 1 < ch.len() {
                let x = walk.t(c_out, (h * w) as u64);
                let out = (h / 2, w / 2);
                let pad = DOWNSAMPLE_PADDING.left + DOWNSAMPLE_PADDING.right;
                let temp = walk.conv_temp((c_out, c_out, 3, 2), w, out, pad);
                walk.at(x + walk.t(c_out, (out.0 * out.1) as u64) + temp);
                (h, w) = out;
            }
        }
        let last = ch[ch.len() - 1];
        walk.mid(last, (h, w));
        let p = (h * w) as u64;
        walk.norm_silu(0, last, p);
        walk.conv3(0, last, 2 * cfg.latent_channels, (h, w));
        walk.max
    }

    /// Bytes to reserve for decoding `batch` images of a `grid` (tokens) untiled: one image's
    /// peak, the latents and the u8 output of the whole batch.
    pub fn decode_request(&self, grid: (usize, usize), batch: usize) -> u64 {
        let (h, w) = (grid.0 * PIXELS_PER_TOKEN, grid.1 * PIXELS_PER_TOKEN);
        self.decode_peak(h, w) + self.io_bytes(grid, batch)
    }

    /// Bytes to reserve for a tiled decode with tiles of `tile` (rows, cols) tokens: the
    /// larger of the whole-image mid block and one tile's up blocks (next to the whole
    /// mid-block output and the tile's slice of it), the f32 blending accumulators of one
    /// image, and the batch's inputs and outputs.
    pub fn tiled_decode_request(
        &self,
        grid: (usize, usize),
        batch: usize,
        tile: (usize, usize),
    ) -> u64 {
        let (h, w) = (grid.0 * PIXELS_PER_TOKEN, grid.1 * PIXELS_PER_TOKEN);
        let (th, tw) = (
            tile.0.min(grid.0) * PIXELS_PER_TOKEN,
            tile.1.min(grid.1) * PIXELS_PER_TOKEN,
        );
        let tiles = self.mid_output(h, w) + self.mid_output(th, tw) + self.decode_up_peak(th, tw);
        let accumulators = (self.cfg.out_channels as u64 + 1) * (h * w) as u64 * 4;
        self.decode_mid_peak(h, w).max(tiles) + accumulators + self.io_bytes(grid, batch)
    }

    /// Bytes to reserve for encoding `batch` images of `height` x `width` pixels.
    pub fn encode_request(&self, height: usize, width: usize, batch: usize) -> u64 {
        let grid = (height / PIXELS_PER_TOKEN, width / PIXELS_PER_TOKEN);
        let images = (batch * height * width * self.cfg.in_channels) as u64 * 4;
        self.encode_peak(height, width) + images + self.io_bytes(grid, batch)
    }

    /// Packed latents (f32 on the wire, model dtype inside) and u8 pixels of a batch.
    fn io_bytes(&self, grid: (usize, usize), batch: usize) -> u64 {
        let tokens = (batch * grid.0 * grid.1) as u64;
        let latents = tokens * self.cfg.packed_channels() as u64 * (4 + self.dtype_bytes);
        let pixels = tokens * (PIXELS_PER_TOKEN * PIXELS_PER_TOKEN * self.cfg.out_channels) as u64;
        latents + pixels
    }
}

/// How an encode will run and what it reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodePlan {
    /// The operation chunk of the job ([`crate::model::config::with_op_bytes`]).
    pub op_bytes: u64,
    /// Bytes reserved through the admission budget.
    pub reserve_bytes: u64,
}

/// The largest operation chunk whose encode reservation fits `capacity` (else the configured
/// one, whose reservation the admission then refuses or queues as before).
pub fn plan_encode(
    memory: &MemoryModel,
    (height, width): (usize, usize),
    batch: usize,
    capacity: u64,
) -> EncodePlan {
    let (op_bytes, reserve_bytes) =
        memory.largest_fitting(capacity, |m| m.encode_request(height, width, batch));
    EncodePlan {
        op_bytes,
        reserve_bytes,
    }
}

/// How a decode will run and what it reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// What is reported (the overlap is the smallest actual one).
    pub tiles: TilePlan,
    /// The overlap asked of the tile layout ([`tile_starts`]), tokens.
    pub overlap_param: usize,
    /// The operation chunk of the job: the largest that lets an untiled decode fit; for a tiled
    /// decode the largest whose tiling needs at most one tile more than the fewest
    /// ([`plan_decode`]); a forced tiling takes the configured one.
    pub op_bytes: u64,
    /// Bytes reserved through the admission budget.
    pub reserve_bytes: u64,
}

/// A decode's plan and the one it falls back to when the first run meets an out-of-memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlans {
    /// The plan the budget reserved for.
    pub first: DecodePlan,
    /// The same request planned into half of `first`'s reservation (smaller tiles, or tiles
    /// where `first` was untiled), run from a pool handed back to the driver; `None` where
    /// nothing fits that. Under an MPS limit the pool's pieces can leave a plan that fits the
    /// budget without room (see [`klein_runtime::gpu_memory::fall_back_on_out_of_memory`]).
    pub fallback: Option<DecodePlan>,
}

impl DecodePlans {
    /// `first` and its fallback.
    pub fn new(
        memory: &MemoryModel,
        (grid, batch): ((usize, usize), usize),
        first: DecodePlan,
        tiling: &TilingConfig,
        force_tiling: bool,
    ) -> Self {
        let half = first.reserve_bytes / 2;
        let fallback = plan_decode(memory, grid, batch, half, tiling, force_tiling).ok();
        Self { first, fallback }
    }
}

/// Chooses untiled or tiled decoding for a request, and its operation chunk. `Err(bytes)` is
/// the smallest reservation any plan needs when even the smallest tile does not fit
/// `capacity`.
///
/// An untiled decode takes the largest chunk of the ladder ([`MemoryModel::op_chunk_ladder`])
/// that fits. A forced tiling takes the configured chunk. Otherwise the tiles trade against the
/// chunk: of the ladder's chunks, the largest whose best tiling needs at most one tile more than
/// the fewest any chunk allows. Taller convolution bands outweigh a third band: the 16 GB
/// plan's tiled 1024² decode (H200, under its MPS limit) took 0.90–1.21 s as two bands at
/// 128 MiB chunks, 0.92–0.96 s as three at 256 MiB and 0.61–0.63 s as three at 512 MiB.
pub fn plan_decode(
    memory: &MemoryModel,
    grid: (usize, usize),
    batch: usize,
    capacity: u64,
    tiling: &TilingConfig,
    force_tiling: bool,
) -> Result<DecodePlan, u64> {
    let (op_bytes, untiled) = memory.largest_fitting(capacity, |m| m.decode_request(grid, batch));
    if !force_tiling && untiled <= capacity {
        return Ok(DecodePlan {
            tiles: TilePlan::untiled(),
            overlap_param: 0,
            op_bytes,
            reserve_bytes: untiled,
        });
    }
    let search = TileSearch {
        memory,
        grid,
        batch,
        capacity,
        tiling,
    };
    let least = (search.smallest(grid.0), search.smallest(grid.1));
    let tiled = if force_tiling {
        search.forced()
    } else {
        let plans: Vec<DecodePlan> = memory
            .op_chunk_ladder()
            .into_iter()
            .map(|op_bytes| memory.at_op_bytes(op_bytes))
            .filter_map(|m| {
                let at_chunk = TileSearch {
                    memory: &m,
                    ..search
                };
                (at_chunk.request(least) <= capacity)
                    .then(|| at_chunk.fewest())
                    .flatten()
            })
            .collect();
        let fewest = plans.iter().map(|p| p.tiles.tile_count).min();
        plans
            .into_iter()
            .find(|p| fewest.is_some_and(|f| p.tiles.tile_count <= f + 1))
    };
    tiled.ok_or_else(|| search.request(least).min(untiled))
}

/// The tile shapes of one decode request that fit `capacity` at `memory`'s operation chunk.
#[derive(Clone, Copy)]
struct TileSearch<'a> {
    memory: &'a MemoryModel,
    grid: (usize, usize),
    batch: usize,
    capacity: u64,
    tiling: &'a TilingConfig,
}

impl TileSearch<'_> {
    /// The smallest tile side the budget may fall back to along an axis of `n` tokens.
    fn smallest(&self, n: usize) -> usize {
        self.tiling.min_tile_tokens.min(n).max(1)
    }

    /// Bytes to reserve with tiles of `tile` (rows, cols) tokens.
    fn request(&self, tile: (usize, usize)) -> u64 {
        self.memory
            .tiled_decode_request(self.grid, self.batch, tile)
    }

    /// The plan of `tile` tokens if it fits.
    fn fits(&self, tile: (usize, usize)) -> Option<DecodePlan> {
        let bytes = self.request(tile);
        (bytes <= self.capacity).then(|| self.plan(tile, bytes))
    }

    /// The tiled plan of `tile` tokens, reserving `bytes`.
    fn plan(&self, tile: (usize, usize), bytes: u64) -> DecodePlan {
        let (grid, overlap) = (self.grid, self.tiling.overlap_for(tile.0.min(tile.1)));
        let count =
            tile_starts(grid.0, tile.0, overlap).len() * tile_starts(grid.1, tile.1, overlap).len();
        DecodePlan {
            tiles: TilePlan {
                tiled: true,
                tile_tokens: tile,
                overlap_tokens: min_overlap(grid, tile, overlap),
                tile_count: count,
            },
            overlap_param: overlap,
            op_bytes: self.memory.cfg.chunking.op_bytes,
            reserve_bytes: bytes,
        }
    }

    /// Square tiles of the configured side, smaller where the capacity needs it.
    fn forced(&self) -> Option<DecodePlan> {
        let grid = self.grid;
        let side = self.tiling.tile_tokens.min(grid.0.max(grid.1));
        (self.smallest(side)..=side)
            .rev()
            .find_map(|t| self.fits((t.min(grid.0), t.min(grid.1))))
    }

    /// Of the tile shapes that fit, the fewest tiles, then the largest (the overlaps grow with
    /// them): where the budget allows, bands across the whole width, which overlap along one
    /// axis only and so decode far fewer tokens twice than square tiles do. For each height
    /// the widest tile that fits (a wider one never reserves less).
    fn fewest(&self) -> Option<DecodePlan> {
        let grid = self.grid;
        let mut best: Option<((usize, Reverse<usize>), DecodePlan)> = None;
        for rows in self.smallest(grid.0)..=grid.0 {
            let widths: Vec<usize> = (self.smallest(grid.1)..=grid.1)
                .filter(|&cols| (rows, cols) != grid)
                .collect();
            let fitting =
                widths.partition_point(|&cols| self.request((rows, cols)) <= self.capacity);
            let Some(plan) = fitting
                .checked_sub(1)
                .and_then(|i| self.fits((rows, widths[i])))
            else {
                continue;
            };
            let t = plan.tiles;
            let key = (t.tile_count, Reverse(t.tile_tokens.0 * t.tile_tokens.1));
            if best.as_ref().is_none_or(|(b, _)| key < *b) {
                best = Some((key, plan));
            }
        }
        best.map(|(_, plan)| plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> MemoryModel {
        MemoryModel::new(&Config::default(), DType::F32)
    }

    #[test]
    fn decode_peak_follows_the_documented_formula() {
        let m = real();
        let op = Config::default().chunking.op_bytes;
        for side in [512usize, 1024, 2048] {
            let px = (side * side) as u64;
            let peak = m.decode_peak(side, side);
            let formula = 640 * px * 4;
            assert!(peak >= formula, "{side}: {peak} < {formula}");
            assert!(
                peak <= formula + 2 * op,
                "{side}: {peak} > {formula} + 2 chunks"
            );
        }
        // Linear in pixels once the chunks are amortised.
        let ratio = m.decode_peak(2048, 2048) as f64 / m.decode_peak(1024, 1024) as f64;
        assert!((3.5..4.1).contains(&ratio), "{ratio}");
        let bf16 = MemoryModel::new(&Config::default(), DType::BF16);
        assert!(bf16.decode_peak(1024, 1024) < m.decode_peak(1024, 1024) * 6 / 10);
    }

    #[test]
    fn small_decodes_count_the_upsamplers_phase_filters() {
        // H200, vae-svc under MPS: a 64² decode peaked at 67.7 MB once its upsamplers built
        // their phase filters (50.7 MB for 512 channels), against 47.9 MB reserved before.
        let m = real();
        assert!(m.decode_peak(64, 64) >= 67_657_728);
        assert_eq!(
            MemoryModel::new(&Config::default(), DType::BF16)
                .walk()
                .phase_filters(512),
            0
        );
    }

    #[test]
    fn encode_peak_is_below_decode_peak() {
        let m = real();
        let enc = m.encode_peak(1024, 1024);
        assert!(enc >= 3 * 128 * 1024 * 1024 * 4, "{enc}");
        assert!(enc < m.decode_peak(1024, 1024));
    }

    fn tiling() -> TilingConfig {
        TilingConfig {
            tile_tokens: 32,
            overlap_tokens: 4,
            min_tile_tokens: 8,
            norm_max_passes: 4,
            norm_tolerance: 0.02,
        }
    }

    #[test]
    fn plans_untiled_when_it_fits_and_the_tiles_covering_the_fewest_tokens_otherwise() {
        let m = real();
        let grid = (64, 64);
        let untiled = m.decode_request(grid, 1);
        let plan = plan_decode(&m, grid, 1, untiled, &tiling(), false).unwrap();
        assert_eq!(plan.tiles, TilePlan::untiled());
        assert_eq!(plan.reserve_bytes, untiled);

        // Just short of untiled: two bands across the whole width, the tallest that fit.
        let plan = plan_decode(&m, grid, 1, untiled - 1, &tiling(), false).unwrap();
        assert!(plan.tiles.tiled);
        assert!(plan.reserve_bytes < untiled);
        let (rows, cols) = plan.tiles.tile_tokens;
        assert_eq!((cols, plan.tiles.tile_count), (64, 2), "{:?}", plan.tiles);
        assert!(m.tiled_decode_request(grid, 1, (rows + 1, 64)) > untiled - 1);
        assert_eq!(plan.overlap_param, 4);
        assert_eq!(plan.tiles.overlap_tokens, 2 * rows - 64);

        // The room of a 48-token square: two bands decode about half the tokens four such
        // squares would (4 · 48² = 9216 a pass against 2 · 64 · at most 36).
        let square = m.tiled_decode_request(grid, 1, (48, 48));
        let plan = plan_decode(&m, grid, 1, square, &tiling(), false).unwrap();
        let t = plan.tiles;
        assert_eq!((t.tile_tokens.1, t.tile_count), (64, 2), "{t:?}");
        assert!((34..=36).contains(&t.tile_tokens.0), "{t:?}");
        assert!(plan.reserve_bytes <= square);
    }

    #[test]
    fn a_decode_falls_back_to_a_plan_of_half_its_reservation() {
        let m = real();
        let grid = (64, 64);
        let plan = |capacity| plan_decode(&m, grid, 1, capacity, &tiling(), false).unwrap();
        let untiled = plan(u64::MAX);
        let plans = DecodePlans::new(&m, (grid, 1), untiled, &tiling(), false);
        let fallback = plans.fallback.expect("bands fit half an untiled decode");
        assert!(fallback.tiles.tiled, "{fallback:?}");
        assert!(fallback.reserve_bytes <= untiled.reserve_bytes / 2);

        let bands = plan(untiled.reserve_bytes - 1);
        let fallback = DecodePlans::new(&m, (grid, 1), bands, &tiling(), false)
            .fallback
            .expect("smaller tiles fit");
        let area = |p: DecodePlan| p.tiles.tile_tokens.0 * p.tiles.tile_tokens.1;
        assert!(area(fallback) < area(bands), "{fallback:?} vs {bands:?}");
        assert!(fallback.reserve_bytes <= bands.reserve_bytes / 2);

        let least = plan(m.tiled_decode_request(grid, 1, (8, 8)));
        let plans = DecodePlans::new(&m, (grid, 1), least, &tiling(), false);
        assert_eq!(
            plans.fallback, None,
            "nothing fits half the smallest tile's room"
        );
    }

    #[test]
    fn tight_budgets_tile_along_both_axes() {
        let m = real();
        let grid = (64, 64);
        let capacity = m.tiled_decode_request(grid, 1, (16, 16));
        let plan = plan_decode(&m, grid, 1, capacity, &tiling(), false).unwrap();
        let t = plan.tiles;
        assert!(t.tile_tokens.0 < 64 && t.tile_tokens.1 < 64, "{t:?}");
        assert!(t.tile_count >= 4, "{t:?}");
        assert!(plan.reserve_bytes <= capacity);
    }

    #[test]
    fn jobs_take_the_largest_operation_chunk_their_reservation_fits() {
        let min = Config::default().chunking.op_bytes;
        let m = real().with_max_op_bytes(16 << 30);
        let ladder: Vec<u64> = (0..8).map(|i| (16u64 << 30) >> i).collect();
        assert_eq!(m.op_chunk_ladder(), ladder);
        assert_eq!(*ladder.last().unwrap(), min);
        assert_eq!(
            real().op_chunk_ladder(),
            [min],
            "no maximum: the configured chunk"
        );
        let at = |op: u64| {
            let mut cfg = Config::default();
            cfg.chunking.op_bytes = op;
            MemoryModel::new(&cfg, DType::F32)
        };
        let grid = (64, 64);
        let roomy = plan_decode(&m, grid, 1, u64::MAX, &tiling(), false).unwrap();
        assert_eq!(
            (roomy.tiles, roomy.op_bytes),
            (TilePlan::untiled(), 16 << 30)
        );
        assert_eq!(roomy.reserve_bytes, at(16 << 30).decode_request(grid, 1));
        // Between the 1 GiB and 2 GiB reservations: 1 GiB chunks.
        let (one, two) = (
            at(1 << 30).decode_request(grid, 1),
            at(2 << 30).decode_request(grid, 1),
        );
        assert!(one < two, "taller bands reserve more: {one} vs {two}");
        let plan = plan_decode(&m, grid, 1, two - 1, &tiling(), false).unwrap();
        assert_eq!((plan.tiles, plan.op_bytes), (TilePlan::untiled(), 1 << 30));
        assert_eq!(plan.reserve_bytes, one);
        // Only the configured chunk fits: as before the ladder.
        let tight = at(min).decode_request(grid, 1);
        let plan = plan_decode(&m, grid, 1, tight, &tiling(), false).unwrap();
        assert_eq!((plan.tiles, plan.op_bytes), (TilePlan::untiled(), min));
        // A forced tiling takes the configured chunk.
        let forced = plan_decode(&m, grid, 1, u64::MAX, &tiling(), true).unwrap();
        assert!(forced.tiles.tiled);
        assert_eq!(forced.op_bytes, min);
        let encode = plan_encode(&m, (1024, 1024), 1, u64::MAX);
        assert_eq!(encode.op_bytes, 16 << 30);
        assert_eq!(
            encode.reserve_bytes,
            at(16 << 30).encode_request(1024, 1024, 1)
        );
        let refused = plan_encode(&m, (1024, 1024), 1, 0);
        assert_eq!(refused.op_bytes, min);
        assert_eq!(refused.reserve_bytes, at(min).encode_request(1024, 1024, 1));
    }

    /// A tiled decode for want of room takes the largest chunk whose tiling needs at most one
    /// tile more than the fewest any chunk allows: on the 16 GB plan's VAE capacity, three bands
    /// at a chunk above the configured one rather than two at the configured one.
    #[test]
    fn tiled_decodes_trade_a_tile_for_taller_convolution_bands() {
        let min = Config::default().chunking.op_bytes;
        let m = real().with_max_op_bytes(16 << 30);
        let grid = (64, 64);
        let capacity = 1_811_000_000;
        let plan = plan_decode(&m, grid, 1, capacity, &tiling(), false).unwrap();
        let per_chunk: Vec<(u64, usize)> = m
            .op_chunk_ladder()
            .into_iter()
            .filter_map(|op| {
                let only = real().at_op_bytes(op);
                let p = plan_decode(&only, grid, 1, capacity, &tiling(), false).ok()?;
                Some((op, p.tiles.tile_count))
            })
            .collect();
        let fewest = per_chunk.iter().map(|&(_, n)| n).min().unwrap();
        let chosen = per_chunk
            .iter()
            .find(|&&(_, n)| n <= fewest + 1)
            .copied()
            .unwrap();
        assert_eq!(
            (plan.op_bytes, plan.tiles.tile_count),
            chosen,
            "{per_chunk:?}"
        );
        assert!(
            plan.op_bytes > min && plan.tiles.tile_count == fewest + 1,
            "{plan:?}"
        );
        assert!(plan.reserve_bytes <= capacity);
        assert_eq!(
            plan.tiles.tile_tokens.1, 64,
            "bands across the width: {plan:?}"
        );
        assert_eq!(
            plan.reserve_bytes,
            real()
                .at_op_bytes(plan.op_bytes)
                .tiled_decode_request(grid, 1, plan.tiles.tile_tokens)
        );
    }

    #[test]
    fn forced_tiling_uses_the_configured_tile_and_hopeless_budgets_are_refused() {
        let m = real();
        let plan = plan_decode(&m, (64, 64), 1, u64::MAX, &tiling(), true).unwrap();
        assert_eq!(plan.tiles.tile_tokens, (32, 32));
        assert_eq!((plan.overlap_param, plan.tiles.overlap_tokens), (4, 16));
        assert_eq!(plan.tiles.tile_count, 9, "starts 0, 16, 32 on each axis");
        assert!(plan.tiles.tiled);
        let small = plan_decode(&m, (6, 4), 1, u64::MAX, &tiling(), true).unwrap();
        assert_eq!(
            (small.tiles.tile_tokens, small.tiles.tile_count),
            ((6, 4), 1)
        );
        // Forced square tiles shrink to the largest that fits the budget.
        let room = m.tiled_decode_request((64, 64), 1, (22, 22));
        assert!(m.tiled_decode_request((64, 64), 1, (23, 23)) > room);
        let shrunk = plan_decode(&m, (64, 64), 1, room, &tiling(), true).unwrap();
        assert_eq!(shrunk.tiles.tile_tokens, (22, 22));
        let need = plan_decode(&m, (64, 64), 1, 1 << 20, &tiling(), false).unwrap_err();
        assert_eq!(need, m.tiled_decode_request((64, 64), 1, (8, 8)));
    }
}
