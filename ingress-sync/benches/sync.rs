//! ingress-sync's benchmark: `cargo bench -p ingress-sync`.
//!
//! The release binary against the fake Kubernetes API, with 100 app namespaces annotated at once.
//! Measured, each beside a baseline from the same run:
//! - seconds until all 100 Ingresses exist, against the bench applying the same 100 Ingresses
//!   itself;
//! - seconds until all 100 URLs are published once the statuses are set, against the bench
//!   writing the same 100 ConfigMaps itself;
//! - resident memory with 100 apps, against the same process idle;
//! - API writes over ten periodic passes of the 100 unchanged apps, against the writes of a
//!   controller that applies every object on every pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hearth_tests::bench::figure;

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use support::{Stack, TAILNET, eventually, metric};

const APPS: usize = 100;
const PASSES: usize = 10;

async fn count<K>(api: &Api<K>, labels: &str) -> usize
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default().labels(labels))
        .await
        .unwrap()
        .items
        .len()
}

#[tokio::main]
async fn main() {
    // The stand-in operator waits an hour: the benchmark sets the statuses itself, at once.
    let stack = Stack::start_with_delay(Duration::from_secs(3600)).await;
    for i in 0..APPS {
        let namespace = format!("app-{i}");
        stack.namespace_with(&namespace, &[]).await;
        stack.service(&namespace, "web", &[(8080, "http")]).await;
    }

    // Baseline: the same Ingresses and ConfigMaps applied by the bench, in a namespace of its own
    // each, one after another.
    let started = Instant::now();
    for i in 0..APPS {
        let ingresses: Api<Ingress> = Api::namespaced(stack.client.clone(), &format!("app-{i}"));
        let body = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "baseline", "labels": {"bench": "baseline"}},
            "spec": {"ingressClassName": "baseline", "tls": [{"hosts": [format!("baseline-{i}")]}],
                     "defaultBackend": {"service": {"name": "web", "port": {"number": 8080}}}},
        });
        ingresses
            .patch(
                "baseline",
                &PatchParams::apply("bench").force(),
                &Patch::Apply(&body),
            )
            .await
            .unwrap();
    }
    let baseline_ingresses = started.elapsed();
    let started = Instant::now();
    for i in 0..APPS {
        let maps: Api<ConfigMap> = Api::namespaced(stack.client.clone(), &format!("app-{i}"));
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "baseline", "labels": {"bench": "baseline"}},
                          "data": {"URL": format!("https://app-{i}.{TAILNET}")}});
        maps.patch(
            "baseline",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    }
    let baseline_urls = started.elapsed();

    let process = stack
        .ingress_sync("bench", &[("RESYNC_INTERVAL", "2s"), ("RUST_LOG", "warn")])
        .await;
    let idle = eventually("the leader ready", Duration::from_secs(30), || async {
        let ready = process.get("/readyz").await.ok()?.status == 200;
        let text = process.get("/metrics").await.ok()?.body;
        ready.then(|| metric(&text, "process_resident_memory_bytes"))
    })
    .await;

    let all_ingresses: Api<Ingress> = Api::all(stack.client.clone());
    let all_maps: Api<ConfigMap> = Api::all(stack.client.clone());
    let ours = "app.kubernetes.io/managed-by=hearth-ingress-sync";
    let started = Instant::now();
    futures::future::join_all((0..APPS).map(|i| {
        let stack = &stack;
        async move {
            stack
                .namespace_with(
                    &format!("app-{i}"),
                    &[("hearth.dev/expose", Some("web:8080"))],
                )
                .await;
        }
    }))
    .await;
    eventually("100 Ingresses", Duration::from_secs(60), || async {
        (count(&all_ingresses, ours).await == APPS).then_some(())
    })
    .await;
    let ingresses_took = started.elapsed();

    // The operator's part, all at once; then until every app has its URL.
    let started = Instant::now();
    futures::future::join_all((0..APPS).map(|i| {
        let client = stack.client.clone();
        async move {
            let status = json!({"status": {"loadBalancer": {"ingress": [
                {"hostname": format!("app-{i}.{TAILNET}"), "ports": [{"port": 443, "protocol": "TCP"}]}
            ]}}});
            Api::<Ingress>::namespaced(client, &format!("app-{i}"))
                .patch_status("hearth-web", &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
        }
    }))
    .await;
    eventually("100 URLs", Duration::from_secs(60), || async {
        (count(&all_maps, ours).await == APPS).then_some(())
    })
    .await;
    let urls_took = started.elapsed();
    let with_apps = metric(
        &process.get("/metrics").await.unwrap().body,
        "process_resident_memory_bytes",
    );

    // Ten periodic passes over the unchanged apps.
    let settle = |text: &str| {
        metric(
            text,
            "hearth_ingress_sync_reconciles_total{result=\"success\"}",
        )
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes_before = stack.writes().len();
    let reconciles_before = settle(&process.get("/metrics").await.unwrap().body);
    let started = Instant::now();
    eventually("ten passes", Duration::from_secs(120), || async {
        let text = process.get("/metrics").await.ok()?.body;
        (settle(&text) >= reconciles_before + (PASSES * APPS) as f64).then_some(())
    })
    .await;
    let passes_took = started.elapsed();
    let writes = stack.writes().len() - writes_before;
    let naive = PASSES * APPS * 2;

    let mib = |bytes: f64| bytes / 1024.0 / 1024.0;
    println!(
        "ingress-sync benchmark ({APPS} apps, release build, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  {APPS} namespaces annotated at once: {:.2} s until {APPS} Ingresses exist (goal <= 5 s); \
         baseline: the same {APPS} Ingresses applied one by one {:.2} s; ratio {:.1}x",
        ingresses_took.as_secs_f64(),
        baseline_ingresses.as_secs_f64(),
        ingresses_took.as_secs_f64() / baseline_ingresses.as_secs_f64()
    );
    figure(
        "ingress-sync",
        "100 Ingresses from 100 annotations",
        "<= 5 s",
        &format!("{:.2} s", ingresses_took.as_secs_f64()),
        Some(&format!(
            "applied one by one {:.2} s",
            baseline_ingresses.as_secs_f64()
        )),
        Some(ingresses_took.as_secs_f64() / baseline_ingresses.as_secs_f64()),
    );
    println!(
        "  {APPS} statuses set at once: {:.2} s until {APPS} URLs are published (goal <= 5 s); \
         baseline: the same {APPS} ConfigMaps applied one by one {:.2} s; ratio {:.1}x",
        urls_took.as_secs_f64(),
        baseline_urls.as_secs_f64(),
        urls_took.as_secs_f64() / baseline_urls.as_secs_f64()
    );
    figure(
        "ingress-sync",
        "100 URLs published",
        "<= 5 s",
        &format!("{:.2} s", urls_took.as_secs_f64()),
        Some(&format!(
            "applied one by one {:.2} s",
            baseline_urls.as_secs_f64()
        )),
        Some(urls_took.as_secs_f64() / baseline_urls.as_secs_f64()),
    );
    println!(
        "  resident memory: idle {:.1} MiB, with {APPS} apps {:.1} MiB (goal <= 12 MiB); ratio {:.2}x",
        mib(idle),
        mib(with_apps),
        with_apps / idle
    );
    figure(
        "ingress-sync",
        "resident memory, 100 apps",
        "<= 12 MiB",
        &format!("{:.1} MiB", mib(with_apps)),
        Some(&format!("idle {:.1} MiB", mib(idle))),
        Some(with_apps / idle),
    );
    println!(
        "  {PASSES} periodic passes over {APPS} unchanged apps ({:.1} s): {writes} API writes (goal 0); \
         a controller applying every Ingress and ConfigMap on every pass: {naive}",
        passes_took.as_secs_f64()
    );
    figure(
        "ingress-sync",
        "API writes, 10 passes over unchanged apps",
        "0",
        &writes.to_string(),
        Some(&format!("apply everything: {naive}")),
        None,
    );
}
