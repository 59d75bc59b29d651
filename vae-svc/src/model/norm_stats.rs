//! Where group-norm statistics come from ([`NormStats`]), for tiled decoding.
//!
//! A statistics pass over the tiles records every group norm's input moments over the part of
//! the image each tile owns; the next pass normalises every tile with those image-wide moments
//! (and may record again: each pass fixes one more norm exactly), so tiles agree with each
//! other and with the untiled decode instead of each using its own statistics.

use candle_core::Result;

/// Sums of one group norm's input per (batch, group): Σx, Σx² and the element count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moments {
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    count: f64,
}

impl Moments {
    /// Mean and `1 / sqrt(var + eps)` per (batch, group).
    fn mean_rstd(&self, eps: f64) -> (Vec<f32>, Vec<f32>) {
        let n = self.count.max(1.0);
        self.sum
            .iter()
            .zip(&self.sum_sq)
            .map(|(s, q)| {
                let mean = s / n;
                let var = (q / n - mean * mean).max(0.0);
                (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
            })
            .unzip()
    }
}

/// The part of a tile it owns, in tokens: the tile is `tokens` (h, w) tokens, it owns rows
/// `rows.0..rows.1` and columns `cols.0..cols.1` (overlaps are split at their middle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub tokens: (usize, usize),
    pub rows: (usize, usize),
    pub cols: (usize, usize),
}

/// Where group-norm statistics come from during a forward pass.
#[derive(Debug, Clone, PartialEq)]
pub enum NormStats {
    /// From the tensor being normalised (the model as trained).
    Local,
    /// Normalise with `prior` (or locally when absent) and add every norm's input moments
    /// over `region` to `moments`, one entry per norm in call order (`next` counts calls
    /// within the current tile).
    Record {
        region: Region,
        moments: Vec<Moments>,
        prior: Option<Vec<Moments>>,
        next: usize,
    },
    /// Normalise with the recorded moments, in call order.
    Replay { moments: Vec<Moments>, next: usize },
}

/// Where one call adds its input's moments: rows and columns at its resolution.
pub struct Target<'a> {
    pub rows: (usize, usize),
    pub cols: (usize, usize),
    moments: &'a mut Moments,
}

impl Target<'_> {
    /// Adds Σx and Σx² of (batch, group) `index`.
    pub fn add(&mut self, index: usize, sum: f64, sum_sq: f64) {
        self.moments.sum[index] += sum;
        self.moments.sum_sq[index] += sum_sq;
    }
}

/// What one group-norm call does with statistics.
pub struct CallStats<'a> {
    /// Mean and rstd per (batch, group) to normalise with instead of the input's own.
    pub replay: Option<(Vec<f32>, Vec<f32>)>,
    /// Where to add the input's moments.
    pub record: Option<Target<'a>>,
}

fn missing() -> candle_core::Error {
    candle_core::Error::Msg("group norm: no recorded moments for this call".into())
}

impl NormStats {
    fn recording(prior: Option<Vec<Moments>>) -> Self {
        Self::Record {
            region: Region {
                tokens: (1, 1),
                rows: (0, 1),
                cols: (0, 1),
            },
            moments: Vec::new(),
            prior,
            next: 0,
        }
    }

    /// Starts recording, normalising locally.
    pub fn record() -> Self {
        Self::recording(None)
    }

    /// Records again, normalising with what was recorded so far (a better estimate, since
    /// the earlier norms now use image-wide statistics too).
    pub fn refine(self) -> Self {
        match self {
            Self::Record { moments, .. } | Self::Replay { moments, .. } => {
                Self::recording(Some(moments))
            }
            Self::Local => Self::record(),
        }
    }

    /// Starts a tile: the call counter restarts; when recording, `region` is the tile's part.
    pub fn start_tile(&mut self, tile_region: Region) {
        match self {
            Self::Local => {}
            Self::Record { region, next, .. } => {
                *region = tile_region;
                *next = 0;
            }
            Self::Replay { next, .. } => *next = 0,
        }
    }

    /// How far the last recording moved the statistics from the ones it normalised with:
    /// the largest change of a group's mean or standard deviation, in units of its standard
    /// deviation. `None` when there is nothing to compare.
    pub fn change(&self, eps: f64) -> Option<f64> {
        let Self::Record {
            moments,
            prior: Some(prior),
            ..
        } = self
        else {
            return None;
        };
        let mut worst = 0f64;
        for (new, old) in moments.iter().zip(prior) {
            let (m1, r1) = new.mean_rstd(eps);
            let (m0, r0) = old.mean_rstd(eps);
            for i in 0..m1.len() {
                let (s1, s0) = (1.0 / f64::from(r1[i]), 1.0 / f64::from(r0[i]));
                let d_mean = (f64::from(m1[i]) - f64::from(m0[i])).abs() / s0;
                let d_std = (s1 - s0).abs() / s0;
                worst = worst.max(d_mean).max(d_std);
            }
        }
        Some(worst)
    }

    /// Switches from recording to replaying what was recorded.
    pub fn into_replay(self) -> Self {
        match self {
            Self::Record { moments, .. } | Self::Replay { moments, .. } => {
                Self::Replay { moments, next: 0 }
            }
            Self::Local => Self::Local,
        }
    }

    /// Begins one norm call over a `(batch, groups)` input of `hw` pixels with
    /// `channels_per_group`.
    pub fn begin_call(
        &mut self,
        (batch, groups): (usize, usize),
        (h, w): (usize, usize),
        channels_per_group: usize,
        eps: f64,
    ) -> Result<CallStats<'_>> {
        match self {
            Self::Local => Ok(CallStats {
                replay: None,
                record: None,
            }),
            Self::Replay { moments, next } => {
                let m = moments.get(*next).ok_or_else(missing)?;
                *next += 1;
                Ok(CallStats {
                    replay: Some(m.mean_rstd(eps)),
                    record: None,
                })
            }
            Self::Record {
                region,
                moments,
                prior,
                next,
            } => {
                let replay = match prior {
                    Some(p) => Some(p.get(*next).ok_or_else(missing)?.mean_rstd(eps)),
                    None => None,
                };
                if moments.len() == *next {
                    moments.push(Moments {
                        sum: vec![0.0; batch * groups],
                        sum_sq: vec![0.0; batch * groups],
                        count: 0.0,
                    });
                }
                let (sh, sw) = (h / region.tokens.0, w / region.tokens.1);
                let rows = (region.rows.0 * sh, region.rows.1 * sh);
                let cols = (region.cols.0 * sw, region.cols.1 * sw);
                let target = &mut moments[*next];
                *next += 1;
                target.count += ((rows.1 - rows.0) * (cols.1 - cols.0) * channels_per_group) as f64;
                Ok(CallStats {
                    replay,
                    record: Some(Target {
                        rows,
                        cols,
                        moments: target,
                    }),
                })
            }
        }
    }
}
