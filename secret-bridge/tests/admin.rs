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
