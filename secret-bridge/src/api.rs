//! The ESO-facing API: the Bitwarden SDK server's routes, headers, bodies and status codes, as
//! External Secrets Operator's `bitwardensecretsmanager` provider uses them.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::bridge::{Bridge, BridgeError, Caller};
use crate::crypto::AccessToken;
use crate::metrics::Metrics;
use crate::upstream::SecretWrite;
use crate::upstreams::{AllowList, UpstreamUrl};

pub const DEFAULT_API_URL: &str = "https://api.bitwarden.com";
pub const DEFAULT_IDENTITY_URL: &str = "https://identity.bitwarden.com";
/// ESO's bodies are a few hundred bytes; anything near this is not ESO.
const MAX_BODY: usize = 256 * 1024;
/// Every answer goes out within this, whatever Bitwarden does: ESO gives up after 10 s.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(8);

pub struct ApiState {
    pub bridge: Arc<Bridge>,
    /// The Bitwarden servers a request may name as its API or identity server.
    pub allowed_upstreams: AllowList,
    pub metrics: Metrics,
}

pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route(
            "/rest/api/1/secret",
            get(get_secret)
                .post(create_secret)
                .put(update_secret)
                .delete(delete_secrets),
        )
        .route("/rest/api/1/secrets", get(list_secrets))
        .route("/rest/api/1/secrets-by-ids", get(get_secrets_by_ids));
    Router::new()
        .route("/ready", get(|| async { "ready" }))
        .route("/live", get(|| async { "live" }))
        .merge(api)
        .fallback(|| async { failure(StatusCode::NOT_FOUND, "404 page not found") })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn count_requests(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| match path.as_str() {
            "/rest/api/1/secret" => "secret",
            "/rest/api/1/secrets" => "secrets",
            "/rest/api/1/secrets-by-ids" => "secrets-by-ids",
            "/ready" => "ready",
            "/live" => "live",
            _ => "other",
        });
    // Labels come from fixed sets only: a client can invent methods, not series.
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    let response = match tokio::time::timeout(REQUEST_DEADLINE, next.run(request)).await {
        Ok(response) => response,
        Err(_) => failure(
            StatusCode::BAD_REQUEST,
            &format!(
                "Bitwarden did not answer within {}s",
                REQUEST_DEADLINE.as_secs()
            ),
        )
        .into_response(),
    };
    let route = format!("{method} {route}");
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// An error as the SDK server writes one: `http.Error`'s text body and headers.
pub struct Failure {
    status: StatusCode,
    message: String,
}

fn failure(status: StatusCode, message: &str) -> Failure {
    Failure {
        status,
        message: message.to_owned(),
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let headers = [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ];
        (self.status, headers, format!("{}\n", self.message)).into_response()
    }
}

fn success<T: Serialize>(body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        Err(error) => {
            failure(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()).into_response()
        }
    }
}

#[derive(Serialize)]
struct Data<T> {
    data: T,
}

/// A header's text, trimmed; `Ok("")` when absent. A value that is not visible ASCII is an
/// error, never taken as empty: a stray non-breaking space in a self-hosted store's URL must not
/// send its credentials to Bitwarden's cloud.
fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, Failure> {
    match headers.get(name) {
        None => Ok(""),
        Some(value) => value.to_str().map(str::trim).map_err(|_| {
            failure(
                StatusCode::BAD_REQUEST,
                &format!("the {name} header is not plain ASCII text; check for stray characters"),
            )
        }),
    }
}

/// The Bitwarden server a Warden URL header names (Bitwarden's cloud when empty), if the
/// allow-list lets requests go there.
fn upstream(
    state: &ApiState,
    headers: &HeaderMap,
    name: &str,
    default: &str,
) -> Result<String, Failure> {
    let given = header_text(headers, name)?;
    let text = if given.is_empty() { default } else { given };
    let url = UpstreamUrl::parse(text).map_err(|why| {
        failure(
            StatusCode::BAD_REQUEST,
            &format!("the {name} header is not a usable URL: {why}"),
        )
    })?;
    if !state.allowed_upstreams.allows(&url) {
        return Err(failure(
            StatusCode::FORBIDDEN,
            &format!("upstream URL not allowed: {url} (see ALLOWED_UPSTREAMS)"),
        ));
    }
    Ok(url.to_string())
}

/// Reads the Warden headers and logs in (or finds the session), before the body is read, as
/// the SDK server does.
async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Caller, Failure> {
    let token_text = header_text(headers, "warden-access-token")?;
    if token_text.is_empty() {
        return Err(failure(
            StatusCode::UNAUTHORIZED,
            "Missing Warden access token",
        ));
    }
    let identity_url = upstream(state, headers, "warden-identity-url", DEFAULT_IDENTITY_URL)?;
    let api_url = upstream(state, headers, "warden-api-url", DEFAULT_API_URL)?;
    let token: AccessToken = token_text.parse().map_err(|error| {
        failure(
            StatusCode::BAD_REQUEST,
            &format!("failed to login to bitwarden using access token: {error}"),
        )
    })?;
    let caller = Caller::new(token_text, token, identity_url, api_url);
    state.bridge.login(&caller).await.map_err(|error| {
        bridge_failure("failed to login to bitwarden using access token: ", &error)
    })?;
    Ok(caller)
}

fn bridge_failure(prefix: &str, error: &BridgeError) -> Failure {
    failure(StatusCode::BAD_REQUEST, &format!("{prefix}{error}"))
}

/// A JSON object read the way Go's `encoding/json` reads into a struct: keys matched without
/// regard to case, unknown keys ignored, absent or null fields empty.
pub struct Body(Map<String, Value>);

impl Body {
    pub fn parse(bytes: &Bytes, status: StatusCode) -> Result<Self, Failure> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(other) => Err(failure(
                status,
                &format!(
                    "json: cannot unmarshal {} into a request object",
                    kind_of(&other)
                ),
            )),
            Err(error) => Err(failure(status, &error.to_string())),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    pub fn text(&self, name: &str, status: StatusCode) -> Result<String, Failure> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(other) => Err(failure(
                status,
                &format!(
                    "json: cannot unmarshal {} into field {name} of type string",
                    kind_of(other)
                ),
            )),
        }
    }

    pub fn list(&self, name: &str, status: StatusCode) -> Result<Vec<String>, Failure> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(text.clone()),
                    other => Err(failure(
                        status,
                        &format!(
                            "json: cannot unmarshal {} into field {name} of type []string",
                            kind_of(other)
                        ),
                    )),
                })
                .collect(),
            Some(other) => Err(failure(
                status,
                &format!(
                    "json: cannot unmarshal {} into field {name} of type []string",
                    kind_of(other)
                ),
            )),
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Serves one API call: the caller first (token, allow-list, login), then `handle`, whose
/// Bitwarden failure becomes a 400 starting with `failed`.
async fn answer<T: Serialize>(
    state: &ApiState,
    headers: &HeaderMap,
    failed: &str,
    handle: impl AsyncFnOnce(&Caller) -> Result<Result<T, BridgeError>, Failure>,
) -> Response {
    let outcome = async {
        let caller = caller(state, headers).await?;
        match handle(&caller).await? {
            Ok(value) => Ok(success(&value)),
            Err(error) => Err(bridge_failure(failed, &error)),
        }
    }
    .await;
    outcome.unwrap_or_else(IntoResponse::into_response)
}

// The SDK server answers a bad body on its GET routes with 500 and on the others with 400.
const GET_BODY_ERROR: StatusCode = StatusCode::INTERNAL_SERVER_ERROR;
const WRITE_BODY_ERROR: StatusCode = StatusCode::BAD_REQUEST;

async fn get_secret(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(&state, &headers, "failed to get secret: ", async |caller| {
        let id = Body::parse(&body, GET_BODY_ERROR)?.text("id", GET_BODY_ERROR)?;
        Ok(state.bridge.get(caller, &id).await)
    })
    .await
}

// The SDK server's wording for a failed list is its wording for a failed get; kept as ESO
// users know it. ESO sends "organizationID", which Go matched to organizationId.
async fn list_secrets(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(&state, &headers, "failed to get secret: ", async |caller| {
        let organization =
            Body::parse(&body, GET_BODY_ERROR)?.text("organizationId", GET_BODY_ERROR)?;
        Ok(state
            .bridge
            .list(caller, &organization)
            .await
            .map(|data| Data { data }))
    })
    .await
}

async fn get_secrets_by_ids(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(
        &state,
        &headers,
        "failed to get secrets: ",
        async |caller| {
            let ids = Body::parse(&body, GET_BODY_ERROR)?.list("ids", GET_BODY_ERROR)?;
            Ok(state
                .bridge
                .get_by_ids(caller, &ids)
                .await
                .map(|data| Data { data }))
        },
    )
    .await
}

async fn delete_secrets(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(&state, &headers, "", async |caller| {
        let ids = Body::parse(&body, WRITE_BODY_ERROR)?.list("ids", WRITE_BODY_ERROR)?;
        Ok(state
            .bridge
            .delete(caller, &ids)
            .await
            .map(|data| Data { data }))
    })
    .await
}

struct WriteRequest {
    id: String,
    key: String,
    value: String,
    note: String,
    organization: String,
    project_ids: Vec<String>,
}

fn write_request(bytes: &Bytes) -> Result<WriteRequest, Failure> {
    let body = Body::parse(bytes, WRITE_BODY_ERROR)?;
    Ok(WriteRequest {
        id: body.text("id", WRITE_BODY_ERROR)?,
        key: body.text("key", WRITE_BODY_ERROR)?,
        value: body.text("value", WRITE_BODY_ERROR)?,
        note: body.text("note", WRITE_BODY_ERROR)?,
        organization: body.text("organizationId", WRITE_BODY_ERROR)?,
        project_ids: body.list("projectIds", WRITE_BODY_ERROR)?,
    })
}

impl WriteRequest {
    fn write(&self) -> SecretWrite<'_> {
        SecretWrite {
            key: &self.key,
            value: &self.value,
            note: &self.note,
            project_ids: &self.project_ids,
        }
    }
}

async fn create_secret(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(
        &state,
        &headers,
        "failed to create secret: ",
        async |caller| {
            let request = write_request(&body)?;
            Ok(state
                .bridge
                .create(caller, &request.organization, &request.write())
                .await)
        },
    )
    .await
}

async fn update_secret(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(
        &state,
        &headers,
        "failed to update secret: ",
        async |caller| {
            let request = write_request(&body)?;
            Ok(state
                .bridge
                .update(caller, &request.id, &request.write())
                .await)
        },
    )
    .await
}
