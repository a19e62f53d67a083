//! The state db-provisioner keeps in Kubernetes, in its own namespace: the Redis index
//! allocation (one ConfigMap, written with optimistic concurrency) and each app's credentials
//! (one Secret per app namespace, the source the app's `hearth-db` Secret is rendered from, so
//! a profile change or a deleted `hearth-db` never loses a password).

use std::collections::BTreeMap;

use hearth_runtime::Sensitive;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::Error;
use crate::secret::{MANAGED_BY, MANAGED_BY_LABEL};

pub const ALLOCATIONS: &str = "hearth-redis-allocations";
pub const FIELD_MANAGER: &str = "hearth-db-provisioner";
const ATTEMPTS: usize = 5;

fn kube(action: &'static str) -> impl Fn(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// Redis index → owning namespace.
pub type Allocation = BTreeMap<u8, String>;

pub struct Allocations {
    api: Api<ConfigMap>,
}

impl Allocations {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }

    pub async fn load(&self) -> Result<Allocation, Error> {
        let map = self
            .api
            .get_opt(ALLOCATIONS)
            .await
            .map_err(kube("read allocations"))?;
        Ok(map.map(|m| parse(&m)).unwrap_or_default())
    }

    /// Applies `change` to the current allocation and writes it back, retrying when another
    /// writer got in between. Returns the allocation as written.
    pub async fn update(
        &self,
        mut change: impl FnMut(&mut Allocation) -> Result<(), Error>,
    ) -> Result<Allocation, Error> {
        for _ in 0..ATTEMPTS {
            let current = self
                .api
                .get_opt(ALLOCATIONS)
                .await
                .map_err(kube("read allocations"))?;
            let mut allocation = current.as_ref().map(parse).unwrap_or_default();
            let before = allocation.clone();
            change(&mut allocation)?;
            if allocation == before && current.is_some() {
                return Ok(allocation);
            }
            let data = allocation
                .iter()
                .map(|(index, owner)| (index.to_string(), owner.clone()))
                .collect();
            let written = match current {
                None => {
                    let map = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(ALLOCATIONS.to_owned()),
                            labels: Some(
                                [(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())].into(),
                            ),
                            ..ObjectMeta::default()
                        },
                        data: Some(data),
                        ..ConfigMap::default()
                    };
                    self.api.create(&PostParams::default(), &map).await
                }
                Some(mut map) => {
                    map.data = Some(data);
                    self.api
                        .replace(ALLOCATIONS, &PostParams::default(), &map)
                        .await
                }
            };
            match written {
                Ok(_) => return Ok(allocation),
                Err(error) if is_conflict(&error) => continue,
                Err(error) => return Err(kube("write allocations")(error)),
            }
        }
        Err(Error::Conflict(format!(
            "ConfigMap {ALLOCATIONS} kept changing under us; will try again"
        )))
    }
}

fn parse(map: &ConfigMap) -> Allocation {
    map.data
        .iter()
        .flatten()
        .filter_map(|(index, owner)| Some((index.parse().ok()?, owner.clone())))
        .collect()
}

/// What is kept for one app namespace.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The passwords the servers accept and the app's Secret carries.
    pub postgres_password: Option<Sensitive<String>>,
    pub redis_password: Option<Sensitive<String>>,
    /// The `hearth.dev/rotate` value last carried out.
    pub rotation: Option<String>,
    /// The PostgreSQL database this namespace's data is in, stored before it is first made:
    /// what a changed `hearth.dev/postgres` is checked against.
    pub database: Option<String>,
    /// A rotation under way: its new passwords are stored here before any server sees them,
    /// and become the current ones once their server has taken them.
    pub next_postgres_password: Option<Sensitive<String>>,
    pub next_redis_password: Option<Sensitive<String>>,
    pub next_rotation: Option<String>,
}

impl Credentials {
    /// The Secret's keys, in one place for reading and writing.
    fn fields(&mut self) -> [(&'static str, &mut Option<Sensitive<String>>); 4] {
        [
            ("postgres-password", &mut self.postgres_password),
            ("redis-password", &mut self.redis_password),
            ("postgres-password-next", &mut self.next_postgres_password),
            ("redis-password-next", &mut self.next_redis_password),
        ]
    }

    /// Whether a rotation has passwords waiting for a server.
    pub fn rotating(&self) -> bool {
        self.next_postgres_password.is_some() || self.next_redis_password.is_some()
    }

    /// PostgreSQL took the staged password: it is the current one now.
    pub fn promote_postgres(&mut self) {
        if let Some(next) = self.next_postgres_password.take() {
            self.postgres_password = Some(next);
        }
        self.finish_rotation();
    }

    /// Redis took the staged password: it is the current one now.
    pub fn promote_redis(&mut self) {
        if let Some(next) = self.next_redis_password.take() {
            self.redis_password = Some(next);
        }
        self.finish_rotation();
    }

    /// Records the rotation as done once no staged password is left.
    pub fn finish_rotation(&mut self) {
        if !self.rotating() && self.next_rotation.is_some() {
            self.rotation = self.next_rotation.take();
        }
    }
}

/// The one Secret, in db-provisioner's own namespace, that holds every app's credentials, each
/// under keys `<namespace>.<field>`. One name lets RBAC limit db-provisioner to it, so it can
/// read no other Secret of its namespace.
pub const CREDENTIALS: &str = "hearth-db-credentials";

pub struct CredentialStore {
    api: Api<Secret>,
}

/// The stored key of one field of one namespace's credentials.
fn key(namespace: &str, field: &str) -> String {
    format!("{namespace}.{field}")
}

impl CredentialStore {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }

    pub async fn load(&self, namespace: &str) -> Result<Option<Credentials>, Error> {
        let secret = self
            .api
            .get_opt(CREDENTIALS)
            .await
            .map_err(kube("read credentials"))?;
        let data = secret.and_then(|secret| secret.data).unwrap_or_default();
        let text = |field: &str| {
            data.get(&key(namespace, field))
                .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
        };
        let mut credentials = Credentials {
            rotation: text("rotation"),
            next_rotation: text("rotation-next"),
            database: text("database"),
            ..Credentials::default()
        };
        let mut any = credentials.rotation.is_some()
            || credentials.next_rotation.is_some()
            || credentials.database.is_some();
        for (field, value) in credentials.fields() {
            *value = text(field).map(Sensitive::new);
            any |= value.is_some();
        }
        Ok(any.then_some(credentials))
    }

    /// Writes one namespace's credentials: its keys are set, or removed when empty, and no other
    /// namespace's keys are touched (a JSON merge patch changes only the keys it names).
    pub async fn save(&self, namespace: &str, credentials: &Credentials) -> Result<(), Error> {
        let mut credentials = credentials.clone();
        let mut data = BTreeMap::new();
        for (field, value) in [
            ("rotation", credentials.rotation.clone()),
            ("rotation-next", credentials.next_rotation.clone()),
            ("database", credentials.database.clone()),
        ] {
            data.insert(key(namespace, field), value.map(String::into_bytes));
        }
        for (field, value) in credentials.fields() {
            let value = value.as_ref().map(|v| v.expose().clone().into_bytes());
            data.insert(key(namespace, field), value);
        }
        self.write(data).await
    }

    /// Removes one namespace's credentials.
    pub async fn delete(&self, namespace: &str) -> Result<(), Error> {
        let data = Credentials::default()
            .fields()
            .map(|(field, _)| field)
            .into_iter()
            .chain(["rotation", "rotation-next", "database"])
            .map(|field| (key(namespace, field), None))
            .collect();
        self.write(data).await
    }

    /// Merges `data` into the Secret (`None` removes a key), creating it first when it is not
    /// there.
    async fn write(&self, data: BTreeMap<String, Option<Vec<u8>>>) -> Result<(), Error> {
        let data: BTreeMap<String, Option<ByteString>> = data
            .into_iter()
            .map(|(key, value)| (key, value.map(ByteString)))
            .collect();
        for _ in 0..ATTEMPTS {
            let patch = json!({"data": data});
            match self
                .api
                .patch(CREDENTIALS, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(kube("write credentials")(error)),
            }
            let kept: BTreeMap<String, ByteString> = data
                .iter()
                .filter_map(|(key, value)| Some((key.clone(), value.clone()?)))
                .collect();
            if kept.is_empty() {
                // Nothing to remove from a Secret that is not there.
                return Ok(());
            }
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(CREDENTIALS.to_owned()),
                    labels: Some(BTreeMap::from([(
                        MANAGED_BY_LABEL.to_owned(),
                        MANAGED_BY.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_owned()),
                data: Some(kept),
                ..Secret::default()
            };
            match self.api.create(&PostParams::default(), &secret).await {
                Ok(_) => return Ok(()),
                // Made meanwhile by another writer: merge into it.
                Err(error) if is_conflict(&error) => {}
                Err(error) => return Err(kube("write credentials")(error)),
            }
        }
        Err(Error::Conflict(format!(
            "Secret {CREDENTIALS} kept changing while it was written; will try again"
        )))
    }
}
