//! Discovery: every namespace with a `hearth.dev/*` opt-in, what hearth and ESO made in it, and
//! so the set of targets, rebuilt whenever the cluster changes. Every replica does this itself
//! (nothing is written, so no leader is needed).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use crate::registry::{App, Check};
use crate::targets::{self, Kind, TargetKey};

const SECRET_NAME: &str = "hearth-db";
/// Only what hearth made counts: a foreign Secret or Ingress of the same name is not ours.
const MADE_BY_INGRESS_SYNC: &str = "app.kubernetes.io/managed-by=hearth-ingress-sync";
const MADE_BY_DB_PROVISIONER: &str = "app.kubernetes.io/managed-by=hearth-db-provisioner";
/// The most ExternalSecrets of one namespace that are checked (the first by name), so that
/// whoever may create them cannot grow the output without bound.
pub const MAX_EXTERNAL_SECRETS: usize = 32;

/// A watch, to run until shutdown.
pub type WatchTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Whether a watch has listed what is there at least once.
#[derive(Clone, Default)]
pub struct Synced(Arc<AtomicBool>);

impl Synced {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What is watched, held in memory and trimmed to what the checks read: namespaces (their
/// annotations), hearth's Ingresses (their status), the names of db-provisioner's Secrets
/// called hearth-db, and ExternalSecrets (their conditions).
#[derive(Clone)]
pub struct Cluster {
    pub namespaces: Store<Namespace>,
    pub ingresses: Store<Ingress>,
    pub secrets: Store<PartialObjectMeta<Secret>>,
    pub external_secrets: Store<DynamicObject>,
    pub ingresses_synced: Synced,
    pub secrets_synced: Synced,
    pub external_secrets_synced: Synced,
    pub changed: Arc<Notify>,
}

fn external_secret_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret"),
        "externalsecrets",
    )
}

/// Metadata cut to name, namespace, labels and the deletion mark: no annotation (a
/// `last-applied-configuration` can hold a whole Secret) and no managedFields.
fn trim_metadata(metadata: &mut ObjectMeta) {
    *metadata = ObjectMeta {
        name: metadata.name.take(),
        namespace: metadata.namespace.take(),
        labels: metadata.labels.take(),
        deletion_timestamp: metadata.deletion_timestamp.take(),
        resource_version: metadata.resource_version.take(),
        ..ObjectMeta::default()
    };
}

fn api<K>(client: &Client, only: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match only {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

impl Cluster {
    /// Starts the watches; each returns its task, to run until shutdown.
    pub fn watch(client: &Client, only: Option<&str>) -> (Self, Vec<WatchTask>) {
        let changed = Arc::new(Notify::new());
        let namespace_config = match only {
            Some(namespace) => {
                watcher::Config::default().fields(&format!("metadata.name={namespace}"))
            }
            None => watcher::Config::default(),
        };
        let (namespaces, namespace_writer) = reflector::store();
        let (ingresses, ingress_writer) = reflector::store();
        let (secrets, secret_writer) = reflector::store();
        let external_writer = reflector::store::Writer::new(external_secret_resource());
        let external_secrets = external_writer.as_reader();
        let external_api: Api<DynamicObject> = match only {
            Some(namespace) => {
                Api::namespaced_with(client.clone(), namespace, &external_secret_resource())
            }
            None => Api::all_with(client.clone(), &external_secret_resource()),
        };
        let (ingresses_synced, secrets_synced, external_secrets_synced) =
            (Synced::default(), Synced::default(), Synced::default());
        let tasks = vec![
            drive(
                "namespaces",
                reflector(
                    namespace_writer,
                    watcher(Api::<Namespace>::all(client.clone()), namespace_config)
                        .default_backoff()
                        .modify(|namespace: &mut Namespace| {
                            namespace.managed_fields_mut().clear();
                            namespace.spec = None;
                        }),
                ),
                Synced::default(),
                Arc::clone(&changed),
            ),
            drive(
                "Ingresses",
                reflector(
                    ingress_writer,
                    watcher(
                        api::<Ingress>(client, only),
                        watcher::Config::default().labels(MADE_BY_INGRESS_SYNC),
                    )
                    .default_backoff()
                    .modify(|ingress: &mut Ingress| {
                        trim_metadata(&mut ingress.metadata);
                        ingress.spec = None;
                    }),
                ),
                ingresses_synced.clone(),
                Arc::clone(&changed),
            ),
            // Names only (a metadata watch): the Secrets' contents are never sent.
            drive(
                "Secrets hearth-db",
                reflector(
                    secret_writer,
                    watcher(
                        api::<PartialObjectMeta<Secret>>(client, only),
                        watcher::Config::default()
                            .fields(&format!("metadata.name={SECRET_NAME}"))
                            .labels(MADE_BY_DB_PROVISIONER),
                    )
                    .default_backoff()
                    .modify(|secret: &mut PartialObjectMeta<Secret>| {
                        trim_metadata(&mut secret.metadata);
                    }),
                ),
                secrets_synced.clone(),
                Arc::clone(&changed),
            ),
            drive(
                "ExternalSecrets (external-secrets.io/v1)",
                reflector(
                    external_writer,
                    watcher(external_api, watcher::Config::default())
                        .default_backoff()
                        .modify(|external: &mut DynamicObject| {
                            trim_metadata(&mut external.metadata);
                            let conditions = external.data["status"]["conditions"].take();
                            external.data = json!({"status": {"conditions": conditions}});
                        }),
                ),
                external_secrets_synced.clone(),
                Arc::clone(&changed),
            ),
        ];
        (
            Self {
                namespaces,
                ingresses,
                secrets,
                external_secrets,
                ingresses_synced,
                secrets_synced,
                external_secrets_synced,
                changed,
            },
            tasks,
        )
    }

    /// The targets wanted now, and the apps as the status page shows them. The certificates of
    /// published URLs are checked only when `published_urls`.
    pub fn targets(
        &self,
        postgres: bool,
        redis: bool,
        published_urls: bool,
    ) -> (BTreeMap<TargetKey, Check>, BTreeMap<String, App>) {
        let mut wanted = BTreeMap::new();
        let mut apps = BTreeMap::new();
        let key = |kind, namespace: &str, target: &str| TargetKey {
            kind,
            namespace: namespace.to_owned(),
            target: target.to_owned(),
        };
        let mut external_secrets: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for external in self.external_secrets.state() {
            if let Some(namespace) = external.namespace() {
                external_secrets
                    .entry(namespace)
                    .or_default()
                    .push(external.name_any());
            }
        }
        for namespace in self.namespaces.state() {
            let name = namespace.name_any();
            let app = targets::read(namespace.annotations());
            if !app.any() || namespace.metadata.deletion_timestamp.is_some() {
                continue;
            }
            match (&app.http, &app.invalid) {
                (Some(http), _) => {
                    let label = targets::http_label(http);
                    wanted.insert(key(Kind::Http, &name, &label), Check::Http(http.clone()));
                }
                (None, Some(invalid)) => {
                    wanted.insert(
                        key(Kind::Http, &name, "annotation"),
                        Check::Invalid(invalid.clone()),
                    );
                }
                (None, None) => {}
            }
            if published_urls
                && let Some(url) = &app.url
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
            for service in &app.exposed {
                let ingress = format!("hearth-{}", service.service);
                wanted.insert(key(Kind::Ingress, &name, &ingress), Check::Cluster);
            }
            if let Some(names) = external_secrets.get_mut(&name) {
                names.sort();
                for external in names.iter().take(MAX_EXTERNAL_SECRETS) {
                    wanted.insert(key(Kind::ExternalSecret, &name, external), Check::Cluster);
                }
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

    /// Whether the watch a check of `kind` reads has listed what is there; until then no
    /// answer from it can be trusted (an object not seen yet is not a missing one).
    pub fn synced(&self, kind: Kind) -> bool {
        match kind {
            Kind::Secret => self.secrets_synced.get(),
            Kind::Ingress => self.ingresses_synced.get(),
            Kind::ExternalSecret => self.external_secrets_synced.get(),
            _ => true,
        }
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

/// Drives a watch stream: marks it synced once it has listed everything, tells discovery after
/// every event, and says when the watch starts failing (once, as a warning: a watch that
/// cannot run leaves its checks unknown) and when it works again.
fn drive<S, T, E>(what: &'static str, stream: S, synced: Synced, changed: Arc<Notify>) -> WatchTask
where
    S: Stream<Item = Result<watcher::Event<T>, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let mut failing = false;
    Box::pin(stream.for_each(move |event| {
        match &event {
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(
                    watch = what,
                    %error,
                    "cannot watch; the checks that read it stay unknown until it works (is the \
                     resource installed, and does the ClusterRole allow it?)"
                );
            }
            Err(error) => tracing::debug!(watch = what, %error, "still cannot watch"),
            Ok(event) => {
                if failing {
                    failing = false;
                    tracing::info!(watch = what, "watching again");
                }
                if matches!(event, watcher::Event::InitDone) {
                    synced.0.store(true, Ordering::Relaxed);
                }
            }
        }
        changed.notify_one();
        futures::future::ready(())
    }))
}
