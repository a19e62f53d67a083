//! What is known of every target: its last result, counts and timestamps. Probes write it in
//! the background; `/metrics` and the status page read it, so a scrape never waits on a target.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::probe::{Outcome, Reason, Report};
use crate::targets::{AppTargets, TargetKey};

/// How a target is checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// An HTTP GET: the URL, and the Host header when the URL names a cluster IP.
    Http {
        service: Option<(String, hearth_runtime::annotations::ServicePort, String)>,
        url: Option<url::Url>,
    },
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

/// Everything held for one target.
#[derive(Debug)]
pub struct Target {
    pub check: Check,
    pub last: Option<(SystemTime, Report)>,
    pub last_success: Option<SystemTime>,
    pub last_failure: Option<(SystemTime, Reason, String)>,
    pub probes: BTreeMap<Outcome, u64>,
    pub errors: BTreeMap<Reason, u64>,
    pub due: Instant,
    pub in_flight: bool,
}

impl Target {
    fn new(check: Check, due: Instant) -> Self {
        Self {
            check,
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

#[derive(Default)]
pub struct Registry {
    targets: Mutex<BTreeMap<TargetKey, Target>>,
    apps: Mutex<BTreeMap<String, App>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// Makes the set of targets exactly `wanted`: new ones are due after `first_in`, changed
    /// checks start afresh, and targets no longer wanted vanish (and vanish from `/metrics`).
    pub fn set_targets(&self, wanted: BTreeMap<TargetKey, Check>, first_in: impl Fn() -> Duration) {
        let now = Instant::now();
        let mut targets = lock(&self.targets);
        targets.retain(|key, _| wanted.contains_key(key));
        for (key, check) in wanted {
            match targets.get_mut(&key) {
                Some(target) if target.check == check => {}
                Some(target) => {
                    target.check = check;
                    target.due = now;
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
    pub fn take_due(&self) -> Vec<(TargetKey, Check)> {
        let now = Instant::now();
        let mut targets = lock(&self.targets);
        targets
            .iter_mut()
            .filter(|(_, target)| !target.in_flight && target.due <= now)
            .map(|(key, target)| {
                target.in_flight = true;
                (key.clone(), target.check.clone())
            })
            .collect()
    }

    /// Records a probe's result; the next one is due after `next_in`.
    pub fn record(&self, key: &TargetKey, report: Report, next_in: Duration) {
        let now = SystemTime::now();
        let mut targets = lock(&self.targets);
        // A target removed while it was probed stays removed.
        let Some(target) = targets.get_mut(key) else {
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

    /// Asks for every target of these kinds to be checked now (the cluster changed).
    pub fn due_now(&self, cluster_only: bool) {
        let now = Instant::now();
        for target in lock(&self.targets).values_mut() {
            if !cluster_only || target.check == Check::Cluster {
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
            &key("a"),
            Report::success(Detail::None),
            Duration::from_secs(60),
        );
        registry.record(
            &key("b"),
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
        registry.record(&key("b"), Report::success(Detail::None), Duration::ZERO);
        registry.read(|targets, _| {
            assert_eq!(targets.len(), 1, "b vanished and stays vanished");
            assert!(targets[&key("a")].up());
            assert_eq!(targets[&key("a")].probes[&Outcome::Success], 1);
        });
    }
}
