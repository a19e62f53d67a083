//! The state db-provisioner keeps in Kubernetes, in its own namespace: the Redis index
//! allocation (one ConfigMap, written with optimistic concurrency) and each app's credentials
//! (one Secret per app namespace, the source the app's `hearth-db` Secret is rendered from, so
//! a profile change or a deleted `hearth-db` never loses a password).

use std::collections::BTreeMap;

use hearth_runtime::Sensitive;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
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

pub struct CredentialStore {
    api: Api<Secret>,
}

pub fn credentials_name(namespace: &str) -> String {
    format!("hearth-db-credentials-{namespace}")
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
            .get_opt(&credentials_name(namespace))
            .await
            .map_err(kube("read credentials"))?;
        Ok(secret.map(|secret| {
            let data = secret.data.unwrap_or_default();
            let text = |key: &str| {
                data.get(key)
                    .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
            };
            let mut credentials = Credentials {
                rotation: text("rotation"),
                next_rotation: text("rotation-next"),
                ..Credentials::default()
            };
            for (key, field) in credentials.fields() {
                *field = text(key).map(Sensitive::new);
            }
            credentials
        }))
    }

    pub async fn save(&self, namespace: &str, credentials: &Credentials) -> Result<(), Error> {
        let mut credentials = credentials.clone();
        let mut data = BTreeMap::new();
        for (key, value) in [
            ("rotation", credentials.rotation.clone()),
            ("rotation-next", credentials.next_rotation.clone()),
        ] {
            if let Some(value) = value {
                data.insert(key.to_owned(), ByteString(value.into_bytes()));
            }
        }
        for (key, field) in credentials.fields() {
            if let Some(value) = field {
                data.insert(
                    key.to_owned(),
                    ByteString(value.expose().clone().into_bytes()),
                );
            }
        }
        let name = credentials_name(namespace);
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY, "hearth.dev/namespace": namespace},
            },
            "type": "Opaque",
            "data": data,
        });
        self.api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(kube("write credentials"))?;
        Ok(())
    }

    pub async fn delete(&self, namespace: &str) -> Result<(), Error> {
        match self
            .api
            .delete(&credentials_name(namespace), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(kube("delete credentials")(error)),
        }
    }
}
