//! The controller over Namespaces: fetch → validate ([`crate::desired`]) → build and apply
//! ([`crate::provision`], [`crate::finalize`]) → report ([`crate::report`], metrics).

use std::sync::Arc;
use std::time::Instant;

use hearth_runtime::Process;
use hearth_runtime::annotations;
use hearth_runtime::controller::{self, Backoff};
use hearth_runtime::events::EventPublisher;
use hearth_runtime::leader::Leadership;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::desired;
use crate::finalize::{self, FINALIZER};
use crate::metrics::Metrics;
use crate::postgres::PostgresAdmin;
use crate::provision;
use crate::redis::RedisAdmin;
use crate::report::{Reporter, Step};
use crate::secret::{MANAGED_BY, MANAGED_BY_LABEL, SECRET_NAME};
use crate::store::{Allocations, CredentialStore};
use crate::{Error, Options};

const LEASE_NAME: &str = "hearth-db-provisioner";

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
    pub report: Reporter,
    pub leadership: Leadership,
    pub postgres: Option<PostgresAdmin>,
    pub redis: Option<RedisAdmin>,
    pub allocations: Allocations,
    pub credentials: CredentialStore,
    pub metrics: Metrics,
    pub settings: Settings,
    backoff: Backoff,
    /// Held while choosing and recording a Redis index.
    pub allocating: tokio::sync::Mutex<()>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        report: Reporter,
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
            report,
            leadership,
            postgres,
            redis,
            metrics,
            settings,
            backoff: Backoff::default(),
            allocating: tokio::sync::Mutex::default(),
        }
    }

    pub fn postgres(&self) -> Result<&PostgresAdmin, Error> {
        self.postgres.as_ref().ok_or(Error::NotConfigured(
            "POSTGRES_ADMIN_URL",
            "PostgreSQL database",
        ))
    }

    pub fn redis(&self) -> Result<&RedisAdmin, Error> {
        self.redis
            .as_ref()
            .ok_or(Error::NotConfigured("REDIS_ADMIN_URL", "Redis database"))
    }
}

/// Builds the context from options and runs the controller until shutdown.
pub async fn start(process: &Process, options: Options) -> Result<(), Error> {
    let client = hearth_runtime::kube_client(crate::SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|source| Error::Kube {
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
    let leadership = hearth_runtime::controller::elect_leader(process, &client, common, LEASE_NAME);

    let events = EventPublisher::new(client.clone(), "hearth-db-provisioner", &common.pod_name);
    let context = Arc::new(Context::new(
        client.clone(),
        Reporter::new(events),
        leadership.clone(),
        postgres,
        redis,
        &common.pod_namespace,
        metrics,
        settings,
    ));
    spawn_readiness(process, &context);

    // Only Secrets named hearth-db are watched (by a field selector, which RBAC can limit with
    // resourceNames): the controller never needs to read every Secret in the cluster.
    let ours = watcher::Config::default()
        .fields(&format!("metadata.name={SECRET_NAME}"))
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let (secrets, watch_config) = match &common.watch_namespace {
        Some(only) => (
            Api::<Secret>::namespaced(client.clone(), only),
            watcher::Config::default().fields(&format!("metadata.name={only}")),
        ),
        None => (
            Api::<Secret>::all(client.clone()),
            watcher::Config::default(),
        ),
    };
    let controller = Controller::new(Api::<Namespace>::all(client.clone()), watch_config)
        // Not `owns`: it would key the Namespace a second time (see namespace_of), and two
        // reconciles of one namespace at once race each other (a drop against a re-provision).
        .watches(secrets, ours, |secret| controller::namespace_of(&secret))
        // Eight at a time: faster is bound by the disk (CREATE DATABASE copies a template),
        // and each reconcile in flight holds a database connection and its buffers.
        .with_config(ControllerConfig::default().concurrency(8))
        // A new leader checks every namespace at once; every resync interval all are checked
        // again, to repair drift.
        .reconcile_all_on(controller::on_becoming_leader(leadership.clone()))
        .reconcile_all_on(controller::every(options.resync_interval))
        .graceful_shutdown_on(token.cancelled_owned());
    let store = controller.store();
    controller::spawn(
        process,
        store,
        controller.run(reconcile, error_policy, context),
        leadership,
    );
    Ok(())
}

/// `/readyz` waits for the first successful connection to each configured database.
fn spawn_readiness(process: &Process, context: &Arc<Context>) {
    if context.postgres.is_some() {
        let context = Arc::clone(context);
        controller::open_once(process.readiness.gate("postgres"), move || {
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
        controller::open_once(process.readiness.gate("redis"), move || {
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

/// Reconciles one namespace and reports the outcome in metrics, a log line and, for a
/// failure, a Warning Event naming the step that failed.
pub async fn reconcile(namespace: Arc<Namespace>, context: Arc<Context>) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        // Becoming leader reconciles every namespace; until then there is nothing to do.
        return Ok(Action::await_change());
    }
    let name = namespace.name_any();
    tracing::debug!(namespace = %name, "reconciling");
    let started = Instant::now();
    let mut step = Step::ReadAnnotations;
    let result = reconcile_namespace(&namespace, &context, &mut step).await;
    let metrics = &context.metrics;
    metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            metrics.reconciles.with_label_values(&["success"]).inc();
            context.backoff.succeeded(&name);
            // The periodic re-check comes from one timer for all namespaces (see `start`), not
            // from per-object requeues, which can pile up when events arrive mid-reconcile.
            Ok(Action::await_change())
        }
        Err(error) => {
            metrics.reconciles.with_label_values(&["error"]).inc();
            metrics.errors.with_label_values(&[error.reason()]).inc();
            tracing::warn!(namespace = %name, step = step.action(), reason = error.reason(), %error, "reconcile failed");
            context
                .report
                .warning(&namespace, step, error.reason(), &error.to_string())
                .await;
            Err(error)
        }
    }
}

pub fn error_policy(namespace: Arc<Namespace>, error: &Error, context: Arc<Context>) -> Action {
    if error.is_permanent() {
        Action::await_change()
    } else {
        Action::requeue(context.backoff.failed(&namespace.name_any()))
    }
}

async fn reconcile_namespace(
    namespace: &Namespace,
    context: &Context,
    step: &mut Step,
) -> Result<(), Error> {
    let name = namespace.name_any();
    let reading = desired::read(
        &name,
        namespace.annotations(),
        &context.settings.allowed_extensions,
    );
    if namespace.metadata.deletion_timestamp.is_some() {
        *step = Step::Drop;
        return finalize::finalize(namespace, &reading.desired, context).await;
    }
    if !reading.invalid.is_empty() {
        let messages: Vec<String> = reading.invalid.iter().map(ToString::to_string).collect();
        return Err(Error::InvalidAnnotations(messages.join("; ")));
    }
    if reading.redis_refused {
        context
            .report
            .warning(
                namespace,
                Step::ReadAnnotations,
                "RedisNotForWallabag",
                "hearth.dev/redis is refused for the wallabag profile: wallabag 2.6 sends Redis \
                 only a password, which Redis takes as a login of its default user, so it could \
                 never use an ACL user of its own. No Redis index or user was made; wallabag runs \
                 without Redis (it uses it only for asynchronous imports). Remove \
                 hearth.dev/redis from this namespace",
            )
            .await;
    }
    if !reading.desired.opted_in() {
        // Only a namespace that carries traces of hearth (its write-back annotations or its
        // finalizer) has anything to clean up; the rest cost no API call.
        let traces = namespace
            .annotations()
            .contains_key(annotations::POSTGRES_DATABASE)
            || namespace.annotations().contains_key(annotations::REDIS_DB)
            || namespace.finalizers().iter().any(|f| f == FINALIZER);
        if traces {
            *step = Step::OptOut;
            finalize::opt_out(namespace, context).await?;
        }
        return Ok(());
    }
    provision::provision(namespace, &reading, context, step).await
}
