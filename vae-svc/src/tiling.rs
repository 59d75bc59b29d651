//! Tiled decoding with overlap blending.
//!
//! The decoder's global part runs on the whole image: `conv_in` and the mid block with its
//! attention, on the latent (1/64 of the pixels), and the first up blocks the plan can afford
//! whole (`global_blocks`, the last of them without its upsampler: at 1024² on the 16 GB plan
//! three, up to 256 channels at 512²), whose group norms are then exact and which run once
//! instead of once per pass and tile. Its output is cut into tiles of `rows` x `cols` tokens
//! (a token is 16x16 image pixels; bands across the whole width where the budget allows, which
//! decode the fewest overlapping tokens), spread evenly so that neighbours overlap by at least
//! `overlap` tokens, and the rest of the up blocks decode one tile at a time:
//! 1. statistics passes record every group norm's input moments over the part of the image
//!    each tile owns (overlaps split at their middle), giving image-wide statistics; each pass
//!    normalises with the previous pass's moments, so they converge to the untiled ones (after
//!    k passes the first k norms are exact); passes stop when the moments settle. Where the
//!    convolutions run split TF32 these passes run one TF32 pass instead (moments are means
//!    over the whole image and need no f32 accuracy): one product where split TF32 runs three;
//! 2. a final pass decodes every tile with those statistics, and the pixels are blended on
//!    the device in f32 with weights that ramp linearly across every overlap (the product of
//!    a vertical and a horizontal ramp), divided by the summed weights.
//!
//! Only one tile's up-block activations live on the device at a time; the price is running
//! the up blocks once per pass. Without statistics passes (`norm_max_passes = 1`) every tile
//! normalises with its own statistics, as diffusers' tiled decode does, and seams show.

use candle_core::{DType, Tensor};
use tokio_util::sync::CancellationToken;

use crate::{
    error::VaeError,
    model::{
        AutoencoderKLFlux2,
        norm_stats::{NormStats, Region},
    },
    validate::PIXELS_PER_TOKEN,
};

/// Tile settings from the service configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TilingConfig {
    /// Tile side, tokens, when a request forces tiling (square tiles).
    pub tile_tokens: usize,
    /// Wanted overlap between neighbouring tiles, tokens (at most half a tile).
    pub overlap_tokens: usize,
    /// Smallest tile side the budget may choose, tokens.
    pub min_tile_tokens: usize,
    /// Most passes over the tiles (statistics passes plus the final one); 1 = every tile
    /// uses its own group-norm statistics, as diffusers' tiled decode does.
    pub norm_max_passes: usize,
    /// Statistics passes stop once no group's mean or deviation moved by more than this
    /// many standard deviations.
    pub norm_tolerance: f64,
}

impl TilingConfig {
    /// The overlap used with tiles of `tile` tokens.
    pub fn overlap_for(&self, tile: usize) -> usize {
        self.overlap_tokens.min(tile / 2)
    }
}

/// How a decode was split (reported to the client and in the logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilePlan {
    /// Decoded in tiles (forced or for the budget).
    pub tiled: bool,
    /// Tile height and width, tokens; (0, 0) when untiled.
    pub tile_tokens: (usize, usize),
    /// Minimum overlap between neighbouring tiles, tokens; 0 when untiled.
    pub overlap_tokens: usize,
    /// Tiles per image; 1 when untiled.
    pub tile_count: usize,
}

impl TilePlan {
    /// The whole image at once.
    pub fn untiled() -> Self {
        Self {
            tiled: false,
            tile_tokens: (0, 0),
            overlap_tokens: 0,
            tile_count: 1,
        }
    }
}

/// Start positions of tiles of side `tile` over `n` tokens, evenly spread, each neighbour
/// overlapping by at least `overlap` (`overlap < tile`).
pub fn tile_starts(n: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if tile >= n {
        return vec![0];
    }
    let stride = tile - overlap;
    let count = (n - overlap).div_ceil(stride);
    let span = n - tile;
    let gaps = count - 1;
    (0..count).map(|i| (i * span + gaps / 2) / gaps).collect()
}

/// Linear-ramp weights over one tile axis of `len` pixels, given the pixels shared with the
/// previous and the next tile. Every weight is in (0, 1].
fn ramp(len: usize, before: usize, after: usize) -> Vec<f32> {
    (0..len)
        .map(|x| {
            let up = if before > 0 {
                (x as f32 + 0.5) / before as f32
            } else {
                1.0
            };
            let down = if after > 0 {
                (len as f32 - x as f32 - 0.5) / after as f32
            } else {
                1.0
            };
            up.min(down).min(1.0)
        })
        .collect()
}

/// One tile along one axis.
struct Span {
    /// First token.
    start: usize,
    /// Tokens covered.
    len: usize,
    /// Tokens this tile owns for group-norm statistics, relative to `start` (overlaps are
    /// split at their middle, so the owned parts partition the axis).
    owned: (usize, usize),
    /// Blending weight of each pixel.
    ramp: Vec<f32>,
}

fn spans(n: usize, tile: usize, overlap: usize) -> Vec<Span> {
    let starts = tile_starts(n, tile, overlap);
    let len = tile.min(n);
    let px = PIXELS_PER_TOKEN;
    (0..starts.len())
        .map(|i| {
            let start = starts[i];
            let before = if i > 0 {
                starts[i - 1] + len - start
            } else {
                0
            };
            let after = if i + 1 < starts.len() {
                start + len - starts[i + 1]
            } else {
                0
            };
            let lo = if i > 0 {
                (start + starts[i - 1] + len) / 2 - start
            } else {
                0
            };
            let hi = if i + 1 < starts.len() {
                (start + len + starts[i + 1]) / 2 - start
            } else {
                len
            };
            Span {
                start,
                len,
                owned: (lo, hi),
                ramp: ramp(len * px, before * px, after * px),
            }
        })
        .collect()
}

/// Smallest overlap between neighbouring tiles of `tile` (rows, cols) tokens over a `grid`.
pub fn min_overlap(grid: (usize, usize), tile: (usize, usize), overlap: usize) -> usize {
    [(grid.0, tile.0), (grid.1, tile.1)]
        .into_iter()
        .flat_map(|(n, tile)| {
            let s = tile_starts(n, tile, overlap);
            let len = tile.min(n);
            s.windows(2)
                .map(move |p| p[0] + len - p[1])
                .collect::<Vec<_>>()
        })
        .min()
        .unwrap_or(0)
}

/// A tiled decode's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileJob {
    /// Tile height and width, tokens.
    pub tile: (usize, usize),
    /// Overlap asked of [`tile_starts`], tokens.
    pub overlap: usize,
    /// See [`TilingConfig::norm_max_passes`].
    pub max_passes: usize,
    /// See [`TilingConfig::norm_tolerance`].
    pub tolerance: f64,
    /// Up blocks run on the whole image before the tiles (`AutoencoderKLFlux2::decode_global`;
    /// the last of them without its upsampler): their group norms are exact and no pass
    /// repeats them.
    pub global_blocks: usize,
}

/// Decodes one image's latent `z` (1, C, 2h, 2w) over a token `grid` (h, w) in tiles and
/// blends the pixels. The decoder's `conv_in` and mid block (with the attention) and the
/// job's `global_blocks` first up blocks run on the whole image first, which is small at
/// those resolutions; only the rest is tiled. With more than one tile,
/// statistics passes of `statistics` (the same weights as `model`; the service passes
/// [`AutoencoderKLFlux2::for_statistics`]) record image-wide group-norm moments (each pass
/// normalising with the previous pass's, so they converge to the image-wide ones) until they
/// settle or the pass limit is reached; `model`'s final pass uses them. Returns
/// (1, 3, 16h, 16w) f32 on the model's device and the number of passes run.
pub fn decode_tiled(
    model: &AutoencoderKLFlux2,
    statistics: &AutoencoderKLFlux2,
    z: &Tensor,
    grid: (usize, usize),
    job: &TileJob,
    cancel: &CancellationToken,
) -> Result<(Tensor, usize), VaeError> {
    let (tile, overlap) = (job.tile, job.overlap);
    let (height, width) = (grid.0 * PIXELS_PER_TOKEN, grid.1 * PIXELS_PER_TOKEN);
    let blocks = job.global_blocks;
    let global = model.decode_global(z, blocks)?;
    let per_token = global.dim(2)? / grid.0;
    let rows = spans(grid.0, tile.0, overlap);
    let cols = spans(grid.1, tile.1, overlap);
    let tiles: Vec<(&Span, &Span)> = rows
        .iter()
        .flat_map(|r| cols.iter().map(move |c| (r, c)))
        .collect();
    let part = |r: &Span, c: &Span| -> Result<Tensor, VaeError> {
        Ok(global
            .narrow(2, r.start * per_token, r.len * per_token)?
            .narrow(3, c.start * per_token, c.len * per_token)?
            .contiguous()?)
    };
    let region = |r: &Span, c: &Span| Region {
        tokens: (r.len, c.len),
        rows: r.owned,
        cols: c.owned,
    };
    let mut stats = NormStats::Local;
    let mut passes = 1;
    if tiles.len() > 1 && job.max_passes > 1 {
        loop {
            stats = stats.refine()?;
            for &(r, c) in &tiles {
                if cancel.is_cancelled() {
                    return Err(VaeError::Cancelled);
                }
                stats.start_tile(region(r, c));
                statistics.decode_up_from(part(r, c)?, blocks, &mut stats)?;
            }
            passes += 1;
            let settled = stats.change()?.is_some_and(|c| c <= job.tolerance);
            if settled || passes >= job.max_passes {
                break;
            }
        }
        stats = stats.into_replay()?;
    }
    // The blend, on the device: each tile's pixels weighted by its ramps, added into its
    // region of the accumulators, divided by the summed weights at the end.
    let dev = global.device();
    let channels = model.out_channels();
    let mut sum = Tensor::zeros((1, channels, height, width), DType::F32, dev)?;
    let mut weight = Tensor::zeros((1, 1, height, width), DType::F32, dev)?;
    for &(r, c) in &tiles {
        if cancel.is_cancelled() {
            return Err(VaeError::Cancelled);
        }
        stats.start_tile(region(r, c));
        let pixels = model
            .decode_up_from(part(r, c)?, blocks, &mut stats)?
            .to_dtype(DType::F32)?;
        let (_, _, th, tw) = pixels.dims4()?;
        let ramps = Tensor::from_slice(&r.ramp, (1, 1, th, 1), dev)?
            .broadcast_mul(&Tensor::from_slice(&c.ramp, (1, 1, 1, tw), dev)?)?;
        let at = (r.start * PIXELS_PER_TOKEN, c.start * PIXELS_PER_TOKEN);
        sum = add_to_region(&sum, &pixels.broadcast_mul(&ramps)?, at)?;
        weight = add_to_region(&weight, &ramps, at)?;
    }
    Ok((sum.broadcast_div(&weight)?, passes))
}

/// `t` (1, C, H, W) with `x` (1, C, h, w) added to its region at pixel `(y0, x0)`.
fn add_to_region(t: &Tensor, x: &Tensor, (y0, x0): (usize, usize)) -> candle_core::Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let region = t.narrow(2, y0, h)?.narrow(3, x0, w)?;
    t.slice_assign(&[0..1, 0..c, y0..y0 + h, x0..x0 + w], &(region + x)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_grid_evenly_with_at_least_the_overlap() {
        assert_eq!(tile_starts(64, 32, 4), vec![0, 16, 32]);
        assert_eq!(tile_starts(10, 32, 4), vec![0]);
        assert_eq!(tile_starts(6, 4, 2), vec![0, 2]);
        for n in 1..80 {
            for tile in 1..40 {
                let overlap = (tile / 2).min(5);
                let s = tile_starts(n, tile, overlap);
                assert_eq!(s[0], 0);
                assert_eq!(s.last().unwrap() + tile.min(n), n, "n {n} tile {tile}");
                for p in s.windows(2) {
                    assert!(
                        p[1] > p[0] && p[0] + tile - p[1] >= overlap,
                        "n {n} tile {tile} {s:?}"
                    );
                }
            }
        }
        assert_eq!(min_overlap((64, 10), (32, 32), 4), 16);
        assert_eq!(min_overlap((8, 8), (32, 32), 4), 0);
        // A band across the whole width overlaps only along the rows.
        assert_eq!(min_overlap((64, 64), (37, 64), 8), 10);
    }

    #[test]
    fn ramps_are_complementary_across_an_overlap() {
        let a = ramp(48, 0, 16);
        let b = ramp(48, 16, 0);
        for i in 0..16 {
            let sum = a[32 + i] + b[i];
            assert!((sum - 1.0).abs() < 1e-6, "{i}: {sum}");
        }
        assert!(a.iter().chain(&b).all(|&w| w > 0.0 && w <= 1.0));
    }
}
