//! A whole stack for ingress-sync's end-to-end tests and benchmark: the fake Kubernetes API, a
//! stand-in Tailscale operator, and the real binary started as a process.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use hearth_tests::FakeApiServer;
use hearth_tests::admin::ServiceProcess;
use hearth_tests::tailscale::StandInOperator;
pub use hearth_tests::{eventually, metric};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tempfile::TempDir;

pub const TAILNET: &str = "tailnet.example.ts.net";
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Stack {
    pub api: FakeApiServer,
    pub client: Client,
    pub operator: StandInOperator,
    kubeconfig: PathBuf,
    _dir: TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with_delay(Duration::from_millis(200)).await
    }

    /// With the stand-in operator naming hosts `delay` after it sees an Ingress.
    pub async fn start_with_delay(delay: Duration) -> Self {
        let api = FakeApiServer::start().await.unwrap();
        let client = api.client().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let operator = StandInOperator::start(client.clone(), TAILNET, delay);
        let stack = Self {
            api,
            client,
            operator,
            kubeconfig,
            _dir: dir,
        };
        stack.namespace_with("hearth-system", &[]).await;
        stack.namespace_with("default", &[]).await;
        stack
    }

    pub async fn ingress_sync(&self, pod: &str, extra: &[(&str, &str)]) -> ServiceProcess {
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAME", pod),
            ("POD_NAMESPACE", "hearth-system"),
            ("RESYNC_INTERVAL", "1s"),
            ("RUST_LOG", "info,ingress_sync=debug"),
        ];
        env.extend_from_slice(extra);
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_ingress-sync"));
        ServiceProcess::start(&binary, &env).await.unwrap()
    }

    /// Creates a namespace, or sets annotations on it (`None` removes one).
    pub async fn namespace_with(&self, name: &str, annotations: &[(&str, Option<&str>)]) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        if namespaces.get_opt(name).await.unwrap().is_none() {
            let namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
            namespaces
                .create(&PostParams::default(), &namespace)
                .await
                .unwrap();
        }
        if annotations.is_empty() {
            return;
        }
        let values: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(key, value)| ((*key).to_owned(), json!(value)))
            .collect();
        namespaces
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"annotations": values}})),
            )
            .await
            .unwrap();
    }

    /// A ClusterIP Service with the given ports as (number, name).
    pub async fn service(&self, namespace: &str, name: &str, ports: &[(u16, &str)]) {
        let ports: Vec<_> = ports
            .iter()
            .map(|(port, port_name)| json!({"port": port, "name": port_name, "protocol": "TCP"}))
            .collect();
        let service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"ports": ports, "clusterIP": "10.43.0.10", "type": "ClusterIP"},
        }))
        .unwrap();
        Api::<Service>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &service)
            .await
            .unwrap();
    }

    pub async fn deployment(&self, namespace: &str, name: &str) {
        let deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
                },
            },
        }))
        .unwrap();
        Api::<Deployment>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &deployment)
            .await
            .unwrap();
    }

    pub async fn ingress(&self, namespace: &str, name: &str) -> Option<Ingress> {
        Api::<Ingress>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .unwrap()
    }

    pub async fn url_config_map(&self, namespace: &str) -> Option<ConfigMap> {
        Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
            .get_opt("hearth-url")
            .await
            .unwrap()
    }

    pub async fn namespace(&self, name: &str) -> Option<Namespace> {
        Api::<Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .unwrap()
    }

    /// Every Event about a namespace, as (type, reason, action, note).
    pub async fn events_about(&self, namespace: &str) -> Vec<(String, String, String, String)> {
        hearth_tests::events::about(&self.client, namespace)
            .await
            .into_iter()
            .map(|seen| (seen.type_, seen.reason, seen.action, seen.note))
            .collect()
    }

    /// Waits for an Event with `reason` about a namespace; its note.
    pub async fn wait_for_event(&self, namespace: &str, reason: &str) -> String {
        hearth_tests::events::wait_for(&self.client, namespace, reason).await
    }

    /// Writes the service made, not counting Events or the harness's own requests.
    pub fn writes(&self) -> Vec<hearth_tests::fake_api::ApiRequest> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| {
                !r.from_harness
                    && !matches!(r.verb, "get" | "list" | "watch")
                    && r.resource != "events"
                    && r.resource != "leases"
            })
            .collect()
    }
}
