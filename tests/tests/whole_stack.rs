//! All four services together, on the machinery `scripts/run` uses (`hearth_tests::local`): an
//! app opted in goes through every service and out again; two replicas of each controller with
//! a leader killed mid-run end in the same state, nothing duplicated or lost; and the run
//! command itself starts everything, says what happened and stops cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hearth_tests::admin::http_get;
use hearth_tests::eventually;
use hearth_tests::local::{Config, LocalStack, TAILNET};
use hearth_tests::sites::{Behaviour, TestSite};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// One whole stack at a time: each runs PostgreSQL, Redis and four to six services, and three
/// at once on two cores make every timing a matter of luck.
fn one_at_a_time() -> &'static tokio::sync::Mutex<()> {
    static SERIAL: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    SERIAL.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// The directory of the service binaries, built (once per test process) as they are now.
fn binaries() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--bins"])
                .args([
                    "-p",
                    "db-provisioner",
                    "-p",
                    "secret-bridge",
                    "-p",
                    "ingress-sync",
                ])
                .args(["-p", "health-exporter", "-p", "hearth-tests"])
                .status()
                .unwrap();
            assert!(status.success(), "building the services failed");
            let exe = std::env::current_exe().unwrap();
            // target/<profile>/deps/<this test> → target/<profile>
            exe.parent().unwrap().parent().unwrap().to_path_buf()
        })
        .clone()
}

async fn stack(controller_replicas: usize) -> LocalStack {
    LocalStack::start(Config {
        binaries: binaries(),
        admin_ports: None,
        controller_replicas,
        examples: false,
        operator_delay: Duration::from_millis(300),
    })
    .await
    .unwrap()
}

/// An app namespace with a Service answered by a stand-in site, a Deployment to roll, and a
/// ConfigMap of its own that hearth must never touch.
async fn app(stack: &LocalStack, name: &str) -> TestSite {
    let site = TestSite::start(Behaviour::Status(200)).await.unwrap();
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": name},
               "spec": {"clusterIP": "127.0.0.1",
                        "ports": [{"name": "http", "port": site.port(), "protocol": "TCP"}]}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": name, "namespace": name},
               "spec": {"selector": {"matchLabels": {"app": name}},
                        "template": {"metadata": {"labels": {"app": name}},
                                     "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "app-settings", "namespace": name},
               "data": {"THEME": "dark"}}),
    ];
    for object in objects {
        stack.apply(&object).await.unwrap();
    }
    site
}

async fn opt_in(stack: &LocalStack, name: &str, port: u16) {
    stack
        .apply(&json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": {
                "hearth.dev/postgres": "true",
                "hearth.dev/redis": "true",
                "hearth.dev/profile": "paperless",
                "hearth.dev/expose": format!("web:{port}"),
                "hearth.dev/restart-on-url-change": name,
            }},
        }))
        .await
        .unwrap();
}

/// The Secret hearth-db of a namespace, decoded, once it is there.
async fn database_secret(stack: &LocalStack, namespace: &str) -> BTreeMap<String, String> {
    let secrets: Api<Secret> = Api::namespaced(stack.client.clone(), namespace);
    eventually(
        &format!("Secret hearth-db in {namespace}"),
        WAIT,
        || async {
            let secret = secrets.get_opt("hearth-db").await.ok()??;
            let data: BTreeMap<String, String> = secret
                .data?
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
                .collect();
            data.contains_key("PAPERLESS_REDIS").then_some(data)
        },
    )
    .await
}

async fn url_published(stack: &LocalStack, namespace: &str) -> BTreeMap<String, String> {
    let maps: Api<ConfigMap> = Api::namespaced(stack.client.clone(), namespace);
    eventually(&format!("hearth-url in {namespace}"), WAIT, || async {
        maps.get_opt("hearth-url").await.ok()??.data
    })
    .await
}

async fn status_of(stack: &LocalStack, namespace: &str) -> Option<Value> {
    let reply = http_get(stack.admin("health-exporter"), "/status.json")
        .await
        .ok()?;
    let facts: Value = serde_json::from_str(&reply.body).ok()?;
    facts["apps"]
        .as_array()?
        .iter()
        .find(|app| app["namespace"] == namespace)
        .cloned()
}

#[tokio::test]
async fn an_app_goes_through_all_four_services_and_out_again() {
    let _alone = one_at_a_time().lock().await;
    let mut stack = stack(1).await;
    let site = app(&stack, "notes").await;
    opt_in(&stack, "notes", site.port()).await;

    // db-provisioner: a database and role that take the Secret's password, and a Redis user.
    let secret = database_secret(&stack, "notes").await;
    assert_eq!(secret["PAPERLESS_DBENGINE"], "postgresql");
    assert_eq!(secret["PAPERLESS_DBNAME"], "notes");
    let login = format!(
        "postgres://notes:{}@127.0.0.1:{}/notes",
        secret["PAPERLESS_DBPASS"],
        stack.postgres.port()
    );
    let (client, connection) = tokio_postgres::connect(&login, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();
    let redis = redis::Client::open(secret["PAPERLESS_REDIS"].as_str()).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut redis).await.unwrap();
    assert_eq!(pong, "PONG");

    // ingress-sync and the stand-in operator: an Ingress, a host, the URL, the app rolled.
    let url = url_published(&stack, "notes").await;
    assert_eq!(url["PAPERLESS_URL"], format!("https://notes.{TAILNET}"));
    let deployments: Api<Deployment> = Api::namespaced(stack.client.clone(), "notes");
    eventually("the app rolled for its URL", WAIT, || async {
        let deployment = deployments.get("notes").await.ok()?;
        deployment
            .spec?
            .template
            .metadata?
            .annotations?
            .contains_key("hearth.dev/url-hash")
            .then_some(())
    })
    .await;

    // health-exporter: the app up, with its URL, every check passed.
    let card = eventually("notes up on the status page", WAIT, || async {
        status_of(&stack, "notes")
            .await
            .filter(|card| card["state"] == "up")
    })
    .await;
    assert_eq!(card["url"], format!("https://notes.{TAILNET}"));
    let kinds: BTreeSet<&str> = card["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    for kind in ["http", "secret", "ingress", "postgres", "redis"] {
        assert!(kinds.contains(kind), "{kind} in {card}");
    }
    // The page people read says the same: the app's URL as a link.
    let page = http_get(stack.admin("health-exporter"), "/")
        .await
        .unwrap()
        .body;
    assert!(
        page.contains(&format!("href=\"https://notes.{TAILNET}\"")),
        "the status page links the app's URL"
    );

    // secret-bridge: a secret fetched as ESO fetches it.
    let eso = stack.eso_client().await.unwrap();
    let (key, value) = eso
        .get(&stack.token, &stack.secrets["hearth-example"])
        .await
        .unwrap();
    assert_eq!(key, "hearth-example");
    assert_eq!(value, "a value from the fake Bitwarden");

    // Opting out: hearth's objects go, the app's own stay, and its data is kept.
    stack
        .apply(&json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "notes", "annotations": {}}}))
        .await
        .unwrap();
    let client = stack.client.clone();
    eventually("hearth's objects gone", WAIT, || async {
        let secret = Api::<Secret>::namespaced(client.clone(), "notes")
            .get_opt("hearth-db")
            .await
            .ok()?;
        let map = Api::<ConfigMap>::namespaced(client.clone(), "notes")
            .get_opt("hearth-url")
            .await
            .ok()?;
        let ingresses = Api::<Ingress>::namespaced(client.clone(), "notes")
            .list(&ListParams::default())
            .await
            .ok()?;
        (secret.is_none() && map.is_none() && ingresses.items.is_empty()).then_some(())
    })
    .await;
    let settings = Api::<ConfigMap>::namespaced(client.clone(), "notes")
        .get("app-settings")
        .await
        .unwrap();
    assert_eq!(settings.data.unwrap()["THEME"], "dark");
    assert!(deployments.get_opt("notes").await.unwrap().is_some());
    let kept = stack.postgres.connect().await.unwrap();
    let databases = kept
        .query("SELECT 1 FROM pg_database WHERE datname = 'notes'", &[])
        .await
        .unwrap();
    assert_eq!(databases.len(), 1, "retained: the default deletion policy");
    eventually("notes gone from the status page", WAIT, || async {
        status_of(&stack, "notes").await.is_none().then_some(())
    })
    .await;
    let problems = stack.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// What the cluster and the databases hold for the apps, without passwords: what must come
/// out the same however the controllers were interrupted.
async fn end_state(stack: &LocalStack, apps: &[&str]) -> Value {
    let client = stack.client.clone();
    let mut state = serde_json::Map::new();
    let mut indexes = BTreeSet::new();
    for app in apps {
        let secret = database_secret(stack, app).await;
        let url = url_published(stack, app).await;
        // db-provisioner writes the namespace's annotations back after its Secret.
        let namespace = eventually(&format!("{app}'s annotations"), WAIT, || async {
            let namespace = Api::<Namespace>::all(client.clone()).get(app).await.ok()?;
            let annotations = namespace.metadata.annotations.as_ref()?;
            (annotations.contains_key("hearth.dev/redis-db")
                && annotations.contains_key("hearth.dev/postgres-database"))
            .then_some(namespace)
        })
        .await;
        let annotations = namespace.metadata.annotations.unwrap_or_default();
        let index = annotations["hearth.dev/redis-db"].clone();
        assert!(
            indexes.insert(index.clone()),
            "Redis index {index} given twice"
        );
        let ingresses = Api::<Ingress>::namespaced(client.clone(), app)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        state.insert(
            (*app).to_owned(),
            json!({
                "secret keys": secret.keys().collect::<Vec<_>>(),
                "url": url["PAPERLESS_URL"],
                "database": annotations["hearth.dev/postgres-database"],
                "ingresses": ingresses.iter().map(|i| i.metadata.name.clone()).collect::<Vec<_>>(),
                "finalizers": namespace.metadata.finalizers,
            }),
        );
        // The password in the Secret is the one PostgreSQL takes: nothing was lost.
        let login = format!(
            "postgres://{app}:{}@127.0.0.1:{}/{app}",
            secret["PAPERLESS_DBPASS"],
            stack.postgres.port()
        );
        let (pg, connection) = tokio_postgres::connect(&login, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{app}: the Secret's password is refused: {e}"));
        tokio::spawn(connection);
        pg.simple_query("SELECT 1").await.unwrap();
    }
    let admin = stack.postgres.connect().await.unwrap();
    let roles: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)",
            &[&apps.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(roles, apps.len() as i64, "one role each");
    let allocations = Api::<ConfigMap>::namespaced(client, "hearth-system")
        .get("hearth-redis-allocations")
        .await
        .unwrap();
    assert_eq!(
        allocations.data.unwrap_or_default().len(),
        apps.len(),
        "one Redis index each"
    );
    Value::Object(state)
}

#[tokio::test]
async fn two_replicas_and_a_leader_killed_mid_run_end_in_the_same_state() {
    let _alone = one_at_a_time().lock().await;
    const APPS: [&str; 3] = ["alpha", "bravo", "charlie"];
    let mut stack = stack(2).await;
    let mut sites = Vec::new();
    for name in APPS {
        sites.push(app(&stack, name).await);
    }
    opt_in(&stack, APPS[0], sites[0].port()).await;
    database_secret(&stack, APPS[0]).await;
    // The other two are opted in and, while they are worked on, each controller's leader is
    // killed outright.
    for (name, site) in APPS.iter().zip(&sites).skip(1) {
        opt_in(&stack, name, site.port()).await;
    }
    let mut killed = Vec::new();
    for service in ["db-provisioner", "ingress-sync"] {
        let leader = eventually(&format!("{service} has a leader"), WAIT, || async {
            stack.leader(service).await.ok()?
        })
        .await;
        stack.kill(leader).unwrap();
        killed.push(leader);
    }
    let taken_over = Instant::now();
    let first = end_state(&stack, &APPS).await;
    println!(
        "settled {:?} after the leaders were killed",
        taken_over.elapsed()
    );
    // The killed replicas come back; nothing changes.
    for index in killed {
        stack.start_replica(index).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = end_state(&stack, &APPS).await;
    assert_eq!(first, second);
    for app in APPS {
        let ingresses = &first[app]["ingresses"];
        assert_eq!(ingresses, &json!(["hearth-web"]), "{app}");
        assert_eq!(first[app]["url"], format!("https://{app}.{TAILNET}"));
    }
    let problems = stack.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// The run command's process, stopped as Ctrl-C would stop it if the test ends early, so that
/// a failing test leaves nothing running.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn the_run_command_starts_everything_says_what_happened_and_stops_cleanly() {
    let _alone = one_at_a_time().blocking_lock();
    let mut run = Running(
        Command::new(binaries().join("hearth-local"))
            .arg(binaries())
            .env("HEARTH_LOCAL_PORTS", "free")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut run.0;
    let stdout = child.stdout.take().unwrap();
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let mut output = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    while !output
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops everything"))
    {
        let line = said
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no end of start-up:\n{}", output.join("\n")));
        output.push(line);
    }
    let text = output.join("\n");
    for app in ["paperless", "wallabag", "miniflux", "immich"] {
        assert!(
            text.contains(&format!("{app}: Secret hearth-db written")),
            "{text}"
        );
        assert!(
            text.contains(&format!("URL https://{app}.{TAILNET} published"))
                || app == "immich" && text.contains("immich.tailnet.example.ts.net"),
            "{text}"
        );
    }
    assert!(text.contains("fetched \"hearth-example\""), "{text}");
    assert!(text.contains("fake Kubernetes API") && text.contains("stand-in"));
    let files = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("temporary files in "))
        .unwrap()
        .to_owned();
    assert!(std::path::Path::new(&files).is_dir());

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let rest: Vec<String> = said.try_iter().collect();
    assert!(status.success(), "{}", rest.join("\n"));
    assert!(
        rest.iter()
            .any(|l| l.contains("Stopped. Nothing is left running")),
        "{rest:?}"
    );
    assert!(
        !std::path::Path::new(&files).exists(),
        "{files} left behind"
    );
}
