//! health-exporter end to end: the real binary against the fake Kubernetes API, a real
//! PostgreSQL and Redis, and stand-in app sites (plain, TLS, broken and silent).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use hearth_tests::admin::promtool_check_metrics;
use hearth_tests::sites::{Behaviour, TestSite};
use support::{
    Stack, WAIT, app, eventually, path_value, sample, status, wait_for_absence, wait_for_sample,
    wait_for_samples,
};

/// 2031-01-15T00:00:00Z, when the stand-in published URL's certificate expires.
const CERT_EXPIRY: f64 = 1_926_201_600.0;

#[tokio::test]
async fn an_app_is_discovered_checked_and_exported_in_the_upstream_names() {
    let stack = Stack::start().await;
    stack.database("paperless").await;
    let mut redis = stack.redis.connect().await.unwrap();
    redis::pipe()
        .cmd("SELECT")
        .arg(3)
        .cmd("SET")
        .arg("celery")
        .arg("1")
        .cmd("SET")
        .arg("_kombu.binding.celery")
        .arg("1")
        .exec_async(&mut redis)
        .await
        .unwrap();
    let site = TestSite::start(Behaviour::Status(200)).await.unwrap();
    let (published, ca_file) = stack.published_site(Some((2031, 1, 15))).await;

    let expose = format!("web:{}", site.port());
    let url = format!("https://localhost:{}", published.port());
    stack
        .namespace_with(
            "paperless",
            &[
                ("hearth.dev/expose", &expose),
                ("hearth.dev/postgres", "true"),
                ("hearth.dev/redis", "true"),
                ("hearth.dev/postgres-database", "paperless"),
                ("hearth.dev/redis-db", "3"),
                ("hearth.dev/url", &url),
            ],
        )
        .await;
    stack.service("paperless", "web", site.port(), "http").await;
    stack.database_secret("paperless", true).await;
    stack
        .external_secret(
            "paperless",
            "paperless-secrets",
            Some((true, "SecretSynced", "Secret was synced")),
        )
        .await;
    stack
        .external_secret(
            "paperless",
            "paperless-oidc",
            Some((
                false,
                "SecretSyncedError",
                "could not get secret data from provider",
            )),
        )
        .await;
    stack
        .ingress("paperless", "hearth-web", Some("paperless.tailnet.ts.net"))
        .await;
    let process = stack
        .exporter(&[("PROBE_CA_FILE", &path_value(&ca_file))])
        .await;

    let tls_target = format!("localhost:{}", published.port());
    let tls_up =
        format!(r#"hearth_target_up{{kind="tls",namespace="paperless",target="{tls_target}"}}"#);
    let text = wait_for_samples(
        &process,
        &[
            (tls_up.as_str(), 1.0),
            (
                r#"hearth_externalsecret_ready{namespace="paperless",name="paperless-oidc"}"#,
                0.0,
            ),
            (
                r#"hearth_target_up{kind="http",namespace="paperless",target="web"}"#,
                1.0,
            ),
            (r#"redis_db_keys{db="db3"}"#, 2.0),
            ("redis_up", 1.0),
            ("pg_up", 1.0),
        ],
    )
    .await;
    let up = |kind: &str, target: &str| {
        sample(
            &text,
            &format!(
                r#"hearth_target_up{{kind="{kind}",namespace="paperless",target="{target}"}}"#
            ),
        )
    };
    assert_eq!(up("http", "web"), Some(1.0), "{text}");
    assert_eq!(up("secret", "hearth-db"), Some(1.0), "{text}");
    assert_eq!(up("ingress", "hearth-web"), Some(1.0), "{text}");
    assert_eq!(
        up("externalsecret", "paperless-secrets"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(up("externalsecret", "paperless-oidc"), Some(0.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"hearth_target_up{kind="postgres",namespace="",target="postgres"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"probe_success{namespace="paperless",target="web"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"probe_http_status_code{namespace="paperless",target="web"}"#
        ),
        Some(200.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                r#"probe_ssl_earliest_cert_expiry{{namespace="paperless",target="{tls_target}"}}"#
            )
        ),
        Some(CERT_EXPIRY)
    );
    let size = sample(&text, r#"pg_database_size_bytes{datname="paperless"}"#).unwrap();
    assert!(
        size > 1_000_000.0,
        "an empty database is still several MB: {size}"
    );
    // Labelled as postgres_exporter labels it: the database's oid and name.
    assert!(
        text.lines().any(
            |line| line.starts_with("pg_stat_database_numbackends{datid=\"")
                && line.contains(",datname=\"postgres\"} ")
        ),
        "{text}"
    );
    assert_eq!(sample(&text, r#"redis_db_keys{db="db3"}"#), Some(2.0));
    assert!(sample(&text, "redis_connected_clients").unwrap() >= 1.0);
    assert!(sample(&text, "redis_memory_used_bytes").unwrap() > 100_000.0);
    assert!(
        sample(
            &text,
            r#"hearth_probe_errors_total{kind="externalsecret",namespace="paperless",target="paperless-oidc",reason="not_ready"}"#
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(sample(&text, "hearth_probe_interval_seconds"), Some(1.0));
    promtool_check_metrics(&text).unwrap();
    // The app was reached by its Service's cluster IP with its cluster DNS name as the Host.
    assert_eq!(
        site.last_host().as_deref(),
        Some(format!("web.paperless.svc:{}", site.port()).as_str())
    );

    let facts = status(&process).await;
    let card = app(&facts, "paperless").unwrap();
    assert_eq!(card["state"], "degraded", "{card}");
    assert_eq!(card["url"], url);
    assert_eq!(card["database"], "paperless");
    assert!(card["databaseSizeBytes"].as_f64().unwrap() > 1_000_000.0);
    assert_eq!(card["redisDb"], 3);
    assert_eq!(card["redisKeys"], 2);
    assert_eq!(
        (card["secretsSynced"].clone(), card["secretsTotal"].clone()),
        (1.into(), 2.into())
    );
    assert_eq!(card["lastFailure"]["reason"], "not_ready");
    // ESO's reason and where to read more; its message (error text) is not repeated.
    let message = card["lastFailure"]["message"].as_str().unwrap();
    assert!(message.contains("SecretSyncedError"), "{message}");
    assert!(
        message.contains("kubectl -n paperless describe externalsecret paperless-oidc"),
        "{message}"
    );
    assert!(!message.contains("could not get secret data"), "{message}");
    assert_eq!(facts["postgres"]["up"], true);
    assert_eq!(facts["redis"]["up"], true);

    // ESO syncs the second secret: the app is up.
    stack
        .external_secret(
            "paperless",
            "paperless-oidc",
            Some((true, "SecretSynced", "Secret was synced")),
        )
        .await;
    wait_for_sample(
        &process,
        r#"hearth_externalsecret_ready{namespace="paperless",name="paperless-oidc"}"#,
        1.0,
    )
    .await;
    let card = eventually("paperless up", WAIT, || async {
        let facts = status(&process).await;
        app(&facts, "paperless")
            .filter(|card| card["state"] == "up")
            .cloned()
    })
    .await;
    assert_eq!(card["secretsSynced"], 2);

    // The namespace opts out: its series go, the databases' stay.
    stack.namespace_with("paperless", &[]).await;
    let text = wait_for_absence(
        &process,
        r#"hearth_target_up{kind="http",namespace="paperless""#,
    )
    .await;
    assert!(!text.contains(r#"namespace="paperless""#), "{text}");
    assert_eq!(sample(&text, "pg_up"), Some(1.0));
    assert!(app(&status(&process).await, "paperless").is_none());
}

#[tokio::test]
async fn a_named_port_and_an_explicit_path_are_probed_and_a_foreign_secret_does_not_count() {
    let stack = Stack::start().await;
    let site = TestSite::start(Behaviour::Status(204)).await.unwrap();
    stack
        .namespace_with(
            "miniflux",
            &[
                ("hearth.dev/probe", "miniflux:http/healthcheck"),
                ("hearth.dev/postgres", "true"),
                ("hearth.dev/url", "https://miniflux.tailnet.example.ts.net"),
            ],
        )
        .await;
    stack
        .service("miniflux", "miniflux", site.port(), "http")
        .await;
    // A Secret called hearth-db that db-provisioner did not make.
    stack.database_secret("miniflux", false).await;
    // By default the published URL's certificate is not checked (it needs the tailnet).
    let process = stack.exporter(&[("PROBE_PUBLISHED_URLS", "false")]).await;
    let text = wait_for_samples(
        &process,
        &[
            (
                r#"probe_http_status_code{namespace="miniflux",target="miniflux"}"#,
                204.0,
            ),
            (
                r#"hearth_target_up{kind="secret",namespace="miniflux",target="hearth-db"}"#,
                0.0,
            ),
        ],
    )
    .await;
    assert!(
        sample(
            &text,
            r#"hearth_probe_errors_total{kind="secret",namespace="miniflux",target="hearth-db",reason="missing"}"#
        )
        .is_some(),
        "{text}"
    );
    // db-provisioner writes its own: now it counts.
    stack.database_secret("miniflux", true).await;
    wait_for_sample(
        &process,
        r#"hearth_target_up{kind="secret",namespace="miniflux",target="hearth-db"}"#,
        1.0,
    )
    .await;
    let text = process.get("/metrics").await.unwrap().body;
    assert!(!text.contains(r#"kind="tls""#), "{text}");
    let facts = status(&process).await;
    assert_eq!(
        app(&facts, "miniflux").unwrap()["url"],
        "https://miniflux.tailnet.example.ts.net",
        "still shown"
    );
    // Secrets were only ever listed and watched by name, for their metadata: none was read.
    let secret_requests: Vec<_> = stack
        .api
        .requests()
        .into_iter()
        .filter(|r| !r.from_harness && r.resource == "secrets")
        .collect();
    assert!(!secret_requests.is_empty());
    for request in secret_requests {
        assert!(
            matches!(request.verb, "list" | "watch")
                && request.metadata_only
                && request.name.as_deref() == Some("hearth-db"),
            "{request:?}"
        );
    }
}

#[tokio::test]
async fn a_probe_changed_while_the_old_one_hangs_is_checked_at_once() {
    let stack = Stack::start().await;
    let site = TestSite::start(Behaviour::SilentAt("/hang")).await.unwrap();
    let probe = |path: &str| format!("http://127.0.0.1:{}{path}", site.port());
    stack
        .namespace_with("switch", &[("hearth.dev/probe", &probe("/hang"))])
        .await;
    // A long deadline and interval: the hanging check holds its target for 8 s.
    let process = stack
        .exporter(&[("PROBE_INTERVAL", "20s"), ("PROBE_TIMEOUT", "8s")])
        .await;
    eventually("the hanging check under way", WAIT, || async {
        (site.connections() > 0).then_some(())
    })
    .await;
    // The same target (its label is the site's address), a different check.
    stack
        .namespace_with("switch", &[("hearth.dev/probe", &probe("/ok"))])
        .await;
    let changed = Instant::now();
    let target = format!("127.0.0.1:{}", site.port());
    wait_for_sample(
        &process,
        &format!(r#"probe_success{{namespace="switch",target="{target}"}}"#),
        1.0,
    )
    .await;
    assert!(
        changed.elapsed() < Duration::from_secs(3),
        "the new check waited {:?} for the old one",
        changed.elapsed()
    );
    // The old check's timeout, when it comes, is not recorded against the new one.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let text = process.get("/metrics").await.unwrap().body;
    assert_eq!(
        sample(
            &text,
            &format!(
                r#"hearth_probes_total{{kind="http",namespace="switch",target="{target}",result="timeout"}}"#
            )
        ),
        Some(0.0),
        "{text}"
    );
}

/// Waits until `series` is 0 with `reason` counted; the exposition.
async fn failed_with(
    process: &hearth_tests::admin::ServiceProcess,
    namespace: &str,
    target: &str,
    reason: &str,
) -> String {
    let errors = format!(
        r#"hearth_probe_errors_total{{kind="http",namespace="{namespace}",target="{target}",reason="{reason}"}}"#
    );
    eventually(&errors, WAIT, || async {
        let text = process.get("/metrics").await.ok()?.body;
        let up = sample(
            &text,
            &format!(
                r#"hearth_target_up{{kind="http",namespace="{namespace}",target="{target}"}}"#
            ),
        );
        (up == Some(0.0) && sample(&text, &errors).is_some()).then_some(text)
    })
    .await
}

#[tokio::test]
async fn bad_input_is_one_failed_target_each_and_never_stalls_a_scrape() {
    let stack = Stack::start().await;
    let garbage = TestSite::start(Behaviour::Garbage).await.unwrap();
    let silent = TestSite::start(Behaviour::Silent).await.unwrap();
    let broken = TestSite::start(Behaviour::Status(500)).await.unwrap();
    let endless = TestSite::start(Behaviour::Endless).await.unwrap();
    let url = |site: &TestSite| format!("http://127.0.0.1:{}/", site.port());
    let apps = [
        ("ftp", "ftp://files.example.org/"),
        ("userinfo", "https://user:hunter2@example.org/"),
        ("nonsense", "::::"),
    ];
    for (namespace, probe) in apps {
        stack
            .namespace_with(namespace, &[("hearth.dev/probe", probe)])
            .await;
    }
    stack
        .namespace_with("bad-expose", &[("hearth.dev/expose", "web:99999")])
        .await;
    stack
        .namespace_with("no-service", &[("hearth.dev/expose", "web:8000")])
        .await;
    for (namespace, site) in [
        ("garbage", &garbage),
        ("silent", &silent),
        ("broken", &broken),
        ("endless", &endless),
    ] {
        stack
            .namespace_with(namespace, &[("hearth.dev/probe", &url(site))])
            .await;
    }
    let process = stack.exporter(&[]).await;

    // Scrapes are timed all along, while the silent site holds every probe of it for the whole
    // deadline.
    let scraping = {
        let admin = process.admin;
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                let started = Instant::now();
                let reply = hearth_tests::admin::http_get(admin, "/metrics")
                    .await
                    .unwrap();
                assert_eq!(reply.status, 200);
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            slowest
        })
    };

    for namespace in ["ftp", "userinfo", "nonsense", "bad-expose"] {
        failed_with(&process, namespace, "annotation", "invalid_annotation").await;
    }
    failed_with(&process, "no-service", "web", "missing").await;
    let garbage_target = format!("127.0.0.1:{}", garbage.port());
    failed_with(&process, "garbage", &garbage_target, "protocol").await;
    let silent_target = format!("127.0.0.1:{}", silent.port());
    let text = failed_with(&process, "silent", &silent_target, "timeout").await;
    assert!(
        sample(
            &text,
            &format!(r#"hearth_probes_total{{kind="http",namespace="silent",target="{silent_target}",result="timeout"}}"#)
        )
        .unwrap()
            >= 1.0
    );
    let broken_target = format!("127.0.0.1:{}", broken.port());
    let text = failed_with(&process, "broken", &broken_target, "http_status").await;
    assert_eq!(
        sample(
            &text,
            &format!(r#"probe_http_status_code{{namespace="broken",target="{broken_target}"}}"#)
        ),
        Some(500.0)
    );
    // An answer that never ends is read no further than needed: up, and quickly.
    let endless_target = format!("127.0.0.1:{}", endless.port());
    let text = wait_for_sample(
        &process,
        &format!(r#"probe_success{{namespace="endless",target="{endless_target}"}}"#),
        1.0,
    )
    .await;
    let took = sample(
        &text,
        &format!(r#"probe_duration_seconds{{namespace="endless",target="{endless_target}"}}"#),
    )
    .unwrap();
    // It reads 64 KiB and stops, far within the 500 ms deadline.
    assert!(took < 0.2, "{took}");
    promtool_check_metrics(&text).unwrap();
    // A credential in an annotation never comes back out.
    assert!(!text.contains("hunter2"));
    let page = process.get("/").await.unwrap().body;
    assert!(!page.contains("hunter2") && !status(&process).await.to_string().contains("hunter2"));

    let slowest = scraping.await.unwrap();
    assert!(
        slowest < Duration::from_millis(250),
        "a scrape took {slowest:?} while a target never answered"
    );
    // Each silent probe was given up at its deadline and tried again on the next interval.
    assert!(silent.connections() >= 3, "{}", silent.connections());
    assert_eq!(process.get("/livez").await.unwrap().status, 200);
    // The card says what is wrong, in words.
    let facts = status(&process).await;
    let card = app(&facts, "ftp").unwrap();
    assert_eq!(card["state"], "down");
    assert!(
        card["lastFailure"]["message"]
            .as_str()
            .unwrap()
            .contains("ftp"),
        "{card}"
    );
}

#[tokio::test]
async fn database_credentials_never_show_and_failures_say_why() {
    let stack = Stack::start().await;
    let pg = stack.postgres.connect().await.unwrap();
    pg.batch_execute("CREATE ROLE monitor LOGIN PASSWORD 'right-password' IN ROLE pg_monitor")
        .await
        .unwrap();
    let mut redis = stack.redis.connect().await.unwrap();
    redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "monitor",
                "on",
                ">right-password",
                "+ping",
                "+info",
            ][..],
        )
        .exec_async(&mut redis)
        .await
        .unwrap();
    let postgres_url = format!(
        "postgres://monitor:Pg-Wrong-Secret-1@127.0.0.1:{}/postgres",
        stack.postgres.port()
    );
    let redis_url = format!(
        "redis://monitor:Redis-Wrong-Secret-2@127.0.0.1:{}/",
        stack.redis.port()
    );
    let process = stack
        .exporter(&[("POSTGRES_URL", &postgres_url), ("REDIS_URL", &redis_url)])
        .await;
    let errors = |kind: &str, reason: &str| {
        format!(
            r#"hearth_probe_errors_total{{kind="{kind}",namespace="",target="{kind}",reason="{reason}"}}"#
        )
    };
    let text = eventually("both refused as auth", WAIT, || async {
        let text = process.get("/metrics").await.ok()?.body;
        (sample(&text, "pg_up") == Some(0.0)
            && sample(&text, "redis_up") == Some(0.0)
            && sample(&text, &errors("postgres", "auth")).is_some()
            && sample(&text, &errors("redis", "auth")).is_some())
        .then_some(text)
    })
    .await;
    let facts = status(&process).await.to_string();
    assert!(facts.contains("28P01"), "the SQLSTATE says why: {facts}");
    let page = process.get("/").await.unwrap().body;
    for secret in ["Pg-Wrong-Secret-1", "Redis-Wrong-Secret-2"] {
        assert!(!text.contains(secret));
        assert!(!facts.contains(secret));
        assert!(!page.contains(secret));
        assert!(!process.logs().contains(secret), "{}", process.logs());
    }

    // With the right password pg_monitor sees every database's size.
    drop(process);
    let postgres_url = postgres_url.replace("Pg-Wrong-Secret-1", "right-password");
    let redis_url = redis_url.replace("Redis-Wrong-Secret-2", "right-password");
    let process = stack
        .exporter(&[("POSTGRES_URL", &postgres_url), ("REDIS_URL", &redis_url)])
        .await;
    let text = wait_for_sample(&process, "pg_up", 1.0).await;
    assert!(sample(&text, r#"pg_database_size_bytes{datname="postgres"}"#).is_some());
    wait_for_sample(&process, "redis_up", 1.0).await;
}

#[test]
fn a_malformed_database_url_stops_the_start_without_showing_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_health-exporter"))
        .env(
            "POSTGRES_URL",
            "postgres://u:Malformed-Secret-3@db:notaport/x",
        )
        .env("KUBECONFIG", "/nonexistent")
        .env("POD_NAMESPACE", "hearth-system")
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("POSTGRES_URL"), "{said}");
    assert!(!said.contains("Malformed-Secret-3"), "{said}");
}
