//! db-provisioner end to end: the real binary, against a real PostgreSQL and Redis and the
//! fake Kubernetes API server. Every check reads the servers' own catalogues.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use support::{Stack, eventually, metric, metrics};

const WAIT: Duration = Duration::from_secs(30);

const PAPERLESS: &[(&str, Option<&str>)] = &[
    ("hearth.dev/postgres", Some("true")),
    ("hearth.dev/postgres-extensions", Some("pg_trgm, vector")),
    ("hearth.dev/redis", Some("true")),
    ("hearth.dev/profile", Some("paperless")),
];

async fn secret_ready(
    stack: &Stack,
    namespace: &str,
) -> std::collections::BTreeMap<String, String> {
    eventually(&format!("Secret hearth-db in {namespace}"), WAIT, || {
        stack.secret(namespace)
    })
    .await
}

#[tokio::test]
async fn a_paperless_namespace_gets_its_database_redis_and_secret() {
    let stack = Stack::start().await;
    let process = stack.provisioner("pod-a", &[]).await;
    stack.annotate("paper-less", PAPERLESS).await;
    let secret = secret_ready(&stack, "paper-less").await;

    // The Secret: the paperless profile's keys, exactly.
    let keys: Vec<&str> = secret.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "PAPERLESS_DBENGINE",
            "PAPERLESS_DBHOST",
            "PAPERLESS_DBNAME",
            "PAPERLESS_DBPASS",
            "PAPERLESS_DBPORT",
            "PAPERLESS_DBUSER",
            "PAPERLESS_REDIS"
        ]
    );
    assert_eq!(secret["PAPERLESS_DBHOST"], "pg.db.svc");
    assert_eq!(secret["PAPERLESS_DBNAME"], "paper_less");
    let password = &secret["PAPERLESS_DBPASS"];
    assert!(password.len() >= 32 && password.bytes().all(|b| b.is_ascii_alphanumeric()));

    // PostgreSQL's own catalogues.
    let su = stack.superuser().await;
    let role = su
        .query_one(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, \
             rolpassword, shobj_description(oid, 'pg_authid') FROM pg_authid WHERE rolname = 'paper_less'",
            &[],
        )
        .await
        .unwrap();
    assert!(role.get::<_, bool>(0));
    assert!(
        !role.get::<_, bool>(1)
            && !role.get::<_, bool>(2)
            && !role.get::<_, bool>(3)
            && !role.get::<_, bool>(4)
    );
    let verifier: String = role.get(5);
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    assert_eq!(
        role.get::<_, String>(6),
        "managed by hearth-db-provisioner for namespace paper-less"
    );
    let database = su
        .query_one(
            "SELECT pg_get_userbyid(datdba)::text, has_database_privilege('public', 'paper_less', 'CONNECT'), \
             has_database_privilege('public', 'paper_less', 'TEMPORARY') FROM pg_database WHERE datname = 'paper_less'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(database.get::<_, String>(0), "paper_less");
    assert!(!database.get::<_, bool>(1), "PUBLIC may not connect");
    assert!(!database.get::<_, bool>(2));

    // The app can log in with the Secret's password and own its schema.
    let app = stack
        .login("paper_less", password, "paper_less")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE documents (id serial primary key)")
        .await
        .unwrap();
    let extensions: Vec<String> = app
        .query("SELECT extname::text FROM pg_extension", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // pg_trgm where the server has it (PyPI's PostgreSQL 16 build ships no contrib modules);
    // where it does not, a Warning says so and the rest is provisioned all the same.
    if stack.extension_installed("pg_trgm").await {
        assert!(extensions.contains(&"pg_trgm".to_owned()), "{extensions:?}");
    } else {
        let note = stack.wait_for_event("paper-less", "ExtensionSkipped").await;
        assert!(note.contains("not installed"), "{note}");
    }
    assert!(!extensions.contains(&"vector".to_owned()));
    // Another role cannot connect to it, though it can log in elsewhere.
    su.batch_execute("CREATE ROLE intruder LOGIN PASSWORD 'intruder'")
        .await
        .unwrap();
    stack
        .login("intruder", "intruder", "postgres")
        .await
        .unwrap();
    let refused = stack
        .login("intruder", "intruder", "paper_less")
        .await
        .err()
        .unwrap();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    // A wrong password is refused: the server really checks it.
    assert!(
        stack
            .login("paper_less", "wrong", "paper_less")
            .await
            .is_err()
    );

    // Redis: the index, its sentinel, the ACL user.
    let url = &secret["PAPERLESS_REDIS"];
    assert!(url.starts_with("redis://paper-less:"), "{url}");
    let index: u8 = url.rsplit('/').next().unwrap().parse().unwrap();
    let redis_password = url.split(':').nth(2).unwrap().split('@').next().unwrap();
    let mut admin = stack.redis_admin().await;
    let user: std::collections::HashMap<String, redis::Value> =
        redis_command!(&mut admin, "ACL", "GETUSER", "paper-less").unwrap();
    let field = |name: &str| -> String { redis::from_redis_value(user[name].clone()).unwrap() };
    assert_eq!(
        (field("keys").as_str(), field("channels").as_str()),
        ("~*", "&*")
    );
    // Redis holds only the hash it was sent.
    let hashes: Vec<String> = redis::from_redis_value(user["passwords"].clone()).unwrap();
    let expected = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        redis_password.as_bytes(),
    ));
    assert_eq!(hashes, [expected]);
    let () = redis_command!(&mut admin, "SELECT", index).unwrap();
    let owner: String = redis_command!(&mut admin, "GET", "__hearth:owner").unwrap();
    assert_eq!(owner, "paper-less");
    let mut app_redis = stack.redis_as("paper-less", redis_password).await.unwrap();
    let () = redis_command!(&mut app_redis, "SELECT", index).unwrap();
    let () = redis_command!(&mut app_redis, "SET", "celery", "x").unwrap();
    let other = (index + 1) % 16;
    let refused: redis::RedisResult<()> = redis_command!(&mut app_redis, "SELECT", other);
    assert!(refused.is_err(), "SELECT of another index must be refused");
    let refused: redis::RedisResult<()> = redis_command!(&mut app_redis, "FLUSHALL");
    assert!(refused.is_err());
    let refused: redis::RedisResult<()> = redis_command!(&mut app_redis, "MOVE", "celery", other);
    assert!(refused.is_err());
    // INFO is allowed (BullMQ needs it); what reaches other apps through the server is not.
    let info: String = redis_command!(&mut app_redis, "INFO", "server").unwrap();
    assert!(info.contains("redis_version"), "{info}");
    for denied in [
        vec!["SCRIPT", "FLUSH"],
        vec!["FUNCTION", "FLUSH"],
        vec!["FUNCTION", "DELETE", "mylib"],
        vec![
            "FUNCTION",
            "LOAD",
            "#!lua name=mylib\nredis.register_function('f', function() return 1 end)",
        ],
        vec!["FUNCTION", "RESTORE", "x"],
        vec!["CLIENT", "TRACKING", "on", "BCAST"],
        vec!["COPY", "celery", "copy", "DB", "0"],
        vec!["SWAPDB", "0", "1"],
        vec!["FLUSHDB"],
        vec!["CONFIG", "GET", "*"],
    ] {
        let mut command = redis::cmd(denied[0]);
        for arg in &denied[1..] {
            command.arg(*arg);
        }
        let refused: redis::RedisResult<redis::Value> = command.query_async(&mut app_redis).await;
        let error = refused.expect_err(&format!("{denied:?} must be refused"));
        assert!(
            error.to_string().contains("no permissions"),
            "{denied:?}: {error}"
        );
    }

    // What is written back, and said.
    let namespace = stack.namespace("paper-less").await.unwrap();
    let annotations = namespace.metadata.annotations.unwrap();
    assert_eq!(annotations["hearth.dev/postgres-database"], "paper_less");
    assert_eq!(annotations["hearth.dev/redis-db"], index.to_string());
    // Each step says what it did under its own reason and action, so none hides another.
    let events = stack.events_in_full("paper-less").await;
    for (type_, reason, action) in [
        ("Normal", "RoleCreated", "EnsureRole"),
        ("Normal", "DatabaseCreated", "EnsureDatabase"),
        ("Normal", "SecretWritten", "WriteSecret"),
        ("Warning", "ExtensionNotAllowed", "ReadAnnotations"),
    ] {
        assert!(
            events
                .iter()
                .any(|(t, r, a, _)| (t.as_str(), r.as_str(), a.as_str()) == (type_, reason, action)),
            "{reason}: {events:?}"
        );
    }

    // The passwords appear nowhere but in the Secret.
    let exposition = metrics(&process).await;
    for text in [process.logs(), format!("{events:?}"), exposition.clone()] {
        assert!(
            !text.contains(password.as_str()),
            "the PostgreSQL password leaked"
        );
        assert!(!text.contains(redis_password), "the Redis password leaked");
        assert!(
            !text.contains("AdminPassword42"),
            "the admin password leaked"
        );
    }
    assert_eq!(
        metric(
            &exposition,
            "hearth_db_provisioner_redis_indexes{state=\"used\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &exposition,
            "hearth_db_provisioner_redis_indexes{state=\"free\"}"
        ),
        14.0,
        "16 databases, one used, and 0 never given out"
    );
    hearth_tests::admin::promtool_check_metrics(&exposition).unwrap();
}

#[tokio::test]
async fn periodic_reconciles_with_nothing_to_change_send_no_ddl() {
    let stack = Stack::start().await;
    let process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate(
            "miniflux",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/profile", Some("miniflux")),
            ],
        )
        .await;
    let secret = secret_ready(&stack, "miniflux").await;
    assert_eq!(secret.keys().collect::<Vec<_>>(), ["DATABASE_URL"]);
    assert!(secret["DATABASE_URL"].starts_with("postgres://miniflux:"));
    let tail = format!(
        "@pg.db.svc:{}/miniflux?sslmode=disable",
        stack.postgres.port()
    );
    assert!(
        secret["DATABASE_URL"].ends_with(&tail),
        "{}",
        secret["DATABASE_URL"]
    );

    let before = eventually("a settled reconcile", WAIT, || async {
        let text = metrics(&process).await;
        (metric(
            &text,
            "hearth_db_provisioner_reconciles_total{result=\"success\"}",
        ) >= 2.0)
            .then_some(text)
    })
    .await;
    let ddl = metric(&before, "hearth_db_provisioner_ddl_statements_total");
    let reconciles = metric(
        &before,
        "hearth_db_provisioner_reconciles_total{result=\"success\"}",
    );
    // Resync is 1 s: wait for several more reconciles.
    let after = eventually("three more reconciles", WAIT, || async {
        let text = metrics(&process).await;
        (metric(
            &text,
            "hearth_db_provisioner_reconciles_total{result=\"success\"}",
        ) >= reconciles + 3.0)
            .then_some(text)
    })
    .await;
    assert_eq!(
        metric(&after, "hearth_db_provisioner_ddl_statements_total"),
        ddl
    );
}

#[tokio::test]
async fn hostile_annotations_are_refused_and_touch_nothing() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    let su = stack.superuser().await;
    let catalogue = "SELECT (SELECT count(*) FROM pg_roles) + (SELECT count(*) FROM pg_database)";
    let objects_before: i64 = su.query_one(catalogue, &[]).await.unwrap().get(0);

    let hostile: &[(&str, &str, &str)] = &[
        (
            "bad-name",
            "hearth.dev/postgres",
            "x\"; DROP DATABASE postgres; --",
        ),
        ("bad-upper", "hearth.dev/postgres", "Paperless"),
        ("bad-unicode", "hearth.dev/postgres", "p\u{0430}perless"),
        ("bad-long", "hearth.dev/postgres", &"a".repeat(64)),
        ("bad-empty", "hearth.dev/postgres", ""),
        ("bad-index", "hearth.dev/redis", "16"),
        ("bad-negative", "hearth.dev/redis", "-1"),
        ("bad-word", "hearth.dev/redis", "abc"),
        ("bad-profile", "hearth.dev/profile", "nextcloud"),
        ("bad-zero", "hearth.dev/redis", "0"),
    ];
    for (namespace, key, value) in hostile {
        let mut annotations = vec![(*key, Some(*value))];
        if *key != "hearth.dev/postgres" {
            annotations.push(("hearth.dev/postgres", Some("true")));
        }
        stack.annotate(namespace, &annotations).await;
    }
    // A good namespace keeps being served among them.
    stack
        .annotate("good", &[("hearth.dev/postgres", Some("true"))])
        .await;
    secret_ready(&stack, "good").await;

    for (namespace, key, _) in hostile {
        let events = eventually(&format!("a Warning about {namespace}"), WAIT, || async {
            let events = stack.events_about(namespace).await;
            (!events.is_empty()).then_some(events)
        })
        .await;
        let (reason, note) = &events[0];
        assert_eq!(reason, "InvalidAnnotation");
        assert!(note.contains(key), "{note}");
        assert!(note.contains("expected"), "{note}");
        assert!(stack.secret(namespace).await.is_none());
    }
    let objects_after: i64 = su.query_one(catalogue, &[]).await.unwrap().get(0);
    assert_eq!(
        objects_after,
        objects_before + 2,
        "only the good namespace's role and database"
    );
    let mut admin = stack.redis_admin().await;
    let users: Vec<String> = redis_command!(&mut admin, "ACL", "USERS").unwrap();
    assert_eq!(users, ["default"]);
}

#[tokio::test]
async fn dropped_role_and_database_are_recreated_with_the_same_password() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("wiki", &[("hearth.dev/postgres", Some("true"))])
        .await;
    let secret = secret_ready(&stack, "wiki").await;
    let su = stack.superuser().await;
    // The controller may put the database back between the two statements (it repairs what
    // it finds missing), and then the role cannot go: drop both until both went.
    eventually("the role and database dropped", WAIT, || async {
        su.batch_execute("DROP DATABASE IF EXISTS wiki WITH (FORCE)")
            .await
            .ok()?;
        su.batch_execute("DROP ROLE IF EXISTS wiki").await.ok()
    })
    .await;
    eventually("the role and database back", WAIT, || async {
        stack.login("wiki", &secret["password"], "wiki").await.ok()
    })
    .await;
    assert_eq!(
        stack.secret("wiki").await.unwrap(),
        secret,
        "same Secret, same password"
    );
}

#[tokio::test]
async fn postgres_down_then_back_converges_without_a_restart() {
    let mut stack = Stack::start().await;
    let process = stack.provisioner("pod-a", &[]).await;
    stack.postgres.stop().unwrap();
    stack
        .annotate("photos", &[("hearth.dev/postgres", Some("true"))])
        .await;
    eventually("a PostgresUnavailable error", WAIT, || async {
        let text = metrics(&process).await;
        (metric(
            &text,
            "hearth_db_provisioner_errors_total{reason=\"PostgresUnavailable\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert!(stack.secret("photos").await.is_none());
    let reasons = stack.events_about("photos").await;
    assert!(
        reasons.iter().any(|(r, _)| r == "PostgresUnavailable"),
        "{reasons:?}"
    );

    stack.postgres.restart().await.unwrap();
    let secret = secret_ready(&stack, "photos").await;
    stack
        .login("photos", &secret["password"], "photos")
        .await
        .unwrap();
    assert!(process.get("/livez").await.unwrap().status == 200);
}

#[tokio::test]
async fn redis_restart_gets_the_acl_user_and_sentinel_back() {
    let mut stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate(
            "immich",
            &[
                ("hearth.dev/redis", Some("3")),
                ("hearth.dev/profile", Some("immich")),
            ],
        )
        .await;
    let secret = secret_ready(&stack, "immich").await;
    assert_eq!(secret["REDIS_DBINDEX"], "3");
    assert_eq!(secret["REDIS_USERNAME"], "immich");
    assert!(!secret.contains_key("REDIS_URL"));

    stack.redis.stop().unwrap();
    stack.redis.restart().await.unwrap();
    let mut app = eventually("the ACL user re-applied", WAIT, || async {
        stack
            .redis_as("immich", &secret["REDIS_PASSWORD"])
            .await
            .ok()
    })
    .await;
    let () = redis_command!(&mut app, "SELECT", 3).unwrap();
    let mut admin = stack.redis_admin().await;
    let () = redis_command!(&mut admin, "SELECT", 3).unwrap();
    let owner: Option<String> = redis_command!(&mut admin, "GET", "__hearth:owner").unwrap();
    assert_eq!(owner.as_deref(), Some("immich"));
}

#[tokio::test]
async fn redis_indexes_are_allocated_claimed_and_exhausted() {
    let stack = Stack::start_with_redis(&["--databases", "3"]).await;
    let process = stack.provisioner("pod-a", &[]).await;
    // Index 0 is never handed out, even empty: every connection starts there.
    stack
        .annotate("first", &[("hearth.dev/redis", Some("true"))])
        .await;
    assert_eq!(secret_ready(&stack, "first").await["redis-db"], "1");
    stack
        .annotate("second", &[("hearth.dev/redis", Some("true"))])
        .await;
    assert_eq!(secret_ready(&stack, "second").await["redis-db"], "2");
    // Nor may it be claimed: the refusal says how to move an app out of it.
    stack
        .annotate("claimer", &[("hearth.dev/redis", Some("0"))])
        .await;
    let note = stack.wait_for_event("claimer", "InvalidAnnotation").await;
    assert!(note.contains("SWAPDB 0 N"), "{note}");

    // Claiming a taken index is a conflict; asking when none is free is exhaustion.
    stack
        .annotate("late-claim", &[("hearth.dev/redis", Some("1"))])
        .await;
    stack
        .annotate("late", &[("hearth.dev/redis", Some("true"))])
        .await;
    eventually("exhaustion and conflict reported", WAIT, || async {
        let late = stack.events_about("late").await;
        let claim = stack.events_about("late-claim").await;
        (late.iter().any(|(r, _)| r == "RedisIndexExhausted")
            && claim.iter().any(|(r, _)| r == "Conflict"))
        .then_some(())
    })
    .await;
    let text = metrics(&process).await;
    assert_eq!(
        metric(&text, "hearth_db_provisioner_redis_indexes{state=\"free\"}"),
        0.0
    );
    assert_eq!(
        metric(&text, "hearth_db_provisioner_redis_indexes{state=\"used\"}"),
        2.0
    );
    assert!(
        metric(
            &text,
            "hearth_db_provisioner_errors_total{reason=\"RedisIndexExhausted\"}"
        ) >= 1.0
    );

    // The record survives in the ConfigMap, and the namespace mirrors it.
    let maps: Api<ConfigMap> = Api::namespaced(stack.client.clone(), "hearth-system");
    let record = maps
        .get("hearth-redis-allocations")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(record.len(), 2);
    assert_eq!(record["1"], "first");
    assert_eq!(record["2"], "second");
    let mut admin = stack.redis_admin().await;
    let owner: Option<String> = redis_command!(&mut admin, "GET", "__hearth:owner").unwrap();
    assert_eq!(owner, None, "nothing is written into index 0");
}

#[tokio::test]
async fn retain_keeps_everything_and_drop_removes_only_what_is_ours() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    let both = |policy| {
        vec![
            ("hearth.dev/postgres", Some("true")),
            ("hearth.dev/redis", Some("true")),
            ("hearth.dev/deletion-policy", Some(policy)),
        ]
    };
    stack.annotate("kept", &both("retain")).await;
    stack.annotate("dropped", &both("drop")).await;
    secret_ready(&stack, "kept").await;
    let dropped_secret = secret_ready(&stack, "dropped").await;
    let dropped_index: u8 = dropped_secret["redis-db"].parse().unwrap();
    let namespace = eventually("the finalizer", WAIT, || async {
        let ns = stack.namespace("dropped").await?;
        ns.metadata
            .finalizers
            .clone()
            .filter(|f| f.contains(&"hearth.dev/db-provisioner".to_owned()))
            .map(|_| ns)
    })
    .await;
    assert!(namespace.metadata.deletion_timestamp.is_none());
    let mut admin = stack.redis_admin().await;
    let () = redis_command!(&mut admin, "SELECT", dropped_index).unwrap();
    let () = redis_command!(&mut admin, "SET", "app-data", "x").unwrap();

    let namespaces: Api<Namespace> = Api::all(stack.client.clone());
    for name in ["kept", "dropped"] {
        namespaces
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    eventually("both namespaces gone", WAIT, || async {
        (stack.namespace("kept").await.is_none() && stack.namespace("dropped").await.is_none())
            .then_some(())
    })
    .await;

    let su = stack.superuser().await;
    let count = |name: &'static str| {
        let su = &su;
        async move {
            let roles: i64 = su
                .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&name])
                .await
                .unwrap()
                .get(0);
            let dbs: i64 = su
                .query_one(
                    "SELECT count(*) FROM pg_database WHERE datname = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            (roles, dbs)
        }
    };
    assert_eq!(
        count("kept").await,
        (1, 1),
        "retain keeps the role and database"
    );
    assert_eq!(count("dropped").await, (0, 0), "drop removes them");
    let size: i64 = redis_command!(&mut admin, "DBSIZE").unwrap();
    assert_eq!(size, 0, "drop flushes the index");
    let users: Vec<String> = redis_command!(&mut admin, "ACL", "USERS").unwrap();
    assert!(
        users.contains(&"kept".to_owned()) && !users.contains(&"dropped".to_owned()),
        "{users:?}"
    );
    let maps: Api<ConfigMap> = Api::namespaced(stack.client.clone(), "hearth-system");
    let record = maps
        .get("hearth-redis-allocations")
        .await
        .unwrap()
        .data
        .unwrap();
    assert!(
        record.values().any(|owner| owner == "kept"),
        "retain keeps the index reserved"
    );
    assert!(
        !record.values().any(|owner| owner == "dropped"),
        "drop frees the index"
    );
}

#[tokio::test]
async fn existing_databases_are_refused_until_adopted() {
    let stack = Stack::start().await;
    let su = stack.superuser().await;
    // A homelab's own database, made by a superuser before hearth.
    for statement in [
        "CREATE ROLE wallabag LOGIN PASSWORD 'old'",
        "CREATE DATABASE wallabag OWNER wallabag",
        "GRANT wallabag TO hearth_admin",
    ] {
        su.batch_execute(statement).await.unwrap();
    }
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate(
            "wallabag",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/profile", Some("wallabag")),
            ],
        )
        .await;
    let note = stack.wait_for_event("wallabag", "Conflict").await;
    assert!(note.contains("hearth.dev/adopt"), "{note}");
    assert!(stack.secret("wallabag").await.is_none());
    assert!(
        stack.login("wallabag", "old", "wallabag").await.is_ok(),
        "untouched"
    );

    stack
        .annotate("wallabag", &[("hearth.dev/adopt", Some("true"))])
        .await;
    if stack.pg_major >= 16 {
        // PostgreSQL 16 lets a CREATEROLE admin change only roles it holds WITH ADMIN OPTION:
        // hearth says exactly what to grant, and changes nothing until then.
        let note = stack.wait_for_event("wallabag", "AdminOptionMissing").await;
        assert!(
            note.contains(
                "GRANT \"wallabag\" TO \"hearth_admin\" WITH ADMIN TRUE, INHERIT FALSE, SET TRUE"
            ),
            "{note}"
        );
        assert!(stack.login("wallabag", "old", "wallabag").await.is_ok());
        su.batch_execute("GRANT wallabag TO hearth_admin WITH ADMIN TRUE, INHERIT FALSE, SET TRUE")
            .await
            .unwrap();
    }
    let secret = secret_ready(&stack, "wallabag").await;
    let password = &secret["SYMFONY__ENV__DATABASE_PASSWORD"];
    stack.login("wallabag", password, "wallabag").await.unwrap();
    assert!(stack.login("wallabag", "old", "wallabag").await.is_err());
    let comment: String = su
        .query_one("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = 'wallabag'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        comment,
        "managed by hearth-db-provisioner for namespace wallabag"
    );
    let reasons = stack.events_about("wallabag").await;
    for reason in ["RoleAdopted", "DatabaseAdopted"] {
        assert!(reasons.iter().any(|(r, _)| r == reason), "{reasons:?}");
    }
    if stack.pg_major >= 16 {
        // The GRANT the Event gave leaves the admin unable to read the app's tables.
        let inherits: bool = su
            .query_one(
                "SELECT pg_has_role('hearth_admin', 'wallabag', 'USAGE')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!inherits);
    }
}

#[tokio::test]
async fn rotation_changes_both_passwords_once() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate(
            "vault",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/redis", Some("true")),
                ("hearth.dev/rotate", Some("v1")),
            ],
        )
        .await;
    let before = secret_ready(&stack, "vault").await;
    stack
        .annotate("vault", &[("hearth.dev/rotate", Some("v2"))])
        .await;
    let after = eventually("a rotated Secret", WAIT, || async {
        let secret = stack.secret("vault").await?;
        (secret["password"] != before["password"]
            && secret["redis-password"] != before["redis-password"])
            .then_some(secret)
    })
    .await;
    stack
        .login("vault", &after["password"], "vault")
        .await
        .unwrap();
    assert!(
        stack
            .login("vault", &before["password"], "vault")
            .await
            .is_err()
    );
    assert!(
        stack
            .redis_as("vault", &after["redis-password"])
            .await
            .is_ok()
    );
    // The old Redis password works until the Secret has the new one, then no more.
    eventually("the old Redis password refused", WAIT, || async {
        stack
            .redis_as("vault", &before["redis-password"])
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let reasons = stack.events_about("vault").await;
    assert!(reasons.iter().any(|(r, _)| r == "Rotated"), "{reasons:?}");
    // Once: the next reconciles keep the new password.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stack.secret("vault").await.unwrap()["password"],
        after["password"]
    );
}

#[tokio::test]
async fn a_secret_that_is_not_ours_is_never_overwritten() {
    let stack = Stack::start().await;
    stack.create_namespace("mine").await;
    let secrets: Api<Secret> = Api::namespaced(stack.client.clone(), "mine");
    let theirs = serde_json::from_value(
        json!({"metadata": {"name": "hearth-db"}, "stringData": {"password": "hand-made"}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("mine", &[("hearth.dev/postgres", Some("true"))])
        .await;
    eventually("a Conflict", WAIT, || async {
        stack
            .events_about("mine")
            .await
            .iter()
            .any(|(r, _)| r == "Conflict")
            .then_some(())
    })
    .await;
    assert_eq!(stack.secret("mine").await.unwrap()["password"], "hand-made");
}

#[tokio::test]
async fn opting_out_removes_the_secret_and_keeps_the_database() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("leaving", &[("hearth.dev/postgres", Some("true"))])
        .await;
    secret_ready(&stack, "leaving").await;
    stack
        .annotate("leaving", &[("hearth.dev/postgres", None)])
        .await;
    eventually("the Secret deleted", WAIT, || async {
        stack.secret("leaving").await.is_none().then_some(())
    })
    .await;
    let namespace = eventually("the write-back annotation removed", WAIT, || async {
        let ns = stack.namespace("leaving").await?;
        (!ns.metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .contains_key("hearth.dev/postgres-database"))
        .then_some(ns)
    })
    .await;
    assert!(namespace.metadata.finalizers.unwrap_or_default().is_empty());
    let su = stack.superuser().await;
    let dbs: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'leaving'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dbs, 1);
}

#[tokio::test]
async fn two_instances_at_once_make_one_role_and_one_database_without_errors() {
    let stack = Stack::start().await;
    let first = stack.provisioner("pod-a", &[]).await;
    let second = stack.provisioner("pod-b", &[]).await;
    for name in ["one", "two", "three"] {
        stack
            .annotate(
                name,
                &[
                    ("hearth.dev/postgres", Some("true")),
                    ("hearth.dev/redis", Some("true")),
                ],
            )
            .await;
    }
    for name in ["one", "two", "three"] {
        secret_ready(&stack, name).await;
    }
    let su = stack.superuser().await;
    let roles: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('one', 'two', 'three')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(roles, 3);
    for process in [&first, &second] {
        let text = metrics(process).await;
        let errors = metric(
            &text,
            "hearth_db_provisioner_reconciles_total{result=\"error\"}",
        );
        assert_eq!(errors, 0.0, "{}", process.logs());
        assert!(!process.logs().contains("reconcile failed"));
    }
}

#[tokio::test]
async fn ready_once_kubernetes_postgres_and_redis_have_answered() {
    let mut stack = Stack::start().await;
    stack.postgres.stop().unwrap();
    let process = stack.provisioner("pod-a", &[]).await;
    eventually("postgres named as the missing gate", WAIT, || async {
        let readyz = process.get("/readyz").await.ok()?;
        (readyz.status == 503 && readyz.body == "not ready; waiting for: postgres\n").then_some(())
    })
    .await;
    stack.postgres.restart().await.unwrap();
    eventually("ready", WAIT, || async {
        (process.get("/readyz").await.ok()?.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn watch_namespace_limits_the_controller_to_one_namespace() {
    let stack = Stack::start().await;
    let _process = stack
        .provisioner("pod-a", &[("WATCH_NAMESPACE", "chosen")])
        .await;
    stack
        .annotate("ignored", &[("hearth.dev/postgres", Some("true"))])
        .await;
    stack
        .annotate("chosen", &[("hearth.dev/postgres", Some("true"))])
        .await;
    secret_ready(&stack, "chosen").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(stack.secret("ignored").await.is_none());
    let su = stack.superuser().await;
    let ignored: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'ignored'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ignored, 0);
}
