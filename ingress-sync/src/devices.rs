//! Which tailnet devices are left-behind operator proxies holding an app's host name. Pure.
//!
//! A device is such an orphan only when every one of these holds: it is tagged (the operator
//! tags its proxies) and is not the operator itself, it is neither connected nor external, it
//! has been offline longer than the threshold, its name is the host name one of hearth's
//! Ingresses asked for while that Ingress was published under a suffixed name instead, and no
//! Ingress in the cluster publishes that name any more.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use crate::build::first_label;
use crate::tailscale::Device;

/// The operator's own device carries this tag; it is never touched.
const OPERATOR_TAG: &str = "tag:k8s-operator";

/// One of hearth's Ingresses and the names involved.
#[derive(Clone, Debug)]
pub struct Published {
    pub namespace: String,
    pub ingress: String,
    /// The host label it asked for.
    pub requested: String,
    /// The first label of the host the operator published, if any.
    pub published: Option<String>,
}

impl Published {
    /// The operator had to publish it under another name: something holds the one it asked for.
    fn blocked(&self) -> bool {
        self.published
            .as_deref()
            .is_some_and(|published| published != self.requested)
    }
}

/// The orphans among `devices`, each with the Ingress whose name it holds.
pub fn orphans<'a>(
    devices: &'a [Device],
    ours: &'a [Published],
    claimed: &HashSet<String>,
    now: jiff::Timestamp,
    offline_after: Duration,
) -> Vec<(&'a Device, &'a Published)> {
    devices
        .iter()
        .filter(|device| {
            !device.tags.is_empty()
                && !device.tags.iter().any(|tag| tag == OPERATOR_TAG)
                && !device.connected_to_control
                && !device.is_external
                && offline_for(device, now).is_some_and(|offline| offline >= offline_after)
                && !claimed.contains(first_label(&device.name))
        })
        .filter_map(|device| {
            let label = first_label(&device.name);
            ours.iter()
                .find(|published| published.blocked() && published.requested == label)
                .map(|published| (device, published))
        })
        .collect()
}

/// How long a device has been offline, from its `lastSeen`.
fn offline_for(device: &Device, now: jiff::Timestamp) -> Option<Duration> {
    let seen = jiff::Timestamp::from_str(device.last_seen.as_deref()?).ok()?;
    let span = now.duration_since(seen);
    Duration::try_from(span).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, tags: &[&str], connected: bool, last_seen: Option<&str>) -> Device {
        Device {
            node_id: format!("n-{name}"),
            name: format!("{name}.tail1234.ts.net"),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            connected_to_control: connected,
            last_seen: last_seen.map(str::to_owned),
            is_external: false,
        }
    }

    #[test]
    fn only_an_offline_tagged_holder_of_a_blocked_name_is_an_orphan() {
        let now: jiff::Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let old = Some("2026-11-28T12:00:00Z");
        let recent = Some("2026-12-01T11:00:00Z");
        let ours = vec![
            Published {
                namespace: "paperless".into(),
                ingress: "hearth-web".into(),
                requested: "paperless".into(),
                published: Some("paperless-1".into()),
            },
            Published {
                namespace: "miniflux".into(),
                ingress: "hearth-web".into(),
                requested: "miniflux".into(),
                published: Some("miniflux".into()),
            },
        ];
        let claimed: HashSet<String> = ["paperless-1".to_owned(), "miniflux".to_owned()].into();
        let devices = vec![
            device("paperless", &["tag:k8s"], false, old),
            device("paperless", &["tag:k8s"], true, None),
            device("paperless", &[], false, old),
            device("paperless", &["tag:k8s"], false, recent),
            device("paperless", &["tag:k8s-operator"], false, old),
            device("miniflux", &["tag:k8s"], false, old),
            device("grafana", &["tag:k8s"], false, old),
            device("paperless-1", &["tag:k8s"], false, old),
        ];
        let found = orphans(
            &devices,
            &ours,
            &claimed,
            now,
            Duration::from_secs(24 * 3600),
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, &devices[0]);
        assert_eq!(found[0].1.namespace, "paperless");
        let mut external = devices[0].clone();
        external.is_external = true;
        assert!(orphans(&[external], &ours, &claimed, now, Duration::from_secs(3600)).is_empty());
        // A name some Ingress still publishes is never an orphan's.
        let claimed_too: HashSet<String> = ["paperless".to_owned()].into();
        assert!(
            orphans(
                &devices,
                &ours,
                &claimed_too,
                now,
                Duration::from_secs(3600)
            )
            .is_empty()
        );
    }
}
