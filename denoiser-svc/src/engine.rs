//! The step engine: one named thread owns the transformer and its device and advances the
//! admitted requests one sampling step at a time.
//!
//! Requests arrive on a queue as [`Job`]s (already validated, holding their budget
//! [`Reservation`]). The thread owns the model registry and keeps a list of active runs; a
//! run pins its model so it stays resident until the run ends. Between any two steps it:
//! - takes new jobs from the queue (waiting only when it has nothing to do), making each
//!   one's model resident (evicting least-recently-used idle models); a job whose model
//!   cannot become resident while other models' runs hold the memory waits, up to
//!   `model_wait_secs`, then is refused with RESOURCE_EXHAUSTED;
//! - drops every run whose client went away (its event stream was dropped): the work stops
//!   within two steps (one on the CPU) and dropping the job frees its reservation;
//! - queues the next step of the oldest active run (FIFO, run to completion), then waits for
//!   the device to finish the step queued before it and reports that one's progress: on a GPU
//!   the device has the next step's work before it finishes a step, so it never idles while
//!   the host queues (~0.3 ms a 1024² step from a CUDA graph, ~3 ms eagerly). A step whose
//!   latents are read at once (a preview, the last step) is waited for at once, and so is every
//!   step on the CPU, which computes as it is called. `klein_denoiser_step_seconds` is each
//!   step's time until the device finished it;
//! - sends a finished run's latents, logging where the run's time went.
//!
//! While runs are active, memory their steps free stays in the device's pool for the next
//! step ([`gpu_memory::keep_freed_memory`]); when the last run ends it goes back to the
//! driver. A step that runs out of memory (the kept pieces may not fit its allocations under a
//! hard MPS limit) hands the pool back and is tried once more
//! ([`gpu_memory::retry_out_of_memory`]).
//!
//! A run whose request names LoRA adapters steps a view of its model with their terms added
//! ([`GraphedTransformer::adapted`]), built when the run is prepared and dropped with it.
//!
//! Steps are the unit of scheduling so that runs with the same geometry can later share one
//! batched forward: the model already takes one timestep per batch item. A panic inside a step
//! fails that run alone.

use std::{
    collections::VecDeque,
    mem,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use candle_core::{DType, Device, Tensor};
use klein_runtime::{
    budget::Reservation,
    engine::{EngineError, EngineThread},
    fence::Fence,
    gpu_memory,
    models::Registry,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    error::DenoiseError,
    graphed::GraphedTransformer,
    model::{Flux2Transformer2DModel, Rope},
    noise, preview,
    sampler::{self, Grid, Guidance, Mode, Request, Run},
    validate::{Noise, ValidDenoiseRequest, ValidMode},
    weights::TransformerSource,
};

/// The models and their device.
pub struct Loaded {
    pub models: Registry<TransformerSource>,
    pub device: Device,
    pub dtype: DType,
    /// Longest a job waits for its model to become resident.
    pub model_wait: Duration,
}

/// What the engine reports for a job.
#[derive(Debug)]
pub enum Event {
    /// A step finished.
    Progress {
        step: usize,
        total: usize,
        sigma: f32,
        /// `[B, h, w, 3]` u8 on the CPU, when asked for at this step.
        preview: Option<Tensor>,
    },
    /// Sampling finished: packed latents `[B, N, 128]` on the CPU in the model dtype.
    Finished {
        latents: Tensor,
        compute_seconds: f64,
    },
    /// Sampling failed.
    Failed(DenoiseError),
}

/// One admitted request.
pub struct Job {
    pub request: ValidDenoiseRequest,
    /// Progress and the result; a closed channel means the client went away.
    pub events: UnboundedSender<Event>,
    /// Held until the job ends, whichever way.
    pub reservation: Reservation,
}

/// A handle to the engine thread; cheap to clone. The thread stops when every handle is gone,
/// and the last handle's drop waits for it ([`EngineThread`]).
#[derive(Clone)]
pub struct DenoiseEngine {
    jobs: EngineThread<Job>,
}

impl DenoiseEngine {
    /// Starts thread `name`, builds the model there with `init` (which also warms it up) and
    /// returns once it is ready, or with `init`'s error.
    pub fn spawn<F>(name: &str, init: F) -> Result<Self, DenoiseError>
    where
        F: FnOnce() -> Result<Loaded, DenoiseError> + Send + 'static,
    {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), DenoiseError>>();
        let jobs = EngineThread::spawn(name, move |queue: mpsc::Receiver<Job>| match init() {
            Ok(mut loaded) => {
                let _ = ready_tx.send(Ok(()));
                serve(&mut loaded, &queue);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { jobs }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EngineError::Panicked("model initialisation panicked".into()).into()),
        }
    }

    /// Queues a job; its events arrive on the job's channel.
    pub fn submit(&self, job: Job) -> Result<(), DenoiseError> {
        Ok(self.jobs.send(job)?)
    }
}

/// An active run and the job it belongs to.
struct Active {
    run: Run<Rope>,
    job: Job,
    /// The model with the job's LoRA adapters, when it names any.
    adapted: Option<Flux2Transformer2DModel>,
    grid: Grid,
    /// From the engine taking the job off its queue to preparing it (a busy model, other jobs).
    waited: Duration,
    /// Moving the request onto the device and preparing the run.
    prepare: Duration,
    /// The steps, each from being queued (or the step before finishing, if later) until the
    /// device finished it.
    steps: Duration,
    /// When the device was last seen finishing a step of this run (first: the run prepared).
    finished: Instant,
    /// The step queued on the device and not reported yet.
    queued: Option<Queued>,
}

/// A step on the device's queue, and the progress to report once it has finished.
struct Queued {
    fence: Fence,
    step: usize,
    sigma: f32,
    since: Instant,
}

fn serve(loaded: &mut Loaded, queue: &mpsc::Receiver<Job>) {
    gpu_memory::keep_freed_memory(&loaded.device);
    let mut active: VecDeque<Active> = VecDeque::new();
    let mut waiting: VecDeque<(Job, Instant)> = VecDeque::new();
    loop {
        if active.is_empty() && waiting.is_empty() {
            match queue.recv() {
                Ok(job) => waiting.push_back((job, Instant::now())),
                Err(_) => return,
            }
        }
        while let Ok(job) = queue.try_recv() {
            waiting.push_back((job, Instant::now()));
        }
        for (job, since) in mem::take(&mut waiting) {
            if job.events.is_closed() {
                continue;
            }
            match loaded.models.resident(&job.request.model).map(|_| ()) {
                Ok(()) => admit(loaded, job, since, &mut active),
                Err(DenoiseError::ModelBusy(e)) if since.elapsed() < loaded.model_wait => {
                    tracing::debug!(error = %e, "waiting for the model");
                    waiting.push_back((job, since));
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e));
                }
            }
        }
        let busy = !active.is_empty();
        active.retain(|a| {
            let gone = a.job.events.is_closed();
            if gone {
                metrics::counter!("klein_denoiser_cancelled_total").increment(1);
                tracing::info!(step = a.run.steps_done(), "client went away; run dropped");
                loaded.models.unpin(&a.job.request.model);
            }
            !gone
        });
        metrics::gauge!("klein_denoiser_active_runs").set(active.len() as f64);
        metrics::gauge!("klein_denoiser_model_waiting").set(waiting.len() as f64);
        match active.pop_front() {
            Some(mut a) => match step(loaded, &mut a) {
                Next::Continue => active.push_front(a),
                Next::Finished => finish(loaded, a),
                Next::Failed => loaded.models.unpin(&a.job.request.model),
            },
            // Only jobs waiting for a busy model are left: they are retried shortly.
            None if !waiting.is_empty() => thread::sleep(Duration::from_millis(5)),
            None => {}
        }
        if busy && active.is_empty() {
            gpu_memory::release_freed_memory(&loaded.device);
        }
    }
}

/// Prepares a job's run on its (resident) model and queues it, or reports why it cannot run;
/// the engine took the job off its queue at `since`.
fn admit(loaded: &mut Loaded, job: Job, since: Instant, active: &mut VecDeque<Active>) {
    let grid = job.request.grid;
    let started = Instant::now();
    let prepared = catch_unwind(AssertUnwindSafe(|| {
        let request = prepare(loaded, &job.request)?;
        let model = resident(loaded, &job.request.model)?;
        if job.request.loras.is_empty() {
            return Ok::<_, DenoiseError>((Run::new(model, request)?, None));
        }
        let adapted = model.adapted(&job.request.loras)?;
        Ok((Run::new(&adapted, request)?, Some(adapted)))
    }));
    match prepared.map_err(panicked).and_then(|r| r) {
        Ok((run, adapted)) => {
            loaded.models.pin(&job.request.model);
            let a = Active {
                run,
                job,
                adapted,
                grid,
                waited: started - since,
                prepare: started.elapsed(),
                steps: Duration::ZERO,
                finished: Instant::now(),
                queued: None,
            };
            if a.run.is_finished() {
                finish(loaded, a);
            } else {
                active.push_back(a);
            }
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed(e));
        }
    }
}

/// The resident model `id` (admitted jobs pin theirs, so it is always there).
fn resident<'a>(loaded: &'a Loaded, id: &str) -> Result<&'a GraphedTransformer, DenoiseError> {
    loaded.models.get(id).ok_or_else(|| {
        DenoiseError::Compute(candle_core::Error::msg(format!(
            "model {id:?} is not resident"
        )))
    })
}

/// What follows a step.
enum Next {
    Continue,
    Finished,
    /// The failure was reported; the job is dropped.
    Failed,
}

/// Queues the next step of `a`, then reports the steps the device has finished.
fn step(loaded: &Loaded, a: &mut Active) -> Next {
    let since = Instant::now();
    let model = match resident(loaded, &a.job.request.model) {
        Ok(m) => m,
        Err(e) => {
            let _ = a.job.events.send(Event::Failed(e));
            return Next::Failed;
        }
    };
    // A step that fails to queue leaves the run as it was, so it may run again.
    let queued = catch_unwind(AssertUnwindSafe(|| {
        gpu_memory::retry_out_of_memory(&loaded.device, || match &a.adapted {
            Some(adapted) => a.run.step(adapted),
            None => a.run.step(model),
        })?;
        Fence::record(&loaded.device)
    }));
    let fence = match queued
        .map_err(panicked)
        .and_then(|r| r.map_err(DenoiseError::from))
    {
        Ok(fence) => fence,
        Err(e) => {
            let _ = a.job.events.send(Event::Failed(e));
            return Next::Failed;
        }
    };
    let step = a.run.steps_done();
    let every = a.job.request.preview_every;
    let preview = every > 0 && step.is_multiple_of(every);
    let at_once = preview || a.run.is_finished() || !fence.pending();
    let queued = Queued {
        fence,
        step,
        sigma: a.run.sigma(),
        since,
    };
    // The step before ran on the device while this one was queued.
    let earlier = a.queued.replace(queued).map(|q| report(a, q, false));
    let this = match earlier {
        Some(Err(e)) => Err(e),
        _ if at_once => a.queued.take().map_or(Ok(()), |q| report(a, q, preview)),
        _ => Ok(()),
    };
    match this {
        Err(e) => {
            let _ = a.job.events.send(Event::Failed(e));
            Next::Failed
        }
        Ok(()) if a.run.is_finished() => Next::Finished,
        Ok(()) => Next::Continue,
    }
}

/// Waits for `q`'s step to finish and reports its progress, with a preview of the run's
/// latents when `with_preview` (they must be that step's).
fn report(a: &mut Active, q: Queued, with_preview: bool) -> Result<(), DenoiseError> {
    q.fence.wait()?;
    let now = Instant::now();
    let elapsed = now - q.since.max(a.finished);
    a.finished = now;
    a.steps += elapsed;
    metrics::histogram!("klein_denoiser_step_seconds").record(elapsed.as_secs_f64());
    let preview = with_preview
        .then(|| preview::preview(a.run.latents(), a.grid.height, a.grid.width))
        .transpose()?;
    let _ = a.job.events.send(Event::Progress {
        step: q.step,
        total: a.run.total_steps(),
        sigma: q.sigma,
        preview,
    });
    Ok(())
}

/// Sends the final latents (on the CPU) of a finished run and unpins its model.
fn finish(loaded: &mut Loaded, a: Active) {
    let Active {
        run,
        job,
        grid,
        waited,
        prepare,
        steps,
        ..
    } = a;
    loaded.models.unpin(&job.request.model);
    let started = Instant::now();
    let steps_done = run.steps_done();
    let latents = run.into_latents().to_device(&Device::Cpu);
    let to_host = started.elapsed();
    let compute = prepare + steps + to_host;
    tracing::info!(
        height = grid.height,
        width = grid.width,
        steps = steps_done,
        waited_seconds = waited.as_secs_f64(),
        prepare_seconds = prepare.as_secs_f64(),
        steps_seconds = steps.as_secs_f64(),
        to_host_seconds = to_host.as_secs_f64(),
        "run finished"
    );
    let event = match latents {
        Ok(latents) => Event::Finished {
            latents,
            compute_seconds: compute.as_secs_f64(),
        },
        Err(e) => Event::Failed(e.into()),
    };
    let _ = job.events.send(event);
}

fn panicked(payload: Box<dyn std::any::Any + Send>) -> DenoiseError {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    EngineError::Panicked(msg).into()
}

/// Moves a validated request onto the model's device and dtype, drawing seeded noise on a
/// thread of its own while this one uploads the rest.
fn prepare(loaded: &Loaded, req: &ValidDenoiseRequest) -> Result<Request, DenoiseError> {
    let on_device = |t: &Tensor| t.to_device(&loaded.device)?.to_dtype(loaded.dtype);
    let (b, grid) = (req.batch(), req.grid);
    let channels = resident(loaded, &req.model)?.config().in_channels;
    std::thread::scope(|s| {
        let noise = s.spawn(|| match &req.noise {
            Noise::Seed(seed) => noise::seeded_tokens(*seed, b, channels, grid.height, grid.width),
            Noise::Tensor(t) => sampler::pack(t),
        });
        let mode = match &req.mode {
            ValidMode::TextToImage => Mode::TextToImage,
            ValidMode::ImageToImage {
                image_latents,
                strength,
            } => Mode::ImageToImage {
                image_latents: on_device(image_latents)?,
                strength: *strength,
            },
            ValidMode::Inpaint {
                image_latents,
                mask,
                strength,
            } => Mode::Inpaint {
                image_latents: on_device(image_latents)?,
                mask: on_device(mask)?,
                strength: *strength,
            },
        };
        let prompt_embeds = on_device(&req.prompt_embeds)?;
        let guidance = match &req.guidance {
            Some((negative, scale)) => Some(Guidance {
                negative: on_device(negative)?,
                scale: *scale,
            }),
            None => None,
        };
        let references = req
            .references
            .iter()
            .map(|(t, g)| Ok((on_device(t)?, *g)))
            .collect::<candle_core::Result<_>>()?;
        let noise = noise
            .join()
            .unwrap_or_else(|payload| std::panic::resume_unwind(payload))?;
        Ok(Request {
            prompt_embeds,
            guidance,
            noise: on_device(&noise)?,
            grid,
            references,
            mode,
            num_steps: req.num_steps,
            shift: req.shift,
        })
    })
}
