//! TLS as ESO meets it: a client that trusts only the CA secret-bridge publishes and checks the
//! host name, HTTP/1.1, TLS ≥ 1.2 — with the self-managed certificate and with files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hearth_tests::admin::{HttpReply, ServiceProcess, http_request};
use hearth_tests::tls::{TestCa, client_trusting};
use hearth_tests::{FakeApiServer, FakeBitwarden, free_port};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Api;
use kube::api::PostParams;
use rustls_pki_types::ServerName;

const SERVICE_NAME: &str = "secret-bridge.hearth-system.svc.cluster.local";

/// A GET as ESO sends it, through a client that trusts only `ca_pem` and checks `server_name`.
async fn eso_request(
    addr: SocketAddr,
    ca_pem: &str,
    server_name: &str,
    fake: &FakeBitwarden,
    token: &str,
    id: &str,
) -> Result<HttpReply, String> {
    let connector = client_trusting(ca_pem).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let identity = fake.identity_url();
    let api = fake.api_url();
    let headers = [
        ("Warden-Access-Token", token),
        ("Warden-Api-Url", api.as_str()),
        ("Warden-Identity-Url", identity.as_str()),
    ];
    let body = format!(r#"{{"id":"{id}"}}"#).into_bytes();
    http_request(
        stream,
        server_name,
        "GET",
        "/rest/api/1/secret",
        &headers,
        body,
    )
    .await
    .map_err(|e| e.to_string())
}

async fn start_bridge(fake: &FakeBitwarden, env: &[(&str, &str)]) -> (ServiceProcess, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
    let listen = addr.to_string();
    let allowed = fake.api_url().replace("/api", "");
    let mut all = vec![
        ("LISTEN_ADDR", listen.as_str()),
        ("ALLOWED_UPSTREAMS", allowed.as_str()),
    ];
    all.extend_from_slice(env);
    let process = ServiceProcess::start(Path::new(env!("CARGO_BIN_EXE_secret-bridge")), &all)
        .await
        .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (process, addr)
}

#[tokio::test]
async fn the_self_managed_ca_is_published_and_shared_by_every_replica() {
    let api = FakeApiServer::start().await.unwrap();
    let client = api.client().unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "hearth-system"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let fake = FakeBitwarden::start().await.unwrap();
    let env = [
        ("KUBECONFIG", kubeconfig.as_str()),
        ("POD_NAMESPACE", "hearth-system"),
        ("TLS_EXTRA_SANS", "bridge.home.arpa"),
    ];
    let (_first, first_addr) = start_bridge(&fake, &env).await;

    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "hearth-system");
    let ca = maps.get("secret-bridge-ca").await.unwrap().data.unwrap()["ca.crt"].clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "hearth-system");
    let issued = secrets.get("secret-bridge-tls").await.unwrap();
    assert_eq!(issued.type_.as_deref(), Some("kubernetes.io/tls"));

    let token = fake.add_token();
    let id = fake.add_secret("k", "over-tls", "", None);
    for name in [
        SERVICE_NAME,
        "bitwarden-sdk-server.hearth-system.svc",
        "bridge.home.arpa",
    ] {
        let reply = eso_request(first_addr, &ca, name, &fake, &token, &id)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body.contains("over-tls"));
    }
    // A name the certificate does not carry is refused by the client, as Go's would be.
    let refused = eso_request(first_addr, &ca, "elsewhere.example", &fake, &token, &id).await;
    assert!(
        refused.unwrap_err().contains("certificate"),
        "hostname must be checked"
    );
    // Another CA is not trusted.
    let other_ca = TestCa::new("another CA").unwrap().pem().to_owned();
    assert!(
        eso_request(first_addr, &other_ca, SERVICE_NAME, &fake, &token, &id)
            .await
            .is_err()
    );

    // A second replica serves the same certificate: the Secret is not rewritten.
    let (_second, second_addr) = start_bridge(&fake, &env).await;
    let reply = eso_request(second_addr, &ca, SERVICE_NAME, &fake, &token, &id)
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let after = secrets.get("secret-bridge-tls").await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        issued.metadata.resource_version
    );
}

/// A new CA that has issued the bridge's tls.crt / tls.key in `dir`; returns the CA, PEM.
fn issue(ca_name: &str, dir: &Path) -> String {
    let ca = TestCa::new(ca_name).unwrap();
    ca.issue_files(&[SERVICE_NAME], dir, "tls").unwrap();
    ca.pem().to_owned()
}

#[tokio::test]
async fn certificate_files_are_served_and_reloaded_when_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let first_ca = issue("first CA", dir.path());
    let fake = FakeBitwarden::start().await.unwrap();
    let cert = dir.path().join("tls.crt").display().to_string();
    let key = dir.path().join("tls.key").display().to_string();
    let (_process, addr) = start_bridge(
        &fake,
        &[
            ("TLS_CERT_FILE", cert.as_str()),
            ("TLS_KEY_FILE", key.as_str()),
        ],
    )
    .await;
    let token = fake.add_token();
    let id = fake.add_secret("k", "v", "", None);
    assert_eq!(
        eso_request(addr, &first_ca, SERVICE_NAME, &fake, &token, &id)
            .await
            .unwrap()
            .status,
        200
    );

    // The mounted Secret is rotated: the new certificate is served without a restart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second_ca = issue("second CA", dir.path());
    let mut served = false;
    for _ in 0..50 {
        if eso_request(addr, &second_ca, SERVICE_NAME, &fake, &token, &id)
            .await
            .is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "the renewed certificate was never served");
    assert!(
        eso_request(addr, &first_ca, SERVICE_NAME, &fake, &token, &id)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_self_hosted_bitwarden_is_trusted_through_upstream_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("self-hosted Bitwarden CA").unwrap();
    let (cert_path, key_path) = ca.issue_files(&["127.0.0.1"], dir.path(), "bw").unwrap();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let fake = FakeBitwarden::start_tls(&cert_path, &key_path)
        .await
        .unwrap();
    let token = fake.add_token();
    let id = fake.add_secret("k", "self-hosted", "", None);
    let ca_file = ca_path.display().to_string();
    let identity = fake.identity_url();
    let api = fake.api_url();
    let headers = [
        ("Warden-Access-Token", token.as_str()),
        ("Warden-Api-Url", api.as_str()),
        ("Warden-Identity-Url", identity.as_str()),
    ];
    let body = || format!(r#"{{"id":"{id}"}}"#).into_bytes();

    // Trusted through UPSTREAM_CA_FILE.
    let (_trusting, addr) = start_bridge(
        &fake,
        &[("INSECURE", "true"), ("UPSTREAM_CA_FILE", ca_file.as_str())],
    )
    .await;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let reply = http_request(
        stream,
        "bridge",
        "GET",
        "/rest/api/1/secret",
        &headers,
        body(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains("self-hosted"));

    // Without it the self-signed chain is refused and nothing is logged in.
    let logins = fake.calls("login");
    let (_plain, addr) = start_bridge(&fake, &[("INSECURE", "true")]).await;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let reply = http_request(
        stream,
        "bridge",
        "GET",
        "/rest/api/1/secret",
        &headers,
        body(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 400);
    assert!(
        reply.body.contains("could not be reached"),
        "{}",
        reply.body
    );
    assert_eq!(fake.calls("login"), logins);
}

/// The fake API with namespace hearth-system and a kubeconfig for it.
async fn cluster() -> (FakeApiServer, kube::Client, tempfile::TempDir, String) {
    let api = FakeApiServer::start().await.unwrap();
    let client = api.client().unwrap();
    let namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "hearth-system"}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    (api, client, dir, kubeconfig)
}

#[tokio::test]
async fn a_broken_tls_secret_is_reissued_not_served() {
    let (_api, client, _dir, kubeconfig) = cluster().await;
    let fake = FakeBitwarden::start().await.unwrap();
    let env = [
        ("KUBECONFIG", kubeconfig.as_str()),
        ("POD_NAMESPACE", "hearth-system"),
    ];
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "hearth-system");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "hearth-system");
    let token = fake.add_token();
    let id = fake.add_secret("k", "v", "", None);
    // A good Secret to break in different ways, then each break served to a fresh bridge.
    let (first, _) = start_bridge(&fake, &env).await;
    drop(first);
    let good = secrets.get("secret-bridge-tls").await.unwrap();
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let breaks: Vec<(&str, Breakage)> = vec![
        (
            "garbage tls.crt",
            Box::new(|s| set(s, "tls.crt", "garbage")),
        ),
        (
            "garbage tls.key",
            Box::new(|s| set(s, "tls.key", "garbage")),
        ),
        (
            "the CA served as the leaf",
            Box::new(|s| {
                let ca = get(s, "ca.crt");
                let ca_key = get(s, "ca.key");
                set(s, "tls.crt", &ca);
                set(s, "tls.key", &ca_key);
            }),
        ),
        (
            "a key from another pair",
            Box::new(move |s| set(s, "tls.key", &other)),
        ),
    ];
    for (what, break_it) in &breaks {
        let mut broken = good.clone();
        broken.metadata.resource_version = None;
        break_it(&mut broken);
        let current = secrets.get("secret-bridge-tls").await.unwrap();
        broken.metadata.resource_version = current.metadata.resource_version;
        secrets
            .replace("secret-bridge-tls", &PostParams::default(), &broken)
            .await
            .unwrap();
        let (process, addr) = start_bridge(&fake, &env).await;
        let ca = maps.get("secret-bridge-ca").await.unwrap().data.unwrap()["ca.crt"].clone();
        let reply = eso_request(addr, &ca, SERVICE_NAME, &fake, &token, &id)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(reply.status, 200, "{what}");
        assert!(
            process.logs().contains("issuing a new one"),
            "{what}: {}",
            process.logs()
        );
        let fixed = secrets.get("secret-bridge-tls").await.unwrap();
        assert_ne!(get(&fixed, "tls.crt"), get(&broken, "tls.crt"), "{what}");
    }
}

#[tokio::test]
async fn a_tls_secret_hearth_did_not_make_is_never_replaced() {
    let (_api, client, _dir, kubeconfig) = cluster().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "hearth-system");
    let theirs: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "secret-bridge-tls"},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "dGhlaXJz", "tls.key": "dGhlaXJz"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    let fake = FakeBitwarden::start().await.unwrap();
    let env = [
        ("KUBECONFIG", kubeconfig.as_str()),
        ("POD_NAMESPACE", "hearth-system"),
    ];
    let (process, addr) = start_bridge(&fake, &env).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Not replaced; the API is not served; readiness and an Event say why; the process lives.
    let kept = secrets.get("secret-bridge-tls").await.unwrap();
    assert_eq!(get(&kept, "tls.crt"), "theirs");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let ready = process.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("tls-certificate"), "{}", ready.body);
    assert_eq!(process.get("/livez").await.unwrap().status, 200);
    assert!(process.logs().contains("was not made by secret-bridge"));
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "hearth-system");
    let events = events.list(&Default::default()).await.unwrap().items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("ForeignObject")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("TLS_CERT_FILE"))),
        "{events:?}"
    );
}

/// One way to break a TLS Secret.
type Breakage = Box<dyn Fn(&mut Secret)>;

fn get(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

fn set(secret: &mut Secret, key: &str, value: &str) {
    secret.data.get_or_insert_default().insert(
        key.to_owned(),
        k8s_openapi::ByteString(value.as_bytes().to_vec()),
    );
}
