//! What is known of every target: its last result, counts and timestamps. Probes write it in
//! the background; `/metrics` and the status page read it, so a scrape never waits on a target.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::probe::{Outcome, Reason, Report};
use crate::targets::{AppTargets, HttpTarget, TargetKey};

/// How a target is checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// An HTTP GET of a Service or a URL.
    Http(HttpTarget),
    /// The certificate of the published URL.
    Tls {
        host: String,
        port: u16,
    },
    Postgres,
    Redis,
    /// Read from the cluster (Secret present, ExternalSecret ready, Ingress named).
    Cluster,
    /// The annotation asking for a probe is not valid: a failed target, with why.
    Invalid(String),
}

impl Check {
    /// Whether the check goes over the network (and so waits for a place among
    /// `PROBE_CONCURRENCY`), rather than reading what is already known.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            Self::Http(_) | Self::Tls { .. } | Self::Postgres | Self::Redis
        )
    }
}

/// Everything held for one target.
#[derive(Debug)]
pub struct Target {
    pub check: Check,
    /// Tells this target's probes from those of a target of the same key it replaced.
    pub generation: u64,
    pub last: Option<(SystemTime, Report)>,
    pub last_success: Option<SystemTime>,
    pub last_failure: Option<(SystemTime, Reason, String)>,
    pub probes: BTreeMap<Outcome, u64>,
    pub errors: BTreeMap<Reason, u64>,
    pub due: Instant,
    pub in_flight: bool,
}

/// Generations, unique in the process.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

impl Target {
    fn new(check: Check, due: Instant) -> Self {
        Self {
            check,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            last: None,
            last_success: None,
            last_failure: None,
            probes: BTreeMap::new(),
            errors: BTreeMap::new(),
            due,
            in_flight: false,
        }
    }

    pub fn up(&self) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(_, report)| report.outcome == Outcome::Success)
    }
}

/// An app namespace as the status page shows it.
#[derive(Clone, Debug, Default)]
pub struct App {
    pub targets: AppTargets,
}

/// A probe handed out by [`Registry::take_due`]: what to check, and for which generation of
/// the target.
#[derive(Clone, Debug)]
pub struct Due {
    pub key: TargetKey,
    pub check: Check,
    pub generation: u64,
}

#[derive(Default)]
pub struct Registry {
    targets: Mutex<BTreeMap<TargetKey, Target>>,
    apps: Mutex<BTreeMap<String, App>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// Makes the set of targets exactly `wanted`: new ones are due after `first_in`, a target
    /// whose check changed starts afresh (its old results and counts are not its own) and is due
    /// now, and targets no longer wanted vanish (and vanish from `/metrics`).
    pub fn set_targets(&self, wanted: BTreeMap<TargetKey, Check>, first_in: impl Fn() -> Duration) {
        let now = Instant::now();
        let mut targets = lock(&self.targets);
        targets.retain(|key, _| wanted.contains_key(key));
        for (key, check) in wanted {
            match targets.get(&key) {
                Some(target) if target.check == check => {}
                Some(_) => {
                    targets.insert(key, Target::new(check, now));
                }
                None => {
                    targets.insert(key, Target::new(check, now + first_in()));
                }
            }
        }
    }

    pub fn set_apps(&self, apps: BTreeMap<String, App>) {
        *lock(&self.apps) = apps;
    }

    /// Targets due now and not being probed; they are marked as in flight.
    pub fn take_due(&self) -> Vec<Due> {
        let now = Instant::now();
        let mut targets = lock(&self.targets);
        targets
            .iter_mut()
            .filter(|(_, target)| !target.in_flight && target.due <= now)
            .map(|(key, target)| {
                target.in_flight = true;
                Due {
                    key: key.clone(),
                    check: target.check.clone(),
                    generation: target.generation,
                }
            })
            .collect()
    }

    /// Records a probe's result; the next one is due after `next_in`. A result for a target
    /// that was removed or replaced meanwhile is dropped.
    pub fn record(&self, due: &Due, report: Report, next_in: Duration) {
        let now = SystemTime::now();
        let mut targets = lock(&self.targets);
        let Some(target) = targets
            .get_mut(&due.key)
            .filter(|target| target.generation == due.generation)
        else {
            return;
        };
        *target.probes.entry(report.outcome).or_default() += 1;
        match report.reason {
            None => target.last_success = Some(now),
            Some(reason) => {
                *target.errors.entry(reason).or_default() += 1;
                target.last_failure = Some((now, reason, report.message.clone()));
            }
        }
        target.last = Some((now, report));
        target.in_flight = false;
        target.due = Instant::now() + next_in;
    }

    /// Hands a probe back unrecorded (what it needs is not known yet): due again after `retry_in`.
    pub fn skip(&self, due: &Due, retry_in: Duration) {
        let mut targets = lock(&self.targets);
        if let Some(target) = targets
            .get_mut(&due.key)
            .filter(|target| target.generation == due.generation)
        {
            target.in_flight = false;
            target.due = Instant::now() + retry_in;
        }
    }

    /// Asks for every check that reads the cluster to run now (the cluster changed).
    pub fn cluster_checks_due(&self) {
        let now = Instant::now();
        for target in lock(&self.targets).values_mut() {
            if target.check == Check::Cluster {
                target.due = target.due.min(now);
            }
        }
    }

    /// Reads the targets and apps at one moment.
    pub fn read<T>(
        &self,
        view: impl FnOnce(&BTreeMap<TargetKey, Target>, &BTreeMap<String, App>) -> T,
    ) -> T {
        let targets = lock(&self.targets);
        let apps = lock(&self.apps);
        view(&targets, &apps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Detail;
    use crate::targets::Kind;

    fn key(target: &str) -> TargetKey {
        TargetKey {
            kind: Kind::Http,
            namespace: "app".into(),
            target: target.into(),
        }
    }

    fn url(text: &str) -> Check {
        Check::Http(HttpTarget::Url(url::Url::parse(text).unwrap()))
    }

    #[test]
    fn targets_come_and_go_and_one_probe_at_a_time() {
        let registry = Registry::default();
        let wanted = BTreeMap::from([(key("a"), Check::Cluster), (key("b"), Check::Cluster)]);
        registry.set_targets(wanted, || Duration::ZERO);
        let due = registry.take_due();
        assert_eq!(due.len(), 2);
        assert!(
            registry.take_due().is_empty(),
            "in flight: not handed out again"
        );
        registry.record(
            &due[0],
            Report::success(Detail::None),
            Duration::from_secs(60),
        );
        registry.record(
            &due[1],
            Report::failure(Reason::Missing, "gone"),
            Duration::ZERO,
        );
        assert_eq!(
            registry.take_due().len(),
            1,
            "b is due again, a in a minute"
        );
        registry.set_targets(BTreeMap::from([(key("a"), Check::Cluster)]), || {
            Duration::ZERO
        });
        registry.record(&due[1], Report::success(Detail::None), Duration::ZERO);
        registry.read(|targets, _| {
            assert_eq!(targets.len(), 1, "b vanished and stays vanished");
            assert!(targets[&key("a")].up());
            assert_eq!(targets[&key("a")].probes[&Outcome::Success], 1);
        });
    }

    #[test]
    fn a_check_changed_while_probed_starts_afresh_and_the_old_result_is_dropped() {
        let registry = Registry::default();
        registry.set_targets(
            BTreeMap::from([(key("web"), url("http://web/slow"))]),
            || Duration::ZERO,
        );
        let old = registry.take_due().remove(0);
        registry.set_targets(
            BTreeMap::from([(key("web"), url("http://web/healthz"))]),
            || Duration::from_secs(60),
        );
        // The new check is due at once, though the old probe has not ended.
        let new = registry.take_due();
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].check, url("http://web/healthz"));
        registry.record(
            &old,
            Report::failure(Reason::Timeout, "slow"),
            Duration::ZERO,
        );
        registry.read(|targets, _| {
            let target = &targets[&key("web")];
            assert!(
                target.last.is_none(),
                "the old check's result is not the new one's"
            );
            assert!(target.in_flight, "the new probe is still running");
        });
        registry.record(
            &new[0],
            Report::success(Detail::None),
            Duration::from_secs(60),
        );
        registry.read(|targets, _| assert!(targets[&key("web")].up()));
    }
}
