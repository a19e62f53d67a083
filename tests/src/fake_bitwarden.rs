//! A fake Bitwarden Secrets Manager over real HTTP on 127.0.0.1: the identity login and the
//! secrets API, with real crypto (every stored value is an EncString under the organisation
//! key), call counters, and faults to inject (429, 401, slowness, undecryptable items).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secret_bridge::crypto::{AccessToken, SymmetricKey};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::HarnessError;
use hearth_runtime::http::{self, ConnectionMetrics, Limits};

/// The fake imposes nothing of its own: slowness is what a test injects.
const LIMITS: Limits = Limits {
    max_connections: 4096,
    max_connections_per_peer: 4096,
    max_connection_age: Duration::from_secs(3600),
    close_grace: Duration::from_secs(10),
    handshake_timeout: Duration::from_secs(60),
    request_head_timeout: Duration::from_secs(60),
    max_header_bytes: 64 * 1024,
};

/// An answer to give instead of the real one, once.
#[derive(Clone, Debug)]
pub struct Fault {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<u64>,
}

struct StoredSecret {
    key: String,
    value: String,
    note: String,
    project: Option<String>,
}

#[derive(Default)]
struct FakeState {
    org_id: String,
    org_key_bytes: Vec<u8>,
    /// client_id → (client secret, whole token text)
    tokens: HashMap<String, (String, String)>,
    bearers: HashSet<String>,
    secrets: BTreeMap<String, StoredSecret>,
    calls: HashMap<String, usize>,
    faults: HashMap<String, VecDeque<Fault>>,
    delay: Duration,
    /// Delays for one kind of call, over `delay`.
    delays: HashMap<String, Duration>,
    /// What logins say of their token's lifetime; `None` is an hour.
    expires_in: Option<u64>,
    counter: u64,
}

impl FakeState {
    fn org_key(&self) -> SymmetricKey {
        // The fake's own key, made at start: 64 bytes by construction.
        SymmetricKey::from_bytes(&self.org_key_bytes)
            .unwrap_or_else(|_| unreachable!("64-byte key"))
    }

    fn uuid(&mut self) -> String {
        self.counter += 1;
        let mut random = [0_u8; 6];
        let _ = getrandom::fill(&mut random);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{}",
            self.counter,
            self.counter & 0xffff,
            self.counter & 0xfff,
            self.counter & 0xfff,
            hex(&random)
        )
    }

    fn encrypt(&self, text: &str) -> String {
        self.org_key()
            .encrypt(text.as_bytes())
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    fn full(&self, id: &str, secret: &StoredSecret) -> Value {
        let projects: Vec<Value> = secret
            .project
            .iter()
            .map(|p| json!({"id": p, "name": self.encrypt("project")}))
            .collect();
        json!({
            "id": id,
            "organizationId": self.org_id,
            "key": secret.key,
            "value": secret.value,
            "note": secret.note,
            "creationDate": "2026-01-26T21:46:02.2182556Z",
            "revisionDate": "2026-01-26T21:46:02.2182556Z",
            "projects": projects,
            "read": true,
            "write": true,
            "object": "secret",
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct FakeBitwarden {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<Mutex<FakeState>>,
    shutdown: CancellationToken,
}

impl FakeBitwarden {
    /// Serves plain HTTP.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_serving(None).await
    }

    /// Serves HTTPS with the given PEM certificate and key, as a self-hosted Bitwarden with its
    /// own CA would.
    pub async fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, HarnessError> {
        let loaded = secret_bridge::tls::load_certified_key(cert, key)
            .map_err(|e| HarnessError::Startup(e.to_string()))?;
        let acceptor =
            secret_bridge::tls::acceptor(secret_bridge::tls::CurrentCertificate::new(loaded))
                .map_err(|e| HarnessError::Startup(e.to_string()))?;
        Self::start_serving(Some(acceptor)).await
    }

    async fn start_serving(tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Self, HarnessError> {
        let mut org_key = vec![0_u8; 64];
        getrandom::fill(&mut org_key).map_err(|e| HarnessError::Startup(e.to_string()))?;
        let mut state = FakeState {
            org_key_bytes: org_key,
            ..FakeState::default()
        };
        state.org_id = state.uuid();
        let state = Arc::new(Mutex::new(state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let metrics = ConnectionMetrics::register(&prometheus::Registry::new())
            .map_err(|e| HarnessError::Startup(e.to_string()))?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    let handshake = move |tcp| acceptor.clone().accept(tcp);
                    http::serve("fake", listener, router, LIMITS, handshake, metrics, stop).await;
                }
                None => {
                    http::serve("fake", listener, router, LIMITS, http::plain, metrics, stop).await;
                }
            }
        });
        Ok(Self {
            addr,
            scheme,
            state,
            shutdown,
        })
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn identity_url(&self) -> String {
        format!("{}://{}/identity", self.scheme, self.addr)
    }

    pub fn api_url(&self) -> String {
        format!("{}://{}/api", self.scheme, self.addr)
    }

    pub fn organization(&self) -> String {
        self.lock().org_id.clone()
    }

    /// A new machine-account access token for the organisation.
    pub fn add_token(&self) -> String {
        let mut state = self.lock();
        let id = state.uuid();
        let mut secret = [0_u8; 15];
        let mut seed = [0_u8; 16];
        let _ = getrandom::fill(&mut secret);
        let _ = getrandom::fill(&mut seed);
        let client_secret = URL_SAFE_NO_PAD.encode(secret);
        let token = format!("0.{id}.{client_secret}:{}", STANDARD.encode(seed));
        state.tokens.insert(id, (client_secret, token.clone()));
        token
    }

    /// A well-formed access token no Bitwarden knows.
    pub fn unknown_token() -> String {
        let mut id = [0_u8; 16];
        let mut secret = [0_u8; 15];
        let mut seed = [0_u8; 16];
        let _ = getrandom::fill(&mut id);
        let _ = getrandom::fill(&mut secret);
        let _ = getrandom::fill(&mut seed);
        let id = hex(&id);
        format!(
            "0.{}-{}-{}-{}-{}.{}:{}",
            &id[..8],
            &id[8..12],
            &id[12..16],
            &id[16..20],
            &id[20..],
            URL_SAFE_NO_PAD.encode(secret),
            STANDARD.encode(seed)
        )
    }

    /// Revokes a token: its logins fail and its bearer tokens stop working.
    pub fn revoke(&self, token: &str) {
        let mut state = self.lock();
        state.tokens.retain(|_, (_, text)| text != token);
        state.bearers.clear();
    }

    pub fn add_secret(&self, key: &str, value: &str, note: &str, project: Option<&str>) -> String {
        let mut state = self.lock();
        let id = state.uuid();
        let secret = StoredSecret {
            key: state.encrypt(key),
            value: state.encrypt(value),
            note: state.encrypt(note),
            project: project.map(str::to_owned),
        };
        state.secrets.insert(id.clone(), secret);
        id
    }

    /// A secret whose value is encrypted under some other key: it cannot be decrypted.
    pub fn add_undecryptable_secret(&self, key: &str) -> String {
        let mut state = self.lock();
        let id = state.uuid();
        let other =
            SymmetricKey::from_bytes(&[9_u8; 64]).unwrap_or_else(|_| unreachable!("64 bytes"));
        let value = other
            .encrypt(b"lost")
            .map(|e| e.to_string())
            .unwrap_or_default();
        let secret = StoredSecret {
            key: state.encrypt(key),
            value,
            note: state.encrypt(""),
            project: None,
        };
        state.secrets.insert(id.clone(), secret);
        id
    }

    /// The decrypted value of a stored secret, as Bitwarden's web vault would show it.
    pub fn value_of(&self, id: &str) -> Option<(String, String, String, Option<String>)> {
        let state = self.lock();
        let key = state.org_key();
        let secret = state.secrets.get(id)?;
        let open = |text: &str| -> Option<String> {
            let plain = key.decrypt(&text.parse().ok()?).ok()?;
            String::from_utf8(plain.to_vec()).ok()
        };
        Some((
            open(&secret.key)?,
            open(&secret.value)?,
            open(&secret.note)?,
            secret.project.clone(),
        ))
    }

    /// How many calls of a kind were served: `login`, `list`, `sync`, `get`, `get-by-ids`,
    /// `create`, `update`, `delete`.
    pub fn calls(&self, kind: &str) -> usize {
        self.lock().calls.get(kind).copied().unwrap_or(0)
    }

    /// Every call of every kind but logins.
    pub fn data_calls(&self) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|(kind, _)| kind.as_str() != "login")
            .map(|(_, count)| count)
            .sum()
    }

    pub fn fail_next(&self, kind: &str, fault: Fault) {
        self.lock()
            .faults
            .entry(kind.to_owned())
            .or_default()
            .push_back(fault);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Delays only calls of one kind (`login`, `sync`, …).
    pub fn set_delay_for(&self, kind: &str, delay: Duration) {
        self.lock().delays.insert(kind.to_owned(), delay);
    }

    /// What the next logins say of their token's lifetime, whatever the number.
    pub fn set_expires_in(&self, seconds: u64) {
        self.lock().expires_in = Some(seconds);
    }

    /// The organisation's key, as Bitwarden keeps it: to look for it where it must not be.
    pub fn organization_key(&self) -> Vec<u8> {
        self.lock().org_key_bytes.clone()
    }

    /// Every bearer token stops working, as when they expire: the next data call gets 401.
    pub fn expire_bearers(&self) {
        self.lock().bearers.clear();
    }
}

impl Drop for FakeBitwarden {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn json_answer(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn not_found() -> Response {
    json_answer(
        StatusCode::NOT_FOUND,
        &json!({"message": "Resource not found.", "object": "error"}),
    )
}

async fn handle(
    State(state): State<Arc<Mutex<FakeState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path: Vec<String> = uri
        .path()
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    let kind = match (&method, segments.as_slice()) {
        (&Method::POST, ["identity", "connect", "token"]) => "login",
        (&Method::GET, ["api", "organizations", _, "secrets"]) => "list",
        (&Method::GET, ["api", "organizations", _, "secrets", "sync"]) => "sync",
        (&Method::POST, ["api", "organizations", _, "secrets"]) => "create",
        (&Method::POST, ["api", "secrets", "get-by-ids"]) => "get-by-ids",
        (&Method::POST, ["api", "secrets", "delete"]) => "delete",
        (&Method::GET, ["api", "secrets", _]) => "get",
        (&Method::PUT, ["api", "secrets", _]) => "update",
        _ => return not_found(),
    };
    let (delay, fault) = {
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        *state.calls.entry(kind.to_owned()).or_default() += 1;
        let fault = state.faults.get_mut(kind).and_then(VecDeque::pop_front);
        let delay = state.delays.get(kind).copied().unwrap_or(state.delay);
        (delay, fault)
    };
    // The answer is what Bitwarden holds when the call arrives; the delay is the way back.
    let response = match fault {
        Some(fault) => {
            let mut response = (
                StatusCode::from_u16(fault.status).unwrap_or(StatusCode::BAD_REQUEST),
                fault.body,
            )
                .into_response();
            if let Some(seconds) = fault.retry_after
                && let Ok(value) = seconds.to_string().parse()
            {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        None => answer(&state, kind, &segments, &headers, &body),
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

fn answer(
    state: &Mutex<FakeState>,
    kind: &str,
    segments: &[&str],
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    if kind == "login" {
        return login(&mut state, body);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !state.bearers.contains(bearer) {
        return (StatusCode::UNAUTHORIZED, "").into_response();
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match kind {
        "list" | "sync" => {
            if segments[2] != state.org_id {
                return not_found();
            }
            if kind == "sync" {
                let data: Vec<Value> = state
                    .secrets
                    .iter()
                    .map(|(id, s)| state.full(id, s))
                    .collect();
                return json_answer(
                    StatusCode::OK,
                    &json!({"hasChanges": true, "secrets": {"data": data}}),
                );
            }
            let secrets: Vec<Value> = state
                .secrets
                .iter()
                .map(|(id, s)| {
                    let mut item = state.full(id, s);
                    if let Some(object) = item.as_object_mut() {
                        object.remove("value");
                        object.remove("note");
                    }
                    item
                })
                .collect();
            json_answer(
                StatusCode::OK,
                &json!({"secrets": secrets, "projects": [], "object": "SecretsWithProjectsList"}),
            )
        }
        "get" => match state.secrets.get(segments[2]) {
            Some(secret) => json_answer(StatusCode::OK, &state.full(segments[2], secret)),
            None => not_found(),
        },
        "get-by-ids" => {
            let ids: Vec<String> =
                serde_json::from_value(request["ids"].clone()).unwrap_or_default();
            if ids.iter().any(|id| !state.secrets.contains_key(id)) {
                return not_found();
            }
            let data: Vec<Value> = ids
                .iter()
                .map(|id| state.full(id, &state.secrets[id]))
                .collect();
            json_answer(
                StatusCode::OK,
                &json!({"data": data, "continuationToken": null, "object": "list"}),
            )
        }
        "create" | "update" => {
            let key = state.org_key();
            let readable = ["key", "value", "note"].iter().all(|field| {
                request[*field]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .is_some_and(|e| key.decrypt(&e).is_ok())
            });
            if !readable {
                return json_answer(
                    StatusCode::BAD_REQUEST,
                    &json!({"message": "The model state is invalid."}),
                );
            }
            let id = if kind == "create" {
                state.uuid()
            } else if state.secrets.contains_key(segments[2]) {
                segments[2].to_owned()
            } else {
                return not_found();
            };
            let text = |field: &str| request[field].as_str().unwrap_or_default().to_owned();
            let secret = StoredSecret {
                key: text("key"),
                value: text("value"),
                note: text("note"),
                project: request["projectIds"][0].as_str().map(str::to_owned),
            };
            let answer = state.full(&id, &secret);
            state.secrets.insert(id, secret);
            json_answer(StatusCode::OK, &answer)
        }
        "delete" => {
            let ids: Vec<String> = serde_json::from_value(request).unwrap_or_default();
            // Bitwarden answers 404 for the whole request when one id is unknown.
            if ids.iter().any(|id| !state.secrets.contains_key(id)) {
                return not_found();
            }
            for id in &ids {
                state.secrets.remove(id);
            }
            let data: Vec<Value> = ids
                .iter()
                .map(|id| json!({"id": id, "error": null}))
                .collect();
            json_answer(StatusCode::OK, &json!({"data": data, "object": "list"}))
        }
        _ => not_found(),
    }
}

fn login(state: &mut FakeState, body: &Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let expected = ["scope", "client_id", "client_secret", "grant_type"];
    let exact = form.len() == expected.len()
        && form.get("scope").map(String::as_str) == Some("api.secrets")
        && form.get("grant_type").map(String::as_str) == Some("client_credentials");
    let known = form
        .get("client_id")
        .and_then(|id| state.tokens.get(id))
        .filter(|(secret, _)| form.get("client_secret") == Some(secret))
        .map(|(_, token)| token.clone());
    let (true, Some(token)) = (exact, known) else {
        return json_answer(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_client", "error_description": "invalid_client"}),
        );
    };
    let Ok(parsed) = token.parse::<AccessToken>() else {
        return json_answer(StatusCode::BAD_REQUEST, &json!({"error": "invalid_client"}));
    };
    let claims = json!({
        "exp": 4_102_444_800_u64,
        "sub": parsed.id,
        "scope": ["api.secrets"],
        "organization": state.org_id,
        "nonce": state.counter,
    });
    state.counter += 1;
    let jwt = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"at+jwt"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"not-a-signature")
    );
    state.bearers.insert(jwt.clone());
    let payload = json!({"encryptionKey": STANDARD.encode(&state.org_key_bytes)}).to_string();
    let encrypted = parsed
        .key
        .encrypt(payload.as_bytes())
        .map(|e| e.to_string())
        .unwrap_or_default();
    json_answer(
        StatusCode::OK,
        &json!({
            "access_token": jwt,
            "expires_in": state.expires_in.unwrap_or(3600),
            "token_type": "Bearer",
            "scope": "api.secrets",
            "encrypted_payload": encrypted,
        }),
    )
}
