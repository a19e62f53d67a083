//! The binary, started as a process, serves /livez, /readyz and /metrics and stops on SIGTERM.

#[tokio::test]
async fn the_binary_answers_on_its_admin_port() {
    let listen = format!("127.0.0.1:{}", hearth_tests::free_port().unwrap());
    hearth_tests::admin::check_service_binary(
        env!("CARGO_BIN_EXE_secret-bridge"),
        "secret-bridge",
        &[("INSECURE", "true"), ("LISTEN_ADDR", &listen)],
    )
    .await
    .unwrap();
}

/// With no certificate files it keeps its own in a Secret through the Kubernetes API, so it is
/// also checked against an API that never answers.
#[tokio::test]
async fn the_binary_with_its_own_certificate_answers_and_stops() {
    let listen = format!("127.0.0.1:{}", hearth_tests::free_port().unwrap());
    hearth_tests::admin::check_kube_service_binary(
        env!("CARGO_BIN_EXE_secret-bridge"),
        "secret-bridge",
        &[("LISTEN_ADDR", &listen)],
    )
    .await
    .unwrap();
}
