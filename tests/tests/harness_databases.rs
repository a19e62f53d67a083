//! The harness's PostgreSQL and Redis are real servers on real sockets.

use hearth_tests::{HarnessError, PostgresServer, RedisServer};

#[tokio::test]
async fn postgres_answers_a_real_query_and_survives_a_restart() {
    let mut postgres = PostgresServer::start().await.unwrap();
    let client = postgres.connect().await.unwrap();
    let row = client.query_one("SELECT version()", &[]).await.unwrap();
    let version: String = row.get(0);
    assert!(version.starts_with("PostgreSQL"), "{version}");
    client
        .batch_execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('before restart')")
        .await
        .unwrap();

    postgres.stop().unwrap();
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    assert!(postgres.connect().await.is_err());

    postgres.restart().await.unwrap();
    let client = postgres.connect().await.unwrap();
    let note: String = client
        .query_one("SELECT note FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note, "before restart");
}

#[tokio::test]
async fn each_test_gets_its_own_postgres() {
    let first = PostgresServer::start().await.unwrap();
    let second = PostgresServer::start().await.unwrap();
    assert_ne!(first.port(), second.port());
    first
        .connect()
        .await
        .unwrap()
        .batch_execute("CREATE DATABASE only_in_first")
        .await
        .unwrap();
    let found: i64 = second
        .connect()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'only_in_first'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 0);
}

#[tokio::test]
async fn redis_round_trip_and_restart_forgets_everything() {
    let mut redis_server = RedisServer::start().await.unwrap();
    let mut connection = redis_server.connect().await.unwrap();
    let () = redis::cmd("SET")
        .arg("hearth")
        .arg("round trip")
        .query_async(&mut connection)
        .await
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg("hearth")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(value, "round trip");
    let databases: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("databases")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(databases, ["databases", "16"]);

    redis_server.stop().unwrap();
    redis_server.restart().await.unwrap();
    let mut connection = redis_server.connect().await.unwrap();
    let value: Option<String> = redis::cmd("GET")
        .arg("hearth")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(value, None, "no persistence: a restart starts empty");
}

#[test]
fn a_missing_binary_names_its_package() {
    let error = HarnessError::MissingBinary {
        binary: "redis-server",
        package: "redis-server",
        looked: "on PATH".into(),
    };
    assert_eq!(
        error.to_string(),
        "redis-server was not found (on PATH); install the Debian package `redis-server` \
         (apt-get install redis-server)"
    );
}
