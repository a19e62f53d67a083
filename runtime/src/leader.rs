//! Leader election on a `coordination.k8s.io/v1` Lease, so a controller can run with
//! replicas > 1 and only one of them writes.
//!
//! The Lease is written with a resourceVersion precondition (create, then replace) rather than
//! server-side apply: taking over a Lease must fail when someone else renewed it in between, and
//! that is exactly what optimistic concurrency gives. Expiry is judged by how long this process
//! has seen the same record unchanged, never by comparing clocks with the other holder.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Error;

#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// How long a holder's claim lasts without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops acting as leader.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    /// The figures client-go's leader election uses.
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether this process currently holds the Lease. Check it right before every write.
#[derive(Clone)]
pub struct Leadership {
    receiver: watch::Receiver<bool>,
    stop: CancellationToken,
}

/// How long giving the Lease up may take at shutdown (a read and a write).
const RELEASE_WITHIN: Duration = Duration::from_secs(3);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Ends the election and releases the Lease if held. Called once the work it guards has
    /// finished, so a successor never writes beside a draining leader.
    pub fn step_down(&self) {
        self.stop.cancel();
    }

    /// Resolves once this process is leader (at once if it already is).
    pub async fn acquired(&mut self) {
        // An error means the election task ended; leadership can then never come.
        if self.receiver.wait_for(|leader| *leader).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when leadership changes either way, with the new state; `None` once the
    /// election has ended (shutdown).
    pub async fn changed(&mut self) -> Option<bool> {
        self.receiver.changed().await.ok()?;
        Some(*self.receiver.borrow_and_update())
    }
}

pub struct LeaderElection {
    api: Api<Lease>,
    lease_name: String,
    holder: String,
    timing: LeaseTiming,
}

/// The last Lease record seen and when it was first seen, for clock-skew-free expiry.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    since: Instant,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, lease_name: &str, holder: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            lease_name: lease_name.to_owned(),
            holder: holder.to_owned(),
            timing: LeaseTiming::default(),
        }
    }

    pub fn with_timing(mut self, timing: LeaseTiming) -> Self {
        self.timing = timing;
        self
    }

    /// Starts campaigning in the background until `stop` (or `Leadership::step_down`); then a
    /// held Lease is released so another replica takes over without waiting for it to expire.
    pub fn spawn(self, stop: CancellationToken) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = watch::channel(false);
        let task = tokio::spawn(self.campaign(sender, stop.clone()));
        (Leadership { receiver, stop }, task)
    }

    async fn campaign(self, leader: watch::Sender<bool>, stop: CancellationToken) {
        let mut observed: Option<Observed> = None;
        // When the last successful round began: the Lease was written no earlier than that, so
        // the renew deadline counted from it ends before the Lease can expire for others.
        let mut last_renewal: Option<Instant> = None;
        loop {
            // A round ends by the renew deadline even when the API never answers: a leader
            // waiting on a hung request would go on acting after another replica took over.
            let budget = self.time_left(last_renewal);
            let began = Instant::now();
            let round = tokio::select! {
                () = stop.cancelled() => break,
                round = tokio::time::timeout(budget, self.try_acquire_or_renew(&mut observed)) => {
                    round.unwrap_or(Err(Error::LeaseRoundTimedOut(budget)))
                }
            };
            match round {
                Ok(true) => {
                    last_renewal = Some(began);
                    if set(&leader, true) {
                        tracing::info!(lease = %self.lease_name, holder = %self.holder, "became leader");
                    }
                }
                Ok(false) => {
                    // Someone else holds a live Lease: stop at once.
                    if set(&leader, false) {
                        tracing::warn!(lease = %self.lease_name, "leadership lost to another holder");
                    }
                    last_renewal = None;
                }
                Err(error) => {
                    tracing::warn!(lease = %self.lease_name, error = %error, "lease update failed");
                    if self.time_left(last_renewal).is_zero() {
                        // From here on a candidate again, with a whole deadline per round.
                        last_renewal = None;
                        if set(&leader, false) {
                            tracing::warn!(lease = %self.lease_name, "leadership lost: could not renew in time");
                        }
                    }
                }
            }
            // A leader wakes by its deadline, so it stops leading on time if the next round fails.
            let pause = self.timing.retry_period.min(self.time_left(last_renewal));
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        // Bounded, so an API that does not answer cannot hold up the drain.
        if set(&leader, false)
            && tokio::time::timeout(RELEASE_WITHIN, self.release())
                .await
                .is_err()
        {
            tracing::warn!(lease = %self.lease_name, "could not release the lease: no answer in time");
        }
    }

    /// What is left of the renew deadline since `last_renewal`; a whole one for a candidate.
    fn time_left(&self, last_renewal: Option<Instant>) -> Duration {
        last_renewal.map_or(self.timing.renew_deadline, |renewed| {
            self.timing.renew_deadline.saturating_sub(renewed.elapsed())
        })
    }

    /// One round: create the Lease, renew ours, or take over an expired one. `Ok(false)` means
    /// another holder has it (or won a race for it).
    async fn try_acquire_or_renew(&self, observed: &mut Option<Observed>) -> Result<bool, Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let Some(current) = self.api.get_opt(&self.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.claim(now.clone(), None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(error) if is_conflict(&error) => Ok(false),
                Err(error) => Err(error.into()),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        if !held_by_me && !self.expired(&spec, observed) {
            return Ok(false);
        }
        let (acquire_time, transitions) = if held_by_me {
            (spec.acquire_time, spec.lease_transitions.unwrap_or(0))
        } else {
            (None, spec.lease_transitions.unwrap_or(0) + 1)
        };
        let lease = Lease {
            metadata: current.metadata,
            spec: Some(self.claim(now, acquire_time, transitions)),
        };
        match self
            .api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if is_conflict(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// A Lease is expired when nobody holds it, or when its record has not changed for a whole
    /// lease duration as measured on this process's own monotonic clock.
    fn expired(&self, spec: &LeaseSpec, observed: &mut Option<Observed>) -> bool {
        if spec
            .holder_identity
            .as_deref()
            .unwrap_or_default()
            .is_empty()
        {
            return true;
        }
        let unchanged = observed.as_ref().is_some_and(|seen| {
            seen.holder == spec.holder_identity && seen.renew_time == spec.renew_time
        });
        if !unchanged {
            *observed = Some(Observed {
                holder: spec.holder_identity.clone(),
                renew_time: spec.renew_time.clone(),
                since: Instant::now(),
            });
        }
        let duration = spec
            .lease_duration_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map_or(self.timing.lease_duration, Duration::from_secs);
        observed
            .as_ref()
            .is_some_and(|seen| seen.since.elapsed() >= duration)
    }

    fn claim(&self, now: MicroTime, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: i32::try_from(self.timing.lease_duration.as_secs()).ok(),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Gives the Lease up so the next replica need not wait out the lease duration.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.lease_name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match self
            .api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.lease_name, "leadership released"),
            Err(error) => {
                tracing::warn!(lease = %self.lease_name, error = %error, "could not release the lease")
            }
        }
    }
}

/// Sets leadership and tells receivers only when it actually changed: a renewal is no news.
fn set(leader: &watch::Sender<bool>, value: bool) -> bool {
    leader.send_if_modified(|current| {
        let changed = *current != value;
        *current = value;
        changed
    })
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}
