//! The memory-budget admission primitive.
//!
//! A [`MemoryBudget`] holds a capacity in bytes (a service's GPU budget minus its weights and
//! runtime overhead). Every request reserves its estimated activation peak before it runs:
//! - it is admitted at once when the bytes fit and nobody is waiting;
//! - otherwise it waits in a bounded FIFO queue until earlier reservations are released
//!   (strict FIFO: a large request at the head is never starved by smaller ones behind it);
//! - it is refused with [`AdmissionError::QueueFull`] when the queue is full, and with
//!   [`AdmissionError::NeverFits`] when it is larger than the whole capacity.
//!
//! Dropping a [`Reservation`] returns its bytes; dropping a waiting `reserve` future (a client
//! that went away, a deadline) leaves the queue without leaking a slot or bytes.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::oneshot;

/// Why a reservation was refused. Both map to `RESOURCE_EXHAUSTED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error(
        "{budget}: request needs {requested} bytes but the whole budget is {capacity} bytes; it can never fit"
    )]
    NeverFits {
        budget: String,
        requested: u64,
        capacity: u64,
    },
    #[error("{budget}: admission queue is full ({depth} waiting); retry later")]
    QueueFull { budget: String, depth: usize },
}

impl From<AdmissionError> for tonic::Status {
    fn from(err: AdmissionError) -> Self {
        tonic::Status::resource_exhausted(err.to_string())
    }
}

/// A point-in-time view of a budget, for Info RPCs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSnapshot {
    /// Bytes that reservations may hold in total.
    pub capacity: u64,
    /// Bytes held by admitted requests.
    pub reserved: u64,
    /// Requests waiting.
    pub queued: usize,
    /// Most requests that may wait.
    pub max_queue: usize,
}

/// A byte-reservation semaphore with a bounded FIFO wait queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    max_queue: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    capacity: u64,
    reserved: u64,
    next_id: u64,
    queue: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    bytes: u64,
    grant: oneshot::Sender<()>,
}

impl MemoryBudget {
    /// A budget named `name` (for messages and metrics) of `capacity` bytes, with at most
    /// `max_queue` waiting requests.
    pub fn new(name: impl Into<String>, capacity: u64, max_queue: usize) -> Self {
        let budget = Self {
            inner: Arc::new(Inner {
                name: name.into(),
                max_queue,
                state: Mutex::new(State {
                    capacity,
                    ..State::default()
                }),
            }),
        };
        metrics::gauge!("klein_budget_capacity_bytes", "budget" => budget.inner.name.clone())
            .set(capacity as f64);
        budget
    }

    /// Reserves `bytes`, waiting in the queue if needed. Cancel-safe.
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, AdmissionError> {
        let (id, granted) = {
            let mut state = self.inner.lock();
            if bytes > state.capacity {
                return Err(AdmissionError::NeverFits {
                    budget: self.inner.name.clone(),
                    requested: bytes,
                    capacity: state.capacity,
                });
            }
            if state.queue.is_empty() && state.reserved + bytes <= state.capacity {
                state.reserved += bytes;
                self.inner.publish(&state);
                return Ok(self.reservation(bytes));
            }
            if state.queue.len() >= self.inner.max_queue {
                metrics::counter!("klein_budget_shed_total", "budget" => self.inner.name.clone())
                    .increment(1);
                return Err(AdmissionError::QueueFull {
                    budget: self.inner.name.clone(),
                    depth: state.queue.len(),
                });
            }
            let id = state.next_id;
            state.next_id += 1;
            let (grant, granted) = oneshot::channel();
            state.queue.push_back(Waiter { id, bytes, grant });
            self.inner.publish(&state);
            (id, granted)
        };
        let guard = WaitGuard {
            inner: &self.inner,
            id,
            bytes,
            armed: true,
        };
        // The sender lives in the queue until a release grants it; the budget owns the queue,
        // so the channel cannot close while we wait.
        let _ = granted.await;
        guard.disarm();
        Ok(self.reservation(bytes))
    }

    /// Reserves `bytes` only if that is possible right now without waiting.
    pub fn try_reserve(&self, bytes: u64) -> Option<Reservation> {
        let mut state = self.inner.lock();
        if state.queue.is_empty() && state.reserved + bytes <= state.capacity {
            state.reserved += bytes;
            self.inner.publish(&state);
            Some(self.reservation(bytes))
        } else {
            None
        }
    }

    /// The budget's name (messages, metrics).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Lowers the capacity to `bytes` if that is smaller (e.g. to what the device really has
    /// free once the model is loaded and warm); returns the capacity now in force. Meant for
    /// startup, before requests arrive: a waiter that no longer fits keeps waiting.
    pub fn limit_capacity(&self, bytes: u64) -> u64 {
        let mut state = self.inner.lock();
        state.capacity = state.capacity.min(bytes);
        metrics::gauge!("klein_budget_capacity_bytes", "budget" => self.inner.name.clone())
            .set(state.capacity as f64);
        state.capacity
    }

    /// Current capacity, reservations and queue.
    pub fn snapshot(&self) -> BudgetSnapshot {
        let state = self.inner.lock();
        BudgetSnapshot {
            capacity: state.capacity,
            reserved: state.reserved,
            queued: state.queue.len(),
            max_queue: self.inner.max_queue,
        }
    }

    fn reservation(&self, bytes: u64) -> Reservation {
        Reservation {
            inner: self.inner.clone(),
            bytes,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves consistent counters (every update is a single
        // statement), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns `bytes` and grants waiters from the head of the queue while they fit.
    fn release(&self, bytes: u64) {
        let mut state = self.lock();
        state.reserved -= bytes;
        while let Some(head) = state.queue.front() {
            if state.reserved + head.bytes > state.capacity {
                break;
            }
            let waiter = state.queue.pop_front().expect("front exists");
            state.reserved += waiter.bytes;
            // A receiver already dropped is a waiter being cancelled; its WaitGuard finds it
            // gone from the queue and releases these bytes itself.
            let _ = waiter.grant.send(());
        }
        self.publish(&state);
    }

    fn publish(&self, state: &State) {
        metrics::gauge!("klein_budget_reserved_bytes", "budget" => self.name.clone())
            .set(state.reserved as f64);
        metrics::gauge!("klein_budget_queue_depth", "budget" => self.name.clone())
            .set(state.queue.len() as f64);
    }
}

/// Bytes held by an admitted request; returned to the budget on drop.
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inner.release(self.bytes);
    }
}

/// Cleans up after a waiter whose `reserve` future was dropped.
struct WaitGuard<'a> {
    inner: &'a Arc<Inner>,
    id: u64,
    bytes: u64,
    armed: bool,
}

impl WaitGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.inner.lock();
        if let Some(pos) = state.queue.iter().position(|w| w.id == self.id) {
            state.queue.remove(pos);
            self.inner.publish(&state);
            drop(state);
            // Leaving the head may let the next waiters in.
            self.inner.release(0);
        } else {
            // Granted between the last poll and the drop: give the bytes back.
            drop(state);
            self.inner.release(self.bytes);
        }
    }
}
