//! The PostgreSQL step on its own, against a real server: concurrent reconciles of one namespace
//! never fail and make exactly one role and one database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use db_provisioner::postgres::{PostgresAdmin, PostgresChange, PostgresPlan};
use hearth_runtime::Sensitive;
use hearth_runtime::annotations::parse_postgres;
use hearth_tests::PostgresServer;
use prometheus::IntCounter;

#[tokio::test]
async fn eight_concurrent_reconciles_make_one_role_and_one_database() {
    let server = PostgresServer::start().await.unwrap();
    let url = Sensitive::new(server.url());
    let ddl = IntCounter::new("ddl", "ddl").unwrap();
    let admin = std::sync::Arc::new(PostgresAdmin::new(&url, ddl.clone()).unwrap());
    let name = parse_postgres("true", "race").unwrap().unwrap();
    let password = Sensitive::new("RacePassword0123456789012345678901".to_owned());

    let runs = (0..8).map(|_| {
        let admin = std::sync::Arc::clone(&admin);
        let name = name.clone();
        let password = password.clone();
        tokio::spawn(async move {
            let plan = PostgresPlan {
                namespace: "race",
                name: &name,
                password: &password,
                set_password: false,
                adopt: false,
                extensions: &[],
            };
            admin.ensure(&plan).await
        })
    });
    let outcomes: Vec<Vec<PostgresChange>> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap())
        .collect();
    let creators = outcomes
        .iter()
        .filter(|changes| changes.contains(&PostgresChange::RoleCreated))
        .count();
    assert_eq!(creators, 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|c| c.is_empty()).count(), 7);

    let su = server.connect().await.unwrap();
    let count = |sql: &'static str| {
        let su = &su;
        async move { su.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM pg_roles WHERE rolname = 'race'").await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM pg_database WHERE datname = 'race'").await,
        1
    );

    // Nothing left to do: no DDL at all.
    let before = ddl.get();
    let plan = PostgresPlan {
        namespace: "race",
        name: &name,
        password: &password,
        set_password: false,
        adopt: false,
        extensions: &[],
    };
    assert!(admin.ensure(&plan).await.unwrap().is_empty());
    assert_eq!(ddl.get(), before);

    // Another namespace asking for the same name is refused, and changes nothing.
    let theirs = PostgresPlan {
        namespace: "other",
        ..plan
    };
    let refused = admin.ensure(&theirs).await.unwrap_err();
    assert_eq!(refused.reason(), "Conflict");
    assert!(
        refused.to_string().contains("belongs to namespace race"),
        "{refused}"
    );
    assert_eq!(ddl.get(), before);
}

#[tokio::test]
async fn drop_touches_only_what_carries_this_namespaces_heritage() {
    let server = PostgresServer::start().await.unwrap();
    let su = server.connect().await.unwrap();
    su.batch_execute("CREATE ROLE legacy LOGIN").await.unwrap();
    su.batch_execute("CREATE DATABASE legacy OWNER legacy")
        .await
        .unwrap();
    let admin = PostgresAdmin::new(
        &Sensitive::new(server.url()),
        IntCounter::new("d", "d").unwrap(),
    )
    .unwrap();
    let name = parse_postgres("legacy", "legacy").unwrap().unwrap();
    let report = admin.drop("legacy", &name).await.unwrap();
    assert!(report.dropped.is_empty());
    assert_eq!(report.kept.len(), 2, "{report:?}");
    let databases: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'legacy'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(databases, 1);
}
