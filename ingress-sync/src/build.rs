//! Build: the Ingress for an exposure, the URL ConfigMap for a published host, and the checks of
//! what is already there (ours or not, up to date or not, host names claimed). Pure.

use std::collections::BTreeMap;

use hearth_runtime::annotations::{Profile, ServicePort};
use k8s_openapi::api::networking::v1::Ingress;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::desired::{Desired, Exposure};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "hearth-ingress-sync";
/// Names the exposure an Ingress serves: `<namespace>/<service>`.
pub const SOURCE: &str = "hearth.dev/source";
pub const FIELD_MANAGER: &str = "hearth-ingress-sync";
pub const URL_CONFIG_MAP: &str = "hearth-url";
/// The pod-template annotation whose change rolls a Deployment when the URL changes.
pub const URL_HASH: &str = "hearth.dev/url-hash";
/// The Tailscale operator's annotations hearth passes through.
const TAGS: &str = "tailscale.com/tags";
const FUNNEL: &str = "tailscale.com/funnel";
const PROXY_GROUP: &str = "tailscale.com/proxy-group";

pub fn ingress_name(service: &str) -> String {
    format!("hearth-{service}")
}

pub fn source(namespace: &str, service: &str) -> String {
    format!("{namespace}/{service}")
}

/// Whether `ingress` was made by ingress-sync for `service` of `namespace`: both its label and
/// its source annotation must say so. Nothing else is ever changed or deleted.
pub fn is_ours(ingress: &Ingress, namespace: &str, service: &str) -> bool {
    let label = ingress
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL));
    let annotation = ingress
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE));
    label.map(String::as_str) == Some(MANAGED_BY)
        && annotation.is_some_and(|a| *a == source(namespace, service))
}

/// The service an Ingress of ours serves, from its source annotation.
pub fn served_service(ingress: &Ingress) -> Option<&str> {
    let source = ingress.metadata.annotations.as_ref()?.get(SOURCE)?;
    source.split_once('/').map(|(_, service)| service)
}

/// The annotations hearth sets on an Ingress: its source and the operator's pass-through ones.
fn annotations(desired: &Desired, exposure: &Exposure) -> BTreeMap<&'static str, String> {
    let mut annotations = BTreeMap::new();
    annotations.insert(SOURCE, source(&desired.namespace, &exposure.service));
    if !desired.tags.is_empty() {
        annotations.insert(TAGS, desired.tags.join(","));
    }
    if desired.funnel {
        annotations.insert(FUNNEL, "true".to_owned());
    }
    if let Some(group) = &desired.proxy_group {
        annotations.insert(PROXY_GROUP, group.clone());
    }
    annotations
}

fn backend_port(port: &ServicePort) -> Value {
    match port {
        ServicePort::Number(number) => json!({"number": number}),
        ServicePort::Name(name) => json!({"name": name}),
    }
}

/// The Service the Ingress sends to, as the owner of the Ingress.
pub struct Owner<'a> {
    pub name: &'a str,
    pub uid: &'a str,
}

/// The server-side apply body of the Ingress for `exposure`: class, one TLS host (the tailnet
/// name), the Service as default backend, hearth's label and annotations, and the Service as
/// owner, so Kubernetes removes the Ingress with the Service.
pub fn ingress(desired: &Desired, exposure: &Exposure, class: &str, owner: &Owner<'_>) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": ingress_name(&exposure.service),
            "namespace": desired.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": annotations(desired, exposure),
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Service",
                "name": owner.name,
                "uid": owner.uid,
            }],
        },
        "spec": {
            "ingressClassName": class,
            "defaultBackend": {
                "service": {"name": exposure.service, "port": backend_port(&exposure.port)},
            },
            "tls": [{"hosts": [exposure.hostname]}],
        },
    })
}

/// Whether `existing` already has every field of `wanted` hearth sets, and none of the
/// pass-through annotations hearth no longer wants (`owned` says which of those hearth set).
pub fn up_to_date(existing: &Ingress, wanted: &Value, owned: &dyn Fn(&str) -> bool) -> bool {
    let Ok(current) = serde_json::to_value(existing) else {
        return false;
    };
    let labels_match = wanted["metadata"]["labels"]
        .as_object()
        .is_some_and(|labels| {
            labels
                .iter()
                .all(|(k, v)| current["metadata"]["labels"][k] == *v)
        });
    let wanted_annotations = &wanted["metadata"]["annotations"];
    let annotations_match = [SOURCE, TAGS, FUNNEL, PROXY_GROUP].iter().all(|key| {
        let have = &current["metadata"]["annotations"][key];
        match &wanted_annotations[key] {
            Value::Null => have.is_null() || !owned(key),
            want => have == want,
        }
    });
    let owner = &wanted["metadata"]["ownerReferences"][0];
    let owner_match = current["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|owners| owners.iter().any(|o| o["uid"] == owner["uid"]));
    let spec = &current["spec"];
    let spec_match = ["ingressClassName", "defaultBackend", "tls"]
        .iter()
        .all(|field| spec[field] == wanted["spec"][field])
        && spec["rules"].is_null();
    labels_match && annotations_match && owner_match && spec_match
}

/// The host name the Tailscale operator published for an Ingress (never computed by hearth:
/// the operator may have had to add a suffix).
pub fn published_host(ingress: &Ingress) -> Option<&str> {
    ingress
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|entry| entry.hostname.as_deref())
        .filter(|host| !host.is_empty())
}

/// The first label of a host name: what the operator made of the TLS host.
pub fn first_label(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

/// The TLS host an Ingress asks for (the tailnet host label), as the operator reads it.
pub fn requested_host(ingress: &Ingress) -> Option<&str> {
    let tls = ingress.spec.as_ref()?.tls.as_ref()?.first()?;
    tls.hosts.as_ref()?.first().map(|host| first_label(host))
}

/// An Ingress of class `class` elsewhere in the cluster (not the one hearth would write) that
/// already asks for `hostname`: `<namespace>/<name>`.
pub fn claimed_by<'a>(
    all: impl IntoIterator<Item = &'a Ingress>,
    class: &str,
    hostname: &str,
    namespace: &str,
    name: &str,
) -> Option<String> {
    all.into_iter().find_map(|other| {
        let other_namespace = other.metadata.namespace.as_deref().unwrap_or_default();
        let other_name = other.metadata.name.as_deref().unwrap_or_default();
        let same = other_namespace == namespace && other_name == name;
        let of_class = other
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_deref())
            == Some(class);
        (!same && of_class && requested_host(other) == Some(hostname))
            .then(|| format!("{other_namespace}/{other_name}"))
    })
}

/// ConfigMap `hearth-url`'s data for a published host, with the keys the app's profile reads.
pub fn url_data(profile: Profile, host: &str) -> BTreeMap<String, String> {
    let url = format!("https://{host}");
    let mut data = BTreeMap::from([
        ("URL".to_owned(), url.clone()),
        ("HOST".to_owned(), host.to_owned()),
        ("ORIGIN".to_owned(), url.clone()),
    ]);
    let key = match profile {
        Profile::Paperless => Some("PAPERLESS_URL"),
        Profile::Miniflux => Some("BASE_URL"),
        Profile::Wallabag => Some("SYMFONY__ENV__DOMAIN_NAME"),
        Profile::Immich | Profile::Generic => None,
    };
    if let Some(key) = key {
        data.insert(key.to_owned(), url);
    }
    data
}

/// A short hash of the URL, for the pod-template annotation that rolls a Deployment.
pub fn url_hash(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired {
        Desired {
            namespace: "paperless".into(),
            exposures: vec![Exposure {
                service: "web".into(),
                port: ServicePort::Number(8000),
                hostname: "paperless".into(),
            }],
            profile: Profile::Paperless,
            tags: vec!["tag:apps".into()],
            ..Desired::default()
        }
    }

    fn applied(body: &Value) -> Ingress {
        serde_json::from_value(body.clone()).unwrap()
    }

    const OWNER: Owner<'static> = Owner {
        name: "web",
        uid: "uid-1",
    };

    #[test]
    fn the_ingress_is_what_the_operator_serves() {
        let desired = desired();
        let body = ingress(&desired, &desired.exposures[0], "tailscale", &OWNER);
        let ingress = applied(&body);
        assert_eq!(ingress.metadata.name.as_deref(), Some("hearth-web"));
        let spec = ingress.spec.as_ref().unwrap();
        assert_eq!(spec.ingress_class_name.as_deref(), Some("tailscale"));
        assert_eq!(requested_host(&ingress), Some("paperless"));
        let backend = spec
            .default_backend
            .as_ref()
            .unwrap()
            .service
            .as_ref()
            .unwrap();
        assert_eq!(backend.name, "web");
        assert_eq!(backend.port.as_ref().unwrap().number, Some(8000));
        assert!(
            spec.rules.is_none(),
            "no rule.host for the operator to ignore"
        );
        assert!(is_ours(&ingress, "paperless", "web"));
        assert!(!is_ours(&ingress, "paperless", "other"));
        assert!(!is_ours(&ingress, "elsewhere", "web"));
        assert_eq!(served_service(&ingress), Some("web"));
        let annotations = ingress.metadata.annotations.unwrap();
        assert_eq!(annotations["tailscale.com/tags"], "tag:apps");
        assert!(!annotations.contains_key("tailscale.com/funnel"));
    }

    #[test]
    fn drift_in_any_field_hearth_sets_is_seen() {
        let desired = desired();
        let body = ingress(&desired, &desired.exposures[0], "tailscale", &OWNER);
        let owns_everything = |_: &str| true;
        let mut ingress = applied(&body);
        assert!(up_to_date(&ingress, &body, &owns_everything));
        ingress.spec.as_mut().unwrap().ingress_class_name = Some("nginx".into());
        assert!(!up_to_date(&ingress, &body, &owns_everything));
        let mut ingress = applied(&body);
        ingress
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("tailscale.com/funnel".into(), "true".into());
        assert!(!up_to_date(&ingress, &body, &owns_everything));
        assert!(
            up_to_date(&ingress, &body, &|key| key != "tailscale.com/funnel"),
            "someone else's funnel annotation is theirs"
        );
        // What the operator adds (finalizers, status) is no drift.
        let mut ingress = applied(&body);
        ingress.metadata.finalizers = Some(vec!["tailscale.com/finalizer".into()]);
        assert!(up_to_date(&ingress, &body, &owns_everything));
    }

    #[test]
    fn only_other_ingresses_of_the_class_claim_a_host() {
        let desired = desired();
        let body = ingress(&desired, &desired.exposures[0], "tailscale", &OWNER);
        let mine = applied(&body);
        let mut theirs = applied(&body);
        theirs.metadata.namespace = Some("other".into());
        theirs.metadata.name = Some("docs".into());
        assert_eq!(
            claimed_by([&mine], "tailscale", "paperless", "paperless", "hearth-web"),
            None
        );
        assert_eq!(
            claimed_by(
                [&mine, &theirs],
                "tailscale",
                "paperless",
                "paperless",
                "hearth-web"
            ),
            Some("other/docs".to_owned())
        );
        theirs.spec.as_mut().unwrap().ingress_class_name = Some("nginx".into());
        assert_eq!(
            claimed_by(
                [&theirs],
                "tailscale",
                "paperless",
                "paperless",
                "hearth-web"
            ),
            None
        );
    }

    #[test]
    fn url_keys_per_profile() {
        let data = url_data(Profile::Paperless, "paperless-1.tail1234.ts.net");
        assert_eq!(data["URL"], "https://paperless-1.tail1234.ts.net");
        assert_eq!(data["HOST"], "paperless-1.tail1234.ts.net");
        assert_eq!(data["ORIGIN"], data["URL"]);
        assert_eq!(data["PAPERLESS_URL"], data["URL"]);
        assert_eq!(
            url_data(Profile::Miniflux, "m.ts.net")["BASE_URL"],
            "https://m.ts.net"
        );
        assert_eq!(
            url_data(Profile::Wallabag, "w.ts.net")["SYMFONY__ENV__DOMAIN_NAME"],
            "https://w.ts.net"
        );
        assert_eq!(url_data(Profile::Immich, "i.ts.net").len(), 3);
        assert_eq!(url_hash("https://a").len(), 16);
        assert_ne!(url_hash("https://a"), url_hash("https://b"));
    }
}
