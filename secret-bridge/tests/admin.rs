//! The binary, started as a process, serves /livez, /readyz and /metrics and stops on SIGTERM.

#[tokio::test]
async fn the_binary_answers_on_its_admin_port() {
    hearth_tests::admin::check_service_binary(
        env!("CARGO_BIN_EXE_secret-bridge"),
        "secret-bridge",
        &[],
    )
    .await
    .unwrap();
}
