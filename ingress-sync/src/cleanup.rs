//! The orphaned-device check (opt-in, with Tailscale API credentials): on the leader, every
//! `TAILSCALE_DEVICE_CHECK_INTERVAL`, list the tailnet's devices, find operator proxies left
//! behind holding one of hearth's host names, and report them, or delete them with
//! `TAILSCALE_DEVICE_CLEANUP=delete`. A 429 or 5xx from the API holds the next check back for as
//! long as it asks (a minute otherwise), doubling while it keeps failing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hearth_runtime::events::EventType;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;

use crate::build::{self, MANAGED_BY, MANAGED_BY_LABEL};
use crate::controller::{Context, Step};
use crate::devices::{self, Published};
use crate::tailscale::{Credentials, TailscaleApi};
use crate::{DeviceCleanup, Error, Options};

/// The longest pause after repeated failures.
const LONGEST_PAUSE: Duration = Duration::from_secs(3600);

pub struct DeviceCheck {
    api: TailscaleApi,
    cleanup: DeviceCleanup,
    offline_after: Duration,
    interval: Duration,
    context: Arc<Context>,
}

impl DeviceCheck {
    /// The check, when credentials for the Tailscale API were given.
    pub fn from_options(options: &Options, context: Arc<Context>) -> Result<Option<Self>, Error> {
        let credentials = match (
            &options.tailscale_api_key,
            &options.tailscale_oauth_client_id,
            &options.tailscale_oauth_client_secret,
        ) {
            (Some(key), _, _) => Credentials::ApiKey(key.clone()),
            (None, Some(id), Some(secret)) => Credentials::OAuth {
                id: id.clone(),
                secret: secret.clone(),
            },
            _ => return Ok(None),
        };
        let api = TailscaleApi::new(
            &options.tailscale_api_url,
            &options.tailscale_tailnet,
            credentials,
        )?;
        Ok(Some(Self {
            api,
            cleanup: options.tailscale_device_cleanup,
            offline_after: options.tailscale_device_offline_after,
            interval: options.tailscale_device_check_interval,
            context,
        }))
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), hearth_runtime::Error> {
        let mut pause = self.interval;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
            if !self.context.leadership.is_leader() {
                pause = self.interval;
                continue;
            }
            pause = match self.check().await {
                Ok(()) => self.interval,
                Err(Some(asked)) => asked.max(pause.saturating_mul(2)).min(LONGEST_PAUSE),
                Err(None) => self.interval,
            };
        }
    }

    /// One check. `Err(Some(pause))` when the API asked to be left alone for a while.
    async fn check(&self) -> Result<(), Option<Duration>> {
        let context = &self.context;
        let devices = self.api.devices().await.map_err(|failure| {
            context
                .metrics
                .errors
                .with_label_values(&["TailscaleApiError"])
                .inc();
            tracing::warn!(error = %failure, "listing the tailnet's devices failed");
            failure.back_off
        })?;
        let all = context.ingresses.state();
        let claimed: HashSet<String> = all
            .iter()
            .filter_map(|ingress| build::published_host(ingress))
            .map(|host| build::first_label(host).to_owned())
            .collect();
        let ours: Vec<Published> = all
            .iter()
            .filter(|ingress| {
                ingress.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
            })
            .filter_map(|ingress| {
                Some(Published {
                    namespace: ingress.namespace()?,
                    ingress: ingress.name_any(),
                    requested: build::requested_host(ingress)?.to_owned(),
                    published: build::published_host(ingress)
                        .map(|host| build::first_label(host).to_owned()),
                })
            })
            .collect();
        let found = devices::orphans(
            &devices,
            &ours,
            &claimed,
            jiff::Timestamp::now(),
            self.offline_after,
        );
        context
            .metrics
            .devices_orphaned
            .set(i64::try_from(found.len()).unwrap_or(i64::MAX));
        for (device, published) in found {
            let regarding = ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Namespace".to_owned()),
                name: Some(published.namespace.clone()),
                ..ObjectReference::default()
            };
            let since = device.last_seen.as_deref().unwrap_or("unknown");
            let holds = format!(
                "tailnet device {} (node {}, tags {}, offline since {since}) is an operator proxy \
                 left behind that holds host name {}, so Ingress {} is published under another name",
                device.name,
                device.node_id,
                device.tags.join(","),
                published.requested,
                published.ingress
            );
            match self.cleanup {
                DeviceCleanup::Report => {
                    let note = format!(
                        "{holds}; delete it in the Tailscale admin console, or set \
                         TAILSCALE_DEVICE_CLEANUP=delete to let hearth"
                    );
                    context
                        .events
                        .publish(
                            &regarding,
                            EventType::Warning,
                            "DeviceOrphaned",
                            Step::CheckDevices.action(),
                            &note,
                        )
                        .await;
                }
                DeviceCleanup::Delete => match self.api.delete(&device.node_id).await {
                    Ok(()) => {
                        context.metrics.devices_deleted.inc();
                        let note = format!(
                            "{holds}; deleted it. Restart the Ingress's proxy to get the host name back"
                        );
                        context
                            .events
                            .publish(
                                &regarding,
                                EventType::Normal,
                                "DeviceDeleted",
                                Step::CheckDevices.action(),
                                &note,
                            )
                            .await;
                    }
                    Err(failure) => {
                        context
                            .metrics
                            .errors
                            .with_label_values(&["TailscaleApiError"])
                            .inc();
                        tracing::warn!(error = %failure, device = %device.node_id, "deleting a device failed");
                        if failure.back_off.is_some() {
                            return Err(failure.back_off);
                        }
                    }
                },
            }
        }
        Ok(())
    }
}
