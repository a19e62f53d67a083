//! Report: Events on the namespace. Each step has its own Event action, and each outcome its
//! own reason, so `kubectl get events` tells the steps apart.

use hearth_runtime::events::{EventPublisher, EventType};
use k8s_openapi::api::core::v1::Namespace;

/// The steps of a reconcile, each the Event action of what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    ReadAnnotations,
    KeepCredentials,
    ProvisionPostgres,
    ProvisionRedis,
    WriteSecret,
    WriteAnnotations,
    Rotate,
    OptOut,
    Drop,
}

impl Step {
    pub fn action(self) -> &'static str {
        match self {
            Self::ReadAnnotations => "ReadAnnotations",
            Self::KeepCredentials => "KeepCredentials",
            Self::ProvisionPostgres => "ProvisionPostgres",
            Self::ProvisionRedis => "ProvisionRedis",
            Self::WriteSecret => "WriteSecret",
            Self::WriteAnnotations => "WriteAnnotations",
            Self::Rotate => "Rotate",
            Self::OptOut => "OptOut",
            Self::Drop => "Drop",
        }
    }
}

/// Publishes Events about namespaces (stored in `default`, as for every cluster-scoped object).
pub struct Reporter {
    events: EventPublisher,
}

impl Reporter {
    pub fn new(events: EventPublisher) -> Self {
        Self { events }
    }

    pub async fn normal(
        &self,
        namespace: &Namespace,
        step: Step,
        reason: &'static str,
        note: &str,
    ) {
        self.publish(namespace, EventType::Normal, step.action(), reason, note)
            .await;
    }

    pub async fn warning(
        &self,
        namespace: &Namespace,
        step: Step,
        reason: &'static str,
        note: &str,
    ) {
        self.publish(namespace, EventType::Warning, step.action(), reason, note)
            .await;
    }

    /// An Event whose action is not one of [`Step`]'s (a PostgreSQL change names its own).
    pub async fn publish(
        &self,
        namespace: &Namespace,
        type_: EventType,
        action: &'static str,
        reason: &'static str,
        note: &str,
    ) {
        self.events
            .publish_about(namespace, type_, reason, action, note)
            .await;
    }
}
