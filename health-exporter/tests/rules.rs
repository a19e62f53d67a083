//! The alerting rules shipped under deploy/ pass `promtool check rules` and their unit tests
//! (`promtool test rules`). (A real Prometheus runs them and every dashboard query in
//! `prometheus.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hearth_tests::manifests::deploy_file;
use hearth_tests::prometheus::{promtool, rules_file_from};

#[test]
fn the_alerting_rules_pass_promtool_and_their_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file_from(
        &deploy_file("components/monitoring/prometheusrule.yaml"),
        dir.path(),
    )
    .unwrap();
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()]).unwrap();
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tests = dir.path().join("alerts.test.yaml");
    std::fs::copy(
        deploy_file("components/monitoring/tests/alerts.test.yaml"),
        &tests,
    )
    .unwrap();
    let tested = promtool(&["test", "rules", tests.to_str().unwrap()]).unwrap();
    assert!(tested.contains("SUCCESS"), "{tested}");
}
