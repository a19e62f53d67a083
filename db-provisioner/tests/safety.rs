//! db-provisioner as a careless operator and a hostile neighbour would try it: nothing locks an
//! app out, no password is lost, nothing hearth did not make is changed, and every refusal says
//! what to do. The real binary against real servers, on PostgreSQL 15 and (scripts/test) 16.

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
/// Long enough for a killed leader's Lease to run out (15 s) and a hanging Redis to time out.
const LONG_WAIT: Duration = Duration::from_secs(90);
const DDL: &str = "hearth_db_provisioner_ddl_statements_total";

const APP: &[(&str, Option<&str>)] = &[
    ("hearth.dev/postgres", Some("true")),
    ("hearth.dev/redis", Some("true")),
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

/// How many DDL statements the process has sent, once `n` more reconciles have passed.
async fn ddl_after_reconciles(process: &hearth_tests::admin::ServiceProcess, n: f64) -> f64 {
    let success = "hearth_db_provisioner_reconciles_total{result=\"success\"}";
    let error = "hearth_db_provisioner_reconciles_total{result=\"error\"}";
    let count = |text: &str| metric(text, success) + metric(text, error);
    let start = count(&metrics(process).await);
    eventually("more reconciles", WAIT, || async {
        let text = metrics(process).await;
        (count(&text) >= start + n).then(|| metric(&text, DDL))
    })
    .await
}

#[tokio::test]
async fn a_rotation_with_redis_hanging_and_a_sigkill_never_locks_the_app_out() {
    let stack = Stack::start().await;
    let mut first = stack.provisioner("pod-a", &[]).await;
    stack.annotate("vault", APP).await;
    let before = secret_ready(&stack, "vault").await;
    let provisioned = ddl_after_reconciles(&first, 2.0).await;

    // Redis hangs; a rotation is asked for.
    stack.redis.pause().unwrap();
    stack
        .annotate("vault", &[("hearth.dev/rotate", Some("2026-12"))])
        .await;
    // PostgreSQL takes its new password and the Secret follows at once, Redis or not.
    let rotated = eventually(
        "the new PostgreSQL password in the Secret",
        WAIT,
        || async {
            let secret = stack.secret("vault").await?;
            (secret["password"] != before["password"]).then_some(secret)
        },
    )
    .await;
    stack
        .login("vault", &rotated["password"], "vault")
        .await
        .unwrap();
    assert_eq!(
        rotated["redis-password"], before["redis-password"],
        "the Redis password changes only once Redis has taken the new one"
    );
    // Retries while Redis hangs send no other password: one ALTER ROLE in all.
    let failing = "hearth_db_provisioner_reconciles_total{result=\"error\"}";
    eventually("two failed passes", LONG_WAIT, || async {
        let text = metrics(&first).await;
        (metric(&text, failing) >= 2.0).then_some(())
    })
    .await;
    assert_eq!(metric(&metrics(&first).await, DDL), provisioned + 1.0);

    // Killed mid-rotation, while Redis still hangs; a new process takes over once the Lease
    // of the killed one runs out, and sets no password either.
    first.kill().unwrap();
    let second = stack.provisioner("pod-b", &[]).await;
    eventually("a failed pass of the new process", LONG_WAIT, || async {
        let text = metrics(&second).await;
        (metric(&text, failing) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(&metrics(&second).await, DDL), 0.0);
    stack
        .login("vault", &rotated["password"], "vault")
        .await
        .unwrap();

    stack.redis.resume().unwrap();
    let done = eventually("the rotation finished", WAIT, || async {
        let secret = stack.secret("vault").await?;
        (secret["redis-password"] != before["redis-password"]).then_some(secret)
    })
    .await;
    assert_eq!(done["password"], rotated["password"]);
    stack
        .redis_as("vault", &done["redis-password"])
        .await
        .unwrap();
    stack
        .login("vault", &done["password"], "vault")
        .await
        .unwrap();
    stack.wait_for_event("vault", "Rotated").await;
    eventually("the old Redis password refused", WAIT, || async {
        stack
            .redis_as("vault", &before["redis-password"])
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_lost_or_edited_password_is_what_postgres_accepts_within_one_resync() {
    let stack = Stack::start().await;
    let process = stack.provisioner("pod-a", &[]).await;
    stack.annotate("notes", APP).await;
    let first = secret_ready(&stack, "notes").await;

    // The kept credentials are deleted: new passwords, which both servers take.
    let kept: Api<Secret> = Api::namespaced(stack.client.clone(), "hearth-system");
    kept.delete("hearth-db-credentials", &DeleteParams::default())
        .await
        .unwrap();
    let second = eventually("new passwords in the Secret", WAIT, || async {
        let secret = stack.secret("notes").await?;
        (secret["password"] != first["password"]).then_some(secret)
    })
    .await;
    eventually("PostgreSQL takes the new password", WAIT, || async {
        stack
            .login("notes", &second["password"], "notes")
            .await
            .ok()
    })
    .await;
    eventually("Redis takes the new password", WAIT, || async {
        stack
            .redis_as("notes", &second["redis-password"])
            .await
            .ok()
    })
    .await;
    stack.wait_for_event("notes", "PasswordReset").await;

    // The app (or a person) changes the role's password by hand: it is put back.
    stack
        .superuser()
        .await
        .batch_execute("ALTER ROLE notes PASSWORD 'changed-by-hand'")
        .await
        .unwrap();
    // Polled by hand, so that a failure says why the login was refused and what hearth holds.
    let deadline = std::time::Instant::now() + WAIT;
    while let Err(error) = stack.login("notes", &second["password"], "notes").await {
        if std::time::Instant::now() >= deadline {
            let now = stack.secret("notes").await;
            panic!(
                "the kept password was not set again: {error:?}; Secret hearth-db {}; events {:?}",
                match now {
                    Some(now) if now["password"] == second["password"] => "unchanged",
                    Some(_) => "holds another password now",
                    None => "gone",
                },
                stack.events_about("notes").await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stack
            .login("notes", "changed-by-hand", "notes")
            .await
            .is_err()
    );

    // And then nothing: checking a password is a login, not DDL.
    let settled = ddl_after_reconciles(&process, 2.0).await;
    assert_eq!(ddl_after_reconciles(&process, 3.0).await, settled);
}

#[tokio::test]
async fn adoption_never_takes_another_namespaces_database() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("victim", &[("hearth.dev/postgres", Some("true"))])
        .await;
    let victim = secret_ready(&stack, "victim").await;
    let app = stack
        .login("victim", &victim["password"], "victim")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE diary (entry text); INSERT INTO diary VALUES ('mine')")
        .await
        .unwrap();

    // Two thieves name the victim's database, with adopt, and would drop it on deletion.
    for thief in ["thief", "thief-two"] {
        stack
            .annotate(
                thief,
                &[
                    ("hearth.dev/postgres", Some("victim")),
                    ("hearth.dev/adopt", Some("true")),
                    ("hearth.dev/deletion-policy", Some("drop")),
                ],
            )
            .await;
        let note = stack.wait_for_event(thief, "Conflict").await;
        assert!(note.contains("belongs to namespace victim"), "{note}");
        assert!(stack.secret(thief).await.is_none());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack
        .login("victim", &victim["password"], "victim")
        .await
        .unwrap();
    let su = stack.superuser().await;
    let comment: String = su
        .query_one(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = 'victim'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(comment.ends_with("namespace victim"), "{comment}");

    // Deleting a thief drops nothing of the victim's.
    let namespaces: Api<Namespace> = Api::all(stack.client.clone());
    namespaces
        .delete("thief", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the thief namespace gone", WAIT, || async {
        stack.namespace("thief").await.is_none().then_some(())
    })
    .await;
    let entry: String = stack
        .login("victim", &victim["password"], "victim")
        .await
        .unwrap()
        .query_one("SELECT entry FROM diary", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(entry, "mine");
}

#[tokio::test]
async fn a_redis_user_hearth_did_not_make_is_never_changed_or_deleted() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    let mut admin = stack.redis_admin().await;
    let () = redis_command!(
        &mut admin,
        "ACL",
        "SETUSER",
        "exporter",
        "on",
        ">exporter-password",
        "+client",
        "+ping",
        "+info",
        "+select"
    )
    .unwrap();
    let rules = || async {
        let mut admin = stack.redis_admin().await;
        let rules: Vec<String> = redis_command!(&mut admin, "ACL", "LIST").unwrap();
        rules
            .into_iter()
            .find(|rule| rule.starts_with("user exporter "))
    };
    let original = rules().await.unwrap();

    stack
        .annotate(
            "exporter",
            &[
                ("hearth.dev/redis", Some("true")),
                ("hearth.dev/deletion-policy", Some("drop")),
            ],
        )
        .await;
    let note = stack.wait_for_event("exporter", "Conflict").await;
    assert!(note.contains("was not made by hearth"), "{note}");
    assert_eq!(rules().await.as_ref(), Some(&original));
    stack
        .redis_as("exporter", "exporter-password")
        .await
        .unwrap();

    // Nor deleted when the namespace goes with deletion policy drop.
    let namespaces: Api<Namespace> = Api::all(stack.client.clone());
    namespaces
        .delete("exporter", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the namespace gone", WAIT, || async {
        stack.namespace("exporter").await.is_none().then_some(())
    })
    .await;
    assert_eq!(rules().await.as_ref(), Some(&original));
}

#[tokio::test]
async fn renaming_the_database_is_refused_while_the_old_one_holds_the_data() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("books", &[("hearth.dev/postgres", Some("books"))])
        .await;
    let secret = secret_ready(&stack, "books").await;
    stack
        .annotate("books", &[("hearth.dev/postgres", Some("library"))])
        .await;
    let note = stack.wait_for_event("books", "RenameRefused").await;
    assert!(
        note.contains("ALTER DATABASE \"books\" RENAME TO \"library\""),
        "{note}"
    );
    assert_eq!(stack.secret("books").await.unwrap(), secret, "unchanged");
    let su = stack.superuser().await;
    let exists = |name: &'static str| {
        let su = &su;
        async move {
            su.query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(exists("library").await, 0);

    // Done on purpose, as the Event says: hearth carries on with the renamed database.
    su.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'books'; \
         ALTER DATABASE books RENAME TO library; ALTER ROLE books RENAME TO library",
    )
    .await
    .unwrap();
    let renamed = eventually("the Secret naming the renamed database", WAIT, || async {
        let secret = stack.secret("books").await?;
        (secret["dbname"] == "library").then_some(secret)
    })
    .await;
    assert_eq!(renamed["password"], secret["password"]);
    stack
        .login("library", &renamed["password"], "library")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_drop_that_would_stop_half_way_drops_nothing_and_says_why() {
    let stack = Stack::start().await;
    let process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate(
            "ledger",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/redis", Some("true")),
                ("hearth.dev/deletion-policy", Some("drop")),
            ],
        )
        .await;
    secret_ready(&stack, "ledger").await;
    // Someone gave the app role a privilege in another database: DROP ROLE would fail there.
    let su = stack.superuser().await;
    su.batch_execute("CREATE TABLE shared_report (n int); GRANT SELECT ON shared_report TO ledger")
        .await
        .unwrap();

    let namespaces: Api<Namespace> = Api::all(stack.client.clone());
    namespaces
        .delete("ledger", &DeleteParams::default())
        .await
        .unwrap();
    let note = stack.wait_for_event("ledger", "DropBlocked").await;
    assert!(note.contains("nothing was dropped"), "{note}");
    assert!(
        note.contains("holds privileges in database postgres")
            && note.contains("REASSIGN OWNED BY \"ledger\""),
        "{note}"
    );
    let count: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'ledger'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "the database is still there");
    assert!(
        stack.namespace("ledger").await.is_some(),
        "held by the finalizer"
    );

    // Released the other way the Event offers for a second one: keep the data instead.
    stack
        .annotate(
            "ledger-kept",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/deletion-policy", Some("drop")),
            ],
        )
        .await;
    secret_ready(&stack, "ledger-kept").await;
    su.batch_execute("GRANT SELECT ON shared_report TO ledger_kept")
        .await
        .unwrap();
    namespaces
        .delete("ledger-kept", &DeleteParams::default())
        .await
        .unwrap();
    stack.wait_for_event("ledger-kept", "DropBlocked").await;
    stack
        .annotate(
            "ledger-kept",
            &[("hearth.dev/deletion-policy", Some("retain"))],
        )
        .await;
    eventually("the kept namespace gone", WAIT, || async {
        stack.namespace("ledger-kept").await.is_none().then_some(())
    })
    .await;
    let kept: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'ledger_kept'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "retain keeps the database");

    su.batch_execute("REVOKE SELECT ON shared_report FROM ledger")
        .await
        .unwrap();
    eventually("the namespace gone", WAIT, || async {
        stack.namespace("ledger").await.is_none().then_some(())
    })
    .await;
    let left: i64 = su
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = 'ledger') \
             + (SELECT count(*) FROM pg_roles WHERE rolname = 'ledger')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // A finished drop ends with what was dropped, not a warning about the finalizer.
    let events = stack.events_in_full("ledger").await;
    assert!(
        events
            .iter()
            .all(|(_, _, _, note)| !note.contains("update finalizers")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(t, r, a, _)| t == "Normal" && r == "Dropped" && a == "Drop")
    );
    let text = metrics(&process).await;
    assert!(
        metric(
            &text,
            "hearth_db_provisioner_errors_total{reason=\"DropBlocked\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_database_handed_to_a_superuser_says_what_to_run_and_sends_no_ddl_meanwhile() {
    let stack = Stack::start().await;
    let process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("photos", &[("hearth.dev/postgres", Some("true"))])
        .await;
    let secret = secret_ready(&stack, "photos").await;
    let su = stack.superuser().await;
    su.batch_execute("REASSIGN OWNED BY photos TO postgres; DROP ROLE photos")
        .await
        .unwrap();
    let note = stack
        .wait_for_event("photos", "DatabaseOwnerUnmanageable")
        .await;
    assert!(
        note.contains("ALTER DATABASE \"photos\" OWNER TO \"photos\""),
        "{note}"
    );
    // The role is back; the database waits for the operator, without a DDL loop.
    let blocked = ddl_after_reconciles(&process, 2.0).await;
    assert_eq!(ddl_after_reconciles(&process, 3.0).await, blocked);

    su.batch_execute("ALTER DATABASE photos OWNER TO photos")
        .await
        .unwrap();
    eventually("the app logs in again", WAIT, || async {
        stack
            .login("photos", &secret["password"], "photos")
            .await
            .ok()
    })
    .await;
}

#[tokio::test]
async fn on_postgres_16_the_admin_cannot_read_app_data_and_asks_for_what_it_lacks() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("diary", &[("hearth.dev/postgres", Some("true"))])
        .await;
    let secret = secret_ready(&stack, "diary").await;
    let app = stack
        .login("diary", &secret["password"], "diary")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE entries (text text); INSERT INTO entries VALUES ('secret')")
        .await
        .unwrap();
    let admin_url = stack.admin_url.replace("/postgres", "/diary");
    let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let read = admin.query("SELECT text FROM entries", &[]).await;
    if stack.pg_major < 16 {
        // PostgreSQL 15 has no grant without INHERIT: its admin reads what its roles read
        // (the README says so, and how to make the admin NOINHERIT).
        assert!(read.is_ok());
        return;
    }
    let error = read.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{error}"
    );

    // A role whose ADMIN option was lost (a pg_dumpall from 15 loses it): a rotation changes
    // nothing, the app keeps working, and the Event names the GRANT.
    let su = stack.superuser().await;
    su.batch_execute("REVOKE ADMIN OPTION FOR diary FROM hearth_admin GRANTED BY postgres CASCADE")
        .await
        .unwrap();
    stack
        .annotate("diary", &[("hearth.dev/rotate", Some("now"))])
        .await;
    let note = stack.wait_for_event("diary", "AdminOptionMissing").await;
    assert!(
        note.contains(
            "GRANT \"diary\" TO \"hearth_admin\" WITH ADMIN TRUE, INHERIT FALSE, SET TRUE"
        ),
        "{note}"
    );
    stack
        .login("diary", &secret["password"], "diary")
        .await
        .unwrap();
    assert_eq!(
        stack.secret("diary").await.unwrap()["password"],
        secret["password"]
    );
    su.batch_execute("GRANT diary TO hearth_admin WITH ADMIN TRUE, INHERIT FALSE, SET TRUE")
        .await
        .unwrap();
    let rotated = eventually("the rotation done", WAIT, || async {
        let secret_now = stack.secret("diary").await?;
        (secret_now["password"] != secret["password"]).then_some(secret_now)
    })
    .await;
    stack
        .login("diary", &rotated["password"], "diary")
        .await
        .unwrap();
}

#[tokio::test]
async fn index_zero_is_left_the_way_the_event_says_and_its_owner_keeps_its_user() {
    let stack = Stack::start().await;
    // A namespace that got index 0 from an earlier hearth, its data there.
    let maps: Api<ConfigMap> = Api::namespaced(stack.client.clone(), "hearth-system");
    let record = serde_json::from_value(json!({
        "metadata": {"name": "hearth-redis-allocations"},
        "data": {"0": "legacy"},
    }))
    .unwrap();
    maps.create(&PostParams::default(), &record).await.unwrap();
    let mut admin = stack.redis_admin().await;
    let () = redis_command!(&mut admin, "SET", "__hearth:owner", "legacy").unwrap();
    let () = redis_command!(&mut admin, "SET", "legacy:data", "precious").unwrap();
    let process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate("neighbour", &[("hearth.dev/redis", Some("true"))])
        .await;
    assert_eq!(secret_ready(&stack, "neighbour").await["redis-db"], "1");
    stack
        .annotate("legacy", &[("hearth.dev/redis", Some("true"))])
        .await;
    let secret = secret_ready(&stack, "legacy").await;
    assert_eq!(secret["redis-db"], "0");
    let note = stack.wait_for_event("legacy", "RedisIndexZero").await;
    assert!(note.contains("SWAPDB 0 N (for example N = 2"), "{note}");
    let text = metrics(&process).await;
    assert_eq!(
        metric(&text, "hearth_db_provisioner_redis_index_zero_allocated"),
        1.0
    );

    // The neighbour overwrites the sentinel in database 0 (where its connections start) and
    // Redis forgets the users: the record's owner gets its user back all the same.
    let neighbour = stack.secret("neighbour").await.unwrap();
    let mut intruder = stack
        .redis_as("neighbour", &neighbour["redis-password"])
        .await
        .unwrap();
    let () = redis_command!(&mut intruder, "SET", "__hearth:owner", "neighbour").unwrap();
    let () = redis_command!(&mut admin, "ACL", "DELUSER", "legacy").unwrap();
    stack
        .wait_for_event("legacy", "RedisSentinelRepaired")
        .await;
    eventually("legacy's user back", WAIT, || async {
        stack
            .redis_as("legacy", &secret["redis-password"])
            .await
            .ok()
    })
    .await;

    // The admin moves the data as the Event says; the allocation follows.
    let () = redis_command!(&mut admin, "SWAPDB", 0, 2).unwrap();
    let moved = eventually("the Secret naming index 2", WAIT, || async {
        let secret = stack.secret("legacy").await?;
        (secret["redis-db"] == "2").then_some(secret)
    })
    .await;
    stack.wait_for_event("legacy", "RedisIndexMoved").await;
    let mut app = stack
        .redis_as("legacy", &moved["redis-password"])
        .await
        .unwrap();
    let () = redis_command!(&mut app, "SELECT", 2).unwrap();
    let data: String = redis_command!(&mut app, "GET", "legacy:data").unwrap();
    assert_eq!(data, "precious");
    let record = maps
        .get("hearth-redis-allocations")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(record.get("0"), None);
    assert_eq!(record["2"], "legacy");
    let text = metrics(&process).await;
    assert_eq!(
        metric(&text, "hearth_db_provisioner_redis_index_zero_allocated"),
        0.0
    );
}

#[tokio::test]
async fn errors_and_events_say_the_current_cause() {
    let stack = Stack::start().await;
    // A wrong admin password: PostgreSQL's own words, with the SQLSTATE, never the password.
    let wrong = stack
        .admin_url
        .replace("AdminPassword42", "NotTheAdminPassword");
    let mut process = stack
        .provisioner("pod-a", &[("POSTGRES_ADMIN_URL", wrong.as_str())])
        .await;
    stack
        .annotate("blog", &[("hearth.dev/postgres", Some("true"))])
        .await;
    let note = stack.wait_for_event("blog", "PostgresError").await;
    assert!(
        note.contains("password authentication failed for user \"hearth_admin\"")
            && note.contains("28P01"),
        "{note}"
    );
    assert!(!note.contains("NotTheAdminPassword"));
    assert!(!process.logs().contains("NotTheAdminPassword"));
    // Stopped cleanly, it hands its Lease over at once.
    process.terminate(Duration::from_secs(25)).await.unwrap();

    // Nothing listening: the I/O cause, not just "error connecting to server".
    let port = hearth_tests::free_port().unwrap();
    let closed = format!("postgres://hearth_admin:x@127.0.0.1:{port}/postgres");
    let _process = stack
        .provisioner("pod-b", &[("POSTGRES_ADMIN_URL", closed.as_str())])
        .await;
    stack
        .annotate("blog", &[("hearth.dev/rotate", Some("1"))])
        .await;
    let note = stack.wait_for_event("blog", "PostgresUnavailable").await;
    assert!(note.contains("Connection refused"), "{note}");

    // A cause that changes under the same reason and action is a new Event, not a stale one.
    stack
        .annotate("typo", &[("hearth.dev/postgres", Some("Bad"))])
        .await;
    stack.wait_for_event("typo", "InvalidAnnotation").await;
    stack
        .annotate("typo", &[("hearth.dev/postgres", Some("Worse"))])
        .await;
    eventually("the new cause in an Event", WAIT, || async {
        let notes: Vec<String> = stack
            .events_about("typo")
            .await
            .into_iter()
            .map(|(_, note)| note)
            .collect();
        (notes.iter().any(|n| n.contains("\"Bad\""))
            && notes.iter().any(|n| n.contains("\"Worse\"")))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_secrets_named_hearth_db_are_read_outside_hearths_namespace() {
    let stack = Stack::start().await;
    let _process = stack.provisioner("pod-a", &[]).await;
    stack.annotate("paperless", APP).await;
    secret_ready(&stack, "paperless").await;
    stack
        .annotate("paperless", &[("hearth.dev/redis", None)])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let secret_calls: Vec<_> = stack
        .api
        .requests()
        .into_iter()
        .filter(|r| !r.from_harness && r.resource == "secrets")
        .collect();
    assert!(!secret_calls.is_empty());
    for call in &secret_calls {
        let own_namespace = call.namespace.as_deref() == Some("hearth-system");
        let by_name = call.name.as_deref() == Some("hearth-db");
        // RBAC can grant every one of these with resourceNames: [hearth-db], but create.
        assert!(
            own_namespace || by_name || call.verb == "create",
            "a Secret call RBAC could not scope by name: {call:?}"
        );
    }
    assert!(
        secret_calls.iter().any(|c| c.verb == "watch"
            && c.namespace.is_none()
            && c.name.as_deref() == Some("hearth-db")),
        "{secret_calls:?}"
    );
}
