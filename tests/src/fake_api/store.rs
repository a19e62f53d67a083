//! The fake API server's objects and the semantics of every write, kept apart from HTTP.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::fields::{self, FieldSet};
use super::kinds::{KINDS, Kind, NAMESPACE, SECRET};
use super::selectors::{FieldSelector, LabelSelector};

/// Watch history kept for resuming watches; older resourceVersions answer 410 Gone.
const HISTORY_LIMIT: usize = 100_000;

#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, kind: &Kind, name: &str) -> Self {
        let mut details = json!({"name": name, "kind": kind.plural});
        if !kind.group.is_empty() {
            details["group"] = json!(kind.group);
        }
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(kind: &Kind, name: &str) -> Self {
        let message = format!("{} \"{name}\" not found", kind.qualified_plural());
        Self::new(404, "NotFound", message).about(kind, name)
    }

    fn already_exists(kind: &Kind, name: &str) -> Self {
        let message = format!("{} \"{name}\" already exists", kind.qualified_plural());
        Self::new(409, "AlreadyExists", message).about(kind, name)
    }

    fn conflict(kind: &Kind, name: &str, why: &str) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            kind.qualified_plural()
        );
        Self::new(409, "Conflict", message).about(kind, name)
    }

    pub fn invalid(kind: &Kind, name: &str, why: &str) -> Self {
        let message = format!("{} \"{name}\" is invalid: {why}", kind.kind);
        Self::new(422, "Invalid", message).about(kind, name)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    /// The `Status` object the real server sends as an error body.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it. `previous` lets a selector watch turn a change of labels
/// into ADDED or DELETED, as the real server does.
#[derive(Debug)]
pub struct Record {
    pub revision: u64,
    pub kind: usize,
    pub namespace: String,
    pub event: EventType,
    pub object: Value,
    pub previous: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    Apply,
    Update,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Manager {
    name: String,
    operation: Operation,
    subresource: &'static str,
}

#[derive(Clone, Debug)]
struct Ownership {
    fields: FieldSet,
    time: String,
}

type Managers = BTreeMap<Manager, Ownership>;

struct Stored {
    object: Value,
    managers: Managers,
}

type Key = (usize, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Orphan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Apply { force: bool },
    Merge,
    Json,
}

/// Who writes and where: the field manager and whether the write targets `/status`.
pub struct Write<'a> {
    pub manager: &'a str,
    pub status: bool,
}

impl Write<'_> {
    fn subresource(&self) -> &'static str {
        if self.status { "status" } else { "" }
    }
}

pub struct Store {
    objects: BTreeMap<Key, Stored>,
    revision: u64,
    uids: u64,
    history: VecDeque<Arc<Record>>,
    /// The newest revision no longer in `history`; a watch must start at or after it.
    compacted: u64,
    sender: broadcast::Sender<Arc<Record>>,
}

pub struct WatchStart {
    pub initial: Vec<Value>,
    pub backlog: Vec<Arc<Record>>,
    pub revision: u64,
    pub receiver: broadcast::Receiver<Arc<Record>>,
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta(object: &Value, field: &str) -> Option<String> {
    object["metadata"][field].as_str().map(str::to_owned)
}

fn finalizers(object: &Value) -> usize {
    object["metadata"]["finalizers"]
        .as_array()
        .map_or(0, Vec::len)
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Store {
    pub fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            revision: 1,
            uids: 0,
            history: VecDeque::new(),
            compacted: 1,
            sender: broadcast::channel(16_384).0,
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Forgets the watch history, as etcd compaction does: older resourceVersions become Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.revision;
    }

    pub fn get(&self, kind: usize, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .map(|stored| self.render(kind, stored))
            .ok_or_else(|| ApiError::not_found(&KINDS[kind], name))
    }

    fn render(&self, kind: usize, stored: &Stored) -> Value {
        let mut object = stored.object.clone();
        let api_version = KINDS[kind].api_version();
        let managed: Vec<Value> = stored
            .managers
            .iter()
            .filter(|(_, ownership)| !ownership.fields.is_empty())
            .map(|(manager, ownership)| {
                let mut entry = json!({
                    "manager": manager.name,
                    "operation": match manager.operation { Operation::Apply => "Apply", Operation::Update => "Update" },
                    "apiVersion": api_version,
                    "time": ownership.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields::fields_v1(&ownership.fields),
                });
                if !manager.subresource.is_empty() {
                    entry["subresource"] = json!(manager.subresource);
                }
                entry
            })
            .collect();
        if !managed.is_empty() {
            object["metadata"]["managedFields"] = Value::Array(managed);
        }
        object
    }

    pub fn list(
        &self,
        kind: usize,
        namespace: Option<&str>,
        labels: &LabelSelector,
        field_selector: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let after = match continue_token {
            Some(token) => Some(self.decode_continue(token)?),
            None => None,
        };
        let mut matching = self
            .objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
            .filter(|((_, ns, name), _)| {
                after
                    .as_ref()
                    .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
            })
            .map(|(_, stored)| self.render(kind, stored))
            .filter(|object| {
                labels.matches(object["metadata"]["labels"].as_object())
                    && field_selector.matches(object)
            });
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let items: Vec<Value> = matching.by_ref().take(limit).collect();
        let remaining = matching.count();
        let mut metadata = json!({"resourceVersion": self.revision.to_string()});
        if remaining > 0
            && let Some(last) = items.last()
        {
            let position = json!({
                "rv": self.revision,
                "ns": meta(last, "namespace").unwrap_or_default(),
                "name": meta(last, "name").unwrap_or_default(),
            });
            metadata["continue"] = json!(URL_SAFE_NO_PAD.encode(position.to_string()));
            metadata["remainingItemCount"] = json!(remaining);
        }
        let kind = &KINDS[kind];
        Ok(json!({
            "kind": format!("{}List", kind.kind),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    fn decode_continue(&self, token: &str) -> Result<(String, String), ApiError> {
        let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let position: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        let revision = position["rv"].as_u64().ok_or_else(bad)?;
        if revision < self.compacted {
            return Err(ApiError::gone(
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            ));
        }
        let namespace = position["ns"].as_str().ok_or_else(bad)?.to_owned();
        let name = position["name"].as_str().ok_or_else(bad)?.to_owned();
        Ok((namespace, name))
    }

    /// Everything a new watch needs, taken under one lock so no change falls between the
    /// initial state or backlog and the live stream.
    pub fn watch(
        &self,
        kind: usize,
        namespace: Option<&str>,
        from: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let receiver = self.sender.subscribe();
        let in_scope = |k: usize, ns: &str| k == kind && namespace.is_none_or(|n| n == ns);
        let Some(from) = from else {
            let initial = self
                .objects
                .iter()
                .filter(|((k, ns, _), _)| in_scope(*k, ns))
                .map(|(_, stored)| self.render(kind, stored))
                .collect();
            return Ok(WatchStart {
                initial,
                backlog: Vec::new(),
                revision: self.revision,
                receiver,
            });
        };
        if from < self.compacted {
            return Err(ApiError::gone(format!(
                "too old resource version: {from} ({})",
                self.compacted
            )));
        }
        let backlog = self
            .history
            .iter()
            .filter(|record| record.revision > from && in_scope(record.kind, &record.namespace))
            .cloned()
            .collect();
        Ok(WatchStart {
            initial: Vec::new(),
            backlog,
            revision: self.revision.max(from),
            receiver,
        })
    }

    pub fn create(
        &mut self,
        kind: usize,
        namespace: &str,
        body: Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        self.insert_new(kind, namespace, body, manager, Operation::Update)
    }

    fn insert_new(
        &mut self,
        kind: usize,
        namespace: &str,
        mut body: Value,
        manager: &str,
        operation: Operation,
    ) -> Result<Value, ApiError> {
        let spec = &KINDS[kind];
        check_type(spec, &body)?;
        let name = match meta(&body, "name") {
            Some(name) => name,
            None => match meta(&body, "generateName") {
                Some(prefix) => {
                    self.uids += 1;
                    format!("{prefix}{:05x}", self.uids)
                }
                None => return Err(ApiError::invalid(spec, "", "metadata.name: Required value")),
            },
        };
        if !is_dns_subdomain(&name) {
            return Err(ApiError::invalid(
                spec,
                &name,
                "metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of \
                 lower case alphanumeric characters, '-' or '.'",
            ));
        }
        if spec.namespaced {
            self.check_namespace_open(namespace)?;
            if meta(&body, "namespace").is_some_and(|ns| ns != namespace) {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on \
                     the request",
                ));
            }
        }
        let scope = if spec.namespaced { namespace } else { "" };
        let key = (kind, scope.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(spec, &name));
        }
        self.uids += 1;
        let metadata = body["metadata"]
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        metadata.insert("name".into(), json!(name));
        if spec.namespaced {
            metadata.insert("namespace".into(), json!(namespace));
        }
        metadata.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uids)),
        );
        metadata.insert("creationTimestamp".into(), json!(now()));
        for server_owned in [
            "resourceVersion",
            "managedFields",
            "deletionTimestamp",
            "generation",
        ] {
            metadata.remove(server_owned);
        }
        if spec.status_subresource {
            metadata.insert("generation".into(), json!(1));
            body.as_object_mut().map(|o| o.remove("status"));
        }
        body["apiVersion"] = json!(spec.api_version());
        body["kind"] = json!(spec.kind);
        normalize(kind, &mut body)?;
        let mut managers = Managers::new();
        let fields = fields::owned_by(&body);
        if !fields.is_empty() {
            managers.insert(
                Manager {
                    name: manager.to_owned(),
                    operation,
                    subresource: "",
                },
                Ownership {
                    fields,
                    time: now(),
                },
            );
        }
        self.commit(key, body, managers, EventType::Added, None);
        self.get(kind, scope, &name)
    }

    fn check_namespace_open(&self, namespace: &str) -> Result<(), ApiError> {
        let key = (NAMESPACE, String::new(), namespace.to_owned());
        let Some(stored) = self.objects.get(&key) else {
            return Err(ApiError::not_found(&KINDS[NAMESPACE], namespace));
        };
        if stored.object["metadata"]["deletionTimestamp"].is_string() {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "unable to create new content in namespace {namespace} because it is being \
                     terminated"
                ),
            ));
        }
        Ok(())
    }

    fn stored(&self, kind: usize, namespace: &str, name: &str) -> Result<&Stored, ApiError> {
        self.objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .ok_or_else(|| ApiError::not_found(&KINDS[kind], name))
    }

    /// PUT: replace the object (or only its status), guarded by the sent resourceVersion.
    pub fn replace(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        body: Value,
        write: &Write<'_>,
    ) -> Result<Value, ApiError> {
        let spec = &KINDS[kind];
        check_type(spec, &body)?;
        if meta(&body, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let current = self.stored(kind, namespace, name)?;
        check_precondition(spec, name, &body, &current.object)?;
        let updated = self.mask_status(kind, &current.object, body, write.status);
        let mut managers = current.managers.clone();
        record_update(&mut managers, write, &current.object, &updated);
        self.finish_update(kind, namespace, name, updated, managers)
    }

    /// PATCH in any of the four patch types.
    pub fn patch(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        patch_type: PatchType,
        patch: Value,
        write: &Write<'_>,
    ) -> Result<Value, ApiError> {
        let spec = &KINDS[kind];
        if let PatchType::Apply { force } = patch_type {
            return self.apply(kind, namespace, name, patch, write, force);
        }
        let current = self.stored(kind, namespace, name)?;
        let mut patched = current.object.clone();
        match patch_type {
            PatchType::Json => {
                let operations: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                json_patch::patch(&mut patched, &operations)
                    .map_err(|e| ApiError::invalid(spec, name, &e.to_string()))?;
            }
            _ => {
                check_precondition(spec, name, &patch, &current.object)?;
                json_patch::merge(&mut patched, &patch);
            }
        }
        let updated = self.mask_status(kind, &current.object, patched, write.status);
        let mut managers = current.managers.clone();
        record_update(&mut managers, write, &current.object, &updated);
        self.finish_update(kind, namespace, name, updated, managers)
    }

    /// Server-side apply: the manager's fields are merged in, fields it no longer sends (and no
    /// one else owns) are removed, and a change to a field another manager owns is a conflict
    /// unless forced.
    fn apply(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        config: Value,
        write: &Write<'_>,
        force: bool,
    ) -> Result<Value, ApiError> {
        let spec = &KINDS[kind];
        check_type(spec, &config)?;
        if config.get("apiVersion").is_none() || config.get("kind").is_none() {
            return Err(ApiError::bad_request(
                "apply patches must name apiVersion and kind",
            ));
        }
        if meta(&config, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let scope = if spec.namespaced { namespace } else { "" };
        let Ok(current) = self.stored(kind, scope, name) else {
            if write.status {
                return Err(ApiError::not_found(spec, name));
            }
            let mut config = config;
            config["metadata"]["name"] = json!(name);
            return self.insert_new(kind, namespace, config, write.manager, Operation::Apply);
        };
        check_precondition(spec, name, &config, &current.object)?;
        let scoped = match (write.status, spec.status_subresource) {
            (true, _) => json!({"status": config.get("status").cloned().unwrap_or(json!({}))}),
            (false, true) => {
                let mut c = config;
                c.as_object_mut().map(|o| o.remove("status"));
                c
            }
            (false, false) => config,
        };
        let me = Manager {
            name: write.manager.to_owned(),
            operation: Operation::Apply,
            subresource: write.subresource(),
        };
        let claimed = fields::owned_by(&scoped);
        let mut conflicts = Vec::new();
        for (other, ownership) in &current.managers {
            if other.name == me.name {
                continue;
            }
            for path in &claimed {
                let contested = ownership
                    .fields
                    .iter()
                    .any(|owned| fields::overlaps(owned, path));
                if contested && fields::get(&current.object, path) != fields::get(&scoped, path) {
                    conflicts.push(format!(
                        "conflict with \"{}\": {}",
                        other.name,
                        fields::render(path)
                    ));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let message = format!(
                "Apply failed with {} conflict{}: {}",
                conflicts.len(),
                if conflicts.len() == 1 { "" } else { "s" },
                conflicts.join("; ")
            );
            return Err(ApiError::new(409, "Conflict", message).about(spec, name));
        }
        let mut managers = current.managers.clone();
        for (other, ownership) in &mut managers {
            if other.name != me.name {
                ownership
                    .fields
                    .retain(|owned| !claimed.iter().any(|path| fields::overlaps(owned, path)));
            }
        }
        let mut updated = current.object.clone();
        let previously = managers
            .get(&me)
            .map(|o| o.fields.clone())
            .unwrap_or_default();
        for dropped in previously.difference(&claimed) {
            let owned_elsewhere = managers.iter().any(|(other, ownership)| {
                *other != me
                    && ownership
                        .fields
                        .iter()
                        .any(|f| fields::overlaps(f, dropped))
            });
            if !owned_elsewhere {
                fields::remove(&mut updated, dropped);
            }
        }
        fields::merge(&mut updated, &scoped);
        managers.insert(
            me,
            Ownership {
                fields: claimed,
                time: now(),
            },
        );
        self.finish_update(kind, scope, name, updated, managers)
    }

    /// Keeps status out of main-resource writes and everything but status out of `/status`.
    fn mask_status(
        &self,
        kind: usize,
        current: &Value,
        mut new: Value,
        status_write: bool,
    ) -> Value {
        if status_write {
            let mut masked = current.clone();
            match new.get_mut("status").map(Value::take) {
                Some(status) => masked["status"] = status,
                None => {
                    masked.as_object_mut().map(|o| o.remove("status"));
                }
            }
            masked
        } else if KINDS[kind].status_subresource {
            match current.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => {
                    new.as_object_mut().map(|o| o.remove("status"));
                }
            }
            new
        } else {
            new
        }
    }

    fn finish_update(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        mut updated: Value,
        managers: Managers,
    ) -> Result<Value, ApiError> {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(current) = self.objects.get(&key) else {
            return Err(ApiError::not_found(&KINDS[kind], name));
        };
        let old = current.object.clone();
        // What the server owns cannot be changed by a client.
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old["metadata"].get(field) {
                Some(value) => updated["metadata"][field] = value.clone(),
                None => {
                    updated["metadata"].as_object_mut().map(|m| m.remove(field));
                }
            }
        }
        updated["metadata"]
            .as_object_mut()
            .map(|m| m.remove("managedFields"));
        updated["apiVersion"] = old["apiVersion"].clone();
        updated["kind"] = old["kind"].clone();
        if old["metadata"]["deletionTimestamp"].is_string()
            && finalizers(&updated) > finalizers(&old)
        {
            return Err(ApiError::new(
                403,
                "Forbidden",
                "no new finalizers can be added if the object is being deleted",
            ));
        }
        normalize(kind, &mut updated)?;
        if KINDS[kind].status_subresource && spec_of(&old) != spec_of(&updated) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            updated["metadata"]["generation"] = json!(generation);
        }
        // A write that changes nothing keeps the resourceVersion and sends no watch event.
        if updated == old && managers_equal(&managers, &current.managers) {
            return self.get(kind, namespace, name);
        }
        self.commit(
            key.clone(),
            updated,
            managers,
            EventType::Modified,
            Some(old),
        );
        let deleting = self.objects[&key].object["metadata"]["deletionTimestamp"].is_string();
        if deleting && finalizers(&self.objects[&key].object) == 0 {
            if kind == NAMESPACE {
                self.finish_namespace(name);
            } else {
                let gone = self.render(kind, &self.objects[&key]);
                self.remove(&key);
                return Ok(gone);
            }
        }
        self.get(kind, namespace, name)
    }

    pub fn delete(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        propagation: Propagation,
        preconditions: &Value,
    ) -> Result<Value, ApiError> {
        let spec = &KINDS[kind];
        let key = (kind, namespace.to_owned(), name.to_owned());
        let current = self.stored(kind, namespace, name)?.object.clone();
        for field in ["uid", "resourceVersion"] {
            if let Some(expected) = preconditions[field].as_str()
                && meta(&current, field).as_deref() != Some(expected)
            {
                return Err(ApiError::conflict(
                    spec,
                    name,
                    &format!("Precondition failed: {field} in precondition: {expected}"),
                ));
            }
        }
        if current["metadata"]["deletionTimestamp"].is_string() {
            return self.get(kind, namespace, name);
        }
        if propagation == Propagation::Orphan
            && let Some(uid) = meta(&current, "uid")
        {
            self.orphan_dependents(&uid);
        }
        if kind == NAMESPACE || finalizers(&current) > 0 {
            let mut marked = current.clone();
            marked["metadata"]["deletionTimestamp"] = json!(now());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            if kind == NAMESPACE {
                marked["status"]["phase"] = json!("Terminating");
            }
            let managers = self.objects[&key].managers.clone();
            self.commit(key, marked, managers, EventType::Modified, Some(current));
            if kind == NAMESPACE {
                self.delete_contents(name);
                self.finish_namespace(name);
            }
            return self
                .get(kind, namespace, name)
                .or_else(|_| Ok(success(spec, name)));
        }
        self.remove(&key);
        Ok(success(spec, name))
    }

    fn delete_contents(&mut self, namespace: &str) {
        let keys: Vec<Key> = self
            .objects
            .keys()
            .filter(|(_, ns, _)| ns == namespace)
            .cloned()
            .collect();
        for (kind, ns, name) in keys {
            // An object may already be gone through garbage collection.
            let _ = self.delete(kind, &ns, &name, Propagation::Background, &Value::Null);
        }
    }

    /// Removes a terminating namespace once it is empty and has no finalizers left.
    fn finish_namespace(&mut self, namespace: &str) {
        let key = (NAMESPACE, String::new(), namespace.to_owned());
        let Some(stored) = self.objects.get(&key) else {
            return;
        };
        let terminating = stored.object["metadata"]["deletionTimestamp"].is_string();
        let empty = !self.objects.keys().any(|(_, ns, _)| ns == namespace);
        if terminating && empty && finalizers(&stored.object) == 0 {
            self.remove(&key);
        }
    }

    fn remove(&mut self, key: &Key) {
        let Some(stored) = self.objects.remove(key) else {
            return;
        };
        self.revision += 1;
        let mut object = self.render(key.0, &stored);
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        let uid = meta(&object, "uid");
        self.publish(key, EventType::Deleted, object, None);
        if let Some(uid) = uid {
            self.collect_garbage(&uid);
        }
        if !key.1.is_empty() {
            self.finish_namespace(&key.1.clone());
        }
    }

    /// Deletes dependents whose every owner is gone; drops the dangling reference from the rest.
    fn collect_garbage(&mut self, owner_uid: &str) {
        let live: std::collections::BTreeSet<String> = self
            .objects
            .values()
            .filter_map(|s| meta(&s.object, "uid"))
            .collect();
        let dependents: Vec<(Key, Vec<Value>)> = self
            .objects
            .iter()
            .filter_map(|(key, stored)| {
                let refs = stored.object["metadata"]["ownerReferences"].as_array()?;
                refs.iter()
                    .any(|r| r["uid"] == owner_uid)
                    .then(|| (key.clone(), refs.clone()))
            })
            .collect();
        for ((kind, ns, name), refs) in dependents {
            let remaining: Vec<Value> = refs
                .into_iter()
                .filter(|r| r["uid"].as_str().is_some_and(|uid| live.contains(uid)))
                .collect();
            if remaining.is_empty() {
                let _ = self.delete(kind, &ns, &name, Propagation::Background, &Value::Null);
            } else {
                self.set_owner_references(&(kind, ns, name), remaining);
            }
        }
    }

    fn orphan_dependents(&mut self, owner_uid: &str) {
        let dependents: Vec<(Key, Vec<Value>)> = self
            .objects
            .iter()
            .filter_map(|(key, stored)| {
                let refs = stored.object["metadata"]["ownerReferences"].as_array()?;
                refs.iter().any(|r| r["uid"] == owner_uid).then(|| {
                    let kept = refs.iter().filter(|r| r["uid"] != owner_uid).cloned();
                    (key.clone(), kept.collect())
                })
            })
            .collect();
        for (key, kept) in dependents {
            self.set_owner_references(&key, kept);
        }
    }

    fn set_owner_references(&mut self, key: &Key, references: Vec<Value>) {
        let Some(stored) = self.objects.get(key) else {
            return;
        };
        let old = stored.object.clone();
        let managers = stored.managers.clone();
        let mut updated = old.clone();
        if references.is_empty() {
            updated["metadata"]
                .as_object_mut()
                .map(|m| m.remove("ownerReferences"));
        } else {
            updated["metadata"]["ownerReferences"] = Value::Array(references);
        }
        self.commit(
            key.clone(),
            updated,
            managers,
            EventType::Modified,
            Some(old),
        );
    }

    fn commit(
        &mut self,
        key: Key,
        mut object: Value,
        managers: Managers,
        event: EventType,
        previous: Option<Value>,
    ) {
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        let stored = Stored { object, managers };
        let rendered = self.render(key.0, &stored);
        self.objects.insert(key.clone(), stored);
        self.publish(&key, event, rendered, previous);
    }

    fn publish(&mut self, key: &Key, event: EventType, object: Value, previous: Option<Value>) {
        let record = Arc::new(Record {
            revision: self.revision,
            kind: key.0,
            namespace: key.1.clone(),
            event,
            object,
            previous,
        });
        self.history.push_back(Arc::clone(&record));
        if self.history.len() > HISTORY_LIMIT
            && let Some(oldest) = self.history.pop_front()
        {
            self.compacted = oldest.revision;
        }
        // No receiver is fine: nobody is watching.
        let _ = self.sender.send(record);
    }
}

fn success(kind: &Kind, name: &str) -> Value {
    let mut details = json!({"name": name, "kind": kind.plural});
    if !kind.group.is_empty() {
        details["group"] = json!(kind.group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

/// Everything but metadata and status: what a change to bumps `generation`.
fn spec_of(object: &Value) -> Map<String, Value> {
    let mut rest = object.as_object().cloned().unwrap_or_default();
    rest.remove("metadata");
    rest.remove("status");
    rest
}

fn managers_equal(a: &Managers, b: &Managers) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, oa), (kb, ob))| ka == kb && oa.fields == ob.fields)
}

/// An update (PUT or non-apply patch) takes ownership of every field it changed.
fn record_update(managers: &mut Managers, write: &Write<'_>, old: &Value, new: &Value) {
    let changed = fields::changed(old, new);
    if changed.is_empty() {
        return;
    }
    for ownership in managers.values_mut() {
        ownership
            .fields
            .retain(|owned| !changed.iter().any(|c| fields::overlaps(owned, c)));
    }
    let present: FieldSet = changed
        .into_iter()
        .filter(|path| fields::get(new, path).is_some())
        .collect();
    let me = Manager {
        name: write.manager.to_owned(),
        operation: Operation::Update,
        subresource: write.subresource(),
    };
    let entry = managers.entry(me).or_insert_with(|| Ownership {
        fields: FieldSet::new(),
        time: now(),
    });
    entry.fields.extend(present);
    entry.time = now();
}

fn check_type(kind: &Kind, body: &Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let api_version = kind.api_version();
    if body
        .get("apiVersion")
        .is_some_and(|v| v.as_str() != Some(&api_version))
        || body
            .get("kind")
            .is_some_and(|k| k.as_str() != Some(kind.kind))
    {
        return Err(ApiError::bad_request(format!(
            "the object's apiVersion and kind must be {api_version} {}",
            kind.kind
        )));
    }
    if body.get("metadata").is_some_and(|m| !m.is_object()) {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(())
}

/// A resourceVersion in the sent object is a precondition: it must be the current one.
fn check_precondition(
    kind: &Kind,
    name: &str,
    sent: &Value,
    current: &Value,
) -> Result<(), ApiError> {
    match sent["metadata"]["resourceVersion"].as_str() {
        Some(version)
            if !version.is_empty()
                && Some(version) != current["metadata"]["resourceVersion"].as_str() =>
        {
            Err(ApiError::conflict(
                kind,
                name,
                "the object has been modified; please apply your changes to the latest version \
                 and try again",
            ))
        }
        _ => Ok(()),
    }
}

/// What the real server does to an object of a kind on every write.
fn normalize(kind: usize, object: &mut Value) -> Result<(), ApiError> {
    if object.get("metadata").is_none_or(Value::is_null) {
        object["metadata"] = json!({});
    }
    if kind == SECRET {
        if let Some(Value::Object(string_data)) =
            object.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            for (key, value) in string_data {
                let text = value.as_str().unwrap_or_default().to_owned();
                object["data"][key] = json!(STANDARD.encode(text));
            }
        }
        if let Some(data) = object["data"].as_object() {
            for (key, value) in data {
                let decodes = value.as_str().is_some_and(|v| STANDARD.decode(v).is_ok());
                if !decodes {
                    let name = meta(object, "name").unwrap_or_default();
                    return Err(ApiError::invalid(
                        &KINDS[kind],
                        &name,
                        &format!("data[{key}]: Invalid value: not base64"),
                    ));
                }
            }
        }
        if object.get("type").is_none() {
            object["type"] = json!("Opaque");
        }
    }
    if kind == NAMESPACE && object["status"]["phase"].is_null() {
        object["status"]["phase"] = json!("Active");
    }
    Ok(())
}

/// Whether a watch record concerns an object the selectors admit, and as which event: a
/// change of labels into or out of the selection is ADDED or DELETED.
pub fn visible_as(
    record: &Record,
    labels: &LabelSelector,
    field_selector: &FieldSelector,
) -> Option<EventType> {
    let admits = |object: &Value| {
        labels.matches(object["metadata"]["labels"].as_object()) && field_selector.matches(object)
    };
    let now = admits(&record.object);
    let before = record.previous.as_ref().map(admits);
    match (record.event, before, now) {
        (EventType::Modified, Some(false), true) => Some(EventType::Added),
        (EventType::Modified, Some(true), false) => Some(EventType::Deleted),
        (_, _, true) => Some(record.event),
        _ => None,
    }
}
