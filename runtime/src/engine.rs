//! One thread owns the model and its device.
//!
//! [`Engine::spawn`] builds the model on a named OS thread (so CUDA contexts and weights never
//! cross threads) and then runs jobs sent from async code one at a time, in arrival order.
//! A job is a closure over `&mut M`; a panic inside it is caught and reported as
//! [`EngineError::Panicked`] for that job only, and the thread keeps serving. Cancellation is
//! the job's business: long jobs check a [`tokio_util::sync::CancellationToken`] between steps.
//! When the last handle goes, the queue closes and the drop waits for the thread to finish and
//! free its model ([`EngineThread`]).

use std::{
    mem,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, mpsc},
    thread,
};

use tokio::sync::oneshot;

type Job<M> = Box<dyn FnOnce(&mut M) + Send>;

/// Why a job produced no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the engine thread has stopped")]
    Stopped,
    #[error("the engine panicked: {0}")]
    Panicked(String),
}

impl From<EngineError> for tonic::Status {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::Stopped => tonic::Status::unavailable(err.to_string()),
            EngineError::Panicked(_) => tonic::Status::internal(err.to_string()),
        }
    }
}

/// The queue into a thread that owns a device, and the thread; cheap to clone. Dropping the
/// last handle closes the queue and waits for the thread to end: the thread finishes what it
/// does and frees its model and device memory before the drop returns, so a process whose
/// service stopped never exits under a thread still using the device (the CUDA driver torn
/// down beneath it at exit). A last handle dropped on the thread itself does not wait.
pub struct EngineThread<J> {
    inner: Arc<Joined<J>>,
}

struct Joined<J> {
    jobs: mpsc::Sender<J>,
    thread: Option<thread::JoinHandle<()>>,
}

impl<J> Clone for EngineThread<J> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<J: Send + 'static> EngineThread<J> {
    /// Starts thread `name` running `body` over the queue's receiving end.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(mpsc::Receiver<J>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(queue))?;
        Ok(Self {
            inner: Arc::new(Joined {
                jobs,
                thread: Some(thread),
            }),
        })
    }

    /// Queues `job`; fails once the thread has stopped.
    pub fn send(&self, job: J) -> Result<(), EngineError> {
        self.inner.jobs.send(job).map_err(|_| EngineError::Stopped)
    }
}

impl<J> Drop for Joined<J> {
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(mem::replace(&mut self.jobs, closed));
        if let Some(t) = self.thread.take()
            && t.thread().id() != thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// A handle to the engine thread; cheap to clone. The thread stops when every handle is gone,
/// and the last handle's drop waits for it ([`EngineThread`]).
pub struct Engine<M> {
    jobs: EngineThread<Job<M>>,
}

impl<M> Clone for Engine<M> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
        }
    }
}

impl<M: 'static> Engine<M> {
    /// Starts thread `name`, builds the model there with `init`, and returns once it is built
    /// (or with `init`'s error).
    pub fn spawn<E, F>(name: &str, init: F) -> Result<Self, E>
    where
        F: FnOnce() -> Result<M, E> + Send + 'static,
        E: Send + 'static + From<EngineError>,
    {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), E>>();
        let jobs = EngineThread::spawn(name, move |queue: mpsc::Receiver<Job<M>>| {
            let mut model = match init() {
                Ok(m) => {
                    let _ = ready_tx.send(Ok(()));
                    m
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Ok(job) = queue.recv() {
                job(&mut model);
            }
        })
        .map_err(|_| E::from(EngineError::Stopped))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { jobs }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(E::from(EngineError::Panicked(
                "model initialisation panicked".into(),
            ))),
        }
    }

    /// Runs `job` on the engine thread after the jobs queued before it.
    pub async fn run<R, F>(&self, job: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&mut M) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let boxed: Job<M> = Box::new(move |model: &mut M| {
            let out = catch_unwind(AssertUnwindSafe(|| job(model))).map_err(panic_message);
            let _ = tx.send(out);
        });
        self.jobs.send(boxed)?;
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(msg)) => Err(EngineError::Panicked(msg)),
            Err(_) => Err(EngineError::Stopped),
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum InitError {
        Bad,
        Engine(EngineError),
    }

    impl From<EngineError> for InitError {
        fn from(e: EngineError) -> Self {
            Self::Engine(e)
        }
    }

    #[tokio::test]
    async fn runs_jobs_in_order_on_one_named_thread() {
        let engine =
            Engine::spawn("test-engine", || Ok::<_, InitError>(Vec::<u32>::new())).unwrap();
        for i in 0..5 {
            engine.run(move |v: &mut Vec<u32>| v.push(i)).await.unwrap();
        }
        let (seen, name) = engine
            .run(|v: &mut Vec<u32>| (v.clone(), thread::current().name().map(str::to_owned)))
            .await
            .unwrap();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(name.as_deref(), Some("test-engine"));
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let engine = Engine::spawn("test-engine", || Ok::<_, InitError>(0u32)).unwrap();
        let err = engine
            .run(|_: &mut u32| -> u32 { panic!("boom") })
            .await
            .unwrap_err();
        assert_eq!(err, EngineError::Panicked("boom".into()));
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Internal);
        assert_eq!(
            engine
                .run(|n: &mut u32| {
                    *n += 1;
                    *n
                })
                .await
                .unwrap(),
            1
        );
    }

    /// A model that reports its drop, after a pause (freeing device memory takes time).
    struct Reports(mpsc::Sender<&'static str>);

    impl Drop for Reports {
        fn drop(&mut self) {
            thread::sleep(std::time::Duration::from_millis(50));
            let _ = self.0.send("model dropped");
        }
    }

    #[tokio::test]
    async fn the_last_handles_drop_waits_for_the_thread_to_free_its_model() {
        let (tx, rx) = mpsc::channel();
        let engine = Engine::spawn("test-engine", move || Ok::<_, InitError>(Reports(tx))).unwrap();
        let clone = engine.clone();
        engine.run(|_: &mut Reports| ()).await.unwrap();
        drop(engine);
        assert!(rx.try_recv().is_err(), "a handle is left");
        drop(clone);
        assert_eq!(rx.try_recv(), Ok("model dropped"));
    }

    #[test]
    fn a_last_handle_dropped_on_its_own_thread_does_not_wait_for_itself() {
        let (handle_tx, handle_rx) = mpsc::channel::<EngineThread<u32>>();
        let (done_tx, done_rx) = mpsc::channel();
        let engine = EngineThread::spawn("test-engine", move |queue| {
            drop(handle_rx.recv().unwrap());
            let _ = done_tx.send(queue.recv().is_err());
        })
        .unwrap();
        handle_tx.send(engine).unwrap();
        assert_eq!(
            done_rx.recv(),
            Ok(true),
            "the queue closed and the thread went on"
        );
    }

    #[test]
    fn init_errors_come_back() {
        let r = Engine::<u32>::spawn("test-engine", || Err(InitError::Bad));
        assert_eq!(r.err(), Some(InitError::Bad));
    }
}
