//! The controller over Namespaces: fetch → validate ([`crate::desired`]) → build and apply
//! ([`crate::ingresses`], [`crate::publish`]) → report (Events, metrics).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::StreamExt;
use hearth_runtime::Process;
use hearth_runtime::annotations;
use hearth_runtime::controller::{self, Backoff};
use hearth_runtime::events::{EventPublisher, EventType};
use hearth_runtime::leader::Leadership;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::build::{FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL};
use crate::metrics::Metrics;
use crate::{Error, Options, cleanup, desired, ingresses, publish};

const LEASE_NAME: &str = "hearth-ingress-sync";

pub struct Context {
    pub client: Client,
    pub events: EventPublisher,
    pub leadership: Leadership,
    pub class: String,
    /// Every Ingress in what is watched, for host-name claims and hearth's own current state.
    pub ingresses: Store<Ingress>,
    pub metrics: Metrics,
    backoff: Backoff,
    /// Per namespace: Ingresses kept and whether a URL is published, for the gauges.
    counts: Mutex<HashMap<String, (usize, bool)>>,
}

/// The steps of a reconcile, each the Event action of what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    ReadAnnotations,
    ApplyIngress,
    RemoveIngress,
    PublishUrl,
    RestartDeployments,
    OptOut,
    CheckDevices,
}

impl Step {
    pub fn action(self) -> &'static str {
        match self {
            Self::ReadAnnotations => "ReadAnnotations",
            Self::ApplyIngress => "ApplyIngress",
            Self::RemoveIngress => "RemoveIngress",
            Self::PublishUrl => "PublishUrl",
            Self::RestartDeployments => "RestartDeployments",
            Self::OptOut => "OptOut",
            Self::CheckDevices => "CheckDevices",
        }
    }
}

impl Context {
    pub async fn normal(
        &self,
        namespace: &Namespace,
        step: Step,
        reason: &'static str,
        note: &str,
    ) {
        self.events
            .publish_about(namespace, EventType::Normal, reason, step.action(), note)
            .await;
    }

    /// Something asked for cannot be done: a Warning Event, a log line and a count.
    pub async fn refuse(
        &self,
        namespace: &Namespace,
        step: Step,
        reason: &'static str,
        note: &str,
    ) {
        tracing::warn!(namespace = %namespace.name_any(), reason, note, "refused");
        self.metrics.errors.with_label_values(&[reason]).inc();
        self.events
            .publish_about(namespace, EventType::Warning, reason, step.action(), note)
            .await;
    }

    /// hearth's Ingresses in `namespace`, as last seen.
    pub fn ours_in(&self, namespace: &str) -> Vec<Arc<Ingress>> {
        self.ingresses
            .state()
            .into_iter()
            .filter(|ingress| {
                ingress.namespace().as_deref() == Some(namespace)
                    && ingress.labels().get(MANAGED_BY_LABEL).map(String::as_str)
                        == Some(MANAGED_BY)
            })
            .collect()
    }

    fn count(&self, namespace: &str, ingresses: usize, published: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if ingresses == 0 && !published {
            counts.remove(namespace);
        } else {
            counts.insert(namespace.to_owned(), (ingresses, published));
        }
        let kept: usize = counts.values().map(|(n, _)| n).sum();
        let urls = counts.values().filter(|(_, published)| *published).count();
        drop(counts);
        self.metrics
            .ingresses
            .set(i64::try_from(kept).unwrap_or(i64::MAX));
        self.metrics
            .urls_published
            .set(i64::try_from(urls).unwrap_or(i64::MAX));
    }
}

/// Builds the context from options and runs the controller until shutdown.
pub async fn start(process: &Process, options: Options) -> Result<(), Error> {
    let client = hearth_runtime::kube_client(crate::SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(crate::kube("connect"))?;
    let metrics = Metrics::register(&process.registry)?;
    let common = &options.common;
    let token = process.shutdown.token();
    let leadership = hearth_runtime::controller::elect_leader(process, &client, common, LEASE_NAME);

    let (ingress_api, service_api, watch_config) = match &common.watch_namespace {
        Some(only) => (
            Api::<Ingress>::namespaced(client.clone(), only),
            Api::<Service>::namespaced(client.clone(), only),
            watcher::Config::default().fields(&format!("metadata.name={only}")),
        ),
        None => (
            Api::<Ingress>::all(client.clone()),
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    };
    // Every Ingress, held in memory: host-name claims are checked against the whole cluster
    // without a list per reconcile.
    let (store, writer) = reflector::store();
    let trimmed = watcher(ingress_api.clone(), watcher::Config::default())
        .default_backoff()
        .modify(trim);
    let reflecting = reflector(writer, trimmed).for_each(|_| futures::future::ready(()));
    let stop = token.clone();
    process.shutdown.spawn("ingress-reflector", async move {
        tokio::select! {
            () = reflecting => {}
            () = stop.cancelled() => {}
        }
        Ok(())
    });
    controller::open_when_synced(store.clone(), process.readiness.gate("ingresses"));

    let context = Arc::new(Context {
        events: EventPublisher::new(client.clone(), "hearth-ingress-sync", &common.pod_name),
        client: client.clone(),
        leadership: leadership.clone(),
        class: options.ingress_class.clone(),
        ingresses: store,
        metrics,
        backoff: Backoff::default(),
        counts: Mutex::default(),
    });
    if let Some(checker) = cleanup::DeviceCheck::from_options(&options, Arc::clone(&context))? {
        process
            .shutdown
            .spawn("device-check", checker.run(token.clone()));
    }

    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let controller = Controller::new(Api::<Namespace>::all(client.clone()), watch_config)
        // The operator writing an Ingress's status publishes its URL; a Service appearing or
        // changing its ports may make an exposure possible.
        .watches(ingress_api, ours, |ingress| {
            controller::namespace_of(&ingress)
        })
        .watches(service_api, watcher::Config::default(), |service| {
            controller::namespace_of(&service)
        })
        .with_config(ControllerConfig::default().concurrency(8))
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

/// What of an Ingress is held in memory: no other manager's field records, and no
/// `kubectl apply` copy of the whole object (often the largest part of it).
fn trim(ingress: &mut Ingress) {
    if let Some(fields) = ingress.metadata.managed_fields.as_mut() {
        fields.retain(|entry| entry.manager.as_deref() == Some(FIELD_MANAGER));
    }
    if let Some(annotations) = ingress.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

pub async fn reconcile(namespace: Arc<Namespace>, context: Arc<Context>) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        // Becoming leader reconciles every namespace; until then there is nothing to do.
        return Ok(Action::await_change());
    }
    let name = namespace.name_any();
    let started = Instant::now();
    let result = reconcile_namespace(&namespace, &context).await;
    let metrics = &context.metrics;
    metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            metrics.reconciles.with_label_values(&["success"]).inc();
            context.backoff.succeeded(&name);
            Ok(Action::await_change())
        }
        Err(error) => {
            metrics.reconciles.with_label_values(&["error"]).inc();
            metrics.errors.with_label_values(&[error.reason()]).inc();
            tracing::warn!(namespace = %name, reason = error.reason(), %error, "reconcile failed");
            let step = if error.is_permanent() {
                Step::ReadAnnotations
            } else {
                Step::ApplyIngress
            };
            context
                .events
                .publish_about(
                    namespace.as_ref(),
                    EventType::Warning,
                    error.reason(),
                    step.action(),
                    &error.to_string(),
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
        Action::requeue(context.backoff.failed(&namespace.name_any()))
    }
}

async fn reconcile_namespace(namespace: &Namespace, context: &Context) -> Result<(), Error> {
    let name = namespace.name_any();
    if namespace.metadata.deletion_timestamp.is_some() {
        // Its Ingresses and ConfigMap go with it (and with their Services).
        context.count(&name, 0, false);
        return Ok(());
    }
    let reading = desired::read(&name, namespace.annotations());
    if !reading.invalid.is_empty() {
        let messages: Vec<String> = reading.invalid.iter().map(ToString::to_string).collect();
        return Err(Error::InvalidAnnotations(messages.join("; ")));
    }
    for why in &reading.unnamed {
        context
            .refuse(namespace, Step::ReadAnnotations, "HostnameInvalid", why)
            .await;
    }
    let desired = reading.desired;
    if desired.exposures.is_empty() {
        let traces = namespace.annotations().contains_key(annotations::URL)
            || !context.ours_in(&name).is_empty();
        if traces {
            publish::opt_out(namespace, context).await?;
        }
        context.count(&name, 0, false);
        return Ok(());
    }
    let mut kept = Vec::new();
    for exposure in &desired.exposures {
        if let Some(ingress) = ingresses::ensure(namespace, &desired, exposure, context).await? {
            kept.push((exposure, ingress));
        }
    }
    ingresses::remove_stale(namespace, &desired, context).await?;
    // The URL is the first exposure's: the app's own address.
    let published = match kept.first() {
        Some((exposure, ingress)) if exposure.service == desired.exposures[0].service => {
            publish::publish(namespace, &desired, exposure, ingress, context).await?
        }
        _ => false,
    };
    context.count(&name, kept.len(), published);
    Ok(())
}
