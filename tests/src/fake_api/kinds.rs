//! The kinds the fake API server serves, with what sets them apart.

#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Whether `status` is a subresource: the main endpoint then ignores status changes.
    pub status_subresource: bool,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// How the real server names a resource in messages: `leases.coordination.k8s.io`.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn kind(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status_subresource: bool,
) -> Kind {
    Kind {
        group,
        version,
        plural,
        kind,
        namespaced,
        status_subresource,
    }
}

pub static KINDS: [Kind; 10] = [
    kind("", "v1", "namespaces", "Namespace", false, true),
    kind("", "v1", "secrets", "Secret", true, false),
    kind("", "v1", "configmaps", "ConfigMap", true, false),
    kind("", "v1", "services", "Service", true, true),
    kind("", "v1", "events", "Event", true, false),
    kind("events.k8s.io", "v1", "events", "Event", true, false),
    kind("apps", "v1", "deployments", "Deployment", true, true),
    kind(
        "networking.k8s.io",
        "v1",
        "ingresses",
        "Ingress",
        true,
        true,
    ),
    kind("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    kind(
        "external-secrets.io",
        "v1",
        "externalsecrets",
        "ExternalSecret",
        true,
        true,
    ),
];

pub const NAMESPACE: usize = 0;
pub const SECRET: usize = 1;

pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)
}
