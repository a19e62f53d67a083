//! secret-bridge's metrics, registered in the process registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub requests: IntCounterVec,
    pub upstream_calls: IntCounterVec,
    pub upstream_latency: HistogramVec,
    pub logins: IntCounter,
    pub rate_limited: IntCounter,
    pub cache: IntCounterVec,
    pub sessions: IntGauge,
    pub cached_secrets: IntGauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "hearth_secret_bridge_requests_total",
                    "Requests served, by route and status.",
                ),
                &["route", "status"],
            )?,
            upstream_calls: IntCounterVec::new(
                Opts::new(
                    "hearth_secret_bridge_upstream_calls_total",
                    "Calls to Bitwarden, by kind and status.",
                ),
                &["kind", "status"],
            )?,
            upstream_latency: HistogramVec::new(
                HistogramOpts::new(
                    "hearth_secret_bridge_upstream_duration_seconds",
                    "How long calls to Bitwarden took, by kind.",
                )
                .buckets(vec![0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                &["kind"],
            )?,
            logins: IntCounter::new(
                "hearth_secret_bridge_logins_total",
                "Logins to Bitwarden (connect/token).",
            )?,
            rate_limited: IntCounter::new(
                "hearth_secret_bridge_rate_limited_total",
                "429 answers from Bitwarden.",
            )?,
            cache: IntCounterVec::new(
                Opts::new(
                    "hearth_secret_bridge_cache_lookups_total",
                    "Data cache lookups, by result.",
                ),
                &["result"],
            )?,
            sessions: IntGauge::new(
                "hearth_secret_bridge_sessions",
                "Access tokens with a session held.",
            )?,
            cached_secrets: IntGauge::new(
                "hearth_secret_bridge_cached_secrets",
                "Secret values held in memory for CACHE_TTL, as of the last sweep.",
            )?,
        };
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.upstream_calls.clone()))?;
        registry.register(Box::new(metrics.upstream_latency.clone()))?;
        registry.register(Box::new(metrics.logins.clone()))?;
        registry.register(Box::new(metrics.rate_limited.clone()))?;
        registry.register(Box::new(metrics.cache.clone()))?;
        registry.register(Box::new(metrics.sessions.clone()))?;
        registry.register(Box::new(metrics.cached_secrets.clone()))?;
        for result in ["hit", "miss"] {
            metrics.cache.with_label_values(&[result]);
        }
        Ok(metrics)
    }
}
