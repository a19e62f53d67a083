//! Discovery: every namespace with a `hearth.dev/*` opt-in, what hearth and ESO made in it, and
//! so the set of targets, rebuilt whenever the cluster changes. Every replica does this itself
//! (nothing is written, so no leader is needed).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use hearth_runtime::annotations;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;

use crate::registry::{App, Check};
use crate::targets::{self, HttpTarget, Kind, TargetKey};

const SECRET_NAME: &str = "hearth-db";
/// Only what hearth made counts: a foreign Secret or Ingress of the same name is not ours.
const MADE_BY_INGRESS_SYNC: &str = "app.kubernetes.io/managed-by=hearth-ingress-sync";
const MADE_BY_DB_PROVISIONER: &str = "app.kubernetes.io/managed-by=hearth-db-provisioner";

/// A watch, to run until shutdown.
pub type WatchTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What is watched, held in memory: namespaces, hearth's Ingresses, the names (only) of
/// Secrets called hearth-db, and ExternalSecrets.
#[derive(Clone)]
pub struct Cluster {
    pub namespaces: Store<Namespace>,
    pub ingresses: Store<Ingress>,
    pub secrets: Store<PartialObjectMeta<Secret>>,
    pub external_secrets: Store<DynamicObject>,
    pub changed: Arc<Notify>,
}

fn external_secret_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret"),
        "externalsecrets",
    )
}

impl Cluster {
    /// Starts the watches; each returns its task, to run until shutdown.
    pub fn watch(client: &Client, only: Option<&str>) -> (Self, Vec<WatchTask>) {
        let changed = Arc::new(Notify::new());
        let scoped = |config: watcher::Config| match only {
            Some(namespace) => config.fields(&format!("metadata.name={namespace}")),
            None => config,
        };
        let (namespaces, namespace_writer) = reflector::store();
        let (ingresses, ingress_writer) = reflector::store();
        let (secrets, secret_writer) = reflector::store();
        let external_writer = reflector::store::Writer::new(external_secret_resource());
        let external_secrets = external_writer.as_reader();
        let ingress_api: Api<Ingress> = match only {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        };
        let secret_api: Api<PartialObjectMeta<Secret>> = match only {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        };
        let external_api: Api<DynamicObject> = match only {
            Some(namespace) => {
                Api::namespaced_with(client.clone(), namespace, &external_secret_resource())
            }
            None => Api::all_with(client.clone(), &external_secret_resource()),
        };
        let tasks = vec![
            notify_each(
                reflector(
                    namespace_writer,
                    watcher(
                        Api::<Namespace>::all(client.clone()),
                        scoped(watcher::Config::default()),
                    ),
                )
                .default_backoff()
                .modify(|namespace: &mut Namespace| namespace.managed_fields_mut().clear()),
                Arc::clone(&changed),
            ),
            notify_each(
                reflector(
                    ingress_writer,
                    watcher(
                        ingress_api,
                        watcher::Config::default().labels(MADE_BY_INGRESS_SYNC),
                    ),
                )
                .default_backoff(),
                Arc::clone(&changed),
            ),
            // Names only (a metadata watch): the Secrets' contents are never read.
            notify_each(
                reflector(
                    secret_writer,
                    watcher(
                        secret_api,
                        watcher::Config::default()
                            .fields(&format!("metadata.name={SECRET_NAME}"))
                            .labels(MADE_BY_DB_PROVISIONER),
                    ),
                )
                .default_backoff(),
                Arc::clone(&changed),
            ),
            // A cluster without ESO has no such resource: the watch keeps backing off, quietly.
            notify_each(
                reflector(
                    external_writer,
                    watcher(external_api, watcher::Config::default()),
                )
                .default_backoff(),
                Arc::clone(&changed),
            ),
        ];
        (
            Self {
                namespaces,
                ingresses,
                secrets,
                external_secrets,
                changed,
            },
            tasks,
        )
    }

    /// The targets wanted now, and the apps as the status page shows them.
    pub fn targets(
        &self,
        postgres: bool,
        redis: bool,
    ) -> (BTreeMap<TargetKey, Check>, BTreeMap<String, App>) {
        let mut wanted = BTreeMap::new();
        let mut apps = BTreeMap::new();
        let key = |kind, namespace: &str, target: &str| TargetKey {
            kind,
            namespace: namespace.to_owned(),
            target: target.to_owned(),
        };
        for namespace in self.namespaces.state() {
            let name = namespace.name_any();
            let app = targets::read(namespace.annotations());
            if !app.any() || namespace.metadata.deletion_timestamp.is_some() {
                continue;
            }
            match (&app.http, &app.invalid) {
                (Some(http), _) => {
                    let check = match http {
                        HttpTarget::Service {
                            service,
                            port,
                            path,
                        } => Check::Http {
                            service: Some((service.clone(), port.clone(), path.clone())),
                            url: None,
                        },
                        HttpTarget::Url(url) => Check::Http {
                            service: None,
                            url: Some(url.clone()),
                        },
                    };
                    wanted.insert(key(Kind::Http, &name, &targets::http_label(http)), check);
                }
                (None, Some(invalid)) => {
                    wanted.insert(
                        key(Kind::Http, &name, "annotation"),
                        Check::Invalid(invalid.clone()),
                    );
                }
                (None, None) => {}
            }
            if let Some(url) = &app.url
                && let Some(host) = url.host_str()
            {
                let check = Check::Tls {
                    host: host.to_owned(),
                    port: url.port().unwrap_or(443),
                };
                wanted.insert(key(Kind::Tls, &name, &targets::authority(url)), check);
            }
            if app.database_secret {
                wanted.insert(key(Kind::Secret, &name, SECRET_NAME), Check::Cluster);
            }
            if app.exposed {
                let exposed = namespace
                    .annotations()
                    .get(annotations::EXPOSE)
                    .and_then(|value| annotations::parse_expose(value).ok())
                    .unwrap_or_default();
                for service in exposed {
                    let ingress = format!("hearth-{}", service.service);
                    wanted.insert(key(Kind::Ingress, &name, &ingress), Check::Cluster);
                }
            }
            for external in self
                .external_secrets
                .state()
                .iter()
                .filter(|e| e.namespace().as_deref() == Some(name.as_str()))
            {
                wanted.insert(
                    key(Kind::ExternalSecret, &name, &external.name_any()),
                    Check::Cluster,
                );
            }
            apps.insert(name, App { targets: app });
        }
        if postgres {
            wanted.insert(key(Kind::Postgres, "", "postgres"), Check::Postgres);
        }
        if redis {
            wanted.insert(key(Kind::Redis, "", "redis"), Check::Redis);
        }
        (wanted, apps)
    }

    pub fn ingress(&self, namespace: &str, name: &str) -> Option<Arc<Ingress>> {
        self.ingresses.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn has_database_secret(&self, namespace: &str) -> bool {
        self.secrets
            .get(&ObjectRef::new(SECRET_NAME).within(namespace))
            .is_some()
    }

    pub fn external_secret(&self, namespace: &str, name: &str) -> Option<Arc<DynamicObject>> {
        self.external_secrets
            .get(&ObjectRef::new_with(name, external_secret_resource()).within(namespace))
    }
}

/// Drives a watch stream, telling discovery after every event.
fn notify_each<S, T, E>(stream: S, changed: Arc<Notify>) -> WatchTask
where
    S: Stream<Item = Result<T, E>> + Send + 'static,
    E: std::fmt::Display,
{
    Box::pin(stream.for_each(move |event| {
        if let Err(error) = &event {
            tracing::debug!(%error, "watch");
        }
        changed.notify_one();
        futures::future::ready(())
    }))
}
