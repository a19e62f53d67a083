//! Events (`events.k8s.io/v1`) that always say the current cause.
//!
//! kube-runtime's `Recorder` folds every Event with the same type, reason and action into one
//! series for minutes and keeps the first note, so a changed cause would stay hidden behind the
//! old one. Here the note is part of what makes two Events the same: an exact repeat becomes
//! a series (one PATCH), a new note is a new Event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Mutex;

/// The API server refuses notes over 1 KiB.
const NOTE_LIMIT: usize = 1024;
/// A repeat within this long joins the earlier Event's series (kube-runtime's figure).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// The cache never holds more than this many Events, whatever happens.
const CACHE_LIMIT: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
    type_: EventType,
    reason: &'static str,
    action: &'static str,
    note: String,
}

struct Sent {
    name: String,
    count: i32,
    last: Instant,
}

/// Publishes Events for one controller instance.
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    sent: Mutex<HashMap<Key, Sent>>,
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            sent: Mutex::default(),
        }
    }

    /// Publishes one Event about a cluster object (a Namespace, an Ingress, …).
    pub async fn publish_about<K: kube::Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &'static str,
        action: &'static str,
        note: &str,
    ) {
        self.publish(&object.object_ref(&()), type_, reason, action, note)
            .await;
    }

    /// Publishes one Event about `regarding`. Events about cluster-scoped objects (a Namespace)
    /// go to `default`, where the API server expects them. A failure is logged, never returned:
    /// an Event is a report, and a reconcile must not fail for want of one.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &'static str,
        action: &'static str,
        note: &str,
    ) {
        let note = truncate(note, NOTE_LIMIT);
        let key = Key {
            regarding: (
                regarding.api_version.clone(),
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
            ),
            type_,
            reason,
            action,
            note: note.to_owned(),
        };
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let now = Instant::now();
        let mut sent = self.sent.lock().await;
        sent.retain(|_, s| now.duration_since(s.last) < SERIES_WINDOW);
        let outcome = match sent.get_mut(&key) {
            Some(earlier) => {
                earlier.count = earlier.count.saturating_add(1);
                earlier.last = now;
                let series = EventSeries {
                    count: earlier.count,
                    last_observed_time: MicroTime(jiff::Timestamp::now()),
                };
                let patch = json!({"series": series});
                events
                    .patch(
                        &earlier.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map(|_| ())
            }
            None => {
                let event = self.event(regarding, &namespace, type_, reason, action, note);
                let created = events.create(&PostParams::default(), &event).await;
                if let Ok(created) = &created {
                    if sent.len() >= CACHE_LIMIT
                        && let Some(oldest) = sent
                            .iter()
                            .min_by_key(|(_, s)| s.last)
                            .map(|(k, _)| k.clone())
                    {
                        sent.remove(&oldest);
                    }
                    sent.insert(
                        key,
                        Sent {
                            name: created.metadata.name.clone().unwrap_or_default(),
                            count: 1,
                            last: now,
                        },
                    );
                }
                created.map(|_| ())
            }
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, reason, "could not publish an Event");
        }
    }

    fn event(
        &self,
        regarding: &ObjectReference,
        namespace: &str,
        type_: EventType,
        reason: &'static str,
        action: &'static str,
        note: &str,
    ) -> Event {
        let now = jiff::Timestamp::now();
        Event {
            metadata: ObjectMeta {
                // The API server adds a random suffix; the name only has to be unique.
                generate_name: Some(format!(
                    "{}.",
                    regarding.name.as_deref().unwrap_or(&self.controller)
                )),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            action: Some(action.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note.to_owned()),
            type_: Some(type_.as_str().to_owned()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        }
    }
}

/// `text` cut to at most `limit` bytes on a character boundary.
pub fn truncate(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut cut = limit;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate(&"x".repeat(2000), NOTE_LIMIT).len(), NOTE_LIMIT);
    }
}
