//! Replica health for the balanced stage channels.
//!
//! tonic's balancer keeps a dead replica "ready" (its reconnect fails only when a call is
//! made), so with two replicas half the calls would go to a dead one. With more than one
//! replica, a watcher probes each one's `grpc.health.v1` status every [`PROBE_INTERVAL`]
//! and takes a replica out of the balancer while it is unreachable or NOT_SERVING (down,
//! loading, draining), and puts it back once it serves again. The last replica in the
//! balancer is never taken out: with every replica down, calls fail fast with UNAVAILABLE
//! instead of waiting for one to come back. Calls that reach a dying replica before the next
//! probe are retried (see [`crate::clients::with_retry`]).

use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tonic::transport::{Channel, Endpoint, channel::Change};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::error::Stage;

/// How often each replica is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one probe may take before the replica counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A channel balanced over `endpoints`; with several, dead replicas are taken out while down.
pub fn balance(stage: Stage, endpoints: Vec<Endpoint>) -> Channel {
    if endpoints.len() < 2 {
        return Channel::balance_list(endpoints.into_iter());
    }
    let (channel, changes) = Channel::balance_channel(endpoints.len() * 2);
    for (key, endpoint) in endpoints.iter().enumerate() {
        // The channel was just made with room for every endpoint.
        let _ = changes.try_send(Change::Insert(key, endpoint.clone()));
    }
    tokio::spawn(watch(stage, endpoints, changes));
    channel
}

async fn serving(client: &mut HealthClient<Channel>) -> bool {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(PROBE_TIMEOUT);
    let probe = tokio::time::timeout(PROBE_TIMEOUT, client.check(req));
    matches!(probe.await, Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32)
}

/// Probes every replica until the balanced channel is dropped.
async fn watch(stage: Stage, endpoints: Vec<Endpoint>, changes: Sender<Change<usize, Endpoint>>) {
    let mut probes: Vec<HealthClient<Channel>> = endpoints
        .iter()
        .map(|e| HealthClient::new(e.clone().connect_lazy()))
        .collect();
    let mut inserted = vec![true; endpoints.len()];
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if changes.is_closed() {
            return;
        }
        for (key, probe) in probes.iter_mut().enumerate() {
            let up = serving(probe).await;
            let others = inserted
                .iter()
                .enumerate()
                .filter(|&(k, &i)| k != key && i)
                .count();
            let change = match (up, inserted[key]) {
                (true, false) => Change::Insert(key, endpoints[key].clone()),
                (false, true) if others > 0 => Change::Remove(key),
                _ => continue,
            };
            let uri = endpoints[key].uri().to_string();
            tracing::warn!(stage = stage.as_str(), replica = %uri, serving = up, "replica changed state");
            metrics::counter!("klein_gateway_replica_changes_total", "stage" => stage.as_str())
                .increment(1);
            if changes.send(change).await.is_err() {
                return;
            }
            inserted[key] = up;
        }
    }
}
