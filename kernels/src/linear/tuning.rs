//! The GEMM tuning of the linear layers ([`tune_linear`]): how a candidate is chosen
//! ([`choose`]), what a run reports per shape ([`Tuned`]), and the choices kept across starts
//! ([`TuningCache`]). Timing a shape's candidates at the card's power cap takes ~0.8 s; a
//! remembered choice is only checked bit for bit against cuBLASLt's first choice, which takes
//! two products (klein-9B's seven tuned shapes: 5.5 s of its start-up on an H200).

use std::{collections::BTreeMap, io, path::Path};

use candle_core::Result;
use serde::{Deserialize, Serialize};

/// Runs `f` with GEMM tuning on: a bf16 linear of a shape this thread has not met before, large
/// enough to matter ([`TUNED_FLOP`]), keeps the candidate `cache` remembers for it on this card
/// if that candidate's output is bit-identical to cuBLASLt's first choice's; otherwise it times
/// the bit-identical candidates and keeps a clearly faster one. Either way the shape keeps that
/// algorithm for every later call. A service runs its warm-up in it, so requests never pay for
/// the timing; shapes first met outside it keep the heuristic's first choice. Also returns what
/// it chose (nothing without CUDA), for [`TuningCache::record`].
pub fn tune_linear<T>(
    cache: &TuningCache,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<Tuned>)> {
    #[cfg(feature = "cuda")]
    {
        super::cublaslt::tuning(cache, f)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cache;
        Ok((f()?, Vec::new()))
    }
}

/// One shape's tuning ([`tune_linear`]): the card, the shape, among how many bit-identical
/// candidates, the heuristic's first choice's median ms per call in the turns, and the
/// candidate kept (its rank in the heuristic's list; 0 when none was clearly faster) with its
/// median. A choice taken from the cache was checked, not timed: its times are NaN and
/// `candidates` counts the heuristic's whole list.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuned {
    /// The card's name, compute capability and cuBLASLt version ([`TuningCache`]'s key).
    pub card: String,
    /// (batch, rows, K, N, x's row stride, x's batch stride).
    pub dims: [usize; 6],
    /// The largest powers of two (bytes, at most 256) dividing W's, x's and the output's
    /// addresses: the heuristic's candidates depend on them.
    pub align: [u32; 3],
    pub candidates: usize,
    pub first_ms: f32,
    pub chosen: usize,
    pub chosen_ms: f32,
    /// cuBLASLt's tile of the kept candidate (`cublasLtMatmulTile_t`, e.g. 197 = 168 × 128).
    pub tile: i32,
    /// Whether the choice came from the [`TuningCache`].
    pub cached: bool,
}

impl std::fmt::Display for Tuned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [b, s, k, n, ..] = self.dims;
        if self.cached {
            return write!(
                f,
                "{b}×{s}×{k} → {n}: candidate {} of the heuristic's {} (tile id {}) from the \
                 tuning cache, bit-identical to the first",
                self.chosen, self.candidates, self.tile
            );
        }
        write!(
            f,
            "{b}×{s}×{k} → {n}: candidate {} of {} (tile id {}), {:.3} ms against the first's \
             {:.3}",
            self.chosen, self.candidates, self.tile, self.chosen_ms, self.first_ms
        )
    }
}

/// Products below this many FLOPs keep the heuristic's choice even while tuning: ~0.45 ms at a
/// Hopper card's power-capped rate, so the timing's noise stays well below the differences
/// worth taking. At 1024² the single block's two products and the double block's image MLP
/// input are above it.
pub const TUNED_FLOP: f64 = 300e9;

/// A candidate replaces the heuristic's first choice only if its median time is at most this
/// fraction of the first's. Smaller differences are within the tuning rounds' spread, and a
/// whole step (GEMMs between attention and elementwise kernels) does not run in exactly the
/// GEMM-only state the rounds measure: on an H100 a tuner that took 2–3 % gains made the step
/// slower (docs/performance.md, nineteenth session).
pub const MIN_GAIN: f32 = 0.96;

/// The median of `times` (sorted in place; not empty).
#[cfg_attr(
    not(any(feature = "cuda", test)),
    expect(dead_code, reason = "the CUDA tuner's; tested here")
)]
pub(super) fn median(times: &mut [f32]) -> f32 {
    times.sort_by(f32::total_cmp);
    times[times.len() / 2]
}

/// Which candidate to keep, from each one's median time, the heuristic's first choice first:
/// the fastest if it beats the first by [`MIN_GAIN`], else the first.
#[cfg_attr(
    not(any(feature = "cuda", test)),
    expect(dead_code, reason = "the CUDA tuner's; tested here")
)]
pub(super) fn choose(medians: &[f32]) -> usize {
    let fastest = (0..medians.len())
        .min_by(|&a, &b| medians[a].total_cmp(&medians[b]))
        .unwrap_or(0);
    if medians[fastest] <= MIN_GAIN * medians[0] {
        fastest
    } else {
        0
    }
}

/// The file format [`TuningCache::write`] writes; a file of another one reads as empty.
const FORMAT: u32 = 1;

/// The tuner's choices per card ([`Tuned::card`]) and shape, kept in a JSON file between
/// starts. A choice is a rank in cuBLASLt's candidate list, which depends only on the card,
/// the library's version, the shape and the alignments, all in the key; it is still checked
/// bit for bit before use, so a stale entry costs a re-tuning, never a changed result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningCache {
    format: u32,
    cards: BTreeMap<String, Vec<Choice>>,
}

/// One shape's kept candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Choice {
    dims: [usize; 6],
    align: [u32; 3],
    rank: usize,
}

impl Default for TuningCache {
    fn default() -> Self {
        Self {
            format: FORMAT,
            cards: BTreeMap::new(),
        }
    }
}

impl TuningCache {
    /// The cache in `path`: empty where there is no file yet or it holds another format.
    /// Errors: the file cannot be read or is not a cache.
    pub fn read(path: &Path) -> io::Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e),
        };
        #[derive(Deserialize)]
        struct Header {
            format: u32,
        }
        let header: Header = serde_json::from_slice(&bytes)?;
        if header.format != FORMAT {
            return Ok(Self::default());
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Writes the cache to `path` whole or not at all (a file beside it renamed over it), making
    /// its folder if needed, so concurrent starts never read half a file.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(format!(".{}.partial", std::process::id()));
        std::fs::write(&partial, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&partial, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
    }

    /// The rank of the candidate kept for a shape on a card.
    pub fn rank(&self, card: &str, dims: [usize; 6], align: [u32; 3]) -> Option<usize> {
        self.cards
            .get(card)?
            .iter()
            .find(|c| c.dims == dims && c.align == align)
            .map(|c| c.rank)
    }

    /// Takes in a tuning run's choices, replacing what it held for the same shapes; whether
    /// anything changed.
    pub fn record(&mut self, tuned: &[Tuned]) -> bool {
        let mut changed = false;
        for t in tuned {
            let choices = self.cards.entry(t.card.clone()).or_default();
            let choice = Choice {
                dims: t.dims,
                align: t.align,
                rank: t.chosen,
            };
            match choices
                .iter_mut()
                .find(|c| c.dims == t.dims && c.align == t.align)
            {
                Some(c) if *c == choice => {}
                Some(c) => {
                    *c = choice;
                    changed = true;
                }
                None => {
                    choices.push(choice);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Shapes remembered, over all cards.
    pub fn len(&self) -> usize {
        self.cards.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_replaces_the_first_choice_only_when_clearly_faster() {
        assert_eq!(choose(&[1.0, 0.97, 0.99]), 0, "3 % is within the spread");
        assert_eq!(choose(&[1.0, 0.97, 0.95]), 2);
        assert_eq!(choose(&[1.0, 0.96]), 1, "exactly the margin");
        assert_eq!(choose(&[1.0, 1.2, f32::NAN]), 0, "a NaN time never wins");
        assert_eq!(choose(&[1.0]), 0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0, 5.0, 4.0]), 3.0);
    }

    fn tuned(card: &str, n: usize, align: u32, chosen: usize) -> Tuned {
        Tuned {
            card: card.into(),
            dims: [1, 4096, 3072, n, 3072, 4096 * 3072],
            align: [256, align, 256],
            candidates: 6,
            first_ms: 1.0,
            chosen,
            chosen_ms: 0.9,
            tile: 197,
            cached: false,
        }
    }

    #[test]
    fn choices_are_kept_per_card_shape_and_alignment() {
        let mut cache = TuningCache::default();
        assert!(cache.is_empty());
        let h200 = "NVIDIA H200 sm_90 cuBLASLt 120902";
        assert!(cache.record(&[tuned(h200, 18432, 256, 3), tuned(h200, 9216, 256, 0)]));
        let t = tuned(h200, 18432, 256, 3);
        assert_eq!(cache.rank(h200, t.dims, t.align), Some(3));
        assert_eq!(
            cache.rank(h200, t.dims, [256, 16, 256]),
            None,
            "another alignment"
        );
        assert_eq!(
            cache.rank("NVIDIA H100", t.dims, t.align),
            None,
            "another card"
        );
        let unchanged = [tuned(h200, 9216, 256, 0)];
        assert!(
            !cache.record(&unchanged),
            "the same choice again changes nothing"
        );
        assert!(cache.record(&[tuned(h200, 18432, 256, 1)]));
        assert_eq!(
            cache.rank(h200, t.dims, t.align),
            Some(1),
            "a new choice replaces"
        );
        assert!(cache.record(&[tuned("NVIDIA H100 sm_90 cuBLASLt 120902", 18432, 256, 2)]));
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn the_file_round_trips_and_a_missing_or_foreign_one_reads_as_empty() {
        let dir = std::env::temp_dir().join(format!("klein-tuning-{}", std::process::id()));
        let path = dir.join("nested/gemm-tuning.json");
        assert_eq!(TuningCache::read(&path).unwrap(), TuningCache::default());
        let mut cache = TuningCache::default();
        cache.record(&[tuned("card", 18432, 256, 3)]);
        cache.write(&path).unwrap();
        assert_eq!(TuningCache::read(&path).unwrap(), cache);
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no partial file is left beside it");

        std::fs::write(&path, r#"{"format": 2, "anything": []}"#).unwrap();
        assert!(TuningCache::read(&path).unwrap().is_empty());
        std::fs::write(&path, "not json").unwrap();
        let err = TuningCache::read(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
