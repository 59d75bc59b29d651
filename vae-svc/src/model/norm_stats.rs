//! Where group-norm statistics come from ([`NormStats`]), for tiled decoding.
//!
//! A statistics pass over the tiles records every group norm's input moments over the part of
//! the image each tile owns; the next pass normalises every tile with those image-wide moments
//! (and may record again: each pass fixes one more norm exactly), so tiles agree with each
//! other and with the untiled decode instead of each using its own statistics.

use candle_core::{DType, Result, Tensor};

/// Sums of one group norm's input per (batch, group): Σx and Σx² as a (batch · groups, 2) f64
/// tensor on the input's device (added up there: recording reads nothing back), the element
/// count, and the norm's eps.
#[derive(Debug, Clone)]
pub struct Moments {
    sums: Option<Tensor>,
    count: f64,
    eps: f64,
}

/// Image-wide statistics of one group norm: mean and `1 / sqrt(var + eps)` per (batch, group),
/// (batch · groups) f32 on the device.
#[derive(Debug, Clone)]
pub struct GroupStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

impl Moments {
    /// The statistics these sums give, computed in f64 on their device and rounded once.
    fn statistics(&self) -> Result<GroupStats> {
        let sums = self.sums.as_ref().ok_or_else(missing)?;
        let n = self.count.max(1.0);
        let mean = (sums.narrow(1, 0, 1)?.squeeze(1)? / n)?;
        let mean_sq = (sums.narrow(1, 1, 1)?.squeeze(1)? / n)?;
        let var = (mean_sq - mean.sqr()?)?.relu()?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        Ok(GroupStats {
            mean: mean.to_dtype(DType::F32)?,
            rstd: rstd.to_dtype(DType::F32)?,
        })
    }
}

/// The statistics of every norm, in call order.
fn statistics(moments: &[Moments]) -> Result<Vec<GroupStats>> {
    moments.iter().map(Moments::statistics).collect()
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
#[derive(Debug, Clone)]
pub enum NormStats {
    /// From the tensor being normalised (the model as trained).
    Local,
    /// Normalise with `prior` (or locally when absent) and add every norm's input moments
    /// over `region` to `moments`, one entry per norm in call order (`next` counts calls
    /// within the current tile).
    Record {
        region: Region,
        moments: Vec<Moments>,
        prior: Option<Vec<GroupStats>>,
        next: usize,
    },
    /// Normalise with the recorded statistics, in call order.
    Replay { stats: Vec<GroupStats>, next: usize },
}

/// Where one call adds its input's moments: rows and columns at its resolution.
pub struct Target<'a> {
    pub rows: (usize, usize),
    pub cols: (usize, usize),
    moments: &'a mut Moments,
}

impl Target<'_> {
    /// Adds Σx and Σx² of every (batch, group), `sums` (batch · groups, 2) f64.
    pub fn add(&mut self, sums: &Tensor) -> Result<()> {
        let total = match self.moments.sums.take() {
            Some(s) => (s + sums)?,
            None => sums.clone(),
        };
        self.moments.sums = Some(total);
        Ok(())
    }
}

/// What one group-norm call does with statistics.
pub struct CallStats<'a> {
    /// Statistics to normalise with instead of the input's own.
    pub replay: Option<GroupStats>,
    /// Where to add the input's moments.
    pub record: Option<Target<'a>>,
}

fn missing() -> candle_core::Error {
    candle_core::Error::Msg("group norm: no recorded moments for this call".into())
}

impl NormStats {
    fn recording(prior: Option<Vec<GroupStats>>) -> Self {
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
    pub fn refine(self) -> Result<Self> {
        Ok(match self {
            Self::Record { moments, .. } => Self::recording(Some(statistics(&moments)?)),
            Self::Replay { stats, .. } => Self::recording(Some(stats)),
            Self::Local => Self::record(),
        })
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
    /// deviation (computed on the device, one value read back). `None` when there is nothing
    /// to compare.
    pub fn change(&self) -> Result<Option<f64>> {
        let Self::Record {
            moments,
            prior: Some(prior),
            ..
        } = self
        else {
            return Ok(None);
        };
        let new = statistics(moments)?;
        let all = |stats: &[GroupStats], part: fn(&GroupStats) -> &Tensor| -> Result<Tensor> {
            let parts: Vec<&Tensor> = stats.iter().map(part).collect();
            Tensor::cat(&parts, 0)?.to_dtype(DType::F64)
        };
        let (m1, r1) = (all(&new, |s| &s.mean)?, all(&new, |s| &s.rstd)?);
        let (m0, r0) = (all(prior, |s| &s.mean)?, all(prior, |s| &s.rstd)?);
        // |Δmean| / σ0 = |m1 − m0| · r0 and |σ1 − σ0| / σ0 = |r0 / r1 − 1|.
        let d_mean = (m1 - m0)?.abs()?.mul(&r0)?;
        let d_std = ((r0 / r1)? - 1.0)?.abs()?;
        let worst = d_mean.maximum(&d_std)?.max_all()?.to_scalar::<f64>()?;
        Ok(Some(worst))
    }

    /// Switches from recording to replaying what was recorded.
    pub fn into_replay(self) -> Result<Self> {
        Ok(match self {
            Self::Record { moments, .. } => Self::Replay {
                stats: statistics(&moments)?,
                next: 0,
            },
            Self::Replay { stats, .. } => Self::Replay { stats, next: 0 },
            Self::Local => Self::Local,
        })
    }

    /// Begins one norm call over an input of `(h, w)` pixels with `channels_per_group`,
    /// normalised with `eps`.
    pub fn begin_call(
        &mut self,
        (h, w): (usize, usize),
        channels_per_group: usize,
        eps: f64,
    ) -> Result<CallStats<'_>> {
        match self {
            Self::Local => Ok(CallStats {
                replay: None,
                record: None,
            }),
            Self::Replay { stats, next } => {
                let s = stats.get(*next).ok_or_else(missing)?;
                *next += 1;
                Ok(CallStats {
                    replay: Some(s.clone()),
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
                    Some(p) => Some(p.get(*next).ok_or_else(missing)?.clone()),
                    None => None,
                };
                if moments.len() == *next {
                    moments.push(Moments {
                        sums: None,
                        count: 0.0,
                        eps,
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// One norm over a 2 × 2 image of two one-channel groups: records `sums` (Σx, Σx² per
    /// group) as the whole image's; returns the statistics the call normalises with.
    fn record_pass(stats: &mut NormStats, sums: [[f64; 2]; 2]) -> Option<GroupStats> {
        stats.start_tile(Region {
            tokens: (1, 1),
            rows: (0, 1),
            cols: (0, 1),
        });
        let mut call = stats.begin_call((2, 2), 1, 0.0).unwrap();
        let sums = Tensor::new(&sums, &Device::Cpu).unwrap();
        call.record.as_mut().unwrap().add(&sums).unwrap();
        call.replay
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().unwrap()
    }

    /// Pass 1 records groups {1, 2, 3, 4} and {0, 0, 2, 2}; pass 2 (normalising with pass 1's
    /// statistics) records {2, 3, 4, 5} and {1, 1, 5, 5}. Group 2's mean moves by 2 of its old
    /// deviations (1) and its deviation by 1: the change is 2. Replay gives pass 2's mean and
    /// rstd.
    #[test]
    fn statistics_and_their_change_come_from_the_recorded_sums() {
        let mut stats = NormStats::record();
        assert!(record_pass(&mut stats, [[10.0, 30.0], [4.0, 8.0]]).is_none());
        assert_eq!(stats.change().unwrap(), None, "nothing to compare yet");
        let mut stats = stats.refine().unwrap();
        let prior = record_pass(&mut stats, [[14.0, 54.0], [12.0, 52.0]]).unwrap();
        assert_eq!(values(&prior.mean), [2.5, 1.0]);
        assert_eq!(values(&prior.rstd), [(1.0 / 1.25f64.sqrt()) as f32, 1.0]);
        let change = stats.change().unwrap().unwrap();
        assert!((change - 2.0).abs() < 1e-6, "{change}");
        let mut stats = stats.into_replay().unwrap();
        stats.start_tile(Region {
            tokens: (1, 1),
            rows: (0, 1),
            cols: (0, 1),
        });
        let replay = stats.begin_call((2, 2), 1, 0.0).unwrap().replay.unwrap();
        assert_eq!(values(&replay.mean), [3.5, 3.0]);
        assert_eq!(values(&replay.rstd), [(1.0 / 1.25f64.sqrt()) as f32, 0.5]);
    }
}
