//! `hearth-local [<directory of the service binaries>]`: the whole of hearth on this machine, as
//! `scripts/run` starts it. Prints what each service does with the example apps, serves the
//! status page, and stops everything on Ctrl-C.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hearth_tests::admin::http_get;
use hearth_tests::local::{Config, EXAMPLES, LocalStack, SERVICES, TAILNET};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, ResourceExt};

/// The admin ports, in the order of `SERVICES`.
const ADMIN_PORTS: [u16; 4] = [8081, 8082, 8083, 8084];
/// How long to wait for the example apps to be fully set up before saying what is missing.
const SETTLE: Duration = Duration::from_secs(90);

fn binaries() -> PathBuf {
    std::env::args_os().nth(1).map_or_else(
        || {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(PathBuf::from))
                .unwrap_or_default()
        },
        PathBuf::from,
    )
}

/// Says each new fact once.
struct Narrator(BTreeSet<String>);

impl Narrator {
    fn say(&mut self, fact: String) {
        if self.0.insert(fact.clone()) {
            println!("  {fact}");
        }
    }
}

/// One look at the cluster; whether every example app is fully set up.
async fn narrate(stack: &LocalStack, said: &mut Narrator) -> bool {
    let client = &stack.client;
    let mut done = true;
    for app in EXAMPLES {
        let Ok(namespace) = Api::<Namespace>::all(client.clone()).get(app).await else {
            done = false;
            continue;
        };
        let annotations = namespace.annotations();
        if let Some(database) = annotations.get("hearth.dev/postgres-database") {
            said.say(format!(
                "db-provisioner   {app}: PostgreSQL role and database \"{database}\" created"
            ));
        }
        if let Some(index) = annotations.get("hearth.dev/redis-db") {
            said.say(format!(
                "db-provisioner   {app}: Redis database {index}, ACL user \"{app}\""
            ));
        }
        match Api::<Secret>::namespaced(client.clone(), app)
            .get_opt("hearth-db")
            .await
        {
            Ok(Some(secret)) => {
                let keys: Vec<String> = secret.data.unwrap_or_default().into_keys().collect();
                said.say(format!(
                    "db-provisioner   {app}: Secret hearth-db written ({})",
                    keys.join(", ")
                ));
            }
            _ => done = false,
        }
        let ingresses = Api::<Ingress>::namespaced(client.clone(), app)
            .list(&ListParams::default())
            .await
            .map(|list| list.items)
            .unwrap_or_default();
        for ingress in &ingresses {
            said.say(format!(
                "ingress-sync     {app}: Ingress {} for the Tailscale operator",
                ingress.name_any()
            ));
            let host = ingress
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .and_then(|entries| entries.iter().find_map(|e| e.hostname.clone()));
            match host {
                Some(host) => said.say(format!(
                    "tailscale (stand-in) {app}: {} named {host}",
                    ingress.name_any()
                )),
                None => done = false,
            }
        }
        match Api::<ConfigMap>::namespaced(client.clone(), app)
            .get_opt("hearth-url")
            .await
        {
            Ok(Some(map)) => {
                let data = map.data.unwrap_or_default();
                let keys: Vec<&String> = data.keys().collect();
                said.say(format!(
                    "ingress-sync     {app}: URL {} published (ConfigMap hearth-url: {keys:?})",
                    data.get("URL").cloned().unwrap_or_default()
                ));
            }
            _ => done = false,
        }
        let events = Api::<Event>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await
            .map(|list| list.items)
            .unwrap_or_default();
        for event in events.iter().filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(app)
        }) {
            said.say(format!(
                "{:<16} {app}: Warning {}: {}",
                event
                    .reporting_controller
                    .as_deref()
                    .unwrap_or("hearth")
                    .trim_start_matches("hearth-"),
                event.reason.as_deref().unwrap_or_default(),
                event.note.as_deref().unwrap_or_default()
            ));
        }
    }
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret"),
        "externalsecrets",
    );
    let externals = Api::<DynamicObject>::all_with(client.clone(), &resource)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    for external in externals {
        let ready = external.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            said.say(format!(
                "external-secrets (stand-in) {}: ExternalSecret {} synced through secret-bridge",
                external.namespace().unwrap_or_default(),
                external.name_any()
            ));
        } else {
            done = false;
        }
    }
    done
}

/// Ctrl-C, a SIGTERM or a SIGHUP (a closed terminal, a supervisor): all stop the same way.
/// Listened for from the start, so one that comes while starting up is not lost.
struct Stop {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Stop {
    fn listen() -> Result<Self, String> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| signal(kind).map_err(|e| format!("cannot listen for signals: {e}"));
        Ok(Self {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }
}

async fn run() -> Result<(), String> {
    let mut stop = Stop::listen()?;
    println!(
        "hearth, locally. Real: the four services, PostgreSQL, Redis. Fake or stand-in, and \
         named so below: the Kubernetes API, the Tailscale operator, External Secrets Operator, \
         Bitwarden and the apps themselves."
    );
    // HEARTH_LOCAL_PORTS=free: admin servers on free ports (tests run it beside other things).
    let fixed = std::env::var("HEARTH_LOCAL_PORTS").map_or(true, |v| v != "free");
    let config = Config {
        binaries: binaries(),
        admin_ports: fixed.then_some(ADMIN_PORTS),
        controller_replicas: 1,
        examples: true,
        operator_delay: Duration::from_secs(2),
    };
    let mut stack = LocalStack::start(config)
        .await
        .map_err(|e| format!("could not start: {e}"))?;
    println!("Started:");
    println!(
        "  PostgreSQL {} and Redis {} (private, removed on exit)",
        stack
            .postgres
            .major_version()
            .await
            .map_or_else(|_| "?".into(), |v| v.to_string()),
        stack.redis.port()
    );
    println!("  fake Kubernetes API at {}", stack.api.url());
    println!("  temporary files in {}", stack.dir().display());
    println!("  stand-in Tailscale operator, tailnet {TAILNET}");
    println!(
        "  fake Bitwarden at {}, with {} secrets",
        stack.bitwarden.api_url(),
        stack.secrets.len()
    );
    for replica in &stack.replicas {
        println!(
            "  {:<16} admin http://{}  log {}",
            replica.service,
            replica.admin,
            replica
                .process
                .as_ref()
                .map(|p| p.log_path().display().to_string())
                .unwrap_or_default()
        );
    }
    for note in &stack.notes {
        println!("  note: {note}");
    }

    println!(
        "What hearth did with the example apps ({}):",
        EXAMPLES.join(", ")
    );
    let mut said = Narrator(BTreeSet::new());
    let started = Instant::now();
    while !narrate(&stack, &mut said).await {
        if started.elapsed() > SETTLE {
            println!("  (not everything was set up within {SETTLE:?}; see the logs above)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let id = stack.secrets["hearth-example"].clone();
    match stack.eso_client().await {
        Ok(eso) => match eso.get(&stack.token, &id).await {
            Ok((key, value)) => println!(
                "secret-bridge: fetched \"{key}\" = \"{value}\" the way ESO does (HTTPS, \
                 trusting ConfigMap secret-bridge-ca, Warden headers)"
            ),
            Err(error) => println!("secret-bridge: the sample fetch failed: {error}"),
        },
        Err(error) => println!("secret-bridge: no CA published: {error}"),
    }
    let status = stack.admin("health-exporter");
    if let Ok(reply) = http_get(status, "/status.json").await
        && let Ok(facts) = serde_json::from_str::<serde_json::Value>(&reply.body)
    {
        for app in facts["apps"].as_array().into_iter().flatten() {
            println!(
                "health-exporter: {} is {}",
                app["namespace"].as_str().unwrap_or_default(),
                app["state"].as_str().unwrap_or_default()
            );
        }
    }
    println!("Status page: http://{status}/   (metrics: http://{status}/metrics)");
    println!("Ctrl-C stops everything.");
    stop.wait().await;
    println!("Stopping: {} ...", SERVICES.join(", "));
    let problems = stack.stop().await;
    drop(stack);
    if problems.is_empty() {
        println!("Stopped. Nothing is left running, and the temporary files are gone.");
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hearth-local: {error}");
            ExitCode::FAILURE
        }
    }
}
