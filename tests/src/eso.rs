//! External Secrets Operator as secret-bridge meets it: requests shaped exactly as ESO's
//! Bitwarden provider sends them (over HTTPS trusting only the bridge's CA, JSON bodies without
//! a Content-Type, the three Warden headers), and a stand-in ESO, named as such, that resolves
//! ExternalSecrets through the bridge: for each `data` entry it finds the secret by name in the
//! organisation's list, reads it, writes the target Secret and sets the `Ready` condition.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::HarnessError;
use crate::admin::{HttpReply, http_request};
use crate::tls::client_trusting;

/// The name ESO's ClusterSecretStore uses for the bridge.
pub const BRIDGE_NAME: &str = "secret-bridge.hearth-system.svc.cluster.local";
/// What the stand-in writes as field manager and labels.
const STAND_IN: &str = "stand-in-external-secrets";

/// Where ESO's provider talks to: the bridge's address, and the Bitwarden servers it names.
#[derive(Clone)]
pub struct EsoClient {
    pub bridge: SocketAddr,
    pub tls: tokio_rustls::TlsConnector,
    pub api_url: String,
    pub identity_url: String,
}

impl EsoClient {
    /// A client trusting only the CA secret-bridge publishes in ConfigMap `secret-bridge-ca`.
    pub async fn trusting_the_bridge(
        client: &Client,
        bridge: SocketAddr,
        api_url: String,
        identity_url: String,
    ) -> Result<Self, HarnessError> {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "hearth-system");
        let ca = maps
            .get("secret-bridge-ca")
            .await?
            .data
            .and_then(|mut data| data.remove("ca.crt"))
            .ok_or_else(|| HarnessError::Startup("secret-bridge-ca has no ca.crt".into()))?;
        Ok(Self {
            bridge,
            tls: client_trusting(&ca)?,
            api_url,
            identity_url,
        })
    }

    /// A request as ESO makes it: JSON body, no Content-Type, all three Warden headers.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: &Value,
    ) -> Result<HttpReply, HarnessError> {
        let headers = [
            ("Warden-Access-Token", token),
            ("Warden-Api-Url", self.api_url.as_str()),
            ("Warden-Identity-Url", self.identity_url.as_str()),
            ("User-Agent", "Go-http-client/1.1"),
            ("Accept-Encoding", "gzip"),
        ];
        self.raw(method, path, &headers, body.to_string().into_bytes())
            .await
    }

    /// Any request, over a new TLS connection that checks the bridge's name.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<HttpReply, HarnessError> {
        let tcp = tokio::net::TcpStream::connect(self.bridge).await?;
        let name = rustls_pki_types::ServerName::try_from(BRIDGE_NAME)
            .map_err(|e| HarnessError::Startup(e.to_string()))?;
        let stream = self.tls.connect(name, tcp).await?;
        http_request(stream, BRIDGE_NAME, method, path, headers, body).await
    }

    /// One secret by id: its key and value.
    pub async fn get(&self, token: &str, id: &str) -> Result<(String, String), HarnessError> {
        let reply = self
            .request("GET", "/rest/api/1/secret", token, &json!({"id": id}))
            .await?;
        let body = ok_json(&reply)?;
        Ok((
            body["key"].as_str().unwrap_or_default().to_owned(),
            body["value"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// The organisation's secrets: name → id.
    pub async fn list(
        &self,
        token: &str,
        organization: &str,
    ) -> Result<BTreeMap<String, String>, HarnessError> {
        let reply = self
            .request(
                "GET",
                "/rest/api/1/secrets",
                token,
                &json!({"organizationID": organization}),
            )
            .await?;
        let body = ok_json(&reply)?;
        Ok(body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["key"].as_str()?.to_owned(), s["id"].as_str()?.to_owned())))
            .collect())
    }
}

fn ok_json(reply: &HttpReply) -> Result<Value, HarnessError> {
    if reply.status != 200 {
        return Err(HarnessError::Startup(format!(
            "secret-bridge answered {}: {}",
            reply.status, reply.body
        )));
    }
    serde_json::from_str(&reply.body).map_err(|e| HarnessError::Startup(e.to_string()))
}

fn external_secrets(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret"),
        "externalsecrets",
    );
    Api::all_with(client.clone(), &resource)
}

/// A stand-in for External Secrets Operator, resolving every ExternalSecret in the cluster
/// through secret-bridge every `every`.
pub struct StandInEso {
    stop: CancellationToken,
}

impl StandInEso {
    pub fn start(
        client: Client,
        eso: EsoClient,
        token: String,
        organization: String,
        every: Duration,
    ) -> Self {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let _ = sync_all(&client, &eso, &token, &organization).await;
                tokio::select! {
                    () = stopped.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
        Self { stop }
    }
}

impl Drop for StandInEso {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Resolves every ExternalSecret once; how many are ready.
pub async fn sync_all(
    client: &Client,
    eso: &EsoClient,
    token: &str,
    organization: &str,
) -> Result<usize, HarnessError> {
    let names = eso.list(token, organization).await?;
    let mut ready = 0;
    for external in external_secrets(client)
        .list(&ListParams::default())
        .await?
        .items
    {
        let namespace = external.namespace().unwrap_or_default();
        let name = external.name_any();
        let target = external.data["spec"]["target"]["name"]
            .as_str()
            .unwrap_or(&name)
            .to_owned();
        let mut data = BTreeMap::new();
        let mut missing = Vec::new();
        for entry in external.data["spec"]["data"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let key = entry["remoteRef"]["key"].as_str().unwrap_or_default();
            let id = names.get(key).cloned().unwrap_or_else(|| key.to_owned());
            match eso.get(token, &id).await {
                Ok((_, value)) => {
                    data.insert(
                        entry["secretKey"].as_str().unwrap_or_default().to_owned(),
                        value,
                    );
                }
                Err(_) => missing.push(key.to_owned()),
            }
        }
        let condition = if missing.is_empty() {
            let secret = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": target, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": STAND_IN}},
                "stringData": data,
            });
            Api::<Secret>::namespaced(client.clone(), &namespace)
                .patch(
                    &target,
                    &PatchParams::apply(STAND_IN).force(),
                    &Patch::Apply(&secret),
                )
                .await?;
            ready += 1;
            json!({"type": "Ready", "status": "True", "reason": "SecretSynced",
                   "message": "secret synced"})
        } else {
            json!({"type": "Ready", "status": "False", "reason": "SecretSyncedError",
                   "message": format!("could not get secret data from provider: {}", missing.join(", "))})
        };
        let status = json!({
            "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
            "status": {"conditions": [condition]},
        });
        Api::<DynamicObject>::namespaced_with(
            client.clone(),
            &namespace,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret"),
                "externalsecrets",
            ),
        )
        .patch_status(
            &name,
            &PatchParams::apply(STAND_IN).force(),
            &Patch::Apply(&status),
        )
        .await?;
    }
    Ok(ready)
}
