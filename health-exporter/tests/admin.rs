//! The binary, started as a process, serves /livez, /readyz and /metrics and stops on SIGTERM,
//! also while the Kubernetes API does not answer.

#[tokio::test]
async fn the_binary_answers_on_its_admin_port() {
    hearth_tests::admin::check_kube_service_binary(
        env!("CARGO_BIN_EXE_health-exporter"),
        "health-exporter",
        &[],
    )
    .await
    .unwrap();
}
