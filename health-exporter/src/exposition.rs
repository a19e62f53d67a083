//! `/metrics` from the last results: a custom collector that builds every family afresh from the
//! registry at each scrape, so a scrape never waits on a target and a target that vanished
//! vanishes from the output. Labels come only from the cluster's own objects (namespace,
//! Service, ExternalSecret and database names), never from a request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use crate::probe::{Detail, Outcome, Reason};
use crate::registry::{Registry, Target};
use crate::targets::{Kind, TargetKey};

/// (name, help, type, label names): every family this collector may produce.
const FAMILIES: &[(&str, &str, MetricType, &[&str])] = &[
    (
        "hearth_target_up",
        "Whether the target's last check succeeded (1) or not (0).",
        MetricType::GAUGE,
        &["kind", "namespace", "target"],
    ),
    (
        "hearth_probe_duration_seconds",
        "How long the target's last check took.",
        MetricType::GAUGE,
        &["kind", "namespace", "target"],
    ),
    (
        "hearth_probe_last_success_timestamp_seconds",
        "When the target's last successful check ended (checks run in the background; this shows how fresh the data is).",
        MetricType::GAUGE,
        &["kind", "namespace", "target"],
    ),
    (
        "hearth_probe_last_run_timestamp_seconds",
        "When the target's last check ended, whatever its result; older than a few intervals means checks have stalled.",
        MetricType::GAUGE,
        &["kind", "namespace", "target"],
    ),
    (
        "hearth_probe_age_seconds",
        "Seconds since the target's last check ended, as the exporter's clock says at the scrape (so a clock that differs from Prometheus' does not matter).",
        MetricType::GAUGE,
        &["kind", "namespace", "target"],
    ),
    (
        "hearth_probe_interval_seconds",
        "How often each target is checked (PROBE_INTERVAL); results are served from the last check, never fetched during a scrape.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "hearth_probes_total",
        "Checks of the target, by result.",
        MetricType::COUNTER,
        &["kind", "namespace", "target", "result"],
    ),
    (
        "hearth_probe_errors_total",
        "Failed checks of the target, by reason.",
        MetricType::COUNTER,
        &["kind", "namespace", "target", "reason"],
    ),
    (
        "hearth_externalsecret_ready",
        "Whether the ExternalSecret's Ready condition is True.",
        MetricType::GAUGE,
        &["namespace", "name"],
    ),
    (
        "pg_up",
        "Whether the last connection to PostgreSQL succeeded (postgres_exporter's name).",
        MetricType::GAUGE,
        &[],
    ),
    (
        "pg_database_size_bytes",
        "Disk space used by the database (postgres_exporter's name).",
        MetricType::GAUGE,
        &["datname"],
    ),
    (
        "pg_stat_database_numbackends",
        "Backends connected to the database (postgres_exporter's name).",
        MetricType::GAUGE,
        &["datid", "datname"],
    ),
    (
        "redis_up",
        "Whether the last connection to Redis succeeded (redis_exporter's name).",
        MetricType::GAUGE,
        &[],
    ),
    (
        "redis_connected_clients",
        "Clients connected to Redis (redis_exporter's name).",
        MetricType::GAUGE,
        &[],
    ),
    (
        "redis_memory_used_bytes",
        "Memory Redis uses (redis_exporter's name).",
        MetricType::GAUGE,
        &[],
    ),
    (
        "redis_db_keys",
        "Keys in each Redis database (redis_exporter's name).",
        MetricType::GAUGE,
        &["db"],
    ),
    (
        "probe_success",
        "Whether the app's HTTP probe succeeded (blackbox_exporter's name).",
        MetricType::GAUGE,
        &["namespace", "target"],
    ),
    (
        "probe_duration_seconds",
        "How long the app's HTTP probe took (blackbox_exporter's name).",
        MetricType::GAUGE,
        &["namespace", "target"],
    ),
    (
        "probe_http_status_code",
        "The HTTP status the app's probe got, 0 when none came (blackbox_exporter's name).",
        MetricType::GAUGE,
        &["namespace", "target"],
    ),
    (
        "probe_ssl_earliest_cert_expiry",
        "When the certificate of the published URL's chain that expires first expires, in Unix seconds (blackbox_exporter's name).",
        MetricType::GAUGE,
        &["namespace", "target"],
    ),
];

pub struct Exporter {
    registry: Arc<Registry>,
    interval: Duration,
    descs: Vec<Desc>,
}

impl Exporter {
    pub fn new(registry: Arc<Registry>, interval: Duration) -> Result<Self, prometheus::Error> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    labels.iter().map(|l| (*l).to_owned()).collect(),
                    std::collections::HashMap::new(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            registry,
            interval,
            descs,
        })
    }
}

/// Samples of one scrape, grouped by family: (labels, value).
#[derive(Default)]
struct Samples(BTreeMap<&'static str, Vec<(Vec<LabelPair>, f64)>>);

impl Samples {
    fn add(&mut self, family: &'static str, labels: &[(&str, &str)], value: f64) {
        let pairs = labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_owned());
                pair.set_value((*value).to_owned());
                pair
            })
            .collect();
        self.0.entry(family).or_default().push((pairs, value));
    }

    /// The family's metrics, each a counter or a gauge as the family is.
    fn take(&mut self, family: &str, kind: MetricType) -> Option<Vec<Metric>> {
        let samples = self.0.remove(family)?;
        Some(
            samples
                .into_iter()
                .map(|(labels, value)| {
                    let mut metric = Metric::from_label(labels);
                    if kind == MetricType::COUNTER {
                        let mut counter = Counter::default();
                        counter.set_value(value);
                        metric.set_counter(counter);
                    } else {
                        let mut gauge = Gauge::default();
                        gauge.set_value(value);
                        metric.set_gauge(gauge);
                    }
                    metric
                })
                .collect(),
        )
    }
}

fn seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn flag(up: bool) -> f64 {
    if up { 1.0 } else { 0.0 }
}

/// Adds one target's samples. `redis_dbs` are the Redis databases apps use: each is shown, with
/// 0 keys when empty (INFO leaves empty databases out), as redis_exporter shows them.
fn add_target(samples: &mut Samples, key: &TargetKey, target: &Target, redis_dbs: &BTreeSet<u8>) {
    let kind = key.kind.as_str();
    let labels = [
        ("kind", kind),
        ("namespace", key.namespace.as_str()),
        ("target", key.target.as_str()),
    ];
    let Some((ran, report)) = &target.last else {
        // Not checked yet: no value is better than a made-up one.
        return;
    };
    let up = target.up();
    samples.add("hearth_target_up", &labels, flag(up));
    samples.add(
        "hearth_probe_duration_seconds",
        &labels,
        report.duration.as_secs_f64(),
    );
    if let Some(at) = target.last_success {
        samples.add(
            "hearth_probe_last_success_timestamp_seconds",
            &labels,
            seconds(at),
        );
    }
    samples.add(
        "hearth_probe_last_run_timestamp_seconds",
        &labels,
        seconds(*ran),
    );
    let age = SystemTime::now()
        .duration_since(*ran)
        .unwrap_or(Duration::ZERO);
    samples.add("hearth_probe_age_seconds", &labels, age.as_secs_f64());
    for outcome in Outcome::ALL {
        let count = target.probes.get(&outcome).copied().unwrap_or(0);
        let mut with = labels.to_vec();
        with.push(("result", outcome.as_str()));
        samples.add("hearth_probes_total", &with, count as f64);
    }
    for (reason, count) in &target.errors {
        let mut with = labels.to_vec();
        with.push(("reason", Reason::as_str(*reason)));
        samples.add("hearth_probe_errors_total", &with, *count as f64);
    }
    let app = [
        ("namespace", key.namespace.as_str()),
        ("target", key.target.as_str()),
    ];
    match (key.kind, &report.detail) {
        (Kind::Http, detail) => {
            samples.add("probe_success", &app, flag(up));
            samples.add(
                "probe_duration_seconds",
                &app,
                report.duration.as_secs_f64(),
            );
            let status = match detail {
                Detail::Http { status } => f64::from(*status),
                _ => 0.0,
            };
            samples.add("probe_http_status_code", &app, status);
        }
        (Kind::Tls, Detail::Tls { earliest_expiry }) => {
            samples.add(
                "probe_ssl_earliest_cert_expiry",
                &app,
                *earliest_expiry as f64,
            );
        }
        (Kind::ExternalSecret, _) => {
            let labels = [
                ("namespace", key.namespace.as_str()),
                ("name", key.target.as_str()),
            ];
            samples.add("hearth_externalsecret_ready", &labels, flag(up));
        }
        (Kind::Postgres, detail) => {
            samples.add("pg_up", &[], flag(up));
            if let Detail::Postgres { databases } = detail {
                for database in databases {
                    let name = [("datname", database.name.as_str())];
                    if let Some(size) = database.size_bytes {
                        samples.add("pg_database_size_bytes", &name, size as f64);
                    }
                    let oid = database.oid.to_string();
                    samples.add(
                        "pg_stat_database_numbackends",
                        &[("datid", &oid), ("datname", &database.name)],
                        database.backends as f64,
                    );
                }
            }
        }
        (Kind::Redis, detail) => {
            samples.add("redis_up", &[], flag(up));
            if let Detail::Redis {
                connected_clients,
                memory_used_bytes,
                keys,
            } = detail
            {
                samples.add("redis_connected_clients", &[], *connected_clients as f64);
                samples.add("redis_memory_used_bytes", &[], *memory_used_bytes as f64);
                let mut counts: BTreeMap<u8, i64> =
                    redis_dbs.iter().map(|index| (*index, 0)).collect();
                counts.extend(keys.iter().copied());
                for (index, count) in counts {
                    samples.add(
                        "redis_db_keys",
                        &[("db", &format!("db{index}"))],
                        count as f64,
                    );
                }
            }
        }
        _ => {}
    }
}

impl Collector for Exporter {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut samples = Samples::default();
        samples.add(
            "hearth_probe_interval_seconds",
            &[],
            self.interval.as_secs_f64(),
        );
        self.registry.read(|targets, apps| {
            let redis_dbs: BTreeSet<u8> = apps
                .values()
                .filter_map(|app| app.targets.redis_db)
                .collect();
            for (key, target) in targets {
                add_target(&mut samples, key, target, &redis_dbs);
            }
        });
        FAMILIES
            .iter()
            .filter_map(|(name, help, kind, _)| {
                let metrics = samples.take(name, *kind)?;
                let mut family = MetricFamily::default();
                family.set_name((*name).to_owned());
                family.set_help((*help).to_owned());
                family.set_field_type(*kind);
                family.set_metric(metrics);
                Some(family)
            })
            .collect()
    }
}
