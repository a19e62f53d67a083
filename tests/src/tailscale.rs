//! Stand-ins for Tailscale, named as such: an operator that gives each Ingress of class
//! `tailscale` a host name in its status after a delay (as the real one does once its proxy has
//! joined the tailnet), suffixing `-1`, `-2` when the name is taken; and the Tailscale API's
//! device and OAuth endpoints, with call counters and injectable 429s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use futures::StreamExt;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::HarnessError;

const FINALIZER: &str = "tailscale.com/finalizer";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A stand-in for the Tailscale operator's Ingress handling.
pub struct StandInOperator {
    /// Host labels in use on the tailnet (by Ingresses, or by devices left behind).
    taken: Arc<Mutex<HashSet<String>>>,
    shutdown: CancellationToken,
}

impl StandInOperator {
    /// Serves every Ingress of class `tailscale` the client can see, naming hosts
    /// `<label>.<tailnet>`.
    pub fn start(client: kube::Client, tailnet: &str, delay: Duration) -> Self {
        let taken: Arc<Mutex<HashSet<String>>> = Arc::default();
        let shutdown = CancellationToken::new();
        let api: Api<Ingress> = Api::all(client);
        let events = watcher(api.clone(), watcher::Config::default()).applied_objects();
        let tailnet = tailnet.to_owned();
        let names = Arc::clone(&taken);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let named: Arc<Mutex<HashMap<String, String>>> = Arc::default();
            let serve = events.for_each(|ingress| {
                let api = api.clone();
                let names = Arc::clone(&names);
                let named = Arc::clone(&named);
                let tailnet = tailnet.clone();
                async move {
                    if let Ok(ingress) = ingress {
                        serve(&api, ingress, &names, &named, &tailnet, delay).await;
                    }
                }
            });
            tokio::select! {
                () = serve => {}
                () = stop.cancelled() => {}
            }
        });
        Self { taken, shutdown }
    }

    /// A device already holds `label` on the tailnet: the next Ingress asking for it gets a
    /// suffix, as the real control plane gives one.
    pub fn occupy(&self, label: &str) {
        lock(&self.taken).insert(label.to_owned());
    }
}

impl Drop for StandInOperator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn serve(
    api: &Api<Ingress>,
    ingress: Ingress,
    taken: &Mutex<HashSet<String>>,
    named: &Mutex<HashMap<String, String>>,
    tailnet: &str,
    delay: Duration,
) {
    let key = format!(
        "{}/{}",
        ingress.namespace().unwrap_or_default(),
        ingress.name_any()
    );
    let Some(namespace) = ingress.namespace() else {
        return;
    };
    let api: Api<Ingress> = Api::namespaced(api.clone().into_client(), &namespace);
    let name = ingress.name_any();
    let spec = ingress.spec.clone().unwrap_or_default();
    if spec.ingress_class_name.as_deref() != Some("tailscale") {
        return;
    }
    if ingress.metadata.deletion_timestamp.is_some() {
        // Its device is removed, then the finalizer.
        if let Some(label) = lock(named).remove(&key) {
            lock(taken).remove(&label);
        }
        let finalizers: Vec<String> = ingress
            .finalizers()
            .iter()
            .filter(|f| f.as_str() != FINALIZER)
            .cloned()
            .collect();
        let patch = json!({"metadata": {"finalizers": finalizers}});
        let _ = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        return;
    }
    if !ingress.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = ingress.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        let patch = json!({"metadata": {"finalizers": finalizers}});
        let _ = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
    let Some(wanted) = spec
        .tls
        .as_ref()
        .and_then(|tls| tls.first())
        .and_then(|tls| tls.hosts.as_ref())
        .and_then(|hosts| hosts.first())
        .map(|host| host.split('.').next().unwrap_or_default().to_owned())
    else {
        return;
    };
    if lock(named).contains_key(&key) {
        return;
    }
    let label = {
        let mut taken = lock(taken);
        let mut label = wanted.clone();
        let mut suffix = 0;
        while taken.contains(&label) {
            suffix += 1;
            label = format!("{wanted}-{suffix}");
        }
        taken.insert(label.clone());
        label
    };
    lock(named).insert(key, label.clone());
    let host = format!("{label}.{tailnet}");
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let status = json!({"status": {"loadBalancer": {"ingress": [
            {"hostname": host, "ports": [{"port": 443, "protocol": "TCP"}]}
        ]}}});
        let _ = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
    });
}

#[derive(Default)]
struct ApiState {
    api_key: String,
    oauth: Option<(String, String)>,
    issued: HashSet<String>,
    devices: Vec<Value>,
    calls: HashMap<String, usize>,
    /// Queued answers: the kind of call each is for (any, when None), status and Retry-After.
    faults: VecDeque<(Option<String>, u16, Option<u64>)>,
}

/// A stand-in for the Tailscale API (`/api/v2`): devices, device deletion and OAuth tokens.
pub struct FakeTailscaleApi {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    shutdown: CancellationToken,
}

impl FakeTailscaleApi {
    /// Accepts `api_key` as a bearer token, and `oauth` client credentials when given.
    pub async fn start(api_key: &str, oauth: Option<(&str, &str)>) -> Result<Self, HarnessError> {
        let state = Arc::new(Mutex::new(ApiState {
            api_key: api_key.to_owned(),
            oauth: oauth.map(|(id, secret)| (id.to_owned(), secret.to_owned())),
            ..ApiState::default()
        }));
        let router = Router::new()
            .route("/api/v2/tailnet/{tailnet}/devices", get(list_devices))
            .route("/api/v2/device/{id}", delete(delete_device))
            .route("/api/v2/oauth/token", post(oauth_token))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a device as the API lists it (`nodeId`, `name`, `tags`, `connectedToControl`,
    /// `lastSeen`, …).
    pub fn add_device(&self, device: Value) {
        lock(&self.state).devices.push(device);
    }

    /// The node ids still listed.
    pub fn device_ids(&self) -> Vec<String> {
        lock(&self.state)
            .devices
            .iter()
            .filter_map(|d| d["nodeId"].as_str().map(str::to_owned))
            .collect()
    }

    /// How many calls of a kind were made: `list`, `delete`, `token`.
    pub fn calls(&self, kind: &str) -> usize {
        lock(&self.state).calls.get(kind).copied().unwrap_or(0)
    }

    /// The next call is answered with `status` (and a Retry-After when given).
    pub fn fail_next(&self, status: u16, retry_after: Option<u64>) {
        lock(&self.state)
            .faults
            .push_back((None, status, retry_after));
    }

    /// The next call of `kind` (`list`, `delete`, `token`) is answered with `status`.
    pub fn fail_next_of(&self, kind: &str, status: u16, retry_after: Option<u64>) {
        lock(&self.state)
            .faults
            .push_back((Some(kind.to_owned()), status, retry_after));
    }
}

impl Drop for FakeTailscaleApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Counts the call and answers a queued fault, or checks the bearer token.
fn admit(state: &mut ApiState, kind: &str, headers: &HeaderMap) -> Option<Response> {
    *state.calls.entry(kind.to_owned()).or_default() += 1;
    let fault = match state.faults.front() {
        Some((Some(for_kind), ..)) if for_kind != kind => None,
        Some(_) => state.faults.pop_front(),
        None => None,
    };
    if let Some((_, status, retry_after)) = fault {
        let mut response = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "slow down",
        )
            .into_response();
        if let Some(seconds) = retry_after
            && let Ok(value) = seconds.to_string().parse()
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return Some(response);
    }
    if kind == "token" {
        return None;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let known = bearer == state.api_key || state.issued.contains(bearer);
    (!known).then(|| (StatusCode::UNAUTHORIZED, "unauthorized").into_response())
}

async fn list_devices(
    State(state): State<Arc<Mutex<ApiState>>>,
    Path(_tailnet): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut state = lock(&state);
    if let Some(refused) = admit(&mut state, "list", &headers) {
        return refused;
    }
    json_answer(&json!({"devices": state.devices}))
}

async fn delete_device(
    State(state): State<Arc<Mutex<ApiState>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut state = lock(&state);
    if let Some(refused) = admit(&mut state, "delete", &headers) {
        return refused;
    }
    let before = state.devices.len();
    state.devices.retain(|d| d["nodeId"] != id);
    if state.devices.len() == before {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    StatusCode::OK.into_response()
}

async fn oauth_token(
    State(state): State<Arc<Mutex<ApiState>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut state = lock(&state);
    if let Some(refused) = admit(&mut state, "token", &headers) {
        return refused;
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let given = (
        form.get("client_id").cloned().unwrap_or_default(),
        form.get("client_secret").cloned().unwrap_or_default(),
    );
    if state.oauth.as_ref() != Some(&given)
        || form.get("grant_type").map(String::as_str) != Some("client_credentials")
    {
        return (StatusCode::UNAUTHORIZED, "invalid client").into_response();
    }
    let token = format!("tskey-oauth-access-{}", state.issued.len() + 1);
    state.issued.insert(token.clone());
    json_answer(&json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}))
}

fn json_answer(body: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
