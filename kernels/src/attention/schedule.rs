//! How Hopper's attention kernel (`flash_attention_sm90.cu`) tiles its keys and shares its query
//! tiles among the SMs: key tiles of 128 or 144 keys ([`KeyTiles`]); one persistent block per
//! SM takes whole query tiles round by round, and the tiles left for a last, partial round are
//! cut along their keys so that every SM takes an equal share, each tile's parts merged by the
//! last to finish ([`Schedule`], `Schedule` in the kernel).

/// Query rows per block.
pub(super) const BLOCK_M: usize = 128;

/// One of the kernel's key-tile widths: its kernel, keys per K/V tile, slots per ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KeyTiles {
    pub kernel: &'static str,
    pub keys: usize,
    stages: usize,
}

const N128: KeyTiles = KeyTiles {
    kernel: "flash_attention_sm90_bf16_hd128_n128",
    keys: 128,
    stages: 3,
};
const N144: KeyTiles = KeyTiles {
    kernel: "flash_attention_sm90_bf16_hd128_n144",
    keys: 144,
    stages: 2,
};

impl KeyTiles {
    /// The wider tiles (fewer tiles, less per-tile work: 4 % faster at the 1024² step's 4608
    /// keys) unless they pad the keys more than 128-key tiles do (512² steps: 1536 keys).
    pub fn for_keys(s_kv: usize) -> Self {
        let padded = |t: KeyTiles| s_kv.div_ceil(t.keys) * t.keys;
        if padded(N144) <= padded(N128) {
            N144
        } else {
            N128
        }
    }

    /// Q and the rings' K and V tiles (bf16, head dim 128), 1024 bytes to align them, the
    /// mbarriers (Q full and empty, and each slot's K full, V full, K empty and V empty):
    /// 225.1 KiB of the SM's 227 for 128-key tiles, 177.1 for 144.
    pub fn shared_bytes(self) -> usize {
        (BLOCK_M + 2 * self.stages * self.keys) * 128 * 2 + 1024 + 8 * (2 + 4 * self.stages)
    }
}

/// Fewest key tiles a part of a split tile takes.
const MIN_PART_KEY_TILES: usize = 4;
/// What a part costs beyond its key tiles, in key tiles: its Q load, its partial result's
/// stores and the merge.
const PART_COST_KEY_TILES: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Schedule {
    /// Blocks launched.
    pub blocks: usize,
    /// Whole query tiles each block takes first (tile `n · blocks + g` for block g).
    pub rounds: usize,
    /// Blocks sharing the remaining tiles' key tiles (0 when none remain). Equal to the number
    /// of remaining tiles when they are not split: each block then takes one whole.
    pub split_blocks: usize,
    remaining: usize,
}

impl Schedule {
    /// `tiles` query tiles, each attending `key_tiles` key tiles, on `sms` SMs.
    pub fn new(tiles: usize, key_tiles: usize, sms: usize) -> Self {
        let sms = sms.max(1);
        let (rounds, remaining) = (tiles / sms, tiles % sms);
        let units = remaining * key_tiles;
        let sharing = sms.min(units / MIN_PART_KEY_TILES);
        let split_blocks = if remaining > 0
            && sharing > remaining
            && units.div_ceil(sharing) + PART_COST_KEY_TILES < key_tiles
        {
            sharing
        } else {
            remaining
        };
        let blocks = if rounds > 0 { sms } else { split_blocks };
        Schedule {
            blocks,
            rounds,
            split_blocks,
            remaining,
        }
    }

    /// Whether the remaining tiles are cut along their keys.
    pub fn splits(&self) -> bool {
        self.split_blocks > self.remaining
    }

    /// Partial-result slots: two per sharing block (its range's first and last tile).
    pub fn part_slots(&self) -> usize {
        if self.splits() {
            2 * self.split_blocks
        } else {
            0
        }
    }

    /// Tiles whose parts are merged (one arrival counter per tile and consumer warpgroup).
    pub fn split_tiles(&self) -> usize {
        if self.splits() { self.remaining } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 144-key tiles where they pad no more than 128-key ones (the 1024² step's 4608 keys),
    /// 128 elsewhere (the 512² and 768² steps); both rings fit an SM's 227 KiB.
    #[test]
    fn key_tiles_are_the_wider_unless_they_pad_more() {
        assert_eq!(KeyTiles::for_keys(4096 + 512), N144);
        assert_eq!(KeyTiles::for_keys(1031), N144);
        assert_eq!(KeyTiles::for_keys(1024 + 512), N128);
        assert_eq!(KeyTiles::for_keys(2304 + 512), N128);
        assert_eq!(
            KeyTiles::for_keys(70).kernel,
            "flash_attention_sm90_bf16_hd128_n128"
        );
        for t in [N128, N144] {
            assert!(t.shared_bytes() <= 227 * 1024, "{t:?}");
        }
    }

    /// The 1024² step on an H100 or H200 (132 SMs): 864 tiles of 36 key tiles are six whole
    /// rounds, and the 72 tiles left are shared by every SM, about 20 key tiles each instead of
    /// a seventh round of 36 on 72 SMs.
    #[test]
    fn the_last_round_of_a_1024_step_is_shared_by_every_sm() {
        let s = Schedule::new(24 * 36, 36, 132);
        assert_eq!((s.blocks, s.rounds, s.split_blocks), (132, 6, 132));
        assert!(s.splits());
        assert_eq!((s.part_slots(), s.split_tiles()), (264, 72));
    }

    /// A nearly full last round is not worth its parts' cost, and tiles of one or a few key
    /// tiles are never cut: each remaining tile then goes whole to a block.
    #[test]
    fn short_or_nearly_full_last_rounds_stay_whole() {
        let nearly_full = Schedule::new(132 * 6 + 130, 36, 132);
        assert_eq!((nearly_full.rounds, nearly_full.split_blocks), (6, 130));
        assert!(!nearly_full.splits());
        let tiny = Schedule::new(6, 1, 132);
        assert_eq!((tiny.blocks, tiny.rounds, tiny.split_blocks), (6, 0, 6));
        assert_eq!((tiny.part_slots(), tiny.split_tiles()), (0, 0));
        let even = Schedule::new(264, 36, 132);
        assert_eq!((even.blocks, even.rounds, even.split_blocks), (132, 2, 0));
    }

    /// Without whole rounds only the sharing blocks are launched, each with at least
    /// [`MIN_PART_KEY_TILES`] key tiles.
    #[test]
    fn small_problems_launch_only_the_sharing_blocks() {
        let s = Schedule::new(48, 9, 132);
        assert_eq!((s.blocks, s.rounds, s.split_blocks), (108, 0, 108));
        assert!(48 * 9 / s.split_blocks >= MIN_PART_KEY_TILES);
    }
}
