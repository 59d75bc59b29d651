//! Several models per service, kept resident under byte caps with least-recently-used
//! eviction (the host-RAM governor).
//!
//! A service configures its models once; a [`Registry`] lives on the engine thread (it owns
//! the built models) and makes the one a job names resident before the job runs. Two tiers:
//! - **device**: the built, runnable model. Its bytes count against the device-weight cap (the
//!   part of the service's memory budget set aside for weights). On a CPU service the device
//!   is host RAM, so these bytes count against the host cap too.
//! - **host**: on an accelerator, a copy of the weights in host RAM ([`HostWeights`], already
//!   in the compute dtype), so a model evicted from the device comes back without reading the
//!   disk. Counts against the host cap. Kept only by services with more than one model (a lone
//!   model is never evicted, so its copy would only hold RAM); a CPU service keeps none (it
//!   would duplicate the model).
//!
//! Making a model resident evicts the least-recently-used unpinned models, from the device
//! tier first and then from the host tier, until it fits. A pinned model (one with runs in
//! flight) is never evicted; when only pinned models stand in the way the call answers
//! [`RegistryError::NoRoom`] and the caller waits for them to finish. A model larger than a
//! cap on its own is refused at startup ([`Registry::new`]).
//!
//! Metrics (label `service`): `klein_models_resident{tier}`, `klein_model_resident_bytes{tier}`
//! (gauges), `klein_model_loads_total{model,tier}`, `klein_model_evictions_total{model,tier}`
//! (counters), `klein_model_load_seconds{model}` (histogram).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::{
    bytesize::ByteSize,
    weights::{self, WeightsError, backend},
};

/// Residency settings of a multi-model service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResidencyConfig {
    /// Most bytes of model weights kept in host RAM; absent = no cap. On a CPU service this
    /// caps the models themselves; on a GPU service, the host copies kept for fast reloads.
    pub host_memory_cap: Option<ByteSize>,
    /// Bytes of the memory budget set aside for resident weights on the device; absent = the
    /// largest configured model (exactly one resident at a time when models differ in size).
    pub device_weight_cap: Option<ByteSize>,
}

/// Flags of [`ResidencyConfig`]; each one given overrides file and environment.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ResidencyFlags {
    /// Cap on model weights kept in host RAM, e.g. 50GB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_memory_cap: Option<ByteSize>,
    /// Budget bytes set aside for resident weights on the device, e.g. 9GiB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_weight_cap: Option<ByteSize>,
}

/// Splits a `--model` flag value, `ID=PATH` or `PATH`, into its id and path.
pub fn parse_model_arg(s: &str) -> Result<(Option<String>, PathBuf), String> {
    let (id, path) = match s.split_once('=') {
        Some((id, path)) if !id.is_empty() => (Some(id.to_owned()), path),
        Some(_) => return Err(format!("{s:?}: empty model id before '='")),
        None => (None, s),
    };
    if path.is_empty() {
        return Err(format!("{s:?}: empty path"));
    }
    Ok((id, path.into()))
}

/// A checkpoint's tensors in host RAM, floating-point ones already in the compute dtype except
/// float8 weights and one-element tensors, which stay as stored: a float8 weight's per-tensor
/// scale is a one-element tensor, and the model's loader applies it in f32 (BFL's fp8 files),
/// so a weight takes a byte and its scale stays exact. What a [`VarBuilder`] serves from here
/// it converts to the dtype asked for.
#[derive(Debug)]
pub struct HostWeights {
    tensors: HashMap<String, Tensor>,
    bytes: u64,
}

impl HostWeights {
    /// Reads the tensors of `files` whose names pass `keep` into host RAM, converting
    /// floating-point tensors to `dtype` (float8 and one-element ones stay as stored).
    pub fn read(
        files: &[PathBuf],
        dtype: DType,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Self, WeightsError> {
        let mapped = weights::mmap_safetensors(files)?;
        let mut tensors = HashMap::new();
        let mut bytes = 0u64;
        for (name, _) in mapped.tensors() {
            if !keep(&name) {
                continue;
            }
            let t = backend::load(&mapped, &name, &Device::Cpu)?;
            let as_stored = t.dtype() == DType::F8E4M3 || t.elem_count() == 1;
            let t = if t.dtype().is_float() && !as_stored {
                t.to_dtype(dtype)?
            } else {
                t
            };
            bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            tensors.insert(name, t);
        }
        Ok(Self { tensors, bytes })
    }

    /// Bytes the tensors take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A [`VarBuilder`] over these tensors yielding `dtype` on `device` (an upload, in
    /// page-locked transfers to a GPU; on the CPU the storage is shared).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(backend::Resident(self.tensors.clone())),
            dtype,
            device.clone(),
        )
    }
}

/// One configured model: how to build it and what it costs.
pub trait ModelSource {
    /// The runnable model.
    type Model;
    /// The service's error; registry refusals convert into it.
    type Error: From<RegistryError>;
    /// Bytes the built model holds on its device.
    fn device_bytes(&self) -> u64;
    /// Bytes a host copy takes.
    fn host_bytes(&self) -> u64;
    /// Whether [`ModelSource::read_host`] can produce a host copy (GGUF files cannot).
    fn has_host_copy(&self) -> bool;
    /// Reads the weights into host RAM.
    fn read_host(&self) -> Result<HostWeights, Self::Error>;
    /// Builds the model on `device`, from `host` when given, else from disk.
    fn build(
        &self,
        host: Option<&HostWeights>,
        device: &Device,
    ) -> Result<Self::Model, Self::Error>;
}

/// Where a model's weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Device,
    Host,
}

impl Tier {
    /// Label value in metrics and Info.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
        }
    }
}

/// Why a model could not be made resident.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown model {id:?}; this service serves: {}", available.join(", "))]
    Unknown { id: String, available: Vec<String> },
    #[error(
        "model {id:?} needs {needed} bytes of {} weights but the cap is {cap} bytes",
        tier.as_str()
    )]
    TooLarge {
        id: String,
        tier: Tier,
        needed: u64,
        cap: u64,
    },
    #[error(
        "model {id:?} cannot become resident now: models with requests in flight hold the {} tier",
        tier.as_str()
    )]
    NoRoom { id: String, tier: Tier },
    #[error("duplicate model id {0:?}")]
    Duplicate(String),
    #[error("no model configured")]
    Empty,
}

/// What Info reports about one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub id: String,
    /// Built on the device.
    pub on_device: bool,
    /// A host copy is kept (accelerator services only).
    pub in_host: bool,
    pub device_bytes: u64,
    pub host_bytes: u64,
    /// Times the model was built on the device.
    pub loads: u64,
    /// Times it was evicted from the device.
    pub evictions: u64,
}

impl ModelStatus {
    /// Copies residency and counters into the model's Info entry.
    pub fn fill(&self, info: &mut klein_proto::pb::ModelInfo) {
        info.on_device = self.on_device;
        info.in_host_memory = self.in_host;
        info.loads = self.loads;
        info.evictions = self.evictions;
    }
}

/// Read-only view of the registry for async handlers (Info, metrics).
#[derive(Debug, Clone, Default)]
pub struct RegistryStatus(Arc<Mutex<Vec<ModelStatus>>>);

impl RegistryStatus {
    /// Every configured model, in configuration order.
    pub fn models(&self) -> Vec<ModelStatus> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Byte caps of the two tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Device-weight cap.
    pub device: u64,
    /// Host cap; `u64::MAX` = none.
    pub host: u64,
}

struct Slot<S: ModelSource> {
    id: String,
    source: S,
    model: Option<S::Model>,
    host: Option<HostWeights>,
    last_used: u64,
    pins: u32,
    status: ModelStatus,
}

/// The configured models of one service and which are resident. Lives on the engine thread.
pub struct Registry<S: ModelSource> {
    service: &'static str,
    device: Device,
    caps: Caps,
    slots: Vec<Slot<S>>,
    tick: u64,
    status: RegistryStatus,
}

impl<S: ModelSource> Registry<S> {
    /// The registry of `sources` (id, source; the first is the default model). Fails when an
    /// id repeats or a model alone exceeds a cap.
    pub fn new(
        service: &'static str,
        device: Device,
        caps: Caps,
        sources: Vec<(String, S)>,
    ) -> Result<Self, RegistryError> {
        if sources.is_empty() {
            return Err(RegistryError::Empty);
        }
        let mut slots: Vec<Slot<S>> = Vec::with_capacity(sources.len());
        for (id, source) in sources {
            if slots.iter().any(|s| s.id == id) {
                return Err(RegistryError::Duplicate(id));
            }
            let bytes = source.device_bytes();
            let too_large = |tier, cap| RegistryError::TooLarge {
                id: id.clone(),
                tier,
                needed: bytes,
                cap,
            };
            if bytes > caps.device {
                return Err(too_large(Tier::Device, caps.device));
            }
            if device.is_cpu() && bytes > caps.host {
                return Err(too_large(Tier::Host, caps.host));
            }
            slots.push(Slot {
                status: ModelStatus {
                    id: id.clone(),
                    on_device: false,
                    in_host: false,
                    device_bytes: 0,
                    host_bytes: 0,
                    loads: 0,
                    evictions: 0,
                },
                id,
                source,
                model: None,
                host: None,
                last_used: 0,
                pins: 0,
            });
        }
        let registry = Self {
            service,
            device,
            caps,
            slots,
            tick: 0,
            status: RegistryStatus::default(),
        };
        registry.publish();
        Ok(registry)
    }

    /// The device the models run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shared status view.
    pub fn status(&self) -> RegistryStatus {
        self.status.clone()
    }

    /// The default model's id.
    pub fn default_id(&self) -> &str {
        &self.slots[0].id
    }

    /// Makes every model resident in configuration order while each fits without evicting
    /// another (startup, off the request path).
    pub fn preload(&mut self) -> Result<(), S::Error> {
        for i in 0..self.slots.len() {
            let bytes = self.slots[i].source.device_bytes();
            let (device, host) = self.used();
            let host_need = if self.device.is_cpu() { bytes } else { 0 };
            if i > 0 && (device + bytes > self.caps.device || host + host_need > self.caps.host) {
                continue;
            }
            let id = self.slots[i].id.clone();
            self.resident(&id)?;
        }
        Ok(())
    }

    /// The model `id` (empty = the default), made resident first if needed, and marked used.
    pub fn resident(&mut self, id: &str) -> Result<&S::Model, S::Error> {
        let i = self.index(id)?;
        self.tick += 1;
        self.slots[i].last_used = self.tick;
        if self.slots[i].model.is_none() {
            self.load(i)?;
        }
        Ok(self.slots[i].model.as_ref().expect("loaded above"))
    }

    /// The resident model `id` without loading (for pinned models).
    pub fn get(&self, id: &str) -> Option<&S::Model> {
        let i = self.index(id).ok()?;
        self.slots[i].model.as_ref()
    }

    /// Keeps `id` from being evicted until [`Registry::unpin`].
    pub fn pin(&mut self, id: &str) {
        if let Ok(i) = self.index(id) {
            self.slots[i].pins += 1;
        }
    }

    /// Undoes one [`Registry::pin`].
    pub fn unpin(&mut self, id: &str) {
        if let Ok(i) = self.index(id) {
            self.slots[i].pins = self.slots[i].pins.saturating_sub(1);
        }
    }

    fn index(&self, id: &str) -> Result<usize, RegistryError> {
        if id.is_empty() {
            return Ok(0);
        }
        self.slots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| RegistryError::Unknown {
                id: id.to_owned(),
                available: self.slots.iter().map(|s| s.id.clone()).collect(),
            })
    }

    /// (device bytes, host bytes) in use.
    fn used(&self) -> (u64, u64) {
        let device: u64 = self.slots.iter().map(|s| s.status.device_bytes).sum();
        let host: u64 = self.slots.iter().map(|s| s.status.host_bytes).sum();
        if self.device.is_cpu() {
            (device, host + device)
        } else {
            (device, host)
        }
    }

    fn load(&mut self, i: usize) -> Result<(), S::Error> {
        let bytes = self.slots[i].source.device_bytes();
        let host_need = if self.device.is_cpu() { bytes } else { 0 };
        self.make_room(i, Tier::Device, bytes)?;
        self.make_room(i, Tier::Host, host_need)?;
        let started = Instant::now();
        let copies = !self.device.is_cpu() && self.slots.len() > 1;
        if copies && self.slots[i].host.is_none() && self.slots[i].source.has_host_copy() {
            let host_bytes = self.slots[i].source.host_bytes();
            if host_bytes <= self.caps.host && self.make_room(i, Tier::Host, host_bytes).is_ok() {
                let host = self.slots[i].source.read_host()?;
                self.slots[i].status.host_bytes = host.bytes();
                self.slots[i].status.in_host = true;
                self.slots[i].host = Some(host);
                self.count_load(i, Tier::Host);
            }
        }
        let slot = &mut self.slots[i];
        let model = slot.source.build(slot.host.as_ref(), &self.device)?;
        let seconds = started.elapsed().as_secs_f64();
        slot.model = Some(model);
        slot.status.on_device = true;
        slot.status.device_bytes = bytes;
        slot.status.loads += 1;
        metrics::histogram!("klein_model_load_seconds", "service" => self.service, "model" => slot.id.clone())
            .record(seconds);
        tracing::info!(service = self.service, model = %slot.id, bytes, seconds, "model resident");
        self.count_load(i, Tier::Device);
        self.publish();
        Ok(())
    }

    fn count_load(&self, i: usize, tier: Tier) {
        metrics::counter!("klein_model_loads_total", "service" => self.service, "model" => self.slots[i].id.clone(), "tier" => tier.as_str())
            .increment(1);
    }

    /// Evicts least-recently-used unpinned models (other than `keep`) until `need` more bytes
    /// fit the `tier` cap; evicts nothing when even evicting all of them would not do.
    fn make_room(&mut self, keep: usize, tier: Tier, need: u64) -> Result<(), RegistryError> {
        let (cap, used) = match (tier, self.used()) {
            (Tier::Device, (device, _)) => (self.caps.device, device),
            (Tier::Host, (_, host)) => (self.caps.host, host),
        };
        let mut victims: Vec<(u64, usize, u64)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(j, s)| j != keep && s.pins == 0)
            .map(|(j, s)| (s.last_used, j, self.frees(s, tier)))
            .filter(|&(_, _, bytes)| bytes > 0)
            .collect();
        let freeable: u64 = victims.iter().map(|v| v.2).sum();
        if used.saturating_add(need).saturating_sub(freeable) > cap {
            return Err(RegistryError::NoRoom {
                id: self.slots[keep].id.clone(),
                tier,
            });
        }
        victims.sort_unstable();
        let mut used = used;
        for (_, j, bytes) in victims {
            if used.saturating_add(need) <= cap {
                break;
            }
            self.evict(j, tier);
            used -= bytes;
        }
        Ok(())
    }

    /// Bytes of the `tier` cap that evicting `s` from it returns (on the CPU the device tier is
    /// host RAM: evicting the model itself frees host bytes).
    fn frees(&self, s: &Slot<S>, tier: Tier) -> u64 {
        match tier {
            Tier::Device => s.status.device_bytes,
            Tier::Host if s.host.is_some() => s.status.host_bytes,
            Tier::Host if self.device.is_cpu() => s.status.device_bytes,
            Tier::Host => 0,
        }
    }

    fn evict(&mut self, j: usize, tier: Tier) {
        let slot = &mut self.slots[j];
        let evicted = match tier {
            Tier::Host if slot.host.is_some() => {
                slot.host = None;
                slot.status.in_host = false;
                slot.status.host_bytes = 0;
                Tier::Host
            }
            _ => {
                slot.model = None;
                slot.status.on_device = false;
                slot.status.device_bytes = 0;
                slot.status.evictions += 1;
                Tier::Device
            }
        };
        tracing::info!(service = self.service, model = %slot.id, tier = evicted.as_str(), "model evicted");
        metrics::counter!("klein_model_evictions_total", "service" => self.service, "model" => slot.id.clone(), "tier" => evicted.as_str())
            .increment(1);
        self.publish();
    }

    fn publish(&self) {
        let (device, host) = self.used();
        let count = |f: fn(&Slot<S>) -> bool| self.slots.iter().filter(|s| f(s)).count() as f64;
        metrics::gauge!("klein_models_resident", "service" => self.service, "tier" => "device")
            .set(count(|s| s.model.is_some()));
        metrics::gauge!("klein_models_resident", "service" => self.service, "tier" => "host")
            .set(count(|s| s.host.is_some()));
        metrics::gauge!("klein_model_resident_bytes", "service" => self.service, "tier" => "device")
            .set(device as f64);
        metrics::gauge!("klein_model_resident_bytes", "service" => self.service, "tier" => "host")
            .set(host as f64);
        if let Ok(mut m) = self.status.0.lock() {
            *m = self.slots.iter().map(|s| s.status.clone()).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A model of a given size whose builds are counted.
    struct Fake {
        bytes: u64,
        builds: Cell<u32>,
    }

    impl ModelSource for Fake {
        type Model = u64;
        type Error = RegistryError;
        fn device_bytes(&self) -> u64 {
            self.bytes
        }
        fn host_bytes(&self) -> u64 {
            self.bytes
        }
        fn has_host_copy(&self) -> bool {
            true
        }
        fn read_host(&self) -> Result<HostWeights, RegistryError> {
            Ok(HostWeights {
                tensors: HashMap::new(),
                bytes: self.bytes,
            })
        }
        fn build(&self, _: Option<&HostWeights>, _: &Device) -> Result<u64, RegistryError> {
            self.builds.set(self.builds.get() + 1);
            Ok(self.bytes)
        }
    }

    fn registry(caps: Caps, sizes: &[(&str, u64)]) -> Registry<Fake> {
        let sources = sizes
            .iter()
            .map(|&(id, bytes)| {
                (
                    id.to_owned(),
                    Fake {
                        bytes,
                        builds: Cell::new(0),
                    },
                )
            })
            .collect();
        Registry::new("test", Device::Cpu, caps, sources).unwrap()
    }

    fn on_device(r: &Registry<Fake>) -> Vec<String> {
        r.status()
            .models()
            .into_iter()
            .filter(|m| m.on_device)
            .map(|m| m.id)
            .collect()
    }

    #[test]
    fn least_recently_used_is_evicted_under_the_host_cap() {
        let caps = Caps {
            device: u64::MAX,
            host: 250,
        };
        let mut r = registry(caps, &[("a", 100), ("b", 100), ("c", 100)]);
        r.preload().unwrap();
        assert_eq!(on_device(&r), ["a", "b"], "c does not fit without evicting");
        r.resident("a").unwrap();
        r.resident("c").unwrap();
        assert_eq!(on_device(&r), ["a", "c"], "b was least recently used");
        let status = r.status().models();
        assert_eq!((status[1].loads, status[1].evictions), (1, 1));
        r.resident("b").unwrap();
        assert_eq!(on_device(&r), ["b", "c"]);
        assert_eq!(r.slots[1].source.builds.get(), 2, "b was built again");
        assert_eq!(
            r.resident("").unwrap(),
            &100,
            "empty id = the default model"
        );
    }

    #[test]
    fn pinned_models_are_never_evicted() {
        let caps = Caps {
            device: 100,
            host: u64::MAX,
        };
        let mut r = registry(caps, &[("a", 100), ("b", 60)]);
        r.resident("a").unwrap();
        r.pin("a");
        assert_eq!(
            r.resident("b").unwrap_err(),
            RegistryError::NoRoom {
                id: "b".into(),
                tier: Tier::Device
            }
        );
        r.unpin("a");
        r.resident("b").unwrap();
        assert_eq!(on_device(&r), ["b"]);
    }

    #[test]
    fn idle_models_stay_when_evicting_them_would_not_make_room() {
        let caps = Caps {
            device: 200,
            host: u64::MAX,
        };
        let mut r = registry(caps, &[("a", 100), ("b", 50), ("c", 150)]);
        r.preload().unwrap();
        assert_eq!(on_device(&r), ["a", "b"]);
        r.pin("a");
        assert!(matches!(r.resident("c"), Err(RegistryError::NoRoom { .. })));
        assert_eq!(on_device(&r), ["a", "b"], "b was not evicted for nothing");
        r.unpin("a");
        r.resident("c").unwrap();
        assert_eq!(
            on_device(&r),
            ["b", "c"],
            "evicting a, the least recent, was enough"
        );
    }

    #[test]
    fn unknown_duplicate_and_oversized_models_are_refused() {
        let caps = Caps {
            device: 100,
            host: 100,
        };
        let mut r = registry(caps, &[("a", 50), ("b", 50)]);
        let err = r.resident("x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown model \"x\"; this service serves: a, b"
        );
        let fake = |bytes| Fake {
            bytes,
            builds: Cell::new(0),
        };
        let dup = Registry::new(
            "test",
            Device::Cpu,
            caps,
            vec![("a".into(), fake(1)), ("a".into(), fake(1))],
        );
        assert_eq!(dup.err(), Some(RegistryError::Duplicate("a".into())));
        let big = Registry::new("test", Device::Cpu, caps, vec![("a".into(), fake(101))]);
        assert!(matches!(
            big.err(),
            Some(RegistryError::TooLarge {
                needed: 101,
                cap: 100,
                ..
            })
        ));
    }

    #[test]
    fn model_flags_split_into_id_and_path() {
        assert_eq!(
            parse_model_arg("klein-9b=/m/9b").unwrap(),
            (Some("klein-9b".into()), "/m/9b".into())
        );
        assert_eq!(parse_model_arg("/m/4b").unwrap(), (None, "/m/4b".into()));
        assert!(parse_model_arg("=/m").is_err());
        assert!(parse_model_arg("x=").is_err());
    }
}
