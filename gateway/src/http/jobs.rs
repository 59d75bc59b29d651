//! The job store behind `/v1/jobs`: a bounded map of jobs, each fed by the event stream of
//! its Generate call. At most `max_jobs` jobs are kept; finished ones are evicted after `ttl`,
//! or oldest first when room is needed; when every kept job is still active, new jobs are
//! refused (429). Cancelling a job drops its event stream (or its place in the admission
//! queue), which cancels the downstream work; the job's task says when it has ([`Stop`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use klein_proto::pb::{self, generate_response::Event};
use klein_runtime::budget::BudgetSnapshot;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{
    error::{ApiError, ErrorBody, Kind},
    run::{ImagesResponse, stage_name, unix_now},
};

/// Bounds of the job store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Most jobs kept, active and finished together.
    pub max_jobs: usize,
    /// How long a finished job stays readable.
    pub ttl: Duration,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_jobs: 64,
            ttl: Duration::from_secs(600),
        }
    }
}

/// Life cycle: `queued -> running -> completed | failed | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    fn active(self) -> bool {
        matches!(self, Self::Queued | Self::Running)
    }
}

/// Progress of a running job.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Progress {
    pub stage: Option<&'static str>,
    pub step: u32,
    pub total_steps: u32,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub object: &'static str,
    pub status: JobStatus,
    pub created_at: u64,
    /// 1-based place in the gateway's admission queue, while queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    pub request_id: Option<String>,
    pub seed: Option<u64>,
    pub progress: Progress,
    /// The latest step preview (PNG), while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview_b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ImagesResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug)]
struct Job {
    created_at: u64,
    status: JobStatus,
    /// Admission order among this store's jobs, and other waiters ahead when it queued.
    queue: Option<(u64, usize)>,
    /// The request's seed, until Accepted tells the one in use.
    seed: Option<u64>,
    accepted: Option<pb::Accepted>,
    progress: Progress,
    preview: Option<Bytes>,
    images: Vec<pb::Image>,
    error: Option<ErrorBody>,
    finished: Option<Instant>,
    stop: Stop,
}

/// What a job's task shares with the store: the request to stop, and the task's word that it
/// has stopped (its place in the admission queue and its event stream dropped).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    pub requested: CancellationToken,
    pub done: CancellationToken,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<String, Job>,
    /// Ids oldest first.
    order: VecDeque<String>,
    next_seq: u64,
}

/// The bounded job store. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct JobStore {
    inner: Arc<Mutex<Inner>>,
    limits: JobLimits,
}

fn new_id() -> String {
    let mut id = [0u8; 12];
    let _ = getrandom::fill(&mut id);
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("job_{hex}")
}

impl Inner {
    fn queued(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.status == JobStatus::Queued)
            .count()
    }

    /// Drops expired finished jobs, then the oldest finished ones until one more fits.
    fn make_room(&mut self, limits: &JobLimits) -> bool {
        let now = Instant::now();
        let jobs = &mut self.jobs;
        self.order.retain(|id| {
            let expired = jobs
                .get(id)
                .and_then(|j| j.finished)
                .is_some_and(|f| now.duration_since(f) >= limits.ttl);
            if expired {
                jobs.remove(id);
            }
            !expired
        });
        while self.jobs.len() >= limits.max_jobs {
            let Some(pos) = self
                .order
                .iter()
                .position(|id| self.jobs.get(id).is_some_and(|j| !j.status.active()))
            else {
                return false;
            };
            if let Some(id) = self.order.remove(pos) {
                self.jobs.remove(&id);
            }
        }
        true
    }
}

impl JobStore {
    /// An empty store with `limits`.
    pub fn new(limits: JobLimits) -> Self {
        Self {
            inner: Arc::default(),
            limits,
        }
    }

    /// The limits.
    pub fn limits(&self) -> JobLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a few field writes: a poisoned lock still holds consistent jobs.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses (429) when the store is full of active jobs.
    pub fn check_room(&self) -> Result<(), ApiError> {
        if self.lock().make_room(&self.limits) {
            Ok(())
        } else {
            Err(ApiError::new(
                Kind::Grpc(tonic::Code::ResourceExhausted),
                format!(
                    "{} jobs are queued or running; retry later",
                    self.limits.max_jobs
                ),
            ))
        }
    }

    /// Adds a job that is `queued` (waiting for admission; `admission` is the queue right
    /// after it joined) or running, with the request's `seed`; returns its id and what its
    /// task shares with the store.
    pub fn insert(
        &self,
        queued: bool,
        admission: BudgetSnapshot,
        seed: Option<u64>,
    ) -> (String, Stop) {
        let mut inner = self.lock();
        inner.make_room(&self.limits);
        let id = new_id();
        let stop = Stop::default();
        let queue = queued.then(|| {
            let others = admission.queued.saturating_sub(inner.queued() + 1);
            inner.next_seq += 1;
            (inner.next_seq, others)
        });
        inner.jobs.insert(
            id.clone(),
            Job {
                created_at: unix_now(),
                status: if queued {
                    JobStatus::Queued
                } else {
                    JobStatus::Running
                },
                queue,
                seed,
                accepted: None,
                progress: Progress::default(),
                preview: None,
                images: Vec::new(),
                error: None,
                finished: None,
                stop: stop.clone(),
            },
        );
        inner.order.push_back(id.clone());
        (id, stop)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Some(job) = self.lock().jobs.get_mut(id) {
            f(job);
        }
    }

    /// The job was admitted and runs.
    pub fn admitted(&self, id: &str) {
        self.update(id, |j| {
            if j.status == JobStatus::Queued {
                j.status = JobStatus::Running;
                j.queue = None;
            }
        });
    }

    /// Records one event of the job's stream.
    pub fn record(&self, id: &str, resp: pb::GenerateResponse) {
        self.update(id, |j| match resp.event {
            Some(Event::Accepted(a)) => j.accepted = Some(a),
            Some(Event::Stage(s)) => j.progress.stage = Some(stage_name(s.stage)),
            Some(Event::Step(s)) => {
                j.progress.step = s.step;
                j.progress.total_steps = s.total_steps;
                if !s.preview_png.is_empty() {
                    j.preview = Some(s.preview_png);
                }
            }
            Some(Event::Image(i)) => j.images.push(i),
            None => {}
        });
    }

    /// The job ended: `Ok` completed, `Err` failed. A cancelled job stays cancelled.
    pub fn finish(&self, id: &str, outcome: Result<(), ApiError>) {
        self.update(id, |j| {
            if !j.status.active() {
                return;
            }
            j.status = match outcome {
                Ok(()) => JobStatus::Completed,
                Err(e) => {
                    j.error = Some(e.body());
                    JobStatus::Failed
                }
            };
            j.queue = None;
            j.preview = None;
            j.finished = Some(Instant::now());
        });
    }

    /// Cancels an active job: 404 when unknown, 409 when it already finished. Returns the
    /// token its task cancels once it has stopped.
    pub fn cancel(&self, id: &str) -> Result<CancellationToken, ApiError> {
        let mut inner = self.lock();
        let job = inner
            .jobs
            .get_mut(id)
            .ok_or_else(|| ApiError::new(Kind::NotFound, format!("no job {id}")))?;
        if !job.status.active() {
            return Err(ApiError::new(
                Kind::Conflict,
                format!("job {id} already ended: {:?}", job.status).to_lowercase(),
            ));
        }
        job.stop.requested.cancel();
        job.status = JobStatus::Cancelled;
        job.queue = None;
        job.preview = None;
        job.finished = Some(Instant::now());
        Ok(job.stop.done.clone())
    }

    /// The job as the API shows it; `admission` gives the queue position.
    pub fn view(&self, id: &str, admission: BudgetSnapshot) -> Result<JobView, ApiError> {
        let mut inner = self.lock();
        inner.make_room(&JobLimits {
            max_jobs: usize::MAX,
            ..self.limits
        });
        let job = inner
            .jobs
            .get(id)
            .ok_or_else(|| ApiError::new(Kind::NotFound, format!("no job {id}")))?;
        let queue_position = job.queue.map(|(seq, others_then)| {
            let ours = inner.queued();
            let ahead = inner
                .jobs
                .values()
                .filter(|o| o.queue.is_some_and(|(s, _)| s < seq))
                .count();
            1 + ahead + others_then.min(admission.queued.saturating_sub(ours))
        });
        Ok(JobView {
            id: id.to_owned(),
            object: "image.job",
            status: job.status,
            created_at: job.created_at,
            queue_position,
            request_id: job.accepted.as_ref().map(|a| a.request_id.clone()),
            seed: job.accepted.as_ref().map(|a| a.seed).or(job.seed),
            progress: job.progress.clone(),
            preview_b64_json: job.preview.as_ref().map(|p| STANDARD.encode(p)),
            result: (job.status == JobStatus::Completed)
                .then(|| ImagesResponse::new(job.accepted.as_ref(), &job.images)),
            error: job.error.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(queued: usize) -> BudgetSnapshot {
        BudgetSnapshot {
            capacity: 1,
            reserved: 1,
            queued,
            max_queue: 8,
        }
    }

    #[test]
    fn queue_positions_count_the_waiters_ahead() {
        let store = JobStore::new(JobLimits::default());
        // One gRPC client waits already; two jobs queue behind it.
        let (a, _) = store.insert(true, snapshot(2), None);
        let (b, _) = store.insert(true, snapshot(3), None);
        assert_eq!(store.view(&a, snapshot(3)).unwrap().queue_position, Some(2));
        assert_eq!(store.view(&b, snapshot(3)).unwrap().queue_position, Some(3));
        // The gRPC client is admitted, then job a.
        assert_eq!(store.view(&b, snapshot(2)).unwrap().queue_position, Some(2));
        store.admitted(&a);
        let view = store.view(&b, snapshot(1)).unwrap();
        assert_eq!(view.queue_position, Some(1));
        assert_eq!(
            store.view(&a, snapshot(1)).unwrap().status,
            JobStatus::Running
        );
    }

    #[test]
    fn finished_jobs_are_evicted_and_active_ones_are_not() {
        let store = JobStore::new(JobLimits {
            max_jobs: 2,
            ttl: Duration::from_secs(600),
        });
        let (a, _) = store.insert(false, snapshot(0), None);
        let (b, _) = store.insert(false, snapshot(0), None);
        assert_eq!(store.check_room().unwrap_err().status().as_u16(), 429);
        store.finish(&a, Ok(()));
        store.check_room().unwrap();
        let (c, _) = store.insert(false, snapshot(0), None);
        assert_eq!(
            store.view(&a, snapshot(0)).unwrap_err().status().as_u16(),
            404
        );
        assert!(store.view(&b, snapshot(0)).is_ok() && store.view(&c, snapshot(0)).is_ok());

        let store = JobStore::new(JobLimits {
            max_jobs: 8,
            ttl: Duration::ZERO,
        });
        let (a, _) = store.insert(false, snapshot(0), None);
        store.finish(&a, Ok(()));
        assert_eq!(
            store.view(&a, snapshot(0)).unwrap_err().status().as_u16(),
            404
        );
    }

    #[test]
    fn cancel_is_final_and_only_for_active_jobs() {
        let store = JobStore::default();
        let (a, stop) = store.insert(false, snapshot(0), None);
        store.cancel(&a).unwrap();
        assert!(stop.requested.is_cancelled());
        store.finish(&a, Ok(()));
        assert_eq!(
            store.view(&a, snapshot(0)).unwrap().status,
            JobStatus::Cancelled
        );
        assert_eq!(store.cancel(&a).unwrap_err().status().as_u16(), 409);
        assert_eq!(store.cancel("job_x").unwrap_err().status().as_u16(), 404);
    }
}
