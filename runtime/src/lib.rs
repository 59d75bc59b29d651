//! The service runtime every klein-serve service is built on.
//!
//! # Layout
//! - [`config`]: layered configuration (defaults < TOML file < `KLEIN_*` env < flags) and the
//!   settings every server shares ([`config::ServerConfig`]).
//! - [`bytesize`]: human byte sizes (`"16GiB"`, `"512MiB"`) for budgets in config and flags.
//! - [`device`]: `cpu` / `cuda:N` and dtype selection; asking for CUDA in a build or on a host
//!   without it fails fast.
//! - [`fence`]: marks in a device's queue of work, waited for later (steps queued ahead).
//! - [`gpu_memory`]: the CUDA memory pool's exact in-use and peak bytes (calibration).
//! - [`graph`]: CUDA graphs of a fixed-shape forward (captured once, replayed with new inputs).
//! - [`budget`]: the memory-budget admission primitive (a byte-reservation semaphore with a
//!   bounded FIFO wait queue).
//! - [`server`]: the gRPC server bootstrap (health, reflection, message limits, HTTP/2
//!   windows, graceful drain with a deadline on SIGTERM / SIGINT).
//! - [`tls`]: optional TLS and mutual TLS of servers and clients (PEM files from config).
//! - [`telemetry`]: tracing (pretty or JSON) and the Prometheus `/metrics` endpoint.
//! - [`engine`]: the one thread that owns a model and its device, fed by async callers.
//! - [`weights`]: diffusers folder layout, sharded safetensors indexes, mmap loading (tensors
//!   copied by every core and sent to a GPU in page-locked transfers, [`klein_kernels::upload`]).
//! - [`models`]: several models per service under host-RAM and device-weight caps (LRU).
//! - [`lru`]: a bytes-bounded least-recently-used map (the services' caches).

#![deny(rust_2018_idioms)]
#![deny(unsafe_code)]

pub mod budget;
pub mod bytesize;
pub mod config;
pub mod device;
pub mod engine;
pub mod fence;
pub mod gpu_memory;
pub mod graph;
pub mod lru;
pub mod models;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod weights;
