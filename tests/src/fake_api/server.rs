//! The HTTP face of the fake API server: Kubernetes REST paths, query parameters, patch content
//! types, watch streams and `Status` error bodies.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::kinds::{self, KINDS};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{self, ApiError, PatchType, Propagation, Store, Write};

pub struct Shared {
    pub store: Mutex<Store>,
    pub bookmark_interval: Duration,
    pub shutdown: CancellationToken,
    pub requests: Mutex<Vec<ApiRequest>>,
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The header the harness's own client sends, so its requests can be told from a service's.
pub const HARNESS_HEADER: &str = "x-hearth-harness";

/// One request as RBAC sees it (its request attributes), for checking what a service asks of
/// the API against what its manifests grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    /// get, list, watch, create, update, patch or delete.
    pub verb: &'static str,
    pub group: String,
    /// The plural, e.g. `secrets`.
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    /// From the path, or for a list or watch from a `metadata.name` field selector, as the
    /// API server does when it authorizes by resourceNames.
    pub name: Option<String>,
    pub from_harness: bool,
    /// Who asked: the product of the User-Agent (`hearth-db-provisioner`), empty when none.
    pub agent: String,
    /// Asked for metadata only (`PartialObjectMetadata`): no data of the object was sent.
    pub metadata_only: bool,
}

fn request_attributes(
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> ApiRequest {
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watching => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    };
    let selected_name = query.get("fieldSelector").and_then(|selector| {
        selector
            .strip_prefix("metadata.name=")
            .filter(|name| !name.contains(','))
            .map(str::to_owned)
    });
    let kind = &KINDS[target.kind];
    ApiRequest {
        verb,
        group: kind.group.to_owned(),
        resource: kind.plural.to_owned(),
        subresource: target.status.then(|| "status".to_owned()),
        namespace: target.namespace.clone(),
        name: target.name.clone().or(selected_name),
        from_harness: headers.contains_key(HARNESS_HEADER),
        agent: headers
            .get(header::USER_AGENT)
            .and_then(|agent| agent.to_str().ok())
            .and_then(|agent| agent.split('/').next())
            .unwrap_or_default()
            .to_owned(),
        metadata_only: wants_metadata_only(headers),
    }
}

/// What a request's path names.
struct Target {
    kind: usize,
    /// `Some` for a namespaced path; `None` for cluster-scoped kinds and all-namespace lists.
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn not_found_path() -> ApiError {
    let mut error = ApiError::bad_request("the server could not find the requested resource");
    error.code = 404;
    error.reason = "NotFound";
    error
}

fn resolve(path: &str) -> Result<Target, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found_path()),
    };
    let namespaced_path = rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && !(group.is_empty() && matches!(rest[2], "status" | "finalize"));
    let (namespace, rest) = if namespaced_path {
        (Some(rest[1].to_owned()), &rest[2..])
    } else {
        (None, rest)
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(not_found_path()),
    };
    let kind = kinds::find(group, version, plural).ok_or_else(not_found_path)?;
    let namespaced = KINDS[kind].namespaced;
    if (namespace.is_some() && !namespaced) || (namespace.is_none() && namespaced && name.is_some())
    {
        return Err(not_found_path());
    }
    let status = match subresource {
        None => false,
        Some("status") => true,
        Some(_) => return Err(not_found_path()),
    };
    Ok(Target {
        kind,
        namespace,
        name: name.map(str::to_owned),
        status,
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(error: &ApiError) -> Response {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &error.status())
}

pub async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path() == "/version" {
        return json_response(StatusCode::OK, &version());
    }
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let metadata_only = wants_metadata_only(&headers);
    let result = resolve(uri.path()).and_then(|target| {
        shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request_attributes(&method, &target, &query, &headers));
        dispatch(&shared, &method, &target, &query, &headers, &body)
    });
    match result {
        Ok(Reply::Object(code, value)) if metadata_only && code.is_success() => {
            json_response(code, &partial_metadata(&value))
        }
        Ok(Reply::Object(code, value)) => json_response(code, &value),
        Ok(Reply::Watch(mut start)) => {
            start.metadata_only = metadata_only;
            watch(&shared, start)
        }
        Err(error) => error_response(&error),
    }
}

/// Whether the client asked for metadata only (`kube`'s metadata watcher does), as in
/// `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`.
fn wants_metadata_only(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("as=PartialObjectMetadata"))
}

/// An object or a list cut down to metadata, as the real server answers a metadata request:
/// nothing else of the object (a Secret's data least of all) leaves the server.
fn partial_metadata(value: &Value) -> Value {
    let one = |object: &Value| {
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": object["metadata"],
        })
    };
    match value["items"].as_array() {
        Some(items) => json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList",
            "metadata": value["metadata"],
            "items": items.iter().map(one).collect::<Vec<_>>(),
        }),
        None => one(value),
    }
}

enum Reply {
    Object(StatusCode, Value),
    Watch(WatchRequest),
}

struct WatchRequest {
    kind: usize,
    namespace: Option<String>,
    from: Option<u64>,
    labels: LabelSelector,
    fields: FieldSelector,
    bookmarks: bool,
    initial_events_end: bool,
    timeout: Option<Duration>,
    metadata_only: bool,
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn field_manager(query: &HashMap<String, String>, headers: &HeaderMap) -> String {
    query.get("fieldManager").cloned().unwrap_or_else(|| {
        headers
            .get(header::USER_AGENT)
            .and_then(|agent| agent.to_str().ok())
            .and_then(|agent| agent.split('/').next())
            .filter(|agent| !agent.is_empty())
            .unwrap_or("unknown")
            .to_owned()
    })
}

fn dispatch(
    shared: &Shared,
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Reply, ApiError> {
    let kind = target.kind;
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let manager = field_manager(query, headers);
    let write = Write {
        manager: &manager,
        status: target.status,
    };
    let ok = |value| Ok(Reply::Object(StatusCode::OK, value));
    let Some(name) = target.name.as_deref() else {
        return match *method {
            Method::GET => {
                let labels =
                    LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
                        .map_err(ApiError::bad_request)?;
                let fields =
                    FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
                        .map_err(ApiError::bad_request)?;
                if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    return Ok(Reply::Watch(watch_request(target, query, labels, fields)?));
                }
                let limit =
                    match query.get("limit") {
                        Some(limit) => Some(limit.parse().map_err(|_| {
                            ApiError::bad_request(format!("invalid limit {limit:?}"))
                        })?),
                        None => None,
                    };
                let continue_token = query
                    .get("continue")
                    .map(String::as_str)
                    .filter(|c| !c.is_empty());
                ok(shared.store().list(
                    kind,
                    target.namespace.as_deref(),
                    &labels,
                    &fields,
                    limit,
                    continue_token,
                )?)
            }
            Method::POST if target.namespace.is_some() || !KINDS[kind].namespaced => {
                let created =
                    shared
                        .store()
                        .create(kind, namespace, parse_body(body)?, &manager)?;
                Ok(Reply::Object(StatusCode::CREATED, created))
            }
            _ => Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on this collection by the fake API server"
            ))),
        };
    };
    match *method {
        Method::GET => ok(shared.store().get(kind, namespace, name)?),
        Method::PUT => {
            ok(shared
                .store()
                .replace(kind, namespace, name, parse_body(body)?, &write)?)
        }
        Method::PATCH => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or_default();
            let patch_type = match content_type.split(';').next().unwrap_or_default().trim() {
                "application/apply-patch+yaml" => {
                    if !query.contains_key("fieldManager") {
                        return Err(ApiError::bad_request(
                            "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
                        ));
                    }
                    PatchType::Apply {
                        force: query.get("force").is_some_and(|f| f == "true"),
                    }
                }
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    PatchType::Merge
                }
                "application/json-patch+json" => PatchType::Json,
                other => {
                    return Err(ApiError::unsupported_media_type(format!(
                        "the body of the request was in an unknown format - accepted media types \
                         include: application/json-patch+json, application/merge-patch+json, \
                         application/apply-patch+yaml; got {other:?}"
                    )));
                }
            };
            let patch = parse_body(body).map_err(|e| match patch_type {
                PatchType::Apply { .. } => ApiError::bad_request(format!(
                    "the fake API server takes apply patches written as JSON only: {}",
                    e.message
                )),
                _ => e,
            })?;
            ok(shared
                .store()
                .patch(kind, namespace, name, patch_type, patch, &write)?)
        }
        Method::DELETE => {
            let options = if body.is_empty() {
                json!({})
            } else {
                parse_body(body)?
            };
            let policy = query
                .get("propagationPolicy")
                .map(String::as_str)
                .or_else(|| options["propagationPolicy"].as_str());
            let propagation = match policy {
                Some("Orphan") => Propagation::Orphan,
                // Foreground deletion is served as Background: dependents go after the owner.
                None | Some("Background" | "Foreground") => Propagation::Background,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "unknown propagationPolicy {other:?}"
                    )));
                }
            };
            let preconditions = options["preconditions"].clone();
            ok(shared
                .store()
                .delete(kind, namespace, name, propagation, &preconditions)?)
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on an object"
        ))),
    }
}

fn watch_request(
    target: &Target,
    query: &HashMap<String, String>,
    labels: LabelSelector,
    fields: FieldSelector,
) -> Result<WatchRequest, ApiError> {
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let initial_events = flag("sendInitialEvents");
    let from =
        match query.get("resourceVersion").map(String::as_str) {
            _ if initial_events => None,
            None | Some("" | "0") => None,
            Some(version) => Some(version.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {version:?}"))
            })?),
        };
    let timeout = match query.get("timeoutSeconds") {
        Some(seconds) => Some(Duration::from_secs(seconds.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {seconds:?}"))
        })?)),
        None => None,
    };
    Ok(WatchRequest {
        kind: target.kind,
        namespace: target.namespace.clone(),
        from,
        labels,
        fields,
        bookmarks: flag("allowWatchBookmarks"),
        initial_events_end: initial_events,
        timeout,
        metadata_only: false,
    })
}

fn bookmark(kind: usize, revision: u64, initial_events_end: bool) -> Value {
    let mut object = json!({
        "kind": KINDS[kind].kind,
        "apiVersion": KINDS[kind].api_version(),
        "metadata": {"resourceVersion": revision.to_string()},
    });
    if initial_events_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": object})
}

fn line(event: &Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("{event}\n")))
}

/// One watch event carrying `object`, cut down to metadata when that was asked for.
fn change(kind: &str, object: &Value, metadata_only: bool) -> Value {
    if metadata_only {
        json!({"type": kind, "object": partial_metadata(object)})
    } else {
        json!({"type": kind, "object": object})
    }
}

/// Streams watch events as the real server does: one JSON object per line, in resourceVersion
/// order, with bookmarks, and an ERROR event carrying 410 when the start is too old.
fn watch(shared: &Arc<Shared>, request: WatchRequest) -> Response {
    let (sender, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let start = shared
        .store()
        .watch(request.kind, request.namespace.as_deref(), request.from);
    let shutdown = shared.shutdown.clone();
    let bookmark_interval = shared.bookmark_interval;
    tokio::spawn(async move {
        let mut start = match start {
            Ok(start) => start,
            Err(error) => {
                let event = json!({"type": "ERROR", "object": error.status()});
                let _ = sender.send(line(&event)).await;
                return;
            }
        };
        let in_scope = |record: &store::Record| {
            record.kind == request.kind
                && request
                    .namespace
                    .as_deref()
                    .is_none_or(|ns| ns == record.namespace)
        };
        let admits = |object: &Value| {
            request
                .labels
                .matches(object["metadata"]["labels"].as_object())
                && request.fields.matches(object)
        };
        for object in start.initial.iter().filter(|o| admits(o)) {
            let event = change("ADDED", object, request.metadata_only);
            if sender.send(line(&event)).await.is_err() {
                return;
            }
        }
        let mut seen = start.revision;
        if request.initial_events_end {
            let _ = sender.send(line(&bookmark(request.kind, seen, true))).await;
        }
        for record in &start.backlog {
            seen = record.revision;
            if let Some(event) = store::visible_as(record, &request.labels, &request.fields) {
                let event = change(event.as_str(), &record.object, request.metadata_only);
                if sender.send(line(&event)).await.is_err() {
                    return;
                }
            }
        }
        let deadline = tokio::time::sleep(request.timeout.unwrap_or(Duration::MAX / 4));
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval(bookmark_interval);
        ticks.tick().await;
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut deadline => return,
                () = sender.closed() => return,
                _ = ticks.tick(), if request.bookmarks => bookmark(request.kind, seen, false),
                received = start.receiver.recv() => match received {
                    Ok(record) if record.revision <= seen => continue,
                    Ok(record) => {
                        seen = record.revision;
                        if !in_scope(&record) {
                            continue;
                        }
                        match store::visible_as(&record, &request.labels, &request.fields) {
                            Some(event) => change(event.as_str(), &record.object, request.metadata_only),
                            None => continue,
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let error = ApiError::gone("the watch fell too far behind; start again");
                        json!({"type": "ERROR", "object": error.status()})
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            let fatal = event["type"] == "ERROR";
            if sender.send(line(&event)).await.is_err() || fatal {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0+hearth-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}
