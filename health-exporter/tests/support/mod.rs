//! A whole stack for health-exporter's tests and benchmark: the fake Kubernetes API, a real
//! PostgreSQL and Redis, stand-in app sites, and the real binary started as a process.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_tests::admin::ServiceProcess;
use hearth_tests::sites::{Behaviour, TestSite};
use hearth_tests::tls::TestCa;
use hearth_tests::{FakeApiServer, PostgresServer, RedisServer};
pub use hearth_tests::{eventually, sample};
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tempfile::TempDir;

pub const WAIT: Duration = Duration::from_secs(30);

/// The harness's own writes, as the operators that own these objects would make them.
const HARNESS: &str = "hearth-tests";

pub struct Stack {
    pub api: FakeApiServer,
    pub client: Client,
    pub postgres: PostgresServer,
    pub redis: RedisServer,
    kubeconfig: PathBuf,
    pub dir: TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        let api = FakeApiServer::start().await.unwrap();
        let client = api.client().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let postgres = PostgresServer::start().await.unwrap();
        let redis = RedisServer::start().await.unwrap();
        let stack = Self {
            api,
            client,
            postgres,
            redis,
            kubeconfig,
            dir,
        };
        stack.namespace_with("hearth-system", &[]).await;
        stack
    }

    /// The exporter, checking every second with a 500 ms deadline, watching the stack's
    /// PostgreSQL and Redis; `extra` adds or overrides environment variables.
    pub async fn exporter(&self, extra: &[(&str, &str)]) -> ServiceProcess {
        let kubeconfig = self.kubeconfig.display().to_string();
        let (postgres, redis) = (self.postgres.url(), self.redis.url());
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAME", "health-exporter-0"),
            ("POD_NAMESPACE", "hearth-system"),
            ("POSTGRES_URL", postgres.as_str()),
            ("REDIS_URL", redis.as_str()),
            ("PROBE_INTERVAL", "1s"),
            ("PROBE_TIMEOUT", "500ms"),
            // The stand-in published URLs are on loopback, so their certificates can be checked.
            ("PROBE_PUBLISHED_URLS", "true"),
            ("RUST_LOG", "info,health_exporter=debug"),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key, value));
        }
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_health-exporter"));
        ServiceProcess::start(&binary, &env).await.unwrap()
    }

    fn patch_params() -> PatchParams {
        PatchParams::apply(HARNESS).force()
    }

    /// Creates a namespace with these annotations (replacing those the harness set before).
    pub async fn namespace_with(&self, name: &str, annotations: &[(&str, &str)]) {
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(key, value)| ((*key).to_owned(), json!(value)))
            .collect();
        let namespace = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": annotations},
        });
        Api::<Namespace>::all(self.client.clone())
            .patch(name, &Self::patch_params(), &Patch::Apply(&namespace))
            .await
            .unwrap();
    }

    pub async fn delete_namespace(&self, name: &str) {
        Api::<Namespace>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    /// A Service whose cluster IP is loopback, so the exporter reaches a test site through it.
    pub async fn service(&self, namespace: &str, name: &str, port: u16, port_name: &str) {
        let service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "clusterIP": "127.0.0.1",
                "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            },
        });
        Api::<Service>::namespaced(self.client.clone(), namespace)
            .patch(name, &Self::patch_params(), &Patch::Apply(&service))
            .await
            .unwrap();
    }

    /// The Secret hearth-db, labelled as db-provisioner labels it when `ours`.
    pub async fn database_secret(&self, namespace: &str, ours: bool) {
        let mut secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "hearth-db", "namespace": namespace},
            "stringData": {"POSTGRES_PASSWORD": "not-for-your-eyes"},
        });
        if ours {
            secret["metadata"]["labels"] =
                json!({"app.kubernetes.io/managed-by": "hearth-db-provisioner"});
        }
        Api::<Secret>::namespaced(self.client.clone(), namespace)
            .patch("hearth-db", &Self::patch_params(), &Patch::Apply(&secret))
            .await
            .unwrap();
    }

    /// An ExternalSecret with a Ready condition of (status, reason, message) (`None`: not synced
    /// yet, no conditions).
    pub async fn external_secret(
        &self,
        namespace: &str,
        name: &str,
        ready: Option<(bool, &str, &str)>,
    ) {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret"),
            "externalsecrets",
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        let object = json!({
            "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"secretStoreRef": {"kind": "ClusterSecretStore", "name": "bitwarden"}},
        });
        api.patch(name, &Self::patch_params(), &Patch::Apply(&object))
            .await
            .unwrap();
        if let Some((ready, reason, message)) = ready {
            let status = json!({
                "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
                "status": {"conditions": [{
                    "type": "Ready",
                    "status": if ready { "True" } else { "False" },
                    "reason": reason,
                    "message": message,
                }]},
            });
            api.patch_status(name, &Self::patch_params(), &Patch::Apply(&status))
                .await
                .unwrap();
        }
    }

    /// An Ingress as ingress-sync labels it, with the host name the Tailscale operator gave it.
    pub async fn ingress(&self, namespace: &str, name: &str, hostname: Option<&str>) {
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), namespace);
        let ingress = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {
                "name": name, "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "hearth-ingress-sync"},
            },
            "spec": {"ingressClassName": "tailscale"},
        });
        api.patch(name, &Self::patch_params(), &Patch::Apply(&ingress))
            .await
            .unwrap();
        if let Some(hostname) = hostname {
            let status = json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "status": {"loadBalancer": {"ingress": [{"hostname": hostname}]}},
            });
            api.patch_status(name, &Self::patch_params(), &Patch::Apply(&status))
                .await
                .unwrap();
        }
    }

    /// A published URL's stand-in: an HTTPS site on localhost with a certificate from a CA of
    /// its own, valid until `not_after` when given; the site, and the CA's PEM file (for
    /// PROBE_CA_FILE).
    pub async fn published_site(&self, not_after: Option<(i32, u8, u8)>) -> (TestSite, PathBuf) {
        let ca = TestCa::new("tailnet CA").unwrap();
        let (cert, key) = ca
            .issue_files_until(&["localhost"], self.dir.path(), "url", not_after)
            .unwrap();
        let site = TestSite::start_tls(Behaviour::Status(200), &cert, &key)
            .await
            .unwrap();
        let ca_file = self.dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        (site, ca_file)
    }

    /// Creates a database the exporter will see the size of.
    pub async fn database(&self, name: &str) {
        self.postgres
            .connect()
            .await
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
}

/// Waits until the exporter's `/metrics` has `series` at `value`; the whole exposition.
pub async fn wait_for_sample(process: &ServiceProcess, series: &str, value: f64) -> String {
    wait_for_samples(process, &[(series, value)]).await
}

/// Waits until one scrape of `/metrics` has every series at its value; that exposition.
pub async fn wait_for_samples(process: &ServiceProcess, wanted: &[(&str, f64)]) -> String {
    eventually(&format!("{wanted:?}"), WAIT, || async {
        let text = process.get("/metrics").await.ok()?.body;
        wanted
            .iter()
            .all(|(series, value)| sample(&text, series) == Some(*value))
            .then_some(text)
    })
    .await
}

/// Waits until the exporter's `/metrics` no longer has any series starting with `prefix`.
pub async fn wait_for_absence(process: &ServiceProcess, prefix: &str) -> String {
    eventually(&format!("no {prefix}"), WAIT, || async {
        let text = process.get("/metrics").await.ok()?.body;
        (!text.lines().any(|line| line.starts_with(prefix))).then_some(text)
    })
    .await
}

/// `/status.json`, parsed.
pub async fn status(process: &ServiceProcess) -> Value {
    let reply = process.get("/status.json").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

/// The card of one app in `/status.json`.
pub fn app<'a>(status: &'a Value, namespace: &str) -> Option<&'a Value> {
    status["apps"]
        .as_array()?
        .iter()
        .find(|app| app["namespace"] == namespace)
}

/// A PEM file path as an environment value.
pub fn path_value(path: &Path) -> String {
    path.display().to_string()
}
