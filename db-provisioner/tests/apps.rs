//! The apps' own client libraries, connecting with what hearth wrote exactly as each app reads
//! its environment: immich's BullMQ, ioredis and postgres.js (npm), Paperless-ngx's Django,
//! psycopg, Celery, kombu, redis-py and channels_redis (PyPI). scripts/test installs them and
//! says where through HEARTH_CLIENTS_NODE_PATH and HEARTH_CLIENTS_PYTHON.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use support::{Stack, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn installed(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| {
        panic!(
            "{variable} is not set: run scripts/test, which installs the apps' client libraries \
             and says where they are"
        )
    })
}

fn client_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/clients")
        .join(name)
}

/// Runs an app's client check with the Secret's keys as its environment, as `envFrom` gives
/// them; its one-line JSON report.
async fn run_client(
    program: &str,
    script: &str,
    secret: &BTreeMap<String, String>,
    extra: &[(&str, String)],
) -> serde_json::Value {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .arg(client_script(script))
            .envs(secret)
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the client check ran past a minute")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(report).unwrap_or_else(|_| {
        panic!(
            "{script} printed no report: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

async fn secret_with(stack: &Stack, namespace: &str, key: &str) -> BTreeMap<String, String> {
    eventually(&format!("{key} in {namespace}'s Secret"), WAIT, || async {
        stack
            .secret(namespace)
            .await
            .filter(|secret| secret.contains_key(key))
    })
    .await
}

#[tokio::test]
async fn immich_runs_its_job_queue_and_database_with_what_hearth_wrote() {
    let node_path = installed("HEARTH_CLIENTS_NODE_PATH");
    let stack = Stack::start().await;
    let extensions = "cube,earthdistance,pg_trgm,unaccent,uuid-ossp,vector";
    let _process = stack
        .provisioner(
            "pod-a",
            &[
                ("POSTGRES_APP_HOST", "127.0.0.1"),
                ("POSTGRES_EXTENSIONS_ALLOWED", extensions),
            ],
        )
        .await;
    stack
        .annotate(
            "immich",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/postgres-extensions", Some(extensions)),
                ("hearth.dev/redis", Some("true")),
                ("hearth.dev/profile", Some("immich")),
            ],
        )
        .await;
    let secret = secret_with(&stack, "immich", "REDIS_DBINDEX").await;
    let keys: Vec<&str> = secret.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "DB_DATABASE_NAME",
            "DB_HOSTNAME",
            "DB_PASSWORD",
            "DB_PORT",
            "DB_USERNAME",
            "REDIS_DBINDEX",
            "REDIS_HOSTNAME",
            "REDIS_PASSWORD",
            "REDIS_PORT",
            "REDIS_USERNAME"
        ],
        "immich's own keys, and no REDIS_URL or DB_URL that would override them"
    );

    let report = run_client(
        "node",
        "immich.cjs",
        &secret,
        &[("NODE_PATH", node_path.clone())],
    )
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["user"], "immich");
    assert_eq!(report["redisUser"], "immich");
    assert_eq!(report["db"].to_string(), secret["REDIS_DBINDEX"]);

    // Trusted extensions are created as the database's owner; one that needs a superuser
    // (earthdistance, vector) is skipped with the statement to run, and the rest goes on.
    let su = stack.superuser().await;
    let rows = su
        .query(
            "SELECT name, trusted FROM pg_available_extension_versions WHERE name = ANY($1) \
             AND version = (SELECT default_version FROM pg_available_extensions a \
                            WHERE a.name = pg_available_extension_versions.name)",
            &[&extensions.split(',').collect::<Vec<_>>()],
        )
        .await
        .unwrap();
    let created: Vec<String> = report["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    let events = stack.events_about("immich").await;
    for row in &rows {
        let (name, trusted): (String, bool) = (row.get(0), row.get(1));
        if trusted {
            assert!(created.contains(&name), "{name}: {created:?}");
        } else {
            assert!(!created.contains(&name), "{name}: {created:?}");
            let skipped = events.iter().any(|(reason, note)| {
                reason == "ExtensionSkipped"
                    && note.contains(&format!("CREATE EXTENSION \"{name}\""))
            });
            assert!(skipped, "{name}: {events:?}");
        }
    }
    for name in extensions.split(',') {
        if !rows.iter().any(|row| row.get::<_, String>(0) == name) {
            assert!(
                events
                    .iter()
                    .any(|(reason, note)| reason == "ExtensionSkipped"
                        && note.contains(name)
                        && note.contains("not installed")),
                "{name}: {events:?}"
            );
        }
    }
}

#[tokio::test]
async fn paperless_runs_django_celery_and_channels_with_what_hearth_wrote() {
    let python = installed("HEARTH_CLIENTS_PYTHON");
    let stack = Stack::start().await;
    let _process = stack
        .provisioner("pod-a", &[("POSTGRES_APP_HOST", "127.0.0.1")])
        .await;
    stack
        .annotate(
            "paperless",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/redis", Some("true")),
                ("hearth.dev/profile", Some("paperless")),
            ],
        )
        .await;
    let secret = secret_with(&stack, "paperless", "PAPERLESS_REDIS").await;
    assert!(
        secret["PAPERLESS_REDIS"].starts_with("redis://paperless:"),
        "{}",
        secret["PAPERLESS_REDIS"]
    );
    let report = run_client(&python, "paperless.py", &secret, &[]).await;
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test]
async fn wallabag_gets_its_database_and_a_clear_no_for_redis() {
    let stack = Stack::start().await;
    let process = stack.provisioner("pod-a", &[]).await;
    stack
        .annotate(
            "wallabag",
            &[
                ("hearth.dev/postgres", Some("true")),
                ("hearth.dev/redis", Some("true")),
                ("hearth.dev/profile", Some("wallabag")),
            ],
        )
        .await;
    let note = stack
        .wait_for_event("wallabag", "RedisNotForWallabag")
        .await;
    assert!(note.contains("default user"), "{note}");
    assert!(note.contains("Remove hearth.dev/redis"), "{note}");
    let secret = secret_with(&stack, "wallabag", "SYMFONY__ENV__DATABASE_PASSWORD").await;
    let keys: Vec<&str> = secret.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "SYMFONY__ENV__DATABASE_CHARSET",
            "SYMFONY__ENV__DATABASE_DRIVER",
            "SYMFONY__ENV__DATABASE_HOST",
            "SYMFONY__ENV__DATABASE_NAME",
            "SYMFONY__ENV__DATABASE_PASSWORD",
            "SYMFONY__ENV__DATABASE_PORT",
            "SYMFONY__ENV__DATABASE_USER"
        ]
    );
    stack
        .login(
            "wallabag",
            &secret["SYMFONY__ENV__DATABASE_PASSWORD"],
            "wallabag",
        )
        .await
        .unwrap();
    // No index allocated, no ACL user made, nothing written to Redis.
    let maps: Api<ConfigMap> = Api::namespaced(stack.client.clone(), "hearth-system");
    assert!(
        maps.get_opt("hearth-redis-allocations")
            .await
            .unwrap()
            .is_none()
    );
    let mut admin = stack.redis_admin().await;
    let users: Vec<String> = redis_command!(&mut admin, "ACL", "USERS").unwrap();
    assert_eq!(users, ["default"]);
    let text = support::metrics(&process).await;
    assert_eq!(
        support::metric(&text, "hearth_db_provisioner_redis_writes_total"),
        0.0
    );
}
