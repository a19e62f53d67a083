//! What every hearth controller shares around kube-runtime's `Controller`: when to reconcile
//! everything again, when the process is ready, and how long to back off after a failure.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::admin::ReadinessGate;
use crate::leader::{LeaderElection, Leadership};
use crate::{CommonOptions, Process};

/// Runs for `lease` in the pod's namespace under its pod name until `Leadership::step_down`, as
/// a task of the process (so the drain waits for the Lease to be released); whether this
/// process leads.
pub fn elect_leader(
    process: &Process,
    client: &kube::Client,
    options: &CommonOptions,
    lease: &str,
) -> Leadership {
    let (leadership, election) = LeaderElection::new(
        client.clone(),
        &options.pod_namespace,
        lease,
        &options.pod_name,
    )
    // Not the process's shutdown token: the controller steps down once it has drained (see
    // `spawn`), so no successor writes beside reconciles that are still finishing.
    .spawn(tokio_util::sync::CancellationToken::new());
    process.shutdown.spawn("leader-election", async move {
        // The election task releases the Lease when it ends; the drain waits for that.
        let _ = election.await;
        Ok(())
    });
    leadership
}

/// Yields each time this process becomes leader, so the new leader checks everything at once
/// instead of at the next resync. Ends with the election.
pub fn on_becoming_leader(leadership: Leadership) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold(leadership, |mut leadership| async move {
        loop {
            match leadership.changed().await {
                Some(true) => return Some(((), leadership)),
                Some(false) => {}
                None => return None,
            }
        }
    })
}

/// Yields once every `interval`: one timer for every object, to repair drift.
pub fn every(interval: Duration) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(interval).await;
        Some(((), ()))
    })
}

/// The Namespace an object lives in, keyed exactly as the controller keys the Namespace itself.
///
/// kube-runtime's `owns` keys an owner by the child's namespace too, so a Namespace owning a
/// Secret in itself got a second key (`Namespace/x` within `x`): the runner, which keeps one
/// reconcile in flight per key, then ran two reconciles of the same Namespace at once.
pub fn namespace_of<K: Resource>(object: &K) -> Option<ObjectRef<Namespace>> {
    object.namespace().map(|name| ObjectRef::new(&name))
}

/// Runs a controller (the stream of its `run`) as a task of the process; /readyz waits for the
/// store's first full list.
///
/// kube-runtime 5 holds a graceful shutdown until the store has had that first list, yet the
/// shutdown has already stopped the watch that would bring it: stopped before then, the
/// controller never ends and the drain times out (seen on a SIGTERM right after start). Such a
/// controller has reconciled nothing, so it is dropped instead.
///
/// Once the controller has ended, `leadership` steps down and releases the Lease.
pub fn spawn<K, S>(process: &Process, store: Store<K>, running: S, leadership: Leadership)
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
    S: Stream + Send + 'static,
{
    open_when_synced(store.clone(), process.readiness.gate("kubernetes"));
    let shutdown = process.shutdown.token();
    process.shutdown.spawn("controller", async move {
        let unsynced_at_shutdown = async {
            shutdown.cancelled().await;
            if store.wait_until_ready().now_or_never().is_some() {
                // Synced (or its writer is gone): the controller ends by itself.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = running.for_each(|_| futures::future::ready(())) => {}
            () = unsynced_at_shutdown => {
                tracing::debug!("controller stopped before its first list");
            }
        }
        leadership.step_down();
        Ok(())
    });
}

/// Opens `gate` once the controller's store has had its first full list.
pub fn open_when_synced<K>(store: Store<K>, gate: ReadinessGate)
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    tokio::spawn(async move {
        // kube-runtime 5's Store::wait_until_ready is not always woken when the store fills;
        // polling it again finds it ready, so it is re-polled every half second.
        loop {
            match tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready()).await {
                Ok(Ok(())) => break gate.open(),
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
    });
}

/// Opens `gate` the first time `reachable` says yes, asking every two seconds.
pub fn open_once<F, Fut>(gate: ReadinessGate, mut reachable: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    tokio::spawn(async move {
        while !reachable().await {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        gate.open();
    });
}

/// Consecutive failures per object: 5 s after the first, doubling to 5 min.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

const FIRST_RETRY: Duration = Duration::from_secs(5);
const LONGEST_RETRY: Duration = Duration::from_secs(300);

impl Backoff {
    /// Counts a failure of `key` and says how long to wait before trying it again.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(key.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        let exponent = (*count - 1).min(6);
        (FIRST_RETRY * 2_u32.pow(exponent)).min(LONGEST_RETRY)
    }

    /// `key` worked: its next failure starts from the shortest wait again.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_maps_to_the_key_of_its_namespace() {
        use k8s_openapi::api::core::v1::Secret;
        use kube::api::ObjectMeta;

        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some("paperless".into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("hearth-db".into()),
                namespace: Some("paperless".into()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        };
        assert_eq!(namespace_of(&secret), Some(ObjectRef::from_obj(&namespace)));
        assert_eq!(namespace_of(&namespace), None);
    }

    #[test]
    fn backoff_doubles_to_five_minutes_and_resets() {
        let backoff = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| backoff.failed("a").as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff.failed("b").as_secs(), 5);
        backoff.succeeded("a");
        assert_eq!(backoff.failed("a").as_secs(), 5);
    }
}
