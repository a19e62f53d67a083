//! Validate: what a namespace's annotations ask of ingress-sync, as typed values. Pure.

use std::collections::BTreeMap;

use hearth_runtime::annotations::{
    self, AnnotationError, Profile, ServicePort, is_dns_label, keep_valid,
};

/// One Service to publish on the tailnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    pub service: String,
    pub port: ServicePort,
    /// The tailnet host label asked for (the operator may have to add a suffix).
    pub hostname: String,
}

/// What one namespace wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub namespace: String,
    pub exposures: Vec<Exposure>,
    pub profile: Profile,
    pub tags: Vec<String>,
    pub funnel: bool,
    pub proxy_group: Option<String>,
    /// Deployments to roll when the published URL changes.
    pub restart: Vec<String>,
}

/// The outcome of reading a namespace: what it wants, plus every problem found. A problem with
/// an annotation stops the whole namespace; an exposure whose derived host name cannot be one is
/// only skipped (and said).
#[derive(Debug)]
pub struct Reading {
    pub desired: Desired,
    pub invalid: Vec<AnnotationError>,
    /// Exposures left out because the host name made for them is not a DNS label.
    pub unnamed: Vec<String>,
}

pub fn read(namespace: &str, annotations: &BTreeMap<String, String>) -> Reading {
    let mut invalid = Vec::new();
    let get = |key: &str| annotations.get(key).map(String::as_str);

    let exposed = get(annotations::EXPOSE)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_expose(v)))
        .unwrap_or_default();
    let hostname = get(annotations::HOSTNAME)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_hostname(v)));
    let profile = get(annotations::PROFILE)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_profile(v)))
        .unwrap_or_default();
    let tags = get(annotations::TAILSCALE_TAGS)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_tailscale_tags(v)))
        .unwrap_or_default();
    let funnel = get(annotations::FUNNEL)
        .and_then(|v| {
            keep_valid(
                &mut invalid,
                annotations::parse_flag(annotations::FUNNEL, v),
            )
        })
        .unwrap_or(false);
    let proxy_group = get(annotations::PROXY_GROUP)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_proxy_group(v)));
    let restart = get(annotations::RESTART_ON_URL_CHANGE)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_restart_on_url_change(v)))
        .unwrap_or_default();
    if funnel && proxy_group.is_some() {
        // The operator's ProxyGroup reconciler never reads the funnel annotation: the app would
        // silently stay off the internet.
        invalid.push(AnnotationError::new(
            annotations::FUNNEL,
            "true",
            "expected no funnel with hearth.dev/proxy-group: the Tailscale operator serves Funnel \
             only for an Ingress with a proxy of its own, so remove one of the two",
        ));
    }

    let mut unnamed = Vec::new();
    let mut taken_hosts: Vec<String> = Vec::new();
    let exposures = exposed
        .into_iter()
        .enumerate()
        .filter_map(|(position, exposed)| {
            let hostname = match (position, &hostname) {
                (0, Some(hostname)) => hostname.clone(),
                (0, None) => namespace.to_owned(),
                _ => format!("{namespace}-{}", exposed.service),
            };
            let taken = taken_hosts.contains(&hostname);
            if taken {
                unnamed.push(format!(
                    "{}: its host name {hostname:?} is already that of another exposure of this \
                     namespace; set hearth.dev/hostname to another name",
                    exposed.service
                ));
                None
            } else if is_dns_label(&hostname)
                && hostname.starts_with(|c: char| c.is_ascii_lowercase())
            {
                taken_hosts.push(hostname.clone());
                Some(Exposure {
                    service: exposed.service,
                    port: exposed.port,
                    hostname,
                })
            } else {
                unnamed.push(format!(
                    "{}: its host name {hostname:?} is not a DNS label of at most 63 characters \
                     starting with a letter; list it first with hearth.dev/hostname, or give \
                     the Service a shorter name",
                    exposed.service
                ));
                None
            }
        })
        .collect();
    Reading {
        desired: Desired {
            namespace: namespace.to_owned(),
            exposures,
            profile,
            tags,
            funnel,
            proxy_group,
            restart,
        },
        invalid,
        unnamed,
    }
}

#[cfg(test)]
mod tests {
    use hearth_tests::annotations;

    use super::*;

    #[test]
    fn host_names_follow_the_contract() {
        let reading = read(
            "paperless",
            &annotations(&[
                ("hearth.dev/expose", "web:8000, flower:http"),
                ("hearth.dev/profile", "paperless"),
                ("hearth.dev/tailscale-tags", "tag:apps"),
                ("hearth.dev/restart-on-url-change", "paperless,worker"),
            ]),
        );
        assert!(reading.invalid.is_empty());
        let desired = reading.desired;
        let names: Vec<(&str, &str)> = desired
            .exposures
            .iter()
            .map(|e| (e.service.as_str(), e.hostname.as_str()))
            .collect();
        assert_eq!(
            names,
            [("web", "paperless"), ("flower", "paperless-flower")]
        );
        assert_eq!(desired.exposures[1].port, ServicePort::Name("http".into()));
        assert_eq!(desired.tags, ["tag:apps"]);
        assert_eq!(desired.restart, ["paperless", "worker"]);
        let named = read(
            "paperless",
            &annotations(&[
                ("hearth.dev/expose", "web:8000"),
                ("hearth.dev/hostname", "docs"),
            ]),
        );
        assert_eq!(named.desired.exposures[0].hostname, "docs");
    }

    #[test]
    fn a_derived_name_too_long_skips_only_that_exposure() {
        let long = "s".repeat(60);
        let reading = read(
            "photos",
            &annotations(&[("hearth.dev/expose", &format!("web:80,{long}:80"))]),
        );
        assert_eq!(reading.desired.exposures.len(), 1);
        assert_eq!(reading.unnamed.len(), 1);
        assert!(
            reading.unnamed[0].contains("not a DNS label"),
            "{:?}",
            reading.unnamed
        );
    }

    #[test]
    fn two_exposures_never_share_a_host_name() {
        let reading = read(
            "paperless",
            &annotations(&[
                ("hearth.dev/expose", "web:80,flower:80"),
                ("hearth.dev/hostname", "paperless-flower"),
            ]),
        );
        assert_eq!(reading.desired.exposures.len(), 1);
        assert!(
            reading.unnamed[0].contains("already"),
            "{:?}",
            reading.unnamed
        );
    }

    #[test]
    fn funnel_with_a_proxy_group_is_refused() {
        let reading = read(
            "blog",
            &annotations(&[
                ("hearth.dev/expose", "web:80"),
                ("hearth.dev/funnel", "true"),
                ("hearth.dev/proxy-group", "ingress"),
            ]),
        );
        assert_eq!(reading.invalid.len(), 1);
        assert!(reading.invalid[0].to_string().contains("Funnel"));
    }

    #[test]
    fn hostile_values_are_refused() {
        for (key, value) in [
            ("hearth.dev/expose", "other-ns/web:80"),
            ("hearth.dev/expose", "web"),
            ("hearth.dev/expose", "web:0"),
            ("hearth.dev/hostname", "Paperless"),
            ("hearth.dev/hostname", "a.b"),
            ("hearth.dev/tailscale-tags", "k8s"),
            ("hearth.dev/funnel", "yes"),
            ("hearth.dev/proxy-group", "Bad_Group"),
            ("hearth.dev/restart-on-url-change", "a,,b"),
        ] {
            let reading = read(
                "x",
                &annotations(&[("hearth.dev/expose", "web:80"), (key, value)]),
            );
            assert_eq!(reading.invalid.len(), 1, "{key}={value}");
            assert_eq!(reading.invalid[0].annotation, key);
        }
    }
}
