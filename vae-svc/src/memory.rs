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
//! | upsample (c at p) | `c·p + 4·c·p + 4·c·p + conv_band` (f32: `+ 256·c²` bytes, the phase filters; on cuDNN's TF32 path, which runs the phases in bands, the upsampled `4·c·p` never exists, but is still counted, as is the normalised input of a convolution that takes its norm as a prologue: docs/performance.md, "Twenty-fifth session", why the tighter estimate was not kept) |
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
//! configured side when the request forces tiling. The mid block and the first `k` up blocks
//! (the k-th without its upsampler) run on the whole image, the rest one tile at a time; a
//! tiled decode reserves `max(mid_peak(H, W), global_peak_k(H, W), global_out_k(H, W) +
//! global_out_k(tile) + tiled_peak_k(tile))` plus the f32 blending accumulators `16 · H · W`
//! bytes. Every `k` from none to all is weighed, each with its best tiling, and the plan of
//! the fewest convolution multiply-adds (the tiled stages counted once per pass) wins: on
//! the 16 GB plan a 1024² decode runs three up blocks whole (up to 256 channels at 512²) and
//! only the last upsampler, up block and output layers in bands, half the work of tiling
//! every up block, and closer to the untiled image (exact group norms in the global part).

use candle_core::DType;

use crate::{
    model::{Config, attention::query_rows, layers::ConvShape, norm, sampling::DOWNSAMPLE_PADDING},
    tiling::tile_starts,
    validate::PIXELS_PER_TOKEN,
};

mod plan;

pub use plan::{DecodePlan, DecodePlans, EncodePlan, plan_decode, plan_encode};

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

/// One step of the decoder after its mid block, at its input's resolution `hw` (latent px).
#[derive(Debug, Clone, Copy)]
enum UpStage {
    /// An up block's ResNets.
    Resnets {
        c_in: usize,
        c_out: usize,
        hw: (usize, usize),
    },
    /// An up block's nearest ×2 upsampling and 3x3 convolution.
    Upsample { c: usize, hw: (usize, usize) },
    /// `conv_out(silu(conv_norm_out(x)))`.
    Out { c: usize, hw: (usize, usize) },
}

impl UpStage {
    /// Its input's channels and resolution.
    fn input(&self) -> (usize, (usize, usize)) {
        match *self {
            UpStage::Resnets { c_in, hw, .. } => (c_in, hw),
            UpStage::Upsample { c, hw } | UpStage::Out { c, hw } => (c, hw),
        }
    }

    /// Multiply-adds of its convolutions (an upsampler's as its four 2x2 phase filters).
    fn macs(&self, layers_per_block: usize) -> u64 {
        match *self {
            UpStage::Resnets { c_in, c_out, hw } => {
                let p = (hw.0 * hw.1) as u64;
                let shortcut = if c_in == c_out { 0 } else { c_in * c_out };
                let first = 9 * c_in * c_out + 9 * c_out * c_out + shortcut;
                p * (first + layers_per_block * 18 * c_out * c_out) as u64
            }
            UpStage::Upsample { c, hw } => (hw.0 * hw.1) as u64 * 16 * (c * c) as u64,
            UpStage::Out { c, hw } => (hw.0 * hw.1) as u64 * 9 * 3 * c as u64,
        }
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
        let stages = self.up_stages(height, width);
        self.decode_mid_peak(height, width)
            .max(self.stages_peak(&stages))
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

    /// The up blocks and output layers producing `height` x `width` pixels, in order.
    fn up_stages(&self, height: usize, width: usize) -> Vec<UpStage> {
        let cfg = &self.cfg;
        let f = cfg.vae_scale_factor();
        let mut hw = (height / f, width / f);
        let rev: Vec<usize> = cfg.decoder_channels().iter().rev().copied().collect();
        let mut stages = Vec::with_capacity(2 * rev.len());
        for (i, &c_out) in rev.iter().enumerate() {
            let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
            stages.push(UpStage::Resnets { c_in, c_out, hw });
            if i + 1 < rev.len() {
                stages.push(UpStage::Upsample { c: c_out, hw });
                hw = (2 * hw.0, 2 * hw.1);
            }
        }
        stages.push(UpStage::Out {
            c: rev[rev.len() - 1],
            hw,
        });
        stages
    }

    /// The stages a tiled decode with `global_blocks` runs on the whole image (before the
    /// tiles) and per tile ([`crate::tiling::TileJob::global_blocks`]).
    fn split_stages(stages: &[UpStage], global_blocks: usize) -> (&[UpStage], &[UpStage]) {
        stages.split_at((2 * global_blocks).saturating_sub(1).min(stages.len()))
    }

    /// Peak of running `stages` one after another.
    fn stages_peak(&self, stages: &[UpStage]) -> u64 {
        let mut walk = self.walk();
        for stage in stages {
            match *stage {
                UpStage::Resnets { c_in, c_out, hw } => {
                    for j in 0..=self.cfg.layers_per_block {
                        walk.resnet(if j == 0 { c_in } else { c_out }, c_out, hw);
                    }
                }
                UpStage::Upsample { c, hw: (h, w) } => {
                    let x = walk.t(c, (h * w) as u64);
                    let (h, w) = (2 * h, 2 * w);
                    let temp = walk.conv_temp((c, c, 3, 1), w, (h, w), 2);
                    let phases = walk.phase_filters(c);
                    walk.at(x + 2 * walk.t(c, (h * w) as u64) + temp + phases);
                }
                UpStage::Out { c, hw: (h, w) } => {
                    let p = (h * w) as u64;
                    walk.norm_silu(0, c, p);
                    walk.conv3(0, c, self.cfg.out_channels, (h, w));
                    let pixels = walk.t(self.cfg.out_channels, p);
                    walk.at(3 * pixels + 2 * self.cfg.out_channels as u64 * p * 4);
                }
            }
        }
        walk.max
    }

    /// Bytes of the input of `stages`' first: what the stages before it left (the mid block's
    /// output before the first up block).
    fn input_bytes(&self, stages: &[UpStage]) -> u64 {
        stages.first().map_or(0, |stage| {
            let (c, (h, w)) = stage.input();
            c as u64 * (h * w) as u64 * self.dtype_bytes
        })
    }

    /// Relative cost of a tiled decode of `grid` tokens in `tile`s with `global_blocks`: the
    /// multiply-adds of the convolutions it runs, those of the tiled stages once per pass (at
    /// most `passes`) over every tile, the others once. What [`plan_decode`] minimises.
    fn tiled_work(
        &self,
        grid: (usize, usize),
        tile: (usize, usize),
        overlap: usize,
        global_blocks: usize,
        passes: usize,
    ) -> u64 {
        let px = |n: usize| n * PIXELS_PER_TOKEN;
        let stages = self.up_stages(px(grid.0), px(grid.1));
        let (global, _) = Self::split_stages(&stages, global_blocks);
        let whole: u64 = global
            .iter()
            .map(|s| s.macs(self.cfg.layers_per_block))
            .sum();
        let decoded = |n: usize, t: usize| tile_starts(n, t, overlap).len() * t.min(n);
        let tiles = self.up_stages(px(decoded(grid.0, tile.0)), px(decoded(grid.1, tile.1)));
        let (_, per_tile) = Self::split_stages(&tiles, global_blocks);
        let tiled: u64 = per_tile
            .iter()
            .map(|s| s.macs(self.cfg.layers_per_block))
            .sum();
        whole + passes as u64 * tiled
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

    /// Bytes to reserve for a tiled decode with tiles of `tile` (rows, cols) tokens and
    /// `global_blocks` up blocks run on the whole image first: the largest of the whole-image
    /// mid block, those global up blocks, and one tile's remaining stages (next to the whole
    /// global output and the tile's slice of it), plus the f32 blending accumulators of one
    /// image and the batch's inputs and outputs.
    pub fn tiled_decode_request(
        &self,
        grid: (usize, usize),
        batch: usize,
        tile: (usize, usize),
        global_blocks: usize,
    ) -> u64 {
        let (h, w) = (grid.0 * PIXELS_PER_TOKEN, grid.1 * PIXELS_PER_TOKEN);
        let (th, tw) = (
            tile.0.min(grid.0) * PIXELS_PER_TOKEN,
            tile.1.min(grid.1) * PIXELS_PER_TOKEN,
        );
        let whole = self.up_stages(h, w);
        let (global, rest) = Self::split_stages(&whole, global_blocks);
        let part = self.up_stages(th, tw);
        let (_, per_tile) = Self::split_stages(&part, global_blocks);
        // The global output, a tile's slice of it, and the tile's stages.
        let tiles =
            self.input_bytes(rest) + self.input_bytes(per_tile) + self.stages_peak(per_tile);
        let global_peak = self.decode_mid_peak(h, w).max(self.stages_peak(global));
        let accumulators = (self.cfg.out_channels as u64 + 1) * (h * w) as u64 * 4;
        global_peak.max(tiles) + accumulators + self.io_bytes(grid, batch)
    }

    /// Up blocks of the decoder (the most a tiled decode can run on the whole image).
    pub fn up_blocks(&self) -> usize {
        self.cfg.decoder_channels().len()
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
}
