//! Plans of encodes and decodes from the activation estimates of [`super::MemoryModel`]: the
//! operation chunk of a job, untiled or tiled, the tiles and the up blocks a tiled decode runs
//! on the whole image (see the parent module's "Tiling").

use std::cmp::Reverse;

use super::MemoryModel;
use crate::tiling::{TilePlan, TilingConfig, min_overlap, tile_starts};

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
    /// Up blocks a tiled decode runs on the whole image before the tiles
    /// ([`crate::tiling::TileJob::global_blocks`]); 0 when untiled.
    pub global_blocks: usize,
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
/// That choice is made for every count of up blocks the decode may run on the whole image
/// first (none to all; a forced tiling runs none), and the plan whose convolutions take the
/// fewest multiply-adds at the most passes wins ([`MemoryModel::tiled_work`]): each global
/// block runs once instead of once per pass and tile, and leaves a larger tensor held
/// beside the tiles.
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
            global_blocks: 0,
        });
    }
    let search = TileSearch {
        memory,
        grid,
        batch,
        capacity,
        tiling,
        global_blocks: 0,
    };
    let least = (search.smallest(grid.0), search.smallest(grid.1));
    if force_tiling {
        return search
            .forced()
            .ok_or_else(|| search.request(least).min(untiled));
    }
    let at = |global_blocks| TileSearch {
        global_blocks,
        ..search
    };
    let work = |p: &DecodePlan| {
        let passes = tiling.norm_max_passes.max(1);
        let tile = p.tiles.tile_tokens;
        memory.tiled_work(grid, tile, p.overlap_param, p.global_blocks, passes)
    };
    (0..=memory.up_blocks())
        .filter_map(|k| at(k).at_best_chunk(least))
        .min_by_key(|p| (work(p), Reverse(p.global_blocks)))
        .ok_or_else(|| {
            (0..=memory.up_blocks())
                .map(|k| at(k).request(least))
                .fold(untiled, u64::min)
        })
}

/// The tile shapes of one decode request that fit `capacity` at `memory`'s operation chunk.
#[derive(Clone, Copy)]
struct TileSearch<'a> {
    memory: &'a MemoryModel,
    grid: (usize, usize),
    batch: usize,
    capacity: u64,
    tiling: &'a TilingConfig,
    global_blocks: usize,
}

impl TileSearch<'_> {
    /// Of the ladder's operation chunks ([`MemoryModel::op_chunk_ladder`]), the largest whose
    /// best tiling needs at most one tile more than the fewest any chunk allows: taller
    /// convolution bands outweigh one more band.
    fn at_best_chunk(&self, least: (usize, usize)) -> Option<DecodePlan> {
        let plans: Vec<DecodePlan> = self
            .memory
            .op_chunk_ladder()
            .into_iter()
            .map(|op_bytes| self.memory.at_op_bytes(op_bytes))
            .filter_map(|m| {
                let at_chunk = TileSearch {
                    memory: &m,
                    ..*self
                };
                (at_chunk.request(least) <= self.capacity)
                    .then(|| at_chunk.fewest())
                    .flatten()
            })
            .collect();
        let fewest = plans.iter().map(|p| p.tiles.tile_count).min()?;
        plans.into_iter().find(|p| p.tiles.tile_count <= fewest + 1)
    }

    /// The smallest tile side the budget may fall back to along an axis of `n` tokens.
    fn smallest(&self, n: usize) -> usize {
        self.tiling.min_tile_tokens.min(n).max(1)
    }

    /// Bytes to reserve with tiles of `tile` (rows, cols) tokens.
    fn request(&self, tile: (usize, usize)) -> u64 {
        self.memory
            .tiled_decode_request(self.grid, self.batch, tile, self.global_blocks)
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
            global_blocks: self.global_blocks,
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
    use candle_core::DType;

    use super::*;
    use crate::model::Config;

    fn real() -> MemoryModel {
        MemoryModel::new(&Config::default(), DType::F32)
    }

    /// The tiled plan [`plan_decode`] weighs for `global_blocks`.
    fn tiled_at(
        m: &MemoryModel,
        grid: (usize, usize),
        capacity: u64,
        global_blocks: usize,
    ) -> Option<DecodePlan> {
        let tiling = tiling();
        let search = TileSearch {
            memory: m,
            grid,
            batch: 1,
            capacity,
            tiling: &tiling,
            global_blocks,
        };
        search.at_best_chunk((search.smallest(grid.0), search.smallest(grid.1)))
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

        // Just short of untiled, with no up block run on the whole image: two bands across the
        // whole width, the tallest that fit.
        let plan = tiled_at(&m, grid, untiled - 1, 0).unwrap();
        assert!(plan.tiles.tiled);
        assert!(plan.reserve_bytes < untiled);
        let (rows, cols) = plan.tiles.tile_tokens;
        assert_eq!((cols, plan.tiles.tile_count), (64, 2), "{:?}", plan.tiles);
        assert!(m.tiled_decode_request(grid, 1, (rows + 1, 64), 0) > untiled - 1);
        assert_eq!(plan.overlap_param, 4);
        assert_eq!(plan.tiles.overlap_tokens, 2 * rows - 64);

        // The room of a 48-token square: two bands decode about half the tokens four such
        // squares would (4 · 48² = 9216 a pass against 2 · 64 · at most 36).
        let square = m.tiled_decode_request(grid, 1, (48, 48), 0);
        let plan = tiled_at(&m, grid, square, 0).unwrap();
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

        let least = plan(m.tiled_decode_request(grid, 1, (8, 8), 0));
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
        let capacity = m.tiled_decode_request(grid, 1, (16, 16), 0);
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
    /// at a chunk above the configured one rather than two at the configured one (for each
    /// count of up blocks run on the whole image; here none).
    #[test]
    fn tiled_decodes_trade_a_tile_for_taller_convolution_bands() {
        let min = Config::default().chunking.op_bytes;
        let m = real().with_max_op_bytes(16 << 30);
        let grid = (64, 64);
        let capacity = 1_811_000_000;
        let plan = tiled_at(&m, grid, capacity, 0).unwrap();
        let per_chunk: Vec<(u64, usize)> = m
            .op_chunk_ladder()
            .into_iter()
            .filter_map(|op| {
                let only = real().at_op_bytes(op);
                let p = tiled_at(&only, grid, capacity, 0)?;
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
            real().at_op_bytes(plan.op_bytes).tiled_decode_request(
                grid,
                1,
                plan.tiles.tile_tokens,
                0
            )
        );
    }

    /// The 16 GB plan's VAE (cuDNN, split TF32, its activation capacity): a 1024² decode runs
    /// the first three up blocks on the whole image (the third without its upsampler, 256
    /// channels at 512²) and tiles only the rest, the plan of the fewest multiply-adds; the
    /// global part and the tiles each fit. A larger image affords fewer global blocks.
    #[test]
    fn tiled_decodes_run_the_up_blocks_they_can_afford_on_the_whole_image() {
        let mut cfg = Config::default();
        cfg.chunking = cfg.chunking.through_cudnn(true);
        let m = MemoryModel::new(&cfg, DType::F32).with_max_op_bytes(16 << 30);
        let capacity = 1_811_000_000;
        let passes = tiling().norm_max_passes;
        let work = |grid, p: &DecodePlan| {
            m.tiled_work(
                grid,
                p.tiles.tile_tokens,
                p.overlap_param,
                p.global_blocks,
                passes,
            )
        };
        for (side, blocks) in [(64, 3), (96, 2), (128, 1)] {
            let grid = (side, side);
            let plan = plan_decode(&m, grid, 1, capacity, &tiling(), false).unwrap();
            assert_eq!(plan.global_blocks, blocks, "{side}: {plan:?}");
            assert!(
                plan.tiles.tiled && plan.reserve_bytes <= capacity,
                "{plan:?}"
            );
            let at = m.at_op_bytes(plan.op_bytes);
            assert_eq!(
                plan.reserve_bytes,
                at.tiled_decode_request(grid, 1, plan.tiles.tile_tokens, blocks)
            );
            for k in 0..=m.up_blocks() {
                match tiled_at(&m, grid, capacity, k) {
                    Some(other) => assert!(work(grid, &plan) <= work(grid, &other), "{k}"),
                    None => assert!(k > blocks, "{side}: {k} global blocks fit no tile"),
                }
            }
        }
        let none = plan_decode(&m, (64, 64), 1, capacity, &tiling(), true).unwrap();
        assert_eq!(
            none.global_blocks, 0,
            "a forced tiling runs every up block in tiles"
        );
        // Half of 1024²'s work: three global blocks leave an upsampler and the last block tiled.
        let grid = (64, 64);
        let (k0, k3) = (
            tiled_at(&m, grid, capacity, 0),
            tiled_at(&m, grid, capacity, 3),
        );
        assert!(2 * work(grid, &k3.unwrap()) < work(grid, &k0.unwrap()));
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
        let room = m.tiled_decode_request((64, 64), 1, (22, 22), 0);
        assert!(m.tiled_decode_request((64, 64), 1, (23, 23), 0) > room);
        let shrunk = plan_decode(&m, (64, 64), 1, room, &tiling(), true).unwrap();
        assert_eq!(shrunk.tiles.tile_tokens, (22, 22));
        let need = plan_decode(&m, (64, 64), 1, 1 << 20, &tiling(), false).unwrap_err();
        assert_eq!(need, m.tiled_decode_request((64, 64), 1, (8, 8), 0));
    }
}
