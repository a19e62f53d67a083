//! A real Prometheus (Debian `prometheus`) scraping the real exporter with a short
//! `scrape_timeout`, its alerting rules loaded: the series follow PostgreSQL going down and
//! coming back, a target that never answers never slows a scrape, and every rule and
//! dashboard query is one Prometheus accepts over metrics the exporter really has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use hearth_tests::manifests::deploy_file;
use hearth_tests::prometheus::{PrometheusServer, Scrape, rules_file_from};
use hearth_tests::sites::{Behaviour, TestSite};
use serde_json::Value;
use support::{Stack, WAIT, eventually};

const SCRAPE: Scrape = Scrape {
    interval: Duration::from_secs(1),
    timeout: Duration::from_millis(800),
};

async fn wait_for_value(prometheus: &PrometheusServer, expr: &str, wanted: f64) {
    eventually(&format!("{expr} = {wanted}"), WAIT, || async {
        (prometheus.value(expr).await.ok()? == Some(wanted)).then_some(())
    })
    .await;
}

/// Every PromQL expression of the shipped rules and dashboard, with the dashboard's variables
/// filled in as Grafana would for this test's job, and whether it must find data here (every
/// dashboard query but those that list only what is failing).
fn shipped_queries() -> Vec<(String, bool)> {
    let rules = hearth_tests::manifests::yaml_file(&deploy_file(
        "components/monitoring/prometheusrule.yaml",
    ))
    .unwrap();
    let mut queries: Vec<(String, bool)> = rules["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap().iter())
        .map(|rule| (rule["expr"].as_str().unwrap().to_owned(), false))
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_file("components/monitoring/dashboards/hearth.json"))
            .unwrap(),
    )
    .unwrap();
    let fill = |expr: &str| {
        expr.replace("$__rate_interval", "1m")
            .replace("$namespace", ".*")
            .replace("$job", "hearth")
    };
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            queries.push((fill(expr), !expr.ends_with("== 0")));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(<selector>, label) is Grafana's; the selector is PromQL.
            let selector = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(','))
                .map(|(selector, _)| selector)
                .unwrap();
            queries.push((fill(selector), true));
        }
    }
    queries
}

/// The metric names a PromQL expression reads (those of hearth's families).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| {
            ["hearth_", "pg_", "redis_", "probe_"]
                .iter()
                .any(|prefix| word.starts_with(prefix))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn prometheus_sees_postgres_go_and_come_back_and_scrapes_never_wait() {
    let mut stack = Stack::start().await;
    let site = TestSite::start(Behaviour::Status(200)).await.unwrap();
    let silent = TestSite::start(Behaviour::Silent).await.unwrap();
    let (published, ca_file) = stack.published_site(None).await;
    stack
        .namespace_with(
            "paperless",
            &[
                (
                    "hearth.dev/probe",
                    &format!("http://127.0.0.1:{}/", site.port()),
                ),
                ("hearth.dev/postgres", "true"),
                ("hearth.dev/redis-db", "3"),
                (
                    "hearth.dev/url",
                    &format!("https://localhost:{}", published.port()),
                ),
            ],
        )
        .await;
    stack
        .namespace_with(
            "silent",
            &[(
                "hearth.dev/probe",
                &format!("http://127.0.0.1:{}/", silent.port()),
            )],
        )
        .await;
    stack.database_secret("paperless", true).await;
    stack
        .external_secret(
            "paperless",
            "paperless-secrets",
            Some((true, "SecretSynced", "synced")),
        )
        .await;
    // The exporter's own deadline is longer than Prometheus' scrape timeout: a scrape that
    // waited on the silent target would time out.
    let process = stack
        .exporter(&[
            ("PROBE_INTERVAL", "2s"),
            ("PROBE_TIMEOUT", "1500ms"),
            ("PROBE_CA_FILE", &support::path_value(&ca_file)),
        ])
        .await;
    let rules = rules_file_from(
        &deploy_file("components/monitoring/prometheusrule.yaml"),
        stack.dir.path(),
    )
    .unwrap();
    let prometheus = PrometheusServer::start(&[process.admin], SCRAPE, &[&rules])
        .await
        .unwrap();

    wait_for_value(&prometheus, r#"up{job="hearth"}"#, 1.0).await;
    wait_for_value(&prometheus, r#"hearth_target_up{kind="postgres"}"#, 1.0).await;
    wait_for_value(&prometheus, "pg_up", 1.0).await;
    wait_for_value(
        &prometheus,
        r#"hearth_target_up{kind="http",namespace="paperless"}"#,
        1.0,
    )
    .await;
    wait_for_value(
        &prometheus,
        r#"hearth_target_up{kind="http",namespace="silent"}"#,
        0.0,
    )
    .await;
    wait_for_value(&prometheus, r#"hearth_target_up{kind="tls"}"#, 1.0).await;
    wait_for_value(&prometheus, "redis_up", 1.0).await;

    stack.postgres.stop().unwrap();
    wait_for_value(&prometheus, r#"hearth_target_up{kind="postgres"}"#, 0.0).await;
    wait_for_value(&prometheus, "pg_up", 0.0).await;
    // The alert on it is pending (it fires after two minutes, as promtool's tests show).
    eventually("HearthDatabaseDown pending", WAIT, || async {
        let alerts = prometheus.alerts().await.ok()?;
        alerts
            .iter()
            .any(|a| a["labels"]["alertname"] == "HearthDatabaseDown" && a["state"] == "pending")
            .then_some(())
    })
    .await;
    stack.postgres.restart().await.unwrap();
    wait_for_value(&prometheus, r#"hearth_target_up{kind="postgres"}"#, 1.0).await;
    wait_for_value(&prometheus, "pg_up", 1.0).await;

    // Through all of it, no scrape failed or came near its timeout.
    let slowest = prometheus
        .value(r#"max_over_time(scrape_duration_seconds{job="hearth"}[5m])"#)
        .await
        .unwrap()
        .unwrap();
    assert!(slowest < 0.4, "slowest scrape {slowest} s");
    assert_eq!(
        prometheus
            .value(r#"min_over_time(up{job="hearth"}[5m])"#)
            .await
            .unwrap(),
        Some(1.0)
    );
    let targets = prometheus.targets().await.unwrap();
    assert_eq!(targets[0]["health"], "up", "{targets:?}");

    // Every shipped query is valid PromQL over names the exporter has.
    let exported = process.get("/metrics").await.unwrap().body;
    for (query, has_data) in shipped_queries() {
        let result = prometheus
            .query(&query)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        assert!(
            !has_data || !result.is_empty(),
            "{query} finds nothing: a label or matcher is wrong"
        );
        for name in metric_names(&query) {
            assert!(
                exported.contains(&format!("\n{name}{{"))
                    || exported.contains(&format!("\n{name} ")),
                "{query} reads {name}, which the exporter does not have"
            );
        }
    }
    assert!(
        !prometheus.logs().contains("level=error"),
        "{}",
        prometheus.logs()
    );
}
