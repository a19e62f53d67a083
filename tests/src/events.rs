//! The Events hearth publishes about a namespace, as the tests read them. Events about a
//! Namespace (cluster-scoped) live in namespace `default`.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::eventually;

/// One Event about a namespace: its type, reason, action and note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub type_: String,
    pub reason: String,
    pub action: String,
    pub note: String,
}

/// Every Event about `namespace`, oldest first.
pub async fn about(client: &Client, namespace: &str) -> Vec<Seen> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(namespace))
        .map(|e| Seen {
            type_: e.type_.unwrap_or_default(),
            reason: e.reason.unwrap_or_default(),
            action: e.action.unwrap_or_default(),
            note: e.note.unwrap_or_default(),
        })
        .collect()
}

/// Waits for an Event with `reason` about `namespace`; its note.
pub async fn wait_for(client: &Client, namespace: &str, reason: &str) -> String {
    eventually(
        &format!("an Event {reason} about {namespace}"),
        Duration::from_secs(30),
        || async {
            about(client, namespace)
                .await
                .into_iter()
                .find(|seen| seen.reason == reason)
                .map(|seen| seen.note)
        },
    )
    .await
}
