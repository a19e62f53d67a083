//! hearth on one machine, for `scripts/run` and the whole-stack tests: a private PostgreSQL and
//! Redis, the project's fake Kubernetes API server seeded with the example apps of
//! `deploy/examples/`, stand-ins (named as such) for the Tailscale operator, for External
//! Secrets Operator and for the apps themselves, a fake Bitwarden seeded with the examples'
//! secrets, and the four real service binaries as processes, each given the environment its
//! Deployment in `deploy/` gives it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::admin::{ServiceProcess, http_get};
use crate::eso::{EsoClient, StandInEso};
use crate::manifests::{kustomize, yaml_documents};
use crate::sites::{Behaviour, TestSite};
use crate::tailscale::StandInOperator;
use crate::{FakeApiServer, FakeBitwarden, HarnessError, PostgresServer, RedisServer, free_port};

/// The four services, in the order their admin ports are numbered.
pub const SERVICES: [&str; 4] = [
    "db-provisioner",
    "secret-bridge",
    "ingress-sync",
    "health-exporter",
];
/// The example apps seeded.
pub const EXAMPLES: [&str; 4] = ["paperless", "wallabag", "miniflux", "immich"];
/// The stand-in operator's tailnet.
pub const TAILNET: &str = "tailnet.example.ts.net";
/// Where hearth's own objects live.
pub const NAMESPACE: &str = "hearth-system";
/// The field manager of what the stack seeds (as a user's `kubectl apply` would).
const SEEDER: &str = "hearth-local-seed";

pub struct Config {
    /// The directory holding the four service binaries.
    pub binaries: PathBuf,
    /// The first replicas' admin ports, in [`SERVICES`] order; free ports when `None`.
    pub admin_ports: Option<[u16; 4]>,
    /// Replicas of each controller (db-provisioner and ingress-sync), at least 1.
    pub controller_replicas: usize,
    /// Seed the example apps of `deploy/examples/`.
    pub examples: bool,
    /// How long the stand-in Tailscale operator takes to name an Ingress's host.
    pub operator_delay: Duration,
}

/// One process of a service.
pub struct Replica {
    pub service: &'static str,
    /// Its pod name, and so its Lease identity.
    pub pod: String,
    pub admin: SocketAddr,
    env: Vec<(String, String)>,
    pub process: Option<ServiceProcess>,
}

pub struct LocalStack {
    pub api: FakeApiServer,
    pub client: Client,
    pub postgres: PostgresServer,
    pub redis: RedisServer,
    pub bitwarden: FakeBitwarden,
    /// A machine-account access token the fake Bitwarden knows.
    pub token: String,
    /// The fake Bitwarden's secrets: name → id.
    pub secrets: BTreeMap<String, String>,
    /// secret-bridge's API address.
    pub bridge: SocketAddr,
    pub replicas: Vec<Replica>,
    /// What differs from `deploy/` here, and what was left out: for people to read.
    pub notes: Vec<String>,
    binaries: PathBuf,
    operator: Option<StandInOperator>,
    eso: Option<StandInEso>,
    sites: Vec<TestSite>,
    dir: TempDir,
}

/// How a Deployment sets one variable.
enum Source {
    Value(String),
    /// `fieldRef`: the pod's name or namespace.
    Field(String),
    /// `secretKeyRef`: a key of a Secret the user makes.
    SecretKey(String),
}

/// The variables `deploy/` sets for a service's container, in order.
fn deployed_env(
    deployments: &[Value],
    service: &str,
) -> Result<Vec<(String, Source)>, HarnessError> {
    let deployment = deployments
        .iter()
        .find(|d| d["metadata"]["name"] == service)
        .ok_or_else(|| HarnessError::Startup(format!("deploy/ has no Deployment {service}")))?;
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(env
        .iter()
        .filter_map(|var| {
            let name = var["name"].as_str()?.to_owned();
            let from = &var["valueFrom"];
            let source = if let Some(value) = var["value"].as_str() {
                Source::Value(value.to_owned())
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                Source::Field(path.to_owned())
            } else {
                Source::SecretKey(from["secretKeyRef"]["key"].as_str()?.to_owned())
            };
            Some((name, source))
        })
        .collect())
}

/// The plural a kind is served under, for what the examples hold and the fake API serves.
fn resource(object: &Value) -> Option<ApiResource> {
    let api_version = object["apiVersion"].as_str()?;
    let kind = object["kind"].as_str()?;
    let plural = match kind {
        "Namespace" => "namespaces",
        "Service" => "services",
        "Deployment" => "deployments",
        "ConfigMap" => "configmaps",
        "Secret" => "secrets",
        "ExternalSecret" => "externalsecrets",
        _ => return None,
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Some(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        plural,
    ))
}

impl LocalStack {
    pub async fn start(config: Config) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new().prefix("hearth-local-").tempdir()?;
        let postgres = PostgresServer::start().await?;
        let redis = RedisServer::start().await?;
        let api = FakeApiServer::start().await?;
        let client = api.client()?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let bitwarden = FakeBitwarden::start().await?;
        let token = bitwarden.add_token();
        let mut stack = Self {
            operator: Some(StandInOperator::start(
                client.clone(),
                TAILNET,
                config.operator_delay,
            )),
            api,
            client,
            postgres,
            redis,
            bitwarden,
            token,
            secrets: BTreeMap::new(),
            bridge: ([127, 0, 0, 1], free_port()?).into(),
            replicas: Vec::new(),
            notes: Vec::new(),
            binaries: config.binaries.clone(),
            eso: None,
            sites: Vec::new(),
            dir,
        };
        for namespace in [NAMESPACE, "default"] {
            stack
                .apply(&json!({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": namespace}}))
                .await?;
        }
        if config.examples {
            stack.seed_examples().await?;
        }
        let key = "hearth-example";
        let id = stack
            .bitwarden
            .add_secret(key, "a value from the fake Bitwarden", "", None);
        stack.secrets.insert(key.to_owned(), id);
        stack.start_services(&config, &kubeconfig).await?;
        let eso = stack.eso_client().await?;
        stack.eso = Some(StandInEso::start(
            stack.client.clone(),
            eso,
            stack.token.clone(),
            stack.bitwarden.organization(),
            Duration::from_secs(5),
        ));
        Ok(stack)
    }

    /// Server-side applies an object as the seeder.
    pub async fn apply(&self, object: &Value) -> Result<(), HarnessError> {
        let resource = resource(object).ok_or_else(|| {
            HarnessError::Startup(format!("the fake API does not serve {}", object["kind"]))
        })?;
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(namespace) => Api::namespaced_with(self.client.clone(), namespace, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        api.patch(
            name,
            &PatchParams::apply(SEEDER).force(),
            &Patch::Apply(object),
        )
        .await?;
        Ok(())
    }

    /// The examples' objects the fake API serves, each app's Services answered by a stand-in
    /// app on a loopback address of its own, and the examples' secrets in the fake Bitwarden.
    async fn seed_examples(&mut self) -> Result<(), HarnessError> {
        let mut next_address = 10_u8;
        for example in EXAMPLES {
            let objects = yaml_documents(&kustomize(&format!("deploy/examples/{example}"))?)?;
            // The namespace first: everything else lives in it.
            let (namespaces, rest): (Vec<Value>, Vec<Value>) =
                objects.into_iter().partition(|o| o["kind"] == "Namespace");
            for mut object in namespaces.into_iter().chain(rest) {
                let kind = object["kind"].as_str().unwrap_or_default().to_owned();
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if resource(&object).is_none() {
                    self.notes.push(format!(
                        "{example}: {kind} {name} left out (the fake API does not serve {kind})"
                    ));
                    continue;
                }
                if kind == "Service" {
                    let address: SocketAddr = ([127, 0, 0, next_address], 0).into();
                    next_address += 1;
                    object["spec"]["clusterIP"] = json!(address.ip().to_string());
                    for port in object["spec"]["ports"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                    {
                        let number = port["port"].as_u64().unwrap_or(0) as u16;
                        let at = SocketAddr::new(address.ip(), number);
                        match TestSite::start_at(at, Behaviour::Status(200)).await {
                            Ok(site) => self.sites.push(site),
                            Err(error) => self.notes.push(format!(
                                "{example}: the stand-in app cannot listen on {at} ({error}); \
                                 its check will fail"
                            )),
                        }
                    }
                }
                if kind == "ExternalSecret" {
                    for entry in object["spec"]["data"].as_array().into_iter().flatten() {
                        if let Some(key) = entry["remoteRef"]["key"].as_str() {
                            let value = format!("stand-in value of {key}");
                            let id = self.bitwarden.add_secret(key, &value, "", None);
                            self.secrets.insert(key.to_owned(), id);
                        }
                    }
                }
                self.apply(&object).await?;
            }
        }
        Ok(())
    }

    /// The value of a variable `deploy/` takes from a Secret the user makes.
    fn user_secret(&self, key: &str) -> Option<String> {
        match key {
            "POSTGRES_ADMIN_URL" | "POSTGRES_URL" => Some(self.postgres.url()),
            "REDIS_ADMIN_URL" | "REDIS_URL" => Some(self.redis.url()),
            _ => None,
        }
    }

    async fn start_services(
        &mut self,
        config: &Config,
        kubeconfig: &std::path::Path,
    ) -> Result<(), HarnessError> {
        let deployments: Vec<Value> = yaml_documents(&kustomize("deploy")?)?
            .into_iter()
            .filter(|o| o["kind"] == "Deployment")
            .collect();
        let kubeconfig = kubeconfig.display().to_string();
        let upstream = self.bitwarden.api_url().replace("/api", "");
        for (index, service) in SERVICES.iter().enumerate() {
            let controller = matches!(*service, "db-provisioner" | "ingress-sync");
            let replicas = if controller {
                config.controller_replicas.max(1)
            } else {
                1
            };
            for replica in 0..replicas {
                let pod = format!("{service}-{replica}");
                let mut env = Vec::new();
                for (name, source) in deployed_env(&deployments, service)? {
                    let value = match source {
                        Source::Value(value) => Some(value),
                        Source::Field(path) if path == "metadata.name" => Some(pod.clone()),
                        Source::Field(_) => Some(NAMESPACE.to_owned()),
                        Source::SecretKey(key) => self.user_secret(&key),
                    };
                    if let Some(value) = value {
                        env.push((name, value));
                    }
                }
                // Here, not as in a cluster: where the API is, and what is local only.
                env.push(("KUBECONFIG".into(), kubeconfig.clone()));
                if *service == "secret-bridge" {
                    env.push(("LISTEN_ADDR".into(), self.bridge.to_string()));
                    env.push(("ALLOWED_UPSTREAMS".into(), upstream.clone()));
                }
                let port = match config.admin_ports {
                    Some(ports) if replica == 0 => ports[index],
                    _ => free_port()?,
                };
                self.replicas.push(Replica {
                    service,
                    pod,
                    admin: ([127, 0, 0, 1], port).into(),
                    env,
                    process: None,
                });
            }
        }
        self.notes.push(format!(
            "each service has the environment its Deployment in deploy/ gives it, with \
             KUBECONFIG pointing at the fake API, the Secrets' database URLs pointing at the \
             local PostgreSQL and Redis, and secret-bridge listening on {} and allowed the fake \
             Bitwarden ({upstream})",
            self.bridge
        ));
        for index in 0..self.replicas.len() {
            self.start_replica(index).await?;
        }
        Ok(())
    }

    /// Starts (or starts again) one replica and waits until it is ready.
    pub async fn start_replica(&mut self, index: usize) -> Result<(), HarnessError> {
        let replica = &self.replicas[index];
        let binary = self.binaries.join(replica.service);
        let env: Vec<(&str, &str)> = replica
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let process = ServiceProcess::start_at(&binary, replica.admin, &env).await?;
        let admin = replica.admin;
        self.replicas[index].process = Some(process);
        for _ in 0..600 {
            if http_get(admin, "/readyz")
                .await
                .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let said = self.replicas[index]
            .process
            .as_ref()
            .map(ServiceProcess::logs)
            .unwrap_or_default();
        Err(HarnessError::Startup(format!(
            "{} did not become ready in 30 s: {said}",
            self.replicas[index].pod
        )))
    }

    /// Kills one replica at once (SIGKILL), as an OOM kill or a lost node would.
    pub fn kill(&mut self, index: usize) -> Result<(), HarnessError> {
        if let Some(mut process) = self.replicas[index].process.take() {
            process.kill()?;
        }
        Ok(())
    }

    /// The replicas of a service.
    pub fn of(&self, service: &str) -> impl Iterator<Item = (usize, &Replica)> {
        self.replicas
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.service == service)
    }

    /// The first replica's admin address.
    pub fn admin(&self, service: &str) -> SocketAddr {
        self.of(service)
            .map(|(_, r)| r.admin)
            .next()
            .unwrap_or(([127, 0, 0, 1], 0).into())
    }

    /// The replica holding a controller's Lease, if one does.
    pub async fn leader(&self, service: &str) -> Result<Option<usize>, HarnessError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NAMESPACE);
        let holder = leases
            .get_opt(&format!("hearth-{service}"))
            .await?
            .and_then(|lease| lease.spec?.holder_identity);
        Ok(holder.and_then(|holder| {
            self.of(service)
                .find(|(_, r)| r.pod == holder)
                .map(|(index, _)| index)
        }))
    }

    /// ESO's side of secret-bridge.
    pub async fn eso_client(&self) -> Result<EsoClient, HarnessError> {
        let mut last = None;
        for _ in 0..100 {
            match EsoClient::trusting_the_bridge(
                &self.client,
                self.bridge,
                self.bitwarden.api_url(),
                self.bitwarden.identity_url(),
            )
            .await
            {
                Ok(client) => return Ok(client),
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| HarnessError::Startup("secret-bridge-ca never came".into())))
    }

    /// Stops every service as the kubelet would (SIGTERM, then the grace period), then the
    /// stand-ins; the databases and the temporary directory go when the stack is dropped.
    pub async fn stop(&mut self) -> Vec<String> {
        self.eso = None;
        let mut problems = Vec::new();
        for replica in &mut self.replicas {
            if let Some(mut process) = replica.process.take()
                && let Err(error) = process.terminate(Duration::from_secs(30)).await
            {
                problems.push(format!("{}: {error}", replica.pod));
            }
        }
        self.operator = None;
        self.sites.clear();
        problems
    }

    /// The temporary directory everything local lives in (removed when the stack is dropped).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}
