//! Discovery, pure: what is probed for one namespace, read from its annotations and from what
//! hearth and ESO made in it.

use std::collections::BTreeMap;
use std::fmt;

use hearth_runtime::annotations::{self, ExposedService, ProbeTarget, ServicePort};

/// What a target is, as the `kind` label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Http,
    Tls,
    Secret,
    ExternalSecret,
    Ingress,
    Postgres,
    Redis,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tls => "tls",
            Self::Secret => "secret",
            Self::ExternalSecret => "externalsecret",
            Self::Ingress => "ingress",
            Self::Postgres => "postgres",
            Self::Redis => "redis",
        }
    }

    /// Whether the check is a network probe (run on its own interval), rather than a look at
    /// what the cluster says (updated as the cluster changes).
    pub fn is_probed(self) -> bool {
        matches!(self, Self::Http | Self::Tls | Self::Postgres | Self::Redis)
    }
}

/// One target's identity: its labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetKey {
    pub kind: Kind,
    /// Empty for the cluster-wide PostgreSQL and Redis.
    pub namespace: String,
    pub target: String,
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.target)
        } else {
            write!(
                f,
                "{} {}/{}",
                self.kind.as_str(),
                self.namespace,
                self.target
            )
        }
    }
}

/// Where an HTTP probe goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpTarget {
    /// A Service of the namespace, over plain HTTP, by its cluster DNS name.
    Service {
        service: String,
        port: ServicePort,
        path: String,
    },
    /// Any http(s) URL.
    Url(url::Url),
}

/// What one namespace asks to be watched over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppTargets {
    pub http: Option<HttpTarget>,
    /// The published URL (without user name, password, query or fragment), whose certificate is
    /// checked when published URLs are.
    pub url: Option<url::Url>,
    /// The namespace opted in to db-provisioner: its Secret hearth-db must be there.
    pub database_secret: bool,
    /// The Services it publishes: their Ingresses must have a host name.
    pub exposed: Vec<ExposedService>,
    /// What db-provisioner wrote back, for the status page.
    pub database: Option<String>,
    pub redis_db: Option<u8>,
    /// A problem with the annotations, shown as a failed target.
    pub invalid: Option<String>,
}

impl AppTargets {
    /// Whether the namespace opted in to anything hearth watches.
    pub fn any(&self) -> bool {
        self.http.is_some()
            || self.url.is_some()
            || self.database_secret
            || !self.exposed.is_empty()
            || self.invalid.is_some()
    }
}

/// Reads a namespace's annotations. Pure.
pub fn read(annotations: &BTreeMap<String, String>) -> AppTargets {
    let get = |key: &str| annotations.get(key).map(String::as_str);
    let opted = |key: &str| get(key).is_some_and(|value| value != "false");
    let mut targets = AppTargets {
        database_secret: opted(annotations::POSTGRES) || opted(annotations::REDIS),
        database: get(annotations::POSTGRES_DATABASE).map(str::to_owned),
        redis_db: get(annotations::REDIS_DB).and_then(|v| v.parse().ok()),
        ..AppTargets::default()
    };
    let exposed = get(annotations::EXPOSE).map(annotations::parse_expose);
    if let Some(Ok(services)) = &exposed {
        targets.exposed.clone_from(services);
    }
    targets.http = match (get(annotations::PROBE), &exposed) {
        (Some(value), _) => match annotations::parse_probe(value) {
            Ok(ProbeTarget::Service {
                service,
                port,
                path,
            }) => Some(HttpTarget::Service {
                service,
                port,
                path,
            }),
            Ok(ProbeTarget::Url(url)) => Some(HttpTarget::Url(url)),
            Err(error) => {
                targets.invalid = Some(error.to_string());
                None
            }
        },
        (None, Some(Ok(services))) => services.first().map(|first| HttpTarget::Service {
            service: first.service.clone(),
            port: first.port.clone(),
            path: "/".to_owned(),
        }),
        (None, Some(Err(error))) => {
            targets.invalid = Some(error.to_string());
            None
        }
        (None, None) => None,
    };
    // Shown on the status page, so nothing that may be a credential is kept.
    targets.url = get(annotations::URL)
        .and_then(|value| url::Url::parse(value).ok())
        .filter(|url| {
            url.scheme() == "https"
                && url.host_str().is_some()
                && url.username().is_empty()
                && url.password().is_none()
        })
        .map(|mut url| {
            url.set_query(None);
            url.set_fragment(None);
            url
        });
    targets
}

/// The `target` label of an HTTP probe: the Service's name, or the URL's host and port.
pub fn http_label(target: &HttpTarget) -> String {
    match target {
        HttpTarget::Service { service, .. } => service.clone(),
        HttpTarget::Url(url) => authority(url),
    }
}

/// `host[:port]` of a URL, for labels and connections.
pub fn authority(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use hearth_tests::annotations;

    use super::*;

    #[test]
    fn the_probe_defaults_to_the_first_exposed_service() {
        let targets = read(&annotations(&[
            ("hearth.dev/expose", "web:8000,flower:5555"),
            ("hearth.dev/postgres", "true"),
            ("hearth.dev/url", "https://paperless.tail1234.ts.net"),
            ("hearth.dev/postgres-database", "paperless"),
            ("hearth.dev/redis-db", "3"),
        ]));
        assert_eq!(
            targets.http,
            Some(HttpTarget::Service {
                service: "web".into(),
                port: ServicePort::Number(8000),
                path: "/".into(),
            })
        );
        assert_eq!(
            targets.url.as_ref().map(url::Url::as_str),
            Some("https://paperless.tail1234.ts.net/")
        );
        assert!(targets.database_secret && targets.exposed.len() == 2);
        assert_eq!(targets.database.as_deref(), Some("paperless"));
        assert_eq!(targets.redis_db, Some(3));
    }

    #[test]
    fn an_explicit_probe_wins_and_a_bad_one_is_a_failed_target() {
        let targets = read(&annotations(&[
            ("hearth.dev/expose", "web:8000"),
            ("hearth.dev/probe", "web:8000/healthcheck"),
        ]));
        assert!(
            matches!(targets.http, Some(HttpTarget::Service { ref path, .. }) if path == "/healthcheck")
        );
        let url = read(&annotations(&[(
            "hearth.dev/probe",
            "https://status.example.org:8443/ok",
        )]));
        assert_eq!(
            http_label(url.http.as_ref().unwrap()),
            "status.example.org:8443"
        );
        for bad in ["ftp://x/", "web", "https://user:pw@x/", "web:0/"] {
            let targets = read(&annotations(&[("hearth.dev/probe", bad)]));
            assert!(targets.http.is_none(), "{bad}");
            assert!(targets.invalid.is_some(), "{bad}");
            assert!(targets.any());
        }
    }

    #[test]
    fn a_published_url_keeps_no_credential_or_query() {
        let secret = read(&annotations(&[(
            "hearth.dev/url",
            "https://u:Hunter2@x.ts.net/",
        )]));
        assert!(secret.url.is_none());
        let query = read(&annotations(&[(
            "hearth.dev/url",
            "https://x.ts.net/app?token=Hunter2#f",
        )]));
        assert_eq!(
            query.url.as_ref().map(url::Url::as_str),
            Some("https://x.ts.net/app")
        );
    }

    #[test]
    fn nothing_asked_is_nothing_watched() {
        assert!(!read(&annotations(&[("hearth.dev/postgres", "false")])).any());
        assert!(!read(&BTreeMap::new()).any());
    }
}
