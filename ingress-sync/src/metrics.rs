//! ingress-sync's metrics, registered in the process registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub ingresses: IntGauge,
    pub urls_published: IntGauge,
    pub api_writes: IntCounter,
    pub devices_orphaned: IntGauge,
    pub devices_deleted: IntCounter,
}

/// Every `reason` label value, so dashboards see zeros, not gaps.
pub const REASONS: [&str; 11] = [
    "InvalidAnnotation",
    "DeploymentMissing",
    "HostnameInvalid",
    "ServiceMissing",
    "ServiceNotRoutable",
    "PortMissing",
    "HostnameTaken",
    "Conflict",
    "KubernetesError",
    "TailscaleApiError",
    "Internal",
];

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            reconciles: IntCounterVec::new(
                Opts::new(
                    "hearth_ingress_sync_reconciles_total",
                    "Reconciles of a namespace, by result.",
                ),
                &["result"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "hearth_ingress_sync_errors_total",
                    "Failures and refusals, by reason.",
                ),
                &["reason"],
            )?,
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "hearth_ingress_sync_reconcile_duration_seconds",
                    "How long one reconcile of a namespace took.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )?,
            ingresses: IntGauge::new(
                "hearth_ingress_sync_ingresses",
                "Ingresses ingress-sync keeps.",
            )?,
            urls_published: IntGauge::new(
                "hearth_ingress_sync_urls_published",
                "Namespaces whose URL is published in ConfigMap hearth-url.",
            )?,
            api_writes: IntCounter::new(
                "hearth_ingress_sync_api_writes_total",
                "Writes sent to the Kubernetes API (applies, patches, deletes; not Events).",
            )?,
            devices_orphaned: IntGauge::new(
                "hearth_ingress_sync_devices_orphaned",
                "Tailnet devices found left behind holding an app's host name, at the last check.",
            )?,
            devices_deleted: IntCounter::new(
                "hearth_ingress_sync_devices_deleted_total",
                "Tailnet devices left behind that were deleted (TAILSCALE_DEVICE_CLEANUP=delete).",
            )?,
        };
        registry.register(Box::new(metrics.reconciles.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.reconcile_duration.clone()))?;
        registry.register(Box::new(metrics.ingresses.clone()))?;
        registry.register(Box::new(metrics.urls_published.clone()))?;
        registry.register(Box::new(metrics.api_writes.clone()))?;
        registry.register(Box::new(metrics.devices_orphaned.clone()))?;
        registry.register(Box::new(metrics.devices_deleted.clone()))?;
        for result in ["success", "error"] {
            metrics.reconciles.with_label_values(&[result]);
        }
        for reason in REASONS {
            metrics.errors.with_label_values(&[reason]);
        }
        Ok(metrics)
    }
}
