//! Per-model routing: a request goes to a replica that serves its model.
//!
//! Each stage's replicas may serve different model sets (a 4B replica and a 9B one). A
//! [`Router`] keeps the channel balanced over all replicas (for model-agnostic calls and
//! models every replica has) and, per model, a channel balanced over only the replicas that
//! list it in their Info. [`crate::catalog`]'s refresher feeds it each replica's model list;
//! a replica that did not answer keeps its last known list, and a model no replica lists is
//! sent to all of them (the replica answers INVALID_ARGUMENT naming its models).

use std::{
    collections::{BTreeSet, HashMap},
    sync::RwLock,
};

use tonic::transport::{Channel, Endpoint};

use crate::error::Stage;

/// For each model, the indices of the replicas that serve it (ascending).
pub fn replicas_by_model(lists: &[Vec<String>]) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for (i, models) in lists.iter().enumerate() {
        for m in models {
            out.entry(m.clone()).or_default().insert(i);
        }
    }
    out.into_iter()
        .map(|(m, set)| (m, set.into_iter().collect()))
        .collect()
}

#[derive(Default)]
struct Table {
    /// Last known model list of each replica.
    lists: Vec<Vec<String>>,
    /// Model → channel over the replicas that serve it (absent: every replica does).
    by_model: HashMap<String, Channel>,
    /// Channels over replica subsets, reused across refreshes.
    subsets: HashMap<Vec<usize>, Channel>,
}

/// The channels of one stage.
pub struct Router {
    stage: Stage,
    endpoints: Vec<Endpoint>,
    /// One lazily connected channel per replica, for its Info.
    replicas: Vec<Channel>,
    all: Channel,
    table: RwLock<Table>,
}

impl Router {
    /// A router over `endpoints` whose all-replica channel is `all` (inside a Tokio runtime).
    pub fn new(stage: Stage, endpoints: Vec<Endpoint>, all: Channel) -> Self {
        let replicas = endpoints.iter().map(|e| e.connect_lazy()).collect();
        let table = Table {
            lists: vec![Vec::new(); endpoints.len()],
            ..Table::default()
        };
        Self {
            stage,
            endpoints,
            replicas,
            all,
            table: RwLock::new(table),
        }
    }

    /// One channel per replica, in configuration order.
    pub fn replicas(&self) -> &[Channel] {
        &self.replicas
    }

    /// The channel for `model` (empty = any replica).
    pub fn channel(&self, model: &str) -> Channel {
        if model.is_empty() {
            return self.all.clone();
        }
        self.table
            .read()
            .ok()
            .and_then(|t| t.by_model.get(model).cloned())
            .unwrap_or_else(|| self.all.clone())
    }

    /// Every model some replica serves.
    pub fn models(&self) -> BTreeSet<String> {
        self.table
            .read()
            .map(|t| t.lists.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Records the model lists that came back (`None`: the replica did not answer).
    pub fn update(&self, answers: Vec<Option<Vec<String>>>) {
        let Ok(mut t) = self.table.write() else {
            return;
        };
        for (i, answer) in answers.into_iter().enumerate() {
            if let (Some(list), Some(slot)) = (answer, t.lists.get_mut(i)) {
                *slot = list;
            }
        }
        let all: Vec<usize> = (0..self.endpoints.len()).collect();
        let mut by_model = HashMap::new();
        for (model, replicas) in replicas_by_model(&t.lists) {
            if replicas == all {
                continue;
            }
            let channel = match t.subsets.get(&replicas) {
                Some(c) => c.clone(),
                None => {
                    let endpoints = replicas
                        .iter()
                        .map(|&i| self.endpoints[i].clone())
                        .collect();
                    let c = crate::replicas::balance(self.stage, endpoints);
                    t.subsets.insert(replicas.clone(), c.clone());
                    c
                }
            };
            by_model.insert(model, channel);
        }
        t.by_model = by_model;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lists(l: &[&[&str]]) -> Vec<Vec<String>> {
        l.iter()
            .map(|r| r.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn each_model_maps_to_the_replicas_that_list_it() {
        let by = replicas_by_model(&lists(&[&["4b", "9b"], &["4b"], &["9b", "base-4b"]]));
        assert_eq!(by["4b"], [0, 1]);
        assert_eq!(by["9b"], [0, 2]);
        assert_eq!(by["base-4b"], [2]);
        assert_eq!(by.len(), 3);
    }

    #[tokio::test]
    async fn a_silent_replica_keeps_its_last_list_and_shared_models_use_every_replica() {
        let endpoints: Vec<Endpoint> = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
            .iter()
            .map(|a| Endpoint::from_static(a))
            .collect();
        let all = Channel::balance_list(endpoints.clone().into_iter());
        let router = Router::new(Stage::Denoiser, endpoints, all);
        router.update(vec![
            Some(vec!["4b".into(), "9b".into()]),
            Some(vec!["4b".into()]),
        ]);
        router.update(vec![None, Some(vec!["4b".into()])]);
        assert_eq!(
            router.models().into_iter().collect::<Vec<_>>(),
            ["4b", "9b"]
        );
        let t = router.table.read().unwrap();
        assert!(!t.by_model.contains_key("4b"), "both replicas serve 4b");
        assert!(t.by_model.contains_key("9b"), "only replica 0 serves 9b");
        assert_eq!(t.subsets.len(), 1, "the subset channel is reused");
    }
}
