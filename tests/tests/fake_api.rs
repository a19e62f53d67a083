//! The fake API server, driven only through the real `kube` client and kube-runtime.

// Test helpers panic on failure just as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use hearth_tests::FakeApiServer;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Secret, Service};
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

async fn server() -> (FakeApiServer, Client) {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    (server, client)
}

async fn create_namespace(client: &Client, name: &str) -> Namespace {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap()
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn api_error(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_kube_runtime_watcher_sees_create_update_delete_of_a_namespace_in_order() {
    let (_server, client) = server().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut events = watcher(namespaces.clone(), watcher::Config::default()).boxed();
    loop {
        let event = tokio::time::timeout(WAIT, events.try_next()).await.unwrap();
        if matches!(event.unwrap(), Some(watcher::Event::InitDone)) {
            break;
        }
    }

    create_namespace(&client, "paperless").await;
    let labels = json!({"metadata": {"labels": {"hearth.dev/test": "updated"}}});
    namespaces
        .patch("paperless", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    namespaces
        .delete("paperless", &DeleteParams::default())
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(WAIT, events.try_next())
            .await
            .expect("watcher went quiet")
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Apply(ns) => {
                let label = ns.labels().get("hearth.dev/test").cloned();
                let terminating = ns.metadata.deletion_timestamp.is_some();
                seen.push(format!("apply label={label:?} terminating={terminating}"));
            }
            watcher::Event::Delete(ns) => seen.push(format!("delete {}", ns.name_any())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "apply label=None terminating=false",
            "apply label=Some(\"updated\") terminating=false",
            "apply label=Some(\"updated\") terminating=true",
            "delete paperless",
        ]
    );
}

#[tokio::test]
async fn server_side_apply_from_two_field_managers() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "apps");
    let apply = |manager: &str, force: bool| {
        let mut params = PatchParams::apply(manager);
        params.force = force;
        params
    };
    let body = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": data});

    maps.patch(
        "shared",
        &apply("db-provisioner", false),
        &Patch::Apply(body(json!({"a": "1", "gone-later": "x"}))),
    )
    .await
    .unwrap();
    let merged = maps
        .patch(
            "shared",
            &apply("ingress-sync", false),
            &Patch::Apply(body(json!({"b": "2"}))),
        )
        .await
        .unwrap();
    let data = merged.data.clone().unwrap();
    assert_eq!(data.get("a").map(String::as_str), Some("1"));
    assert_eq!(data.get("b").map(String::as_str), Some("2"));
    let managers: BTreeMap<String, String> = merged
        .managed_fields()
        .iter()
        .map(|entry| {
            let fields = serde_json::to_string(&entry.fields_v1.as_ref().unwrap().0).unwrap();
            (entry.manager.clone().unwrap(), fields)
        })
        .collect();
    assert_eq!(managers.len(), 2, "{managers:?}");
    assert!(managers["db-provisioner"].contains("f:a"));
    assert!(managers["ingress-sync"].contains("f:b"));
    assert!(!managers["ingress-sync"].contains("f:a"));

    // Changing another manager's field is a conflict that names it...
    let conflict = maps
        .patch(
            "shared",
            &apply("ingress-sync", false),
            &Patch::Apply(body(json!({"a": "changed", "b": "2"}))),
        )
        .await
        .unwrap_err();
    let status = api_error(conflict);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status
            .message
            .contains("conflict with \"db-provisioner\": .data.a"),
        "{}",
        status.message
    );
    // ...unless forced, which takes the field over.
    maps.patch(
        "shared",
        &apply("ingress-sync", true),
        &Patch::Apply(body(json!({"a": "changed", "b": "2"}))),
    )
    .await
    .unwrap();

    // A field its only manager stops applying is removed.
    let after = maps
        .patch(
            "shared",
            &apply("db-provisioner", false),
            &Patch::Apply(body(json!({}))),
        )
        .await
        .unwrap();
    let data = after.data.unwrap();
    assert!(!data.contains_key("gone-later"), "{data:?}");
    assert_eq!(data.get("a").map(String::as_str), Some("changed"));

    // Applying the same thing again changes nothing, not even the resourceVersion.
    let again = maps
        .patch(
            "shared",
            &apply("db-provisioner", false),
            &Patch::Apply(body(json!({}))),
        )
        .await
        .unwrap();
    assert_eq!(again.resource_version(), after.metadata.resource_version);
}

#[tokio::test]
async fn apply_creates_and_requires_a_field_manager() {
    let (server, client) = server().await;
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "apps");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "new"}, "data": {"k": "v"}});
    let created = maps
        .patch("new", &PatchParams::apply("me"), &Patch::Apply(&body))
        .await
        .unwrap();
    assert_eq!(created.data.unwrap()["k"], "v");
    assert_eq!(created.metadata.namespace.as_deref(), Some("apps"));

    // Without a field manager the real server refuses an apply; so does the fake.
    let response = raw_patch(
        &server,
        "/api/v1/namespaces/apps/configmaps/new",
        "application/apply-patch+yaml",
        &body,
    )
    .await;
    assert_eq!(response.0, 400, "{}", response.1);
}

/// A PATCH sent by hand, for what the kube client never sends.
async fn raw_patch(
    server: &FakeApiServer,
    path: &str,
    content_type: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let client = server.client().unwrap();
    let request = http::Request::patch(path)
        .header("content-type", content_type)
        .body(serde_json::to_vec(body).unwrap())
        .unwrap();
    match client.request::<serde_json::Value>(request).await {
        Ok(value) => (200, value),
        Err(kube::Error::Api(status)) => (status.code, json!(status.message)),
        Err(other) => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_finalizer_holds_a_delete_until_it_is_removed() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "apps");
    let mut guarded = config_map("guarded", &[("k", "v")]);
    guarded.metadata.finalizers = Some(vec!["hearth.dev/cleanup".into()]);
    maps.create(&PostParams::default(), &guarded).await.unwrap();

    let deleted = maps
        .delete("guarded", &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.is_left(), "a finalizer keeps the object");
    let held = maps.get("guarded").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());

    // A second delete changes nothing; a new finalizer is refused while deleting.
    maps.delete("guarded", &DeleteParams::default())
        .await
        .unwrap();
    let more = json!({"metadata": {"finalizers": ["hearth.dev/cleanup", "other"]}});
    let refused = maps
        .patch("guarded", &PatchParams::default(), &Patch::Merge(&more))
        .await
        .unwrap_err();
    assert_eq!(api_error(refused).code, 403);

    let release = json!({"metadata": {"finalizers": null}});
    maps.patch("guarded", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    let gone = maps.get("guarded").await.unwrap_err();
    let status = api_error(gone);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "configmaps \"guarded\" not found");
}

#[tokio::test]
async fn a_stale_update_gets_409_and_a_duplicate_create_409_already_exists() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "apps");
    let first = maps
        .create(&PostParams::default(), &config_map("cm", &[("v", "1")]))
        .await
        .unwrap();

    let duplicate = maps
        .create(&PostParams::default(), &config_map("cm", &[]))
        .await
        .unwrap_err();
    let status = api_error(duplicate);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );

    let mut newer = first.clone();
    newer.data = Some([("v".to_owned(), "2".to_owned())].into());
    let newer = maps
        .replace("cm", &PostParams::default(), &newer)
        .await
        .unwrap();
    assert_ne!(newer.resource_version(), first.resource_version());

    let mut stale = first;
    stale.data = Some([("v".to_owned(), "stale".to_owned())].into());
    let refused = maps
        .replace("cm", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    let status = api_error(refused);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(status.message.contains("the object has been modified"));
    assert_eq!(maps.get("cm").await.unwrap().data.unwrap()["v"], "2");
}

#[tokio::test]
async fn lists_filter_by_selectors_and_page_with_continue() {
    let (server, client) = server().await;
    create_namespace(&client, "a").await;
    create_namespace(&client, "b").await;
    for (namespace, count) in [("a", 5), ("b", 2)] {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        for i in 0..count {
            let mut map = config_map(&format!("cm-{i}"), &[]);
            let tier = if i % 2 == 0 { "even" } else { "odd" };
            map.metadata.labels = Some([("tier".to_owned(), tier.to_owned())].into());
            maps.create(&PostParams::default(), &map).await.unwrap();
        }
    }
    let all: Api<ConfigMap> = Api::all(client.clone());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        7
    );
    let even = all
        .list(&ListParams::default().labels("tier=even"))
        .await
        .unwrap();
    assert_eq!(even.items.len(), 4);
    let in_b = all
        .list(&ListParams::default().fields("metadata.namespace=b"))
        .await
        .unwrap();
    assert_eq!(in_b.items.len(), 2);
    let set = all
        .list(&ListParams::default().labels("tier in (odd),tier notin (even)"))
        .await
        .unwrap();
    assert_eq!(set.items.len(), 3);

    let mut names = Vec::new();
    let mut params = ListParams::default().limit(3);
    loop {
        let page = all.list(&params).await.unwrap();
        assert!(page.items.len() <= 3);
        names.extend(
            page.items
                .iter()
                .map(|m| format!("{}/{}", m.namespace().unwrap(), m.name_any())),
        );
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(names.len(), 7);
    assert_eq!(names.first().map(String::as_str), Some("a/cm-0"));
    assert_eq!(names.last().map(String::as_str), Some("b/cm-1"));

    // A continue token from before a compaction is too old, as on the real server.
    let first_page = all.list(&ListParams::default().limit(2)).await.unwrap();
    create_namespace(&client, "c").await;
    server.compact();
    let token = first_page.metadata.continue_.unwrap();
    let expired = all
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap_err();
    assert_eq!(api_error(expired).code, 410);
}

#[tokio::test]
async fn watch_resumes_from_a_version_sends_bookmarks_and_410s_when_too_old() {
    let server = FakeApiServer::start_with_bookmarks_every(Duration::from_millis(100))
        .await
        .unwrap();
    let client = server.client().unwrap();
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    let first = maps
        .create(&PostParams::default(), &config_map("one", &[]))
        .await
        .unwrap();
    maps.create(&PostParams::default(), &config_map("two", &[]))
        .await
        .unwrap();

    // From the first object's version: only what came after, then bookmarks.
    let version = first.resource_version().unwrap();
    let params = WatchParams::default();
    let mut stream = maps.watch(&params, &version).await.unwrap().boxed();
    let next = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next {
        WatchEvent::Added(map) => assert_eq!(map.name_any(), "two"),
        other => panic!("unexpected {other:?}"),
    }
    let next = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(next, WatchEvent::Bookmark(_)), "{next:?}");

    // After compaction the old version is gone: the stream says 410 Expired.
    server.compact();
    let mut stream = maps.watch(&params, &version).await.unwrap().boxed();
    let next = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("unexpected {other:?}"),
    }

    // kube-runtime's watcher recovers from that by listing again, and keeps working.
    let mut events = watcher(maps.clone(), watcher::Config::default()).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(map) => initial.push(map.name_any()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(initial, ["one", "two"]);
}

#[tokio::test]
async fn a_label_change_moves_an_object_in_and_out_of_a_selector_watch() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    let config = watcher::Config::default().labels("hearth.dev/managed=yes");
    let mut events = watcher(maps.clone(), config).boxed();
    while !matches!(
        tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap(),
        Some(watcher::Event::InitDone)
    ) {}
    maps.create(&PostParams::default(), &config_map("cm", &[]))
        .await
        .unwrap();
    let label = |value: &str| json!({"metadata": {"labels": {"hearth.dev/managed": value}}});
    maps.patch("cm", &PatchParams::default(), &Patch::Merge(label("yes")))
        .await
        .unwrap();
    maps.patch("cm", &PatchParams::default(), &Patch::Merge(label("no")))
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, watcher::Event::Apply(_)), "{first:?}");
    let second = tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(second, watcher::Event::Delete(_)), "{second:?}");
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents_and_waits_for_their_finalizers() {
    let (_server, client) = server().await;
    create_namespace(&client, "doomed").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "doomed");
    maps.create(&PostParams::default(), &config_map("plain", &[]))
        .await
        .unwrap();
    let mut held = serde_json::from_value::<Secret>(json!({
        "metadata": {"name": "held", "finalizers": ["hearth.dev/db"]},
        "stringData": {"password": "x"},
    }))
    .unwrap();
    held = secrets.create(&PostParams::default(), &held).await.unwrap();
    assert_eq!(held.data.unwrap()["password"].0, b"x");

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(api_error(maps.get("plain").await.unwrap_err()).code, 404);
    let terminating = namespaces.get("doomed").await.unwrap();
    assert_eq!(
        terminating.status.unwrap().phase.as_deref(),
        Some("Terminating")
    );
    let refused = maps
        .create(&PostParams::default(), &config_map("late", &[]))
        .await
        .unwrap_err();
    assert_eq!(api_error(refused).code, 403);

    let release = json!({"metadata": {"finalizers": []}});
    secrets
        .patch("held", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    assert_eq!(
        api_error(namespaces.get("doomed").await.unwrap_err()).code,
        404
    );
    assert_eq!(api_error(secrets.get("held").await.unwrap_err()).code, 404);
}

#[tokio::test]
async fn dependents_are_garbage_collected_through_owner_references() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    let owner = maps
        .create(&PostParams::default(), &config_map("owner", &[]))
        .await
        .unwrap();
    let reference = OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.uid().unwrap(),
        ..Default::default()
    };
    for name in ["child", "orphan-to-be"] {
        let mut child = config_map(name, &[]);
        child.metadata.owner_references = Some(vec![reference.clone()]);
        maps.create(&PostParams::default(), &child).await.unwrap();
    }
    maps.delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(api_error(maps.get("child").await.unwrap_err()).code, 404);
    assert_eq!(
        api_error(maps.get("orphan-to-be").await.unwrap_err()).code,
        404
    );

    // With the Orphan policy dependents stay and lose the reference.
    let owner = maps
        .create(&PostParams::default(), &config_map("owner", &[]))
        .await
        .unwrap();
    let mut child = config_map("kept", &[]);
    child.metadata.owner_references = Some(vec![OwnerReference {
        uid: owner.uid().unwrap(),
        ..reference
    }]);
    maps.create(&PostParams::default(), &child).await.unwrap();
    maps.delete("owner", &DeleteParams::orphan()).await.unwrap();
    let kept = maps.get("kept").await.unwrap();
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn status_is_a_subresource_where_the_real_server_makes_it_one() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "apps");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}}},
        "status": {"replicas": 9},
    }))
    .unwrap();
    let created = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    assert!(created.status.is_none(), "status is dropped on create");
    assert_eq!(created.metadata.generation, Some(1));

    let status = json!({"status": {"replicas": 1}, "spec": {"replicas": 5}});
    let after = deployments
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(after.status.unwrap().replicas, Some(1));
    assert_eq!(
        after.spec.unwrap().replicas,
        None,
        "spec ignored on /status"
    );
    assert_eq!(after.metadata.generation, Some(1));

    let spec = json!({"spec": {"replicas": 3}, "status": {"replicas": 7}});
    let after = deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .unwrap();
    assert_eq!(after.spec.unwrap().replicas, Some(3));
    assert_eq!(
        after.status.unwrap().replicas,
        Some(1),
        "status ignored on the main resource"
    );
    assert_eq!(after.metadata.generation, Some(2));
}

#[tokio::test]
async fn json_and_strategic_patches() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "apps");
    maps.create(&PostParams::default(), &config_map("cm", &[("a", "1")]))
        .await
        .unwrap();
    let operations: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/a", "value": "1"},
        {"op": "add", "path": "/data/b", "value": "2"},
        {"op": "remove", "path": "/data/a"},
    ]))
    .unwrap();
    let patched = maps
        .patch(
            "cm",
            &PatchParams::default(),
            &Patch::<()>::Json(operations),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.data.unwrap(),
        [("b".to_owned(), "2".to_owned())].into()
    );

    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/b", "value": "wrong"}]))
            .unwrap();
    let refused = maps
        .patch("cm", &PatchParams::default(), &Patch::<()>::Json(failing))
        .await
        .unwrap_err();
    assert_eq!(api_error(refused).code, 422);

    let strategic = json!({"data": {"c": "3"}});
    let patched = maps
        .patch("cm", &PatchParams::default(), &Patch::Strategic(&strategic))
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap().len(), 2);
}

#[tokio::test]
async fn every_kind_hearth_uses_round_trips() {
    let (_server, client) = server().await;
    create_namespace(&client, "apps").await;
    async fn round_trip<K>(client: &Client, value: serde_json::Value)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(client.clone(), "apps");
        let object: K = serde_json::from_value(value).unwrap();
        let created = api.create(&PostParams::default(), &object).await.unwrap();
        let name = created.meta().name.clone().unwrap();
        api.get(&name).await.unwrap();
        assert_eq!(
            api.list(&ListParams::default()).await.unwrap().items.len(),
            1
        );
        api.delete(&name, &DeleteParams::default()).await.unwrap();
        assert_eq!(api_error(api.get(&name).await.unwrap_err()).code, 404);
    }
    round_trip::<Secret>(
        &client,
        json!({"metadata": {"name": "s"}, "data": {"k": "dg=="}}),
    )
    .await;
    round_trip::<ConfigMap>(&client, json!({"metadata": {"name": "c"}})).await;
    round_trip::<Service>(
        &client,
        json!({"metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}]}}),
    )
    .await;
    round_trip::<Event>(&client, json!({"metadata": {"generateName": "e."}, "involvedObject": {"kind": "Namespace", "name": "apps"}, "reason": "Test"})).await;
    round_trip::<EventV1>(&client, json!({"metadata": {"name": "e2"}, "eventTime": "2026-11-25T00:00:00.000000Z", "reason": "Test", "action": "Testing", "reportingController": "hearth.dev/test", "reportingInstance": "t"})).await;
    round_trip::<Deployment>(
        &client,
        json!({"metadata": {"name": "d"}, "spec": {"selector": {}, "template": {}}}),
    )
    .await;
    round_trip::<Ingress>(
        &client,
        json!({"metadata": {"name": "i"}, "spec": {"ingressClassName": "tailscale"}}),
    )
    .await;
    round_trip::<Lease>(
        &client,
        json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "me"}}),
    )
    .await;

    let gvk = GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "externalsecrets");
    let external: Api<DynamicObject> = Api::namespaced_with(client.clone(), "apps", &resource);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
        "metadata": {"name": "es"}, "spec": {"refreshInterval": "1h"},
    }))
    .unwrap();
    external
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    let status = json!({"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret", "status": {"refreshTime": "now"}});
    let after = external
        .patch_status("es", &PatchParams::apply("eso"), &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(after.data["status"]["refreshTime"], "now");
    assert_eq!(after.data["spec"]["refreshInterval"], "1h");
}

#[tokio::test]
async fn errors_are_status_bodies_like_the_real_server() {
    let (_server, client) = server().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "nowhere");
    let error = api_error(
        secrets
            .create(&PostParams::default(), &Secret::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((error.code, error.reason.as_str()), (422, "Invalid"));
    let error = api_error(
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "s"}})).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((error.code, error.reason.as_str()), (404, "NotFound"));
    assert_eq!(error.message, "namespaces \"nowhere\" not found");

    create_namespace(&client, "apps").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "apps");
    let bad_name = serde_json::from_value(json!({"metadata": {"name": "Not_Valid"}})).unwrap();
    let error = api_error(
        secrets
            .create(&PostParams::default(), &bad_name)
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 422);
    let bad_data = serde_json::from_value(json!({"metadata": {"name": "s"}, "data": {}})).unwrap();
    secrets
        .create(&PostParams::default(), &bad_data)
        .await
        .unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "34")
    );
}

#[tokio::test]
async fn a_kubeconfig_file_reaches_the_server() {
    let (server, _client) = server().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    // The harness acting as a user: it says so, as every client of the fake API must.
    config.headers.push((
        http::HeaderName::from_static(hearth_tests::fake_api::HARNESS_HEADER),
        http::HeaderValue::from_static("true"),
    ));
    let client = Client::try_from(config).unwrap();
    create_namespace(&client, "via-kubeconfig").await;
    let namespaces: Api<Namespace> = Api::all(server.client().unwrap());
    namespaces.get("via-kubeconfig").await.unwrap();
}
