//! The bridge as its tests meet it: the real binary serving its self-managed certificate
//! (from the fake Kubernetes API), a client that trusts only the CA it publishes and checks the
//! host name, and a fake Bitwarden with real crypto that counts every call.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use hearth_tests::admin::{HttpReply, ServiceProcess};
use hearth_tests::eso::EsoClient;
use hearth_tests::tls::client_trusting;
use hearth_tests::{FakeApiServer, FakeBitwarden, free_port};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// The name ESO's ClusterSecretStore uses for the bridge.
pub const SERVICE_NAME: &str = hearth_tests::eso::BRIDGE_NAME;

pub struct Bridge {
    pub process: ServiceProcess,
    pub fake: FakeBitwarden,
    pub addr: std::net::SocketAddr,
    pub tls: tokio_rustls::TlsConnector,
    pub api: FakeApiServer,
    _dir: tempfile::TempDir,
}

impl Bridge {
    /// The bridge with the fake Bitwarden's host allowed, at any path.
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        Self::start_allowing(extra, |fake| fake.api_url().replace("/api", "")).await
    }

    /// The bridge with `ALLOWED_UPSTREAMS` made from its fake Bitwarden.
    pub async fn start_allowing(
        extra: &[(&str, &str)],
        allowed: impl Fn(&FakeBitwarden) -> String,
    ) -> Self {
        let api = FakeApiServer::start().await.unwrap();
        let client = api.client().unwrap();
        let namespace =
            serde_json::from_value(json!({"metadata": {"name": "hearth-system"}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let kubeconfig = kubeconfig.display().to_string();
        let fake = FakeBitwarden::start().await.unwrap();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
        let listen = addr.to_string();
        let allowed = allowed(&fake);
        let mut env = vec![
            ("LISTEN_ADDR", listen.as_str()),
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAMESPACE", "hearth-system"),
            ("ALLOWED_UPSTREAMS", allowed.as_str()),
            ("UPSTREAM_TIMEOUT", "2s"),
        ];
        env.extend_from_slice(extra);
        let binary = Path::new(env!("CARGO_BIN_EXE_secret-bridge"));
        let process = ServiceProcess::start(binary, &env).await.unwrap();
        // The API listener comes up once the self-managed certificate is ready.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let maps: Api<ConfigMap> = Api::namespaced(client, "hearth-system");
        let ca = maps.get("secret-bridge-ca").await.unwrap().data.unwrap()["ca.crt"].clone();
        Self {
            process,
            fake,
            addr,
            tls: client_trusting(&ca).unwrap(),
            api,
            _dir: dir,
        }
    }

    /// ESO's side of the bridge, trusting the CA it publishes.
    pub fn eso_client(&self) -> EsoClient {
        EsoClient {
            bridge: self.addr,
            tls: self.tls.clone(),
            api_url: self.fake.api_url(),
            identity_url: self.fake.identity_url(),
        }
    }

    /// A request as ESO makes it: JSON body, no Content-Type, all three Warden headers.
    pub async fn eso(&self, method: &str, path: &str, token: &str, body: Value) -> HttpReply {
        self.eso_client()
            .request(method, path, token, &body)
            .await
            .unwrap()
    }

    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> HttpReply {
        self.eso_client()
            .raw(method, path, headers, body)
            .await
            .unwrap()
    }

    pub async fn get_secret(&self, token: &str, id: &str) -> HttpReply {
        self.eso("GET", "/rest/api/1/secret", token, json!({"id": id}))
            .await
    }

    pub async fn list(&self, token: &str) -> Vec<Value> {
        let reply = self
            .eso(
                "GET",
                "/rest/api/1/secrets",
                token,
                json!({"organizationID": self.fake.organization()}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        body["data"].as_array().unwrap().clone()
    }
}
