//! ingress-sync end to end: the real binary against the fake Kubernetes API, with a stand-in
//! Tailscale operator that names each Ingress's host after a short delay (and adds its
//! finalizer, as the real one does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::{Stack, TAILNET, WAIT, eventually, metric};

type Annotations<'a> = &'a [(&'a str, Option<&'a str>)];

fn url_hash(deployment: &Deployment) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get("hearth.dev/url-hash")
        .cloned()
}

#[tokio::test]
async fn an_exposed_service_gets_its_ingress_and_the_app_its_url() {
    let stack = Stack::start().await;
    let process = stack.ingress_sync("pod-a", &[]).await;
    stack.namespace_with("paperless", &[]).await;
    stack.service("paperless", "web", &[(8000, "http")]).await;
    stack.deployment("paperless", "paperless").await;
    stack.deployment("paperless", "unrelated").await;
    stack
        .namespace_with(
            "paperless",
            &[
                ("hearth.dev/expose", Some("web:8000")),
                ("hearth.dev/profile", Some("paperless")),
                ("hearth.dev/tailscale-tags", Some("tag:apps")),
                ("hearth.dev/restart-on-url-change", Some("paperless")),
            ],
        )
        .await;
    let ingress = eventually("Ingress hearth-web", WAIT, || {
        stack.ingress("paperless", "hearth-web")
    })
    .await;
    let spec = ingress.spec.as_ref().unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("tailscale"));
    let tls = spec.tls.as_ref().unwrap();
    assert_eq!(tls[0].hosts.as_ref().unwrap(), &["paperless"]);
    let backend = spec
        .default_backend
        .as_ref()
        .unwrap()
        .service
        .as_ref()
        .unwrap();
    assert_eq!(backend.name, "web");
    assert_eq!(backend.port.as_ref().unwrap().number, Some(8000));
    assert_eq!(
        ingress.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
        "hearth-ingress-sync"
    );
    let annotations = ingress.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations["hearth.dev/source"], "paperless/web");
    assert_eq!(annotations["tailscale.com/tags"], "tag:apps");
    let owner = &ingress.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Service", "web")
    );

    // The operator names the host; the app is told its URL.
    let config_map = eventually("ConfigMap hearth-url", WAIT, || {
        stack.url_config_map("paperless")
    })
    .await;
    let url = format!("https://paperless.{TAILNET}");
    let data = config_map.data.unwrap();
    assert_eq!(data["URL"], url);
    assert_eq!(data["HOST"], format!("paperless.{TAILNET}"));
    assert_eq!(data["ORIGIN"], url);
    assert_eq!(data["PAPERLESS_URL"], url);
    assert_eq!(data.len(), 4);
    let annotated = eventually("annotation hearth.dev/url", WAIT, || async {
        let namespace = stack.namespace("paperless").await?;
        namespace
            .metadata
            .annotations?
            .get("hearth.dev/url")
            .cloned()
    })
    .await;
    assert_eq!(annotated, url);
    let note = stack.wait_for_event("paperless", "UrlPublished").await;
    assert!(note.contains(&url), "{note}");
    let events = stack.events_about("paperless").await;
    assert!(
        events
            .iter()
            .any(|(t, r, a, _)| t == "Normal" && r == "IngressCreated" && a == "ApplyIngress")
    );
    assert!(events.iter().all(|(_, r, _, _)| r != "HostnameSuffixed"));

    // The named Deployment is rolled, the other is not.
    let deployments: Api<Deployment> = Api::namespaced(stack.client.clone(), "paperless");
    let rolled = eventually("the Deployment rolled", WAIT, || async {
        url_hash(&deployments.get("paperless").await.unwrap())
    })
    .await;
    assert_eq!(rolled.len(), 16);
    assert_eq!(url_hash(&deployments.get("unrelated").await.unwrap()), None);

    // Never a PUT of an Ingress, never its status or finalizers: the operator's finalizer stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ingress = stack.ingress("paperless", "hearth-web").await.unwrap();
    assert_eq!(
        ingress.metadata.finalizers.as_deref(),
        Some(&["tailscale.com/finalizer".to_owned()][..])
    );
    for write in stack.writes() {
        assert!(write.verb != "update", "a replace: {write:?}");
        assert!(write.subresource.is_none(), "a status write: {write:?}");
    }
    let text = process.get("/metrics").await.unwrap().body;
    assert_eq!(metric(&text, "hearth_ingress_sync_ingresses"), 1.0);
    assert_eq!(metric(&text, "hearth_ingress_sync_urls_published"), 1.0);
    hearth_tests::admin::promtool_check_metrics(&text).unwrap();
}

#[tokio::test]
async fn a_suffixed_host_is_published_as_the_operator_named_it() {
    let stack = Stack::start().await;
    let _process = stack.ingress_sync("pod-a", &[]).await;
    stack.operator.occupy("miniflux");
    stack.namespace_with("miniflux", &[]).await;
    stack.service("miniflux", "web", &[(8080, "http")]).await;
    stack
        .namespace_with(
            "miniflux",
            &[
                ("hearth.dev/expose", Some("web:http")),
                ("hearth.dev/profile", Some("miniflux")),
            ],
        )
        .await;
    let config_map = eventually("ConfigMap hearth-url", WAIT, || {
        stack.url_config_map("miniflux")
    })
    .await;
    assert_eq!(
        config_map.data.unwrap()["BASE_URL"],
        format!("https://miniflux-1.{TAILNET}")
    );
    let note = stack.wait_for_event("miniflux", "HostnameSuffixed").await;
    assert!(note.contains("miniflux-1"), "{note}");
}

#[tokio::test]
async fn drift_is_patched_back_never_by_re_creating() {
    let stack = Stack::start().await;
    let _process = stack.ingress_sync("pod-a", &[]).await;
    stack.namespace_with("wiki", &[]).await;
    stack
        .service("wiki", "web", &[(80, "http"), (8080, "admin")])
        .await;
    stack
        .namespace_with("wiki", &[("hearth.dev/expose", Some("web:80"))])
        .await;
    let before = eventually("Ingress", WAIT, || stack.ingress("wiki", "hearth-web")).await;
    // Someone edits a field hearth owns.
    let ingresses: Api<Ingress> = Api::namespaced(stack.client.clone(), "wiki");
    let edit =
        json!({"spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 8080}}}}});
    ingresses
        .patch(
            "hearth-web",
            &PatchParams::apply("kubectl-edit").force(),
            &Patch::Apply(&json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": "hearth-web"}, "spec": edit["spec"],
            })),
        )
        .await
        .unwrap();
    let repaired = eventually("the port put back", WAIT, || async {
        let ingress = stack.ingress("wiki", "hearth-web").await?;
        let port = ingress
            .spec
            .as_ref()?
            .default_backend
            .as_ref()?
            .service
            .as_ref()?
            .port
            .as_ref()?
            .number;
        (port == Some(80)).then_some(ingress)
    })
    .await;
    assert_eq!(
        repaired.metadata.uid, before.metadata.uid,
        "patched, not re-created"
    );
    stack.wait_for_event("wiki", "IngressUpdated").await;
    assert!(
        stack
            .writes()
            .iter()
            .all(|w| !(w.resource == "ingresses" && w.verb == "delete"))
    );
}

#[tokio::test]
async fn what_the_operator_would_ignore_is_refused_and_said() {
    let stack = Stack::start().await;
    let _process = stack.ingress_sync("pod-a", &[]).await;
    // A hand-written Ingress elsewhere asks for the host name "photos".
    stack.namespace_with("elsewhere", &[]).await;
    let theirs: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "photos"},
        "spec": {
            "ingressClassName": "tailscale",
            "tls": [{"hosts": ["photos"]}],
            "defaultBackend": {"service": {"name": "x", "port": {"number": 80}}},
        },
    }))
    .unwrap();
    Api::<Ingress>::namespaced(stack.client.clone(), "elsewhere")
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    // (namespace, its annotations, the reason refused, what the note says)
    let cases: &[(&str, Annotations, &str, &str)] = &[
        (
            "no-service",
            &[("hearth.dev/expose", Some("web:80"))],
            "ServiceMissing",
            "has no such Service",
        ),
        (
            "wrong-port",
            &[("hearth.dev/expose", Some("web:81"))],
            "PortMissing",
            "80/http",
        ),
        (
            "headless",
            &[("hearth.dev/expose", Some("db:80"))],
            "ServiceNotRoutable",
            "headless",
        ),
        (
            "photos",
            &[("hearth.dev/expose", Some("web:80"))],
            "HostnameTaken",
            "elsewhere/photos",
        ),
        (
            "hostile",
            &[("hearth.dev/expose", Some("../etc:80"))],
            "InvalidAnnotation",
            "hearth.dev/expose",
        ),
        (
            "funnel",
            &[
                ("hearth.dev/expose", Some("web:80")),
                ("hearth.dev/funnel", Some("true")),
                ("hearth.dev/proxy-group", Some("pg")),
            ],
            "InvalidAnnotation",
            "Funnel",
        ),
        (
            "long",
            &[(
                "hearth.dev/expose",
                Some("web:80, a-service-whose-name-is-long-enough-to-push-the-host-past-63:80"),
            )],
            "HostnameInvalid",
            "not a DNS label",
        ),
    ];
    for (namespace, annotations, _, _) in cases {
        stack.namespace_with(namespace, &[]).await;
        if *namespace != "no-service" {
            stack.service(namespace, "web", &[(80, "http")]).await;
        }
        if *namespace == "long" {
            stack
                .service(
                    namespace,
                    "a-service-whose-name-is-long-enough-to-push-the-host-past-63",
                    &[(80, "http")],
                )
                .await;
        }
        if *namespace == "headless" {
            let service = serde_json::from_value(json!({
                "metadata": {"name": "db"},
                "spec": {"ports": [{"port": 80}], "clusterIP": "None"},
            }))
            .unwrap();
            Api::<k8s_openapi::api::core::v1::Service>::namespaced(stack.client.clone(), namespace)
                .create(&PostParams::default(), &service)
                .await
                .unwrap();
        }
        stack.namespace_with(namespace, annotations).await;
    }
    for (namespace, _, reason, says) in cases {
        let note = stack.wait_for_event(namespace, reason).await;
        assert!(note.contains(says), "{namespace}: {note}");
        if *namespace != "long" {
            assert!(
                stack.ingress(namespace, "hearth-web").await.is_none(),
                "{namespace}"
            );
        }
    }
    // The one that could be published beside the refused one was.
    assert!(stack.ingress("long", "hearth-web").await.is_some());
}

#[tokio::test]
async fn an_ingress_hearth_did_not_make_is_left_byte_for_byte() {
    let stack = Stack::start().await;
    let _process = stack.ingress_sync("pod-a", &[]).await;
    stack.namespace_with("blog", &[]).await;
    stack.service("blog", "web", &[(80, "http")]).await;
    let mine: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "hearth-web", "labels": {"team": "me"}},
        "spec": {
            "ingressClassName": "nginx",
            "defaultBackend": {"service": {"name": "web", "port": {"number": 80}}},
        },
    }))
    .unwrap();
    let ingresses: Api<Ingress> = Api::namespaced(stack.client.clone(), "blog");
    let created = ingresses
        .create(&PostParams::default(), &mine)
        .await
        .unwrap();
    // Another one carrying hearth's label but naming another source: not ours either.
    let impostor: Ingress = serde_json::from_value(json!({
        "metadata": {
            "name": "hearth-old",
            "labels": {"app.kubernetes.io/managed-by": "hearth-ingress-sync"},
            "annotations": {"hearth.dev/source": "other/old"},
        },
        "spec": {"defaultBackend": {"service": {"name": "old", "port": {"number": 80}}}},
    }))
    .unwrap();
    let impostor = ingresses
        .create(&PostParams::default(), &impostor)
        .await
        .unwrap();
    stack
        .namespace_with("blog", &[("hearth.dev/expose", Some("web:80"))])
        .await;
    let note = stack.wait_for_event("blog", "Conflict").await;
    assert!(note.contains("never changes or deletes it"), "{note}");
    // Opting out leaves both as they were.
    stack
        .namespace_with("blog", &[("hearth.dev/expose", None)])
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = ingresses.get("hearth-web").await.unwrap();
    assert_eq!(
        serde_json::to_value(&after).unwrap(),
        serde_json::to_value(&created).unwrap()
    );
    let impostor_after = ingresses.get("hearth-old").await.unwrap();
    assert_eq!(
        impostor_after.metadata.resource_version,
        impostor.metadata.resource_version
    );
}

#[tokio::test]
async fn opting_out_removes_only_what_hearth_made() {
    let stack = Stack::start().await;
    let _process = stack.ingress_sync("pod-a", &[]).await;
    stack.namespace_with("photos", &[]).await;
    stack.service("photos", "web", &[(2283, "http")]).await;
    stack.service("photos", "api", &[(3001, "http")]).await;
    stack
        .namespace_with(
            "photos",
            &[("hearth.dev/expose", Some("web:2283,api:3001"))],
        )
        .await;
    eventually("both Ingresses", WAIT, || async {
        let api = stack.ingress("photos", "hearth-api").await?;
        let web = stack.ingress("photos", "hearth-web").await?;
        Some((api, web))
    })
    .await;
    let second = stack.ingress("photos", "hearth-api").await.unwrap();
    assert_eq!(
        second.spec.unwrap().tls.unwrap()[0].hosts.as_ref().unwrap(),
        &["photos-api"]
    );
    eventually("the URL", WAIT, || stack.url_config_map("photos")).await;
    let other_map: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"a": "b"}}))
            .unwrap();
    Api::<ConfigMap>::namespaced(stack.client.clone(), "photos")
        .create(&PostParams::default(), &other_map)
        .await
        .unwrap();

    // One exposure dropped: only its Ingress goes.
    stack
        .namespace_with("photos", &[("hearth.dev/expose", Some("web:2283"))])
        .await;
    eventually("hearth-api gone", WAIT, || async {
        stack
            .ingress("photos", "hearth-api")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    stack.wait_for_event("photos", "IngressRemoved").await;
    // All dropped: Ingress, ConfigMap and annotation go; the app's own ConfigMap stays.
    stack
        .namespace_with("photos", &[("hearth.dev/expose", None)])
        .await;
    eventually("everything of hearth's gone", WAIT, || async {
        let namespace = stack.namespace("photos").await?;
        let annotated = namespace
            .metadata
            .annotations
            .is_some_and(|a| a.contains_key("hearth.dev/url"));
        (stack.ingress("photos", "hearth-web").await.is_none()
            && stack.url_config_map("photos").await.is_none()
            && !annotated)
            .then_some(())
    })
    .await;
    assert!(
        Api::<ConfigMap>::namespaced(stack.client.clone(), "photos")
            .get_opt("settings")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn deployments_roll_once_per_url_change() {
    let stack = Stack::start().await;
    let _process = stack.ingress_sync("pod-a", &[]).await;
    stack.namespace_with("notes", &[]).await;
    stack.service("notes", "web", &[(80, "http")]).await;
    stack.deployment("notes", "notes").await;
    stack.deployment("notes", "worker").await;
    stack
        .namespace_with(
            "notes",
            &[
                ("hearth.dev/expose", Some("web:80")),
                ("hearth.dev/restart-on-url-change", Some("notes,worker")),
            ],
        )
        .await;
    let deployments: Api<Deployment> = Api::namespaced(stack.client.clone(), "notes");
    let first = eventually("both rolled", WAIT, || async {
        let notes = url_hash(&deployments.get("notes").await.ok()?)?;
        let worker = url_hash(&deployments.get("worker").await.ok()?)?;
        Some((notes, worker))
    })
    .await;
    assert_eq!(first.0, first.1);
    let versions = |d: Deployment| d.metadata.resource_version;
    let settled = versions(deployments.get("notes").await.unwrap());
    // Resyncs with the same URL roll nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(versions(deployments.get("notes").await.unwrap()), settled);
    // The operator republishes under another name: one more roll each.
    let status = json!({"status": {"loadBalancer": {"ingress": [
        {"hostname": format!("notes-2.{TAILNET}"), "ports": [{"port": 443, "protocol": "TCP"}]}
    ]}}});
    Api::<Ingress>::namespaced(stack.client.clone(), "notes")
        .patch_status(
            "hearth-web",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    let second = eventually("rolled again", WAIT, || async {
        let hash = url_hash(&deployments.get("notes").await.ok()?)?;
        (hash != first.0).then_some(hash)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let notes_writes = stack
        .writes()
        .into_iter()
        .filter(|w| w.resource == "deployments" && w.name.as_deref() == Some("notes"))
        .count();
    assert_eq!(notes_writes, 2, "once per URL");
    assert_eq!(
        url_hash(&deployments.get("worker").await.unwrap()),
        Some(second)
    );
}
