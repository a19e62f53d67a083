//! db-provisioner's benchmark: `cargo bench -p db-provisioner`.
//!
//! Runs the release binary against the fake Kubernetes API, a real PostgreSQL and a real Redis,
//! and measures, with a baseline from the same run beside each figure:
//! - 100 namespaces annotated at once: seconds until all 100 Secrets exist, against the same
//!   roles and databases made by plain SQL over one connection;
//! - 10 periodic reconciles of the 100 unchanged namespaces: DDL statements sent and wall time;
//! - resident memory idle and with 100 namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hearth_tests::bench::figure;

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Stack, eventually, metric, metrics};

const NAMESPACES: usize = 100;
const ROUNDS: f64 = 10.0;

#[tokio::main]
async fn main() {
    let stack = Stack::start().await;

    // Baseline: the least work that makes the same objects, plain SQL over one connection.
    let su = stack.superuser().await;
    let started = Instant::now();
    for i in 0..NAMESPACES {
        su.batch_execute(&format!("CREATE ROLE baseline_{i} LOGIN PASSWORD 'x'"))
            .await
            .unwrap();
        su.batch_execute(&format!("CREATE DATABASE baseline_{i} OWNER baseline_{i}"))
            .await
            .unwrap();
        su.batch_execute(&format!(
            "REVOKE CONNECT, TEMPORARY ON DATABASE baseline_{i} FROM PUBLIC"
        ))
        .await
        .unwrap();
    }
    let baseline = started.elapsed();

    let process = stack
        .provisioner("bench", &[("RESYNC_INTERVAL", "2s"), ("RUST_LOG", "warn")])
        .await;
    let idle = eventually("the leader ready", Duration::from_secs(30), || async {
        let text = metrics(&process).await;
        let ready = process.get("/readyz").await.ok()?.status == 200;
        ready.then(|| metric(&text, "process_resident_memory_bytes"))
    })
    .await;

    let started = Instant::now();
    let annotations = [("hearth.dev/postgres", Some("true"))];
    futures::future::join_all((0..NAMESPACES).map(|i| {
        let stack = &stack;
        async move { stack.annotate(&format!("app-{i}"), &annotations).await }
    }))
    .await;
    eventually("all Secrets", Duration::from_secs(120), || async {
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::all(stack.client.clone());
        let count = secrets
            .list(
                &kube::api::ListParams::default()
                    .labels("app.kubernetes.io/managed-by=hearth-db-provisioner"),
            )
            .await
            .ok()?
            .items
            .iter()
            .filter(|s| s.metadata.name.as_deref() == Some("hearth-db"))
            .count();
        (count == NAMESPACES).then_some(())
    })
    .await;
    let provisioning = started.elapsed();

    let text = metrics(&process).await;
    let ddl_before = metric(&text, "hearth_db_provisioner_ddl_statements_total");
    let seconds_before = metric(
        &text,
        "hearth_db_provisioner_reconcile_duration_seconds_sum",
    );
    let count_before = metric(
        &text,
        "hearth_db_provisioner_reconcile_duration_seconds_count",
    );
    let reconciles_before = metric(
        &text,
        "hearth_db_provisioner_reconciles_total{result=\"success\"}",
    );
    let started = Instant::now();
    let target = reconciles_before + ROUNDS * NAMESPACES as f64;
    let after = eventually("ten periodic rounds", Duration::from_secs(300), || async {
        let text = metrics(&process).await;
        (metric(
            &text,
            "hearth_db_provisioner_reconciles_total{result=\"success\"}",
        ) >= target)
            .then_some(text)
    })
    .await;
    let rounds = started.elapsed();
    let ddl = metric(&after, "hearth_db_provisioner_ddl_statements_total") - ddl_before;
    let loaded = metric(&after, "process_resident_memory_bytes");
    let errors = metric(
        &after,
        "hearth_db_provisioner_reconciles_total{result=\"error\"}",
    );
    let seconds = metric(
        &after,
        "hearth_db_provisioner_reconcile_duration_seconds_sum",
    );
    let count = metric(
        &after,
        "hearth_db_provisioner_reconcile_duration_seconds_count",
    );
    let mean_reconcile = (seconds - seconds_before) / (count - count_before);

    let mib = |bytes: f64| bytes / 1024.0 / 1024.0;
    println!("db-provisioner benchmark ({NAMESPACES} namespaces, release build)");
    println!(
        "  provision {NAMESPACES} namespaces: {:.2} s until every Secret exists (goal <= 10 s); \
         plain SQL baseline {:.2} s; ratio {:.1}x",
        provisioning.as_secs_f64(),
        baseline.as_secs_f64(),
        provisioning.as_secs_f64() / baseline.as_secs_f64()
    );
    figure(
        "db-provisioner",
        "provision 100 namespaces",
        "<= 10 s",
        &format!("{:.2} s", provisioning.as_secs_f64()),
        Some(&format!("plain SQL {:.2} s", baseline.as_secs_f64())),
        Some(provisioning.as_secs_f64() / baseline.as_secs_f64()),
    );
    println!(
        "  {ROUNDS} periodic rounds over {NAMESPACES} unchanged namespaces (resync 2 s): {ddl} DDL \
         statements (goal 0), {errors} errors, {:.1} s wall, {:.1} ms mean reconcile",
        rounds.as_secs_f64(),
        mean_reconcile * 1000.0
    );
    figure(
        "db-provisioner",
        "DDL in periodic rounds, nothing changed",
        "0",
        &ddl.to_string(),
        None,
        None,
    );
    println!(
        "  resident memory: idle {:.1} MiB, with {NAMESPACES} namespaces {:.1} MiB (goal <= 15 MiB); \
         ratio {:.2}x idle",
        mib(idle),
        mib(loaded),
        loaded / idle
    );
    figure(
        "db-provisioner",
        "resident memory, 100 namespaces",
        "<= 15 MiB",
        &format!("{:.1} MiB", mib(loaded)),
        Some(&format!("idle {:.1} MiB", mib(idle))),
        Some(loaded / idle),
    );
}
