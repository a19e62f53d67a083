//! db-provisioner's metrics, registered in the process registry.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::Error;

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub redis_indexes: IntGaugeVec,
    pub redis_index_zero: IntGauge,
    pub reconcile_duration: Histogram,
    pub ddl_statements: IntCounter,
    pub redis_writes: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, Error> {
        let metrics = Self {
            reconciles: IntCounterVec::new(
                Opts::new(
                    "hearth_db_provisioner_reconciles_total",
                    "Reconciles of a namespace, by result.",
                ),
                &["result"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "hearth_db_provisioner_errors_total",
                    "Failed or refused reconciles, by reason.",
                ),
                &["reason"],
            )?,
            redis_indexes: IntGaugeVec::new(
                Opts::new(
                    "hearth_db_provisioner_redis_indexes",
                    "Redis database indexes, used or free.",
                ),
                &["state"],
            )?,
            redis_index_zero: IntGauge::new(
                "hearth_db_provisioner_redis_index_zero_allocated",
                "1 while a namespace still holds Redis index 0, which every other app can reach.",
            )?,
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "hearth_db_provisioner_reconcile_duration_seconds",
                    "How long one reconcile of a namespace took.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            ddl_statements: IntCounter::new(
                "hearth_db_provisioner_ddl_statements_total",
                "DDL statements sent to PostgreSQL.",
            )?,
            redis_writes: IntCounter::new(
                "hearth_db_provisioner_redis_writes_total",
                "Commands sent to Redis that change it (ACL, sentinel, FLUSHDB).",
            )?,
        };
        registry.register(Box::new(metrics.reconciles.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.redis_indexes.clone()))?;
        registry.register(Box::new(metrics.redis_index_zero.clone()))?;
        registry.register(Box::new(metrics.reconcile_duration.clone()))?;
        registry.register(Box::new(metrics.ddl_statements.clone()))?;
        registry.register(Box::new(metrics.redis_writes.clone()))?;
        // Every label value exists from the start, so dashboards see zeros, not gaps.
        for result in ["success", "error"] {
            metrics.reconciles.with_label_values(&[result]);
        }
        for state in ["used", "free"] {
            metrics.redis_indexes.with_label_values(&[state]);
        }
        Ok(metrics)
    }
}
