//! The binary, started as a process, serves /livez, /readyz and /metrics and stops on SIGTERM.

#[tokio::test]
async fn the_binary_answers_on_its_admin_port() {
    let api = hearth_tests::FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    hearth_tests::admin::check_service_binary(
        env!("CARGO_BIN_EXE_db-provisioner"),
        "db-provisioner",
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAMESPACE", "hearth-system"),
        ],
    )
    .await
    .unwrap();
}
