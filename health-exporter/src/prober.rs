//! Probing in the background: each target on its own interval (jittered), at most one probe in
//! flight per target, at most `PROBE_CONCURRENCY` in all, each cut off at `PROBE_TIMEOUT`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_runtime::annotations::ServicePort;
use hyper::Uri;
use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::discovery::Cluster;
use crate::probe::{Detail, PostgresProbe, Reason, RedisProbe, Report, WebProbe};
use crate::registry::{Check, Due, Registry};
use crate::targets::{HttpTarget, Kind, TargetKey};

/// How often due targets are looked for.
const TICK: Duration = Duration::from_millis(200);

pub struct Prober {
    pub registry: Arc<Registry>,
    pub cluster: Cluster,
    pub client: Client,
    pub web: WebProbe,
    pub postgres: Option<PostgresProbe>,
    pub redis: Option<RedisProbe>,
    pub interval: Duration,
    pub timeout: Duration,
    pub permits: Arc<Semaphore>,
}

/// An interval, ±10 %, so targets added together do not stay in step.
pub fn jittered(interval: Duration) -> Duration {
    let mut byte = [0_u8; 1];
    let _ = getrandom::fill(&mut byte);
    interval.mul_f64(0.9 + f64::from(byte[0]) / 255.0 * 0.2)
}

/// How soon a cluster check waiting for its watch's first listing is looked at again.
const UNSYNCED_RETRY: Duration = Duration::from_secs(1);

/// A probe under way; dropped without a result (its task panicked), it records one, so the
/// target is never left marked in flight.
struct InFlight<'a> {
    registry: &'a Registry,
    due: Due,
    next_in: Duration,
    done: bool,
}

impl InFlight<'_> {
    fn record(mut self, report: Report) {
        self.done = true;
        self.registry.record(&self.due, report, self.next_in);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            let report = Report::failure(Reason::Protocol, "the check stopped unexpectedly");
            self.registry.record(&self.due, report, self.next_in);
        }
    }
}

impl Prober {
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
            for due in self.registry.take_due() {
                if due.check.is_network() {
                    let prober = Arc::clone(&self);
                    tokio::spawn(async move { prober.probe(due).await });
                } else {
                    // Reads what is in memory: at once, never queued behind slow probes.
                    self.look(due);
                }
            }
        }
    }

    /// A network check, within the concurrency cap and the deadline.
    async fn probe(&self, due: Due) {
        let Ok(_permit) = self.permits.acquire().await else {
            self.registry.skip(&due, self.interval);
            return;
        };
        let in_flight = InFlight {
            registry: &self.registry,
            next_in: jittered(self.interval),
            due,
            done: false,
        };
        let started = Instant::now();
        let check = self.check(&in_flight.due.key, &in_flight.due.check);
        let mut report = match tokio::time::timeout(self.timeout, check).await {
            Ok(report) => report,
            Err(_) => Report::timeout(self.timeout),
        };
        report.duration = started.elapsed();
        if let Some(reason) = report.reason {
            tracing::debug!(target = %in_flight.due.key, reason = reason.as_str(), message = %report.message, "check failed");
        }
        in_flight.record(report);
    }

    /// A check of what the cluster says, or of an invalid annotation.
    fn look(&self, due: Due) {
        if !self.cluster.synced(due.key.kind) {
            self.registry.skip(&due, UNSYNCED_RETRY);
            return;
        }
        let report = match &due.check {
            Check::Invalid(why) => Report::failure(Reason::InvalidAnnotation, why.clone()),
            _ => self.cluster_check(&due.key),
        };
        self.registry.record(&due, report, jittered(self.interval));
    }

    async fn check(&self, key: &TargetKey, check: &Check) -> Report {
        match check {
            Check::Http(HttpTarget::Service {
                service,
                port,
                path,
            }) => self.service(&key.namespace, service, port, path).await,
            Check::Http(HttpTarget::Url(url)) => match url.as_str().parse::<Uri>() {
                Ok(uri) => self.web.http(uri, None).await,
                Err(error) => Report::failure(Reason::InvalidAnnotation, error.to_string()),
            },
            Check::Tls { host, port } => self.web.certificate(host, *port).await,
            Check::Postgres => match &self.postgres {
                Some(postgres) => postgres.probe().await,
                None => Report::failure(Reason::Missing, "POSTGRES_URL is not set"),
            },
            Check::Redis => match &self.redis {
                Some(redis) => redis.probe().await,
                None => Report::failure(Reason::Missing, "REDIS_URL is not set"),
            },
            Check::Cluster | Check::Invalid(_) => {
                Report::failure(Reason::Protocol, "not a network check")
            }
        }
    }

    /// A Service of the namespace, by its cluster DNS name (the Host header) at its cluster IP
    /// as the API gives it, so a probe does not depend on the pod's DNS.
    async fn service(&self, namespace: &str, name: &str, port: &ServicePort, path: &str) -> Report {
        let services: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let service = match services.get_opt(name).await {
            Ok(Some(service)) => service,
            Ok(None) => {
                return Report::failure(
                    Reason::Missing,
                    format!("Service {name} does not exist in namespace {namespace}"),
                );
            }
            Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => {
                return Report::failure(
                    Reason::Auth,
                    format!(
                        "reading Service {name} was refused ({}); the ClusterRole \
                         hearth-health-exporter must allow get on services",
                        status.message
                    ),
                );
            }
            Err(error) => {
                return Report::failure(
                    Reason::Connect,
                    format!("reading Service {name}: {error}"),
                );
            }
        };
        let spec = service.spec.unwrap_or_default();
        let Some(ip) = spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None") else {
            return Report::failure(
                Reason::Missing,
                format!(
                    "Service {name} has no cluster IP (headless or ExternalName); name a URL in \
                     hearth.dev/probe instead"
                ),
            );
        };
        let number = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .find_map(|p| match port {
                ServicePort::Number(n) => (p.port == i32::from(*n)).then_some(p.port),
                ServicePort::Name(wanted) => (p.name.as_deref() == Some(wanted)).then_some(p.port),
            });
        let Some(number) = number else {
            return Report::failure(
                Reason::Missing,
                format!("Service {name} has no port {port}"),
            );
        };
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        let Ok(uri) = format!("http://{host}:{number}{path}").parse::<Uri>() else {
            return Report::failure(Reason::InvalidAnnotation, format!("path {path:?}"));
        };
        self.web
            .http(uri, Some(&format!("{name}.{namespace}.svc:{number}")))
            .await
    }

    /// What the cluster says of a Secret, an Ingress or an ExternalSecret.
    fn cluster_check(&self, key: &TargetKey) -> Report {
        let namespace = key.namespace.as_str();
        let name = key.target.as_str();
        match key.kind {
            Kind::Secret => {
                if self.cluster.has_database_secret(namespace) {
                    Report::success(Detail::None)
                } else {
                    Report::failure(
                        Reason::Missing,
                        "Secret hearth-db from db-provisioner is not there (see the namespace's Events from hearth-db-provisioner)",
                    )
                }
            }
            Kind::Ingress => match self.cluster.ingress(namespace, name) {
                None => Report::failure(
                    Reason::Missing,
                    format!(
                        "Ingress {name} from ingress-sync is not there (see the namespace's Events from hearth-ingress-sync)"
                    ),
                ),
                Some(ingress) => {
                    let host = ingress
                        .status
                        .as_ref()
                        .and_then(|s| s.load_balancer.as_ref())
                        .and_then(|lb| lb.ingress.as_ref())
                        .and_then(|entries| entries.iter().find_map(|e| e.hostname.clone()))
                        .filter(|host| !host.is_empty());
                    match host {
                        Some(_) => Report::success(Detail::None),
                        None => Report::failure(
                            Reason::NoHostname,
                            format!(
                                "the Tailscale operator has not given Ingress {name} a host name yet"
                            ),
                        ),
                    }
                }
            },
            Kind::ExternalSecret => match self.cluster.external_secret(namespace, name) {
                None => Report::failure(Reason::Missing, format!("ExternalSecret {name} is gone")),
                Some(external) => {
                    let conditions = external.data["status"]["conditions"].as_array().cloned();
                    let ready = conditions.iter().flatten().find(|c| c["type"] == "Ready");
                    match ready {
                        Some(c) if c["status"] == "True" => Report::success(Detail::None),
                        // Only the condition's reason: its message is ESO's error text, and
                        // the status page is readable without the RBAC that guards it.
                        Some(c) => Report::failure(
                            Reason::NotReady,
                            format!(
                                "ESO reports it not ready ({}); `kubectl -n {namespace} describe \
                                 externalsecret {name}` says why",
                                c["reason"]
                                    .as_str()
                                    .unwrap_or("no reason given")
                                    .chars()
                                    .take(64)
                                    .collect::<String>()
                            ),
                        ),
                        None => Report::failure(Reason::NotReady, "ESO has not synced it yet"),
                    }
                }
            },
            Kind::Http | Kind::Tls | Kind::Postgres | Kind::Redis => {
                Report::failure(Reason::Protocol, "not a cluster check")
            }
        }
    }
}
