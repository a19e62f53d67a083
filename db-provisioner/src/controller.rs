//! The controller over Namespaces: fetch → validate → build → apply → report.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hearth_runtime::annotations::{
    self, DeletionPolicy, PgName, Profile, RedisRequest, parse_postgres,
};
use hearth_runtime::leader::{LeaderElection, Leadership};
use hearth_runtime::{Process, Sensitive};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::credentials::generate_password;
use crate::desired::{self, Desired};
use crate::metrics::Metrics;
use crate::postgres::{PostgresAdmin, PostgresChange, PostgresPlan};
use crate::redis::{RedisAdmin, choose_index};
use crate::secret::{self, MANAGED_BY, MANAGED_BY_LABEL, PostgresAccess, RedisAccess, SECRET_NAME};
use crate::store::{Allocations, CredentialStore, Credentials, FIELD_MANAGER};
use crate::{Error, Options};

/// Holds a namespace's deletion until its databases are dropped (deletion policy `drop`).
pub const FINALIZER: &str = "hearth.dev/db-provisioner";
const LEASE_NAME: &str = "hearth-db-provisioner";
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Events carry at most this much text (the API's limit is 1 KiB).
const NOTE_LIMIT: usize = 1000;

/// Where apps reach the databases, and what the operator allows.
pub struct Settings {
    pub postgres_host: String,
    pub postgres_port: u16,
    pub postgres_sslmode: String,
    pub redis_host: String,
    pub redis_port: u16,
    pub allowed_extensions: Vec<String>,
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub leadership: Leadership,
    pub postgres: Option<PostgresAdmin>,
    pub redis: Option<RedisAdmin>,
    pub allocations: Allocations,
    pub credentials: CredentialStore,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Consecutive failures per namespace, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Held while choosing and recording a Redis index.
    allocating: tokio::sync::Mutex<()>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        recorder: Recorder,
        leadership: Leadership,
        postgres: Option<PostgresAdmin>,
        redis: Option<RedisAdmin>,
        own_namespace: &str,
        metrics: Metrics,
        settings: Settings,
    ) -> Self {
        Self {
            allocations: Allocations::new(client.clone(), own_namespace),
            credentials: CredentialStore::new(client.clone(), own_namespace),
            client,
            recorder,
            leadership,
            postgres,
            redis,
            metrics,
            settings,
            failures: Mutex::default(),
            allocating: tokio::sync::Mutex::default(),
        }
    }

    async fn publish(&self, namespace: &Namespace, type_: EventType, reason: &str, note: String) {
        let mut note = note;
        if note.len() > NOTE_LIMIT {
            let mut cut = NOTE_LIMIT;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Provision".to_owned(),
            secondary: None,
        };
        if let Err(error) = self
            .recorder
            .publish(&event, &namespace.object_ref(&()))
            .await
        {
            tracing::warn!(%error, reason, "could not publish an Event");
        }
    }

    fn backoff(&self, namespace: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(namespace.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        let exponent = (*count - 1).min(6);
        (Duration::from_secs(5) * 2_u32.pow(exponent)).min(MAX_BACKOFF)
    }

    fn succeeded(&self, namespace: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(namespace);
    }
}

/// Builds the context from options and runs the controller until shutdown.
pub async fn start(process: &Process, options: Options) -> Result<(), Error> {
    let client = Client::try_default().await.map_err(|source| Error::Kube {
        action: "connect",
        source,
    })?;
    let metrics = Metrics::register(&process.registry)?;
    let postgres = options
        .postgres_admin_url
        .as_ref()
        .map(|url| PostgresAdmin::new(url, metrics.ddl_statements.clone()))
        .transpose()?;
    let redis = options
        .redis_admin_url
        .as_ref()
        .map(|url| RedisAdmin::new(url, metrics.redis_writes.clone()))
        .transpose()?;
    let (pg_host, pg_port) = postgres
        .as_ref()
        .map_or(("localhost".to_owned(), 5432), PostgresAdmin::address);
    let (redis_host, redis_port) = redis
        .as_ref()
        .map_or(("localhost".to_owned(), 6379), RedisAdmin::address);
    let settings = Settings {
        postgres_host: options.postgres_app_host.clone().unwrap_or(pg_host),
        postgres_port: options.postgres_app_port.unwrap_or(pg_port),
        postgres_sslmode: options.postgres_app_sslmode.clone(),
        redis_host: options.redis_app_host.clone().unwrap_or(redis_host),
        redis_port: options.redis_app_port.unwrap_or(redis_port),
        allowed_extensions: options
            .postgres_extensions_allowed
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect(),
    };

    let common = &options.common;
    let token = process.shutdown.token();
    let (leadership, election) = LeaderElection::new(
        client.clone(),
        &common.pod_namespace,
        LEASE_NAME,
        &common.pod_name,
    )
    .spawn(token.clone());
    process.shutdown.spawn("leader-election", async move {
        // The election task releases the Lease on shutdown; the drain waits for that.
        let _ = election.await;
        Ok(())
    });

    let reporter = Reporter {
        controller: "hearth-db-provisioner".to_owned(),
        instance: Some(common.pod_name.clone()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let context = Arc::new(Context::new(
        client.clone(),
        recorder,
        leadership.clone(),
        postgres,
        redis,
        &common.pod_namespace,
        metrics,
        settings,
    ));
    spawn_readiness(process, &context);

    let (namespaces, secrets, watch_config) = match &common.watch_namespace {
        Some(only) => (
            Api::<Namespace>::all(client.clone()),
            Api::<Secret>::namespaced(client.clone(), only),
            watcher::Config::default().fields(&format!("metadata.name={only}")),
        ),
        None => (
            Api::<Namespace>::all(client.clone()),
            Api::<Secret>::all(client.clone()),
            watcher::Config::default(),
        ),
    };
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    // Becoming leader re-checks every namespace at once instead of at the next resync.
    let became_leader = futures::stream::unfold(leadership, |mut leadership| async move {
        loop {
            match leadership.changed().await {
                Some(true) => return Some(((), leadership)),
                Some(false) => {}
                None => return None,
            }
        }
    });
    // Every namespace is checked again each resync interval, to repair drift.
    let resync = options.resync_interval;
    let every_resync = futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(resync).await;
        Some(((), ()))
    });
    let controller = Controller::new(namespaces, watch_config)
        .owns(secrets, ours)
        // Eight at a time: faster is bound by the disk (CREATE DATABASE copies a template),
        // and each reconcile in flight holds a database connection and its buffers.
        .with_config(ControllerConfig::default().concurrency(8))
        .reconcile_all_on(became_leader)
        .reconcile_all_on(every_resync)
        .graceful_shutdown_on(token.cancelled_owned());
    let kubernetes_ready = process.readiness.gate("kubernetes");
    let store = controller.store();
    tokio::spawn(async move {
        // kube-runtime 5's Store::wait_until_ready is not always woken when the store fills;
        // polling it again finds it ready, so it is re-polled every half second.
        loop {
            match tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready()).await {
                Ok(Ok(())) => break kubernetes_ready.open(),
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
    });
    let running = controller
        .run(reconcile, error_policy, context)
        .for_each(|_| futures::future::ready(()));
    process.shutdown.spawn("controller", async move {
        running.await;
        Ok(())
    });
    Ok(())
}

/// `/readyz` waits for the first successful connection to each configured database.
fn spawn_readiness(process: &Process, context: &Arc<Context>) {
    if context.postgres.is_some() {
        let context = Arc::clone(context);
        open_once(process.readiness.gate("postgres"), move || {
            let context = Arc::clone(&context);
            async move {
                match &context.postgres {
                    Some(postgres) => postgres.ping().await.is_ok(),
                    None => true,
                }
            }
        });
    }
    if context.redis.is_some() {
        let context = Arc::clone(context);
        open_once(process.readiness.gate("redis"), move || {
            let context = Arc::clone(&context);
            async move {
                match &context.redis {
                    Some(redis) => redis.session().await.is_ok(),
                    None => true,
                }
            }
        });
    }
}

/// Opens `gate` the first time `reachable` says yes, asking every two seconds.
fn open_once<F, Fut>(gate: hearth_runtime::admin::ReadinessGate, mut reachable: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    tokio::spawn(async move {
        while !reachable().await {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        gate.open();
    });
}

/// Reconciles one namespace and reports the outcome in metrics, a log line and, for a
/// failure, a Warning Event.
pub async fn reconcile(namespace: Arc<Namespace>, context: Arc<Context>) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        // Becoming leader reconciles every namespace; until then there is nothing to do.
        return Ok(Action::await_change());
    }
    let name = namespace.name_any();
    tracing::debug!(namespace = %name, "reconciling");
    let started = Instant::now();
    let result = reconcile_namespace(&namespace, &context).await;
    let metrics = &context.metrics;
    metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            metrics.reconciles.with_label_values(&["success"]).inc();
            context.succeeded(&name);
            // The periodic re-check comes from one timer for all namespaces (see `start`), not
            // from per-object requeues, which can pile up when events arrive mid-reconcile.
            Ok(Action::await_change())
        }
        Err(error) => {
            metrics.reconciles.with_label_values(&["error"]).inc();
            metrics.errors.with_label_values(&[error.reason()]).inc();
            tracing::warn!(namespace = %name, reason = error.reason(), %error, "reconcile failed");
            context
                .publish(
                    &namespace,
                    EventType::Warning,
                    error.reason(),
                    error.to_string(),
                )
                .await;
            Err(error)
        }
    }
}

pub fn error_policy(namespace: Arc<Namespace>, error: &Error, context: Arc<Context>) -> Action {
    if error.is_permanent() {
        Action::await_change()
    } else {
        Action::requeue(context.backoff(&namespace.name_any()))
    }
}

async fn reconcile_namespace(namespace: &Namespace, context: &Context) -> Result<(), Error> {
    let name = namespace.name_any();
    let reading = desired::read(
        &name,
        namespace.annotations(),
        &context.settings.allowed_extensions,
    );
    if namespace.metadata.deletion_timestamp.is_some() {
        return finalize(namespace, &reading.desired, context).await;
    }
    if !reading.invalid.is_empty() {
        let messages: Vec<String> = reading.invalid.iter().map(ToString::to_string).collect();
        return Err(Error::InvalidAnnotations(messages.join("; ")));
    }
    let desired = reading.desired;
    if !desired.opted_in() {
        // Only a namespace that carries traces of hearth (its write-back annotations or its
        // finalizer) has anything to clean up; the rest cost no API call.
        let traces = namespace
            .annotations()
            .contains_key(annotations::POSTGRES_DATABASE)
            || namespace.annotations().contains_key(annotations::REDIS_DB)
            || namespace.finalizers().iter().any(|f| f == FINALIZER);
        if traces {
            opt_out(namespace, context).await?;
        }
        return Ok(());
    }
    if !reading.refused_extensions.is_empty() {
        let note = format!(
            "extensions not on the operator's allow-list were skipped: {} (allowed: {})",
            reading.refused_extensions.join(", "),
            if context.settings.allowed_extensions.is_empty() {
                "none".to_owned()
            } else {
                context.settings.allowed_extensions.join(", ")
            }
        );
        context
            .publish(namespace, EventType::Warning, "ExtensionNotAllowed", note)
            .await;
    }
    set_finalizer(
        namespace,
        context,
        desired.deletion_policy == DeletionPolicy::Drop,
    )
    .await?;

    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &name);
    let existing = secrets
        .get_opt(SECRET_NAME)
        .await
        .map_err(|source| Error::Kube {
            action: "read Secret",
            source,
        })?;
    if let Some(existing) = &existing
        && existing.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY)
    {
        return Err(Error::Conflict(format!(
            "Secret {SECRET_NAME} in namespace {name} exists and was not made by hearth; \
                 hearth never overwrites it. Rename or delete it to let hearth write its own"
        )));
    }

    let credentials = ensure_credentials(&desired, context).await?;
    let rotation_due = desired.rotate.is_some() && desired.rotate != credentials.rotation;
    let fresh = |wanted: bool| -> Result<Option<Sensitive<String>>, Error> {
        if wanted && rotation_due {
            generate_password().map(Some)
        } else {
            Ok(None)
        }
    };
    let new_postgres = fresh(desired.postgres.is_some())?;
    let new_redis = fresh(desired.redis.is_some())?;
    let postgres_password = new_postgres
        .as_ref()
        .or(credentials.postgres_password.as_ref());
    let redis_password = new_redis.as_ref().or(credentials.redis_password.as_ref());

    let mut notes = Vec::new();
    if let (Some(database), Some(password)) = (&desired.postgres, postgres_password) {
        let postgres = context.postgres.as_ref().ok_or(Error::NotConfigured(
            "POSTGRES_ADMIN_URL",
            "PostgreSQL database",
        ))?;
        let plan = PostgresPlan {
            namespace: &name,
            name: database,
            password,
            set_password: rotation_due,
            adopt: desired.adopt,
            extensions: &desired.extensions,
        };
        for change in postgres.ensure(&plan).await? {
            notes.push(describe(&change, database));
        }
    }
    let redis_index = match (desired.redis, redis_password) {
        (Some(request), Some(password)) => {
            Some(ensure_redis(namespace, &desired, request, password, context).await?)
        }
        _ => None,
    };
    let credentials = if rotation_due {
        let rotated = Credentials {
            postgres_password: new_postgres.or(credentials.postgres_password),
            redis_password: new_redis.or(credentials.redis_password),
            rotation: desired.rotate.clone(),
        };
        context.credentials.save(&name, &rotated).await?;
        notes.push(format!(
            "rotated the passwords (hearth.dev/rotate: {:?})",
            desired.rotate.as_deref().unwrap_or_default()
        ));
        rotated
    } else {
        credentials
    };
    write_secret(
        namespace,
        &desired,
        &credentials,
        redis_index,
        existing.as_ref(),
        context,
    )
    .await?;
    if let (Profile::Wallabag, Some(index), None) = (desired.profile, redis_index, &existing) {
        let note = format!(
            "wallabag 2.6 cannot select a Redis database index or send a user name: it will use \
             database 0 as the default user, not index {index} as {name}"
        );
        context
            .publish(namespace, EventType::Warning, "WallabagRedisLimits", note)
            .await;
    }
    write_back(namespace, desired.postgres.as_ref(), redis_index, context).await?;
    for note in notes {
        let reason = if note.starts_with("adopted") {
            "Adopted"
        } else if note.starts_with("rotated") {
            "Rotated"
        } else {
            "Provisioned"
        };
        context
            .publish(namespace, EventType::Normal, reason, note)
            .await;
    }
    Ok(())
}

fn describe(change: &PostgresChange, name: &PgName) -> String {
    match change {
        PostgresChange::CreatedRole => format!("created PostgreSQL role {name}"),
        PostgresChange::CreatedDatabase => {
            format!("created PostgreSQL database {name}, owned by role {name}, closed to PUBLIC")
        }
        PostgresChange::AdoptedRole => {
            format!(
                "adopted the existing PostgreSQL role {name}: marked as this namespace's, new password"
            )
        }
        PostgresChange::AdoptedDatabase => {
            format!(
                "adopted the existing PostgreSQL database {name}: marked as this namespace's, owned by role {name}"
            )
        }
        PostgresChange::SetPassword => format!("set a new password on PostgreSQL role {name}"),
        PostgresChange::RepairedOwner => {
            format!("made role {name} the owner of database {name} again")
        }
        PostgresChange::RevokedPublicAccess => {
            format!("revoked CONNECT and TEMPORARY on database {name} from PUBLIC again")
        }
        PostgresChange::CreatedExtension(extension) => {
            format!("created extension {extension} in database {name}")
        }
    }
}

/// Loads the namespace's kept passwords, generating and saving any that are missing before any
/// server sees them, so a crash can never leave a role with a password nobody knows.
async fn ensure_credentials(desired: &Desired, context: &Context) -> Result<Credentials, Error> {
    let name = &desired.namespace;
    let loaded = context.credentials.load(name).await?;
    let existed = loaded.is_some();
    let mut credentials = loaded.unwrap_or_else(|| Credentials {
        // The value present at opt-in is the starting point, not a request to rotate.
        rotation: desired.rotate.clone(),
        ..Credentials::default()
    });
    let mut changed = !existed;
    if desired.postgres.is_some() && credentials.postgres_password.is_none() {
        credentials.postgres_password = Some(generate_password()?);
        changed = true;
    }
    if desired.redis.is_some() && credentials.redis_password.is_none() {
        credentials.redis_password = Some(generate_password()?);
        changed = true;
    }
    if changed {
        context.credentials.save(name, &credentials).await?;
    }
    Ok(credentials)
}

async fn ensure_redis(
    namespace: &Namespace,
    desired: &Desired,
    request: RedisRequest,
    password: &Sensitive<String>,
    context: &Context,
) -> Result<u8, Error> {
    let redis = context
        .redis
        .as_ref()
        .ok_or(Error::NotConfigured("REDIS_ADMIN_URL", "Redis database"))?;
    let name = desired.namespace.as_str();
    if name == "default" {
        return Err(Error::Invalid(
            "the namespace \"default\" cannot have a Redis ACL user: Redis reserves the user \
             name default for itself"
                .into(),
        ));
    }
    let mut session = redis.session().await?;
    let databases = session.databases().await?;
    let allocation = context.allocations.load().await?;
    let owned = allocation
        .iter()
        .find(|(_, owner)| owner.as_str() == name)
        .map(|(index, _)| *index);
    let index = match owned {
        Some(index) => {
            if let RedisRequest::Claim(claimed) = request
                && claimed != index
            {
                let note = format!(
                    "hearth.dev/redis claims index {claimed}, but this namespace already holds \
                         index {index}; it keeps {index}. Moving data between indexes is not \
                         done automatically"
                );
                context
                    .publish(namespace, EventType::Warning, "RedisIndexMismatch", note)
                    .await;
            }
            record_indexes(context, allocation.len(), databases);
            index
        }
        None => allocate(&mut session, name, request, databases, context).await?,
    };
    match session.inspect(index).await?.0 {
        Some(owner) if owner != name => {
            return Err(Error::Conflict(format!(
                "Redis index {index} is allocated to this namespace but its sentinel key names \
                 namespace {owner}; nothing is written until that is resolved"
            )));
        }
        Some(_) => {}
        None => redis.claim(&mut session, index, name).await?,
    }
    // Re-applied every time: Redis forgets ACL users when it restarts.
    redis.set_user(&mut session, name, password, index).await?;
    Ok(index)
}

/// Finds and records a new index. Reconciles in this process take turns; another process
/// racing for the same index loses the optimistic write, and then this one simply looks again.
async fn allocate(
    session: &mut crate::redis::Session,
    name: &str,
    request: RedisRequest,
    databases: u8,
    context: &Context,
) -> Result<u8, Error> {
    let _turn = context.allocating.lock().await;
    for _ in 0..usize::from(databases) + 1 {
        let allocation = context.allocations.load().await?;
        let taken = |index: u8| allocation.get(&index).cloned();
        let Some(index) = choose_index(session, name, request, databases, &taken).await? else {
            record_indexes(context, allocation.len(), databases);
            return Err(Error::RedisIndexExhausted);
        };
        let mut lost_race = false;
        let written = context
            .allocations
            .update(|allocation| {
                lost_race = allocation.get(&index).is_some_and(|owner| owner != name);
                if !lost_race {
                    allocation.insert(index, name.to_owned());
                }
                Ok(())
            })
            .await?;
        if !lost_race {
            record_indexes(context, written.len(), databases);
            return Ok(index);
        }
    }
    Err(Error::Conflict(
        "the Redis allocation kept changing while choosing an index; will try again".into(),
    ))
}

fn record_indexes(context: &Context, used: usize, databases: u8) {
    let used = i64::try_from(used).unwrap_or(i64::MAX);
    let gauges = &context.metrics.redis_indexes;
    gauges.with_label_values(&["used"]).set(used);
    gauges
        .with_label_values(&["free"])
        .set((i64::from(databases) - used).max(0));
}

async fn write_secret(
    namespace: &Namespace,
    desired: &Desired,
    credentials: &Credentials,
    redis_index: Option<u8>,
    existing: Option<&Secret>,
    context: &Context,
) -> Result<(), Error> {
    let name = namespace.name_any();
    let settings = &context.settings;
    let postgres = match (&desired.postgres, &credentials.postgres_password) {
        (Some(database), Some(password)) => Some(PostgresAccess {
            host: &settings.postgres_host,
            port: settings.postgres_port,
            database: database.as_str(),
            username: database.as_str(),
            password,
            sslmode: &settings.postgres_sslmode,
        }),
        _ => None,
    };
    let redis = match (redis_index, &credentials.redis_password) {
        (Some(index), Some(password)) => Some(RedisAccess {
            host: &settings.redis_host,
            port: settings.redis_port,
            index,
            username: desired.redis_user(),
            password,
        }),
        _ => None,
    };
    let data: BTreeMap<String, ByteString> =
        secret::render(desired.profile, postgres.as_ref(), redis.as_ref())
            .into_iter()
            .map(|(key, value)| (key, ByteString(value.into_bytes())))
            .collect();
    if existing.and_then(|s| s.data.as_ref()) == Some(&data) {
        return Ok(());
    }
    let owner = namespace.controller_owner_ref(&()).map(|mut owner| {
        owner.controller = Some(false);
        owner.block_owner_deletion = Some(false);
        owner
    });
    let body = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": SECRET_NAME,
            "namespace": name,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "type": "Opaque",
        "data": data,
    });
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &name);
    secrets
        .patch(
            SECRET_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Kube {
            action: "write Secret",
            source,
        })?;
    let verb = if existing.is_some() {
        "updated"
    } else {
        "wrote"
    };
    context
        .publish(
            namespace,
            EventType::Normal,
            "SecretWritten",
            format!(
                "{verb} Secret {SECRET_NAME} ({} profile)",
                desired.profile.as_str()
            ),
        )
        .await;
    Ok(())
}

/// Writes `hearth.dev/postgres-database` and `hearth.dev/redis-db` for people to read, and
/// removes them when they no longer apply. A merge patch, not server-side apply: an apply would
/// re-create a namespace deleted while this reconcile ran, and a patch of a missing one fails.
async fn write_back(
    namespace: &Namespace,
    database: Option<&PgName>,
    redis_index: Option<u8>,
    context: &Context,
) -> Result<(), Error> {
    let wanted = [
        (
            annotations::POSTGRES_DATABASE,
            database.map(|d| d.as_str().to_owned()),
        ),
        (annotations::REDIS_DB, redis_index.map(|i| i.to_string())),
    ];
    let current = namespace.annotations();
    let changes: serde_json::Map<String, serde_json::Value> = wanted
        .into_iter()
        .filter(|(key, value)| current.get(*key) != value.as_ref())
        .map(|(key, value)| (key.to_owned(), json!(value)))
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": changes}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let namespaces: Api<Namespace> = Api::all(context.client.clone());
    namespaces
        .patch(&namespace.name_any(), &params, &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Kube {
            action: "write annotations",
            source,
        })?;
    Ok(())
}

/// Adds or removes this service's finalizer, guarded by a JSON-patch test so a concurrent
/// change to the list is never overwritten.
async fn set_finalizer(
    namespace: &Namespace,
    context: &Context,
    wanted: bool,
) -> Result<(), Error> {
    let current = namespace.finalizers().to_vec();
    let present = current.iter().any(|f| f == FINALIZER);
    if present == wanted {
        return Ok(());
    }
    let mut next = current.clone();
    if wanted {
        next.push(FINALIZER.to_owned());
    } else {
        next.retain(|f| f != FINALIZER);
    }
    let patch = if namespace.metadata.finalizers.is_some() {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "replace", "path": "/metadata/finalizers", "value": next},
        ])
    } else {
        json!([{"op": "add", "path": "/metadata/finalizers", "value": next}])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch)
        .map_err(|e| Error::Invalid(format!("building the finalizer patch: {e}")))?;
    let namespaces: Api<Namespace> = Api::all(context.client.clone());
    namespaces
        .patch(
            &namespace.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
        .map_err(|source| Error::Kube {
            action: "update finalizers",
            source,
        })?;
    Ok(())
}

/// The namespace no longer asks for anything: remove what was delivered into it and the
/// finalizer, and keep the databases (and the Redis index reserved) as the retain policy says.
async fn opt_out(namespace: &Namespace, context: &Context) -> Result<(), Error> {
    let name = namespace.name_any();
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &name);
    let existing = secrets
        .get_opt(SECRET_NAME)
        .await
        .map_err(|source| Error::Kube {
            action: "read Secret",
            source,
        })?;
    let ours = existing
        .as_ref()
        .is_some_and(|s| s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY));
    if ours {
        secrets
            .delete(SECRET_NAME, &DeleteParams::default())
            .await
            .map_err(|source| Error::Kube {
                action: "delete Secret",
                source,
            })?;
        context
            .publish(
                namespace,
                EventType::Normal,
                "OptedOut",
                format!(
                    "no hearth.dev/postgres or hearth.dev/redis annotation: deleted Secret \
                     {SECRET_NAME}; databases and the Redis index are kept"
                ),
            )
            .await;
    }
    set_finalizer(namespace, context, false).await?;
    write_back(namespace, None, None, context).await?;
    Ok(())
}

/// The namespace is being deleted. With `drop`, its database, role, ACL user and Redis data go
/// first, and only what carries this namespace's heritage; then the finalizer is removed.
async fn finalize(
    namespace: &Namespace,
    desired: &Desired,
    context: &Context,
) -> Result<(), Error> {
    if !namespace.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let name = namespace.name_any();
    if desired.deletion_policy == DeletionPolicy::Drop {
        // What was provisioned is recorded on the namespace; the request may be gone by now.
        let database = desired.postgres.clone().or_else(|| {
            namespace
                .annotations()
                .get(annotations::POSTGRES_DATABASE)
                .and_then(|value| parse_postgres(value, &name).ok().flatten())
        });
        if let Some(database) = database {
            let postgres = context.postgres.as_ref().ok_or(Error::NotConfigured(
                "POSTGRES_ADMIN_URL",
                "PostgreSQL database",
            ))?;
            let report = postgres.drop(&name, &database).await?;
            if !report.dropped.is_empty() {
                context
                    .publish(
                        namespace,
                        EventType::Normal,
                        "Dropped",
                        format!("dropped {}", report.dropped.join(" and ")),
                    )
                    .await;
            }
            if !report.kept.is_empty() {
                context
                    .publish(
                        namespace,
                        EventType::Warning,
                        "Kept",
                        format!(
                            "kept, since not this namespace's: {}",
                            report.kept.join(", ")
                        ),
                    )
                    .await;
            }
        }
        drop_redis(namespace, context).await?;
        context.credentials.delete(&name).await?;
    }
    set_finalizer(namespace, context, false).await?;
    Ok(())
}

async fn drop_redis(namespace: &Namespace, context: &Context) -> Result<(), Error> {
    let name = namespace.name_any();
    let allocation = context.allocations.load().await?;
    let Some(index) = allocation
        .iter()
        .find(|(_, owner)| owner.as_str() == name)
        .map(|(index, _)| *index)
    else {
        return Ok(());
    };
    let redis = context
        .redis
        .as_ref()
        .ok_or(Error::NotConfigured("REDIS_ADMIN_URL", "Redis database"))?;
    let mut session = redis.session().await?;
    let (owner, keys) = session.inspect(index).await?;
    let flushable = match owner.as_deref() {
        Some(owner) => owner == name,
        // Without a sentinel only an empty database is released: keys there are unaccounted for.
        None => keys == 0,
    };
    redis.delete_user(&mut session, &name).await?;
    if !flushable {
        context
            .publish(
                namespace,
                EventType::Warning,
                "Kept",
                format!(
                    "Redis index {index} was not flushed and stays reserved: its sentinel does not \
                     name this namespace"
                ),
            )
            .await;
        return Ok(());
    }
    redis.flush(&mut session, index).await?;
    let databases = session.databases().await?;
    let written = context
        .allocations
        .update(|allocation| {
            allocation.retain(|_, owner| owner.as_str() != name);
            Ok(())
        })
        .await?;
    record_indexes(context, written.len(), databases);
    context
        .publish(
            namespace,
            EventType::Normal,
            "Dropped",
            format!("flushed Redis index {index}, deleted ACL user {name}, and freed the index"),
        )
        .await;
    Ok(())
}
