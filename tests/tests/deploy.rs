//! deploy/ as `kubectl kustomize` renders it, checked the way a cluster and a reviewer would:
//! every object is a valid object of its kind with no field lost, every hearth pod meets the
//! restricted Pod Security Standard with probes and sized resources, RBAC is exactly the table
//! in the README, every variable a Deployment sets is one its binary reads, the example apps
//! read only keys hearth writes for their profile, and the ClusterSecretStore is what ESO's
//! Bitwarden provider reads. (Whether the RBAC allows what the services do is checked by every
//! test that runs a service: see `hearth_tests::rbac`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::CommandFactory;
use hearth_runtime::Sensitive;
use hearth_runtime::annotations::{self, ServicePort};
use hearth_tests::manifests::{
    COMPONENTS, kustomize, kustomize_with_components, repo_root, yaml_documents,
};
use hearth_tests::rbac::{self, Grant};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::{Value, json};

const SERVICES: [&str; 4] = [
    "db-provisioner",
    "secret-bridge",
    "ingress-sync",
    "health-exporter",
];
const APPS: [&str; 4] = ["paperless", "wallabag", "miniflux", "immich"];

fn render(relative: &str) -> Vec<Value> {
    yaml_documents(&kustomize(relative).unwrap()).unwrap()
}

/// deploy/ with every component, as a user's overlay renders it.
fn render_with_every_component() -> Vec<Value> {
    yaml_documents(&kustomize_with_components(&COMPONENTS).unwrap()).unwrap()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> {
    objects.iter().filter(move |o| o["kind"] == kind)
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(objects, kind)
        .find(|o| o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Paths of `original` that `back` does not have, or has with another value.
fn lost(original: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => lost(value, other, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        _ => out.push(format!("{path} (was {original}, became {back})")),
    }
}

fn typed<K: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) -> Vec<String> {
    let parsed: K = match serde_json::from_value(object.clone()) {
        Ok(parsed) => parsed,
        Err(error) => return vec![format!("does not parse: {error}")],
    };
    let mut out = Vec::new();
    lost(object, &serde_json::to_value(parsed).unwrap(), "", &mut out);
    out
}

/// The fields a custom resource may have, as its operator reads them: an object lists its
/// keys, an array's one element describes every element, `"*"` is anything.
fn custom_shape(kind: &str) -> Option<Value> {
    let metadata = json!("*");
    let spec = match kind {
        "ServiceMonitor" => json!({
            "selector": "*",
            "endpoints": [{"port": "", "path": "", "interval": "", "scrapeTimeout": "",
                           "honorLabels": ""}],
        }),
        "PrometheusRule" => json!({
            "groups": [{"name": "", "rules": [{"alert": "", "expr": "", "for": "",
                                               "labels": "*", "annotations": "*"}]}],
        }),
        // ESO's BitwardenSecretsManagerProvider (external-secrets.io/v1).
        "ClusterSecretStore" => json!({
            "conditions": [{"namespaces": [""], "namespaceSelector": "*", "namespaceRegexes": [""]}],
            "provider": {"bitwardensecretsmanager": {
                "apiURL": "", "identityURL": "", "bitwardenServerSDKURL": "", "caBundle": "",
                "caProvider": {"type": "", "name": "", "key": "", "namespace": ""},
                "organizationID": "", "projectID": "",
                "auth": {"secretRef": {"credentials": {"name": "", "key": "", "namespace": ""}}},
            }},
        }),
        "ExternalSecret" => json!({
            "refreshInterval": "",
            "secretStoreRef": {"kind": "", "name": ""},
            "target": {"name": "", "creationPolicy": ""},
            "data": [{"secretKey": "", "remoteRef": {"key": "", "property": ""}}],
        }),
        _ => return None,
    };
    Some(json!({"apiVersion": "", "kind": "", "metadata": metadata, "spec": spec}))
}

/// Fields of `object` that its shape does not have.
fn unknown_fields(object: &Value, shape: &Value, path: &str, out: &mut Vec<String>) {
    match (object, shape) {
        (_, Value::String(any)) if any == "*" => {}
        (Value::Object(fields), Value::Object(allowed)) => {
            for (key, value) in fields {
                match allowed.get(key) {
                    Some(inner) => unknown_fields(value, inner, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(items), Value::Array(element)) => {
            for (i, item) in items.iter().enumerate() {
                unknown_fields(item, &element[0], &format!("{path}[{i}]"), out);
            }
        }
        (Value::Object(_) | Value::Array(_), _) => out.push(format!("{path} (not expected here)")),
        _ => {}
    }
}

fn problems(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    match kind {
        "Namespace" => typed::<Namespace>(object),
        "ServiceAccount" => typed::<ServiceAccount>(object),
        "ClusterRole" => typed::<ClusterRole>(object),
        "ClusterRoleBinding" => typed::<ClusterRoleBinding>(object),
        "Role" => typed::<Role>(object),
        "RoleBinding" => typed::<RoleBinding>(object),
        "Deployment" => typed::<Deployment>(object),
        "Job" => typed::<Job>(object),
        "Service" => typed::<Service>(object),
        "NetworkPolicy" => typed::<NetworkPolicy>(object),
        "PodDisruptionBudget" => typed::<PodDisruptionBudget>(object),
        "ConfigMap" => typed::<ConfigMap>(object),
        "Secret" => typed::<Secret>(object),
        "PersistentVolumeClaim" => typed::<PersistentVolumeClaim>(object),
        "ValidatingAdmissionPolicy" => typed::<ValidatingAdmissionPolicy>(object),
        "ValidatingAdmissionPolicyBinding" => typed::<ValidatingAdmissionPolicyBinding>(object),
        _ => match custom_shape(kind) {
            Some(shape) => {
                let mut out = Vec::new();
                unknown_fields(object, &shape, "", &mut out);
                out
            }
            None => vec![format!("no check for kind {kind}")],
        },
    }
}

#[test]
fn every_kustomization_renders_and_every_object_round_trips_strictly() {
    let mut renderings = vec![
        ("deploy".to_owned(), render("deploy")),
        ("every component".to_owned(), render_with_every_component()),
    ];
    // A user may take any one component without the others.
    for component in COMPONENTS {
        renderings.push((
            format!("deploy with {component} alone"),
            yaml_documents(&kustomize_with_components(&[component]).unwrap()).unwrap(),
        ));
    }
    for example in APPS.iter().chain(&["admin-secrets"]) {
        let dir = format!("deploy/examples/{example}");
        renderings.push((dir.clone(), render(&dir)));
    }
    let mut checked = 0;
    for (name, objects) in &renderings {
        assert!(!objects.is_empty(), "{name} renders nothing");
        for object in objects {
            let found = problems(object);
            assert!(
                found.is_empty(),
                "{name}: {} {}: {found:?}",
                object["kind"],
                object["metadata"]["name"]
            );
            checked += 1;
        }
    }
    assert!(checked > 60, "{checked} objects");
}

/// The Deployments deploy/ installs, with every component.
fn hearth_deployments(objects: &[Value]) -> Vec<Deployment> {
    of_kind(objects, "Deployment")
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect()
}

#[test]
fn every_hearth_pod_meets_the_restricted_standard_with_probes_and_sized_resources() {
    let objects = render_with_every_component();
    let namespace = named(&objects, "Namespace", "hearth-system");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let deployments = hearth_deployments(&objects);
    assert_eq!(deployments.len(), SERVICES.len());
    for deployment in &deployments {
        let name = deployment.metadata.name.clone().unwrap();
        assert!(SERVICES.contains(&name.as_str()), "{name}");
        let pod = deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let pod_security = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true), "{name}");
        assert_eq!(
            pod_security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let drain = hearth_runtime::shutdown::DEFAULT_DRAIN.as_secs() as i64;
        assert!(
            pod.termination_grace_period_seconds.unwrap() > drain,
            "{name}: the grace period must outlast the {drain} s drain"
        );
        assert_eq!(pod.service_account_name.as_deref(), Some(name.as_str()));
        assert_eq!(pod.containers.len(), 1, "{name}");
        let container = &pod.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some(format!("hearth:{}", env!("CARGO_PKG_VERSION")).as_str())
        );
        assert_eq!(
            container.command.as_deref(),
            Some([format!("/usr/local/bin/{name}")].as_slice())
        );
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true), "{name}");
        assert!(security.run_as_user.is_some_and(|uid| uid > 0), "{name}");
        assert_eq!(security.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(security.allow_privilege_escalation, Some(false), "{name}");
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(["ALL".to_owned()].as_slice()),
            "{name}"
        );
        assert_eq!(
            security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let resources = container.resources.as_ref().unwrap();
        let requests = resources.requests.as_ref().unwrap();
        let limits = resources.limits.as_ref().unwrap();
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{name}"
        );
        assert!(limits.contains_key("memory"), "{name}");
        let mebibytes = |q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
            q.0.strip_suffix("Mi").unwrap().parse::<u32>().unwrap()
        };
        assert!(mebibytes(&requests["memory"]) <= mebibytes(&limits["memory"]));
        for (probe, path) in [
            (container.liveness_probe.as_ref(), "/livez"),
            (container.readiness_probe.as_ref(), "/readyz"),
        ] {
            let get = probe.unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path), "{name}");
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("admin".into())
            );
        }
        let env: BTreeMap<&str, &Value> = container
            .env
            .iter()
            .flatten()
            .map(|var| (var.name.as_str(), &Value::Null))
            .collect();
        for downward in ["POD_NAME", "POD_NAMESPACE"] {
            assert!(env.contains_key(downward), "{name}: {downward}");
        }
        // A Service with named ports, the admin one among them, and a NetworkPolicy.
        let service: Service =
            serde_json::from_value(named(&objects, "Service", &name).clone()).unwrap();
        let ports = service.spec.unwrap().ports.unwrap();
        assert!(ports.iter().all(|p| p.name.is_some()), "{name}");
        assert!(ports.iter().any(|p| p.name.as_deref() == Some("admin")));
        let policy = named(&objects, "NetworkPolicy", &name);
        assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            name
        );
    }
    // Every named port a probe, Service or NetworkPolicy uses is one the container declares,
    // and every PodDisruptionBudget selects a Deployment's pods.
    for deployment in &deployments {
        let name = deployment.metadata.name.clone().unwrap();
        let template = &deployment.spec.as_ref().unwrap().template;
        let container = &template.spec.as_ref().unwrap().containers[0];
        let declared: BTreeSet<String> = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        let service = named(&objects, "Service", &name);
        let policy = named(&objects, "NetworkPolicy", &name);
        let used = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| &p["targetPort"])
            .chain(
                policy["spec"]["ingress"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|rule| rule["ports"].as_array().unwrap())
                    .map(|p| &p["port"]),
            );
        for port in used.filter_map(Value::as_str) {
            assert!(declared.contains(port), "{name}: no container port {port}");
        }
        let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        let selector = &deployment.spec.as_ref().unwrap().selector;
        for (key, value) in selector.match_labels.iter().flatten() {
            assert_eq!(
                labels.get(key),
                Some(value),
                "{name}: its selector matches its pods"
            );
        }
    }
    for budget in of_kind(&objects, "PodDisruptionBudget") {
        let selector = &budget["spec"]["selector"]["matchLabels"];
        assert!(
            deployments.iter().any(|d| {
                let labels = d
                    .spec
                    .as_ref()
                    .unwrap()
                    .template
                    .metadata
                    .as_ref()
                    .unwrap()
                    .labels
                    .as_ref()
                    .unwrap();
                selector
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
            }),
            "{budget}"
        );
        assert_eq!(budget["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    }
    let bridge = named(&objects, "Service", "secret-bridge");
    assert!(
        bridge["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "https" && p["port"] == 9998)
    );
}

#[test]
fn rbac_has_no_wildcard_and_reads_no_secret_it_does_not_own() {
    let objects = render_with_every_component();
    for role in of_kind(&objects, "Role").chain(of_kind(&objects, "ClusterRole")) {
        let name = role["metadata"]["name"].as_str().unwrap();
        for rule in role["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                assert!(
                    !rule[field]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|v| v.as_str().is_some_and(|v| v.contains('*'))),
                    "{name}: a wildcard in {field}"
                );
            }
        }
    }
    // The Secrets each service writes, and so may read; health-exporter is the one exception:
    // it lists db-provisioner's hearth-db Secrets for their metadata only (README, "What each
    // service may do").
    let owned = BTreeMap::from([
        ("db-provisioner", vec!["hearth-db", "hearth-db-credentials"]),
        ("secret-bridge", vec!["secret-bridge-tls"]),
        ("health-exporter", vec!["hearth-db"]),
        ("ingress-sync", vec![]),
    ]);
    for (account, grants) in rbac::grants(&objects) {
        for grant in &grants {
            let secrets = grant.resources.iter().any(|r| r == "secrets");
            let only_create = grant.verbs == ["create"];
            assert!(
                !secrets || only_create || !grant.resource_names.is_empty(),
                "{account} may read Secrets by any name: {grant:?}"
            );
            if secrets && !only_create {
                for name in &grant.resource_names {
                    assert!(
                        owned[account.as_str()].contains(&name.as_str()),
                        "{account} may read Secret {name}, which it does not write"
                    );
                }
            }
            if account == "health-exporter" && secrets {
                assert_eq!(grant.verbs, ["list", "watch"], "metadata lists only");
            }
            let leases = grant.resources.iter().any(|r| r == "leases");
            assert!(
                !leases || grant.namespace.as_deref() == Some(rbac::NAMESPACE),
                "{account}: Lease rights belong in its own namespace"
            );
        }
    }
    // Leader election is a Role of its own.
    for role in of_kind(&objects, "Role").chain(of_kind(&objects, "ClusterRole")) {
        let name = role["metadata"]["name"].as_str().unwrap();
        let leases = role["rules"].as_array().unwrap().iter().any(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .contains(&json!("leases"))
        });
        assert_eq!(
            leases,
            name.ends_with("-leader-election"),
            "{name}: Lease rights, and only they, in a -leader-election Role"
        );
    }
}

/// One line of the README's RBAC table: service, where, API group, resources, names, verbs.
fn table_row(account: &str, grant: &Grant) -> String {
    let join = |items: &[String]| {
        let mut items = items.to_vec();
        items.sort();
        items.join(", ")
    };
    let group = join(&grant.api_groups);
    format!(
        "| {account} | {} | {} | {} | {} | {} |",
        grant.namespace.as_deref().unwrap_or("cluster"),
        if group.is_empty() { "core" } else { &group },
        join(&grant.resources),
        if grant.resource_names.is_empty() {
            "any".to_owned()
        } else {
            join(&grant.resource_names)
        },
        join(&grant.verbs)
    )
}

#[test]
fn rbac_is_exactly_the_table_in_the_readme() {
    let objects = render_with_every_component();
    let rendered: BTreeSet<String> = rbac::grants(&objects)
        .iter()
        .flat_map(|(account, grants)| grants.iter().map(|g| table_row(account, g)))
        .collect();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("<!-- rbac -->")
        .expect("README has an RBAC table");
    let end = readme.find("<!-- /rbac -->").unwrap();
    let documented: BTreeSet<String> = readme[start..end]
        .lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| service"))
        .filter(|line| !line.starts_with("|---"))
        .map(|line| line.trim().to_owned())
        .collect();
    assert_eq!(
        documented,
        rendered,
        "the README's table should read:\n{}",
        rendered.iter().cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The environment variables a service's binary reads.
fn variables(service: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let command = match service {
        "db-provisioner" => db_provisioner::Options::command(),
        "secret-bridge" => secret_bridge::Options::command(),
        "ingress-sync" => ingress_sync::Options::command(),
        "health-exporter" => health_exporter::Options::command(),
        other => panic!("{other}"),
    };
    let mut read = BTreeSet::new();
    let mut required = BTreeSet::new();
    for argument in command.get_arguments() {
        if let Some(env) = argument.get_env() {
            let name = env.to_string_lossy().into_owned();
            if argument.is_required_set() {
                required.insert(name.clone());
            }
            read.insert(name);
        }
    }
    (read, required)
}

#[test]
fn every_variable_a_deployment_sets_is_one_its_binary_reads() {
    let objects = render_with_every_component();
    let admin_secrets = render("deploy/examples/admin-secrets");
    for deployment in hearth_deployments(&objects) {
        let name = deployment.metadata.name.unwrap();
        let (read, required) = variables(&name);
        let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
        let set: BTreeSet<String> = container
            .env
            .iter()
            .flatten()
            .map(|var| var.name.clone())
            .collect();
        assert!(
            container.env_from.is_none(),
            "{name}: every variable by name"
        );
        for variable in &set {
            assert!(read.contains(variable), "{name} does not read {variable}");
        }
        for variable in &required {
            assert!(set.contains(variable), "{name} needs {variable}");
        }
        // What comes from the user's Secret or ConfigMap comes under its own name, from
        // hearth-<service>, optionally; the example ExternalSecret of that Secret provides some
        // of those keys.
        for var in container.env.iter().flatten() {
            let from = var.value_from.as_ref();
            if let Some(setting) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                assert_eq!(setting.key, var.name, "{name}");
                assert_eq!(setting.name, format!("hearth-{name}"), "{name}");
                assert_eq!(setting.optional, Some(true), "{name}");
                continue;
            }
            let Some(key) = from.and_then(|f| f.secret_key_ref.as_ref()) else {
                continue;
            };
            assert_eq!(key.key, var.name, "{name}");
            assert_eq!(key.name, format!("hearth-{name}"), "{name}");
            assert_eq!(key.optional, Some(true), "{name}: optional, documented");
            let example = named(&admin_secrets, "ExternalSecret", &key.name);
            let keys: Vec<&Value> = example["spec"]["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| &d["secretKey"])
                .collect();
            assert!(
                keys.iter().all(|k| set.contains(k.as_str().unwrap())),
                "{}: the example ExternalSecret makes keys {name} does not read",
                key.name
            );
        }
    }
}

/// The keys hearth writes for a namespace: `hearth-db` (db-provisioner) and `hearth-url`
/// (ingress-sync), as their own code renders them.
fn written_keys(
    namespace: &str,
    annotations: &BTreeMap<String, String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let extensions = annotations
        .get(annotations::POSTGRES_EXTENSIONS)
        .map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .unwrap_or_default();
    let reading = db_provisioner::desired::read(namespace, annotations, &extensions);
    assert!(
        reading.invalid.is_empty(),
        "{namespace}: {:?}",
        reading.invalid
    );
    assert!(
        !reading.redis_refused,
        "{namespace}: Redis refused for its profile"
    );
    let desired = reading.desired;
    let password = Sensitive::new("password".to_owned());
    let postgres = desired
        .postgres
        .as_ref()
        .map(|name| db_provisioner::secret::PostgresAccess {
            host: "postgres.databases.svc",
            port: 5432,
            database: name.as_str(),
            username: name.as_str(),
            password: &password,
            sslmode: "disable",
        });
    let redis = desired.redis.map(|_| db_provisioner::secret::RedisAccess {
        host: "redis.databases.svc",
        port: 6379,
        index: 3,
        username: namespace,
        password: &password,
    });
    let database =
        db_provisioner::secret::render(desired.profile, postgres.as_ref(), redis.as_ref())
            .into_keys()
            .collect();
    let exposure = ingress_sync::desired::read(namespace, annotations);
    assert!(
        exposure.invalid.is_empty(),
        "{namespace}: {:?}",
        exposure.invalid
    );
    let url = if exposure.desired.exposures.is_empty() {
        BTreeSet::new()
    } else {
        ingress_sync::build::url_data(exposure.desired.profile, "app.tailnet.ts.net")
            .into_keys()
            .collect()
    };
    (database, url)
}

#[test]
fn the_example_apps_read_only_what_hearth_writes_for_their_profile() {
    for app in APPS {
        let objects = render(&format!("deploy/examples/{app}"));
        let namespace = named(&objects, "Namespace", app);
        let annotations: BTreeMap<String, String> =
            serde_json::from_value(namespace["metadata"]["annotations"].clone()).unwrap();
        assert!(
            annotations::unknown_annotations(&annotations).is_empty(),
            "{app}: unknown annotations"
        );
        assert_eq!(
            annotations[annotations::PROFILE],
            app,
            "{app}: its own profile"
        );
        let checks = health_exporter::targets::read(&annotations);
        assert!(checks.invalid.is_none(), "{app}: {:?}", checks.invalid);
        let (database_keys, url_keys) = written_keys(app, &annotations);
        assert!(
            !database_keys.is_empty(),
            "{app}: hearth writes it a database Secret"
        );

        // What it exposes and probes exists, on those ports.
        let services: Vec<Service> = of_kind(&objects, "Service")
            .map(|s| serde_json::from_value(s.clone()).unwrap())
            .collect();
        let has_port = |service: &str, port: &ServicePort| {
            services.iter().any(|s| {
                s.metadata.name.as_deref() == Some(service)
                    && s.spec
                        .iter()
                        .flat_map(|spec| spec.ports.iter().flatten())
                        .any(|p| match port {
                            ServicePort::Number(n) => p.port == i32::from(*n),
                            ServicePort::Name(name) => p.name.as_deref() == Some(name),
                        })
            })
        };
        for exposed in annotations::parse_expose(&annotations[annotations::EXPOSE]).unwrap() {
            assert!(
                has_port(&exposed.service, &exposed.port),
                "{app}: {}",
                exposed.service
            );
        }
        if let Some(health_exporter::targets::HttpTarget::Service { service, port, .. }) =
            &checks.http
        {
            assert!(has_port(service, port), "{app}: probe {service}");
        }
        let workloads: Vec<(String, k8s_openapi::api::core::v1::PodSpec)> =
            of_kind(&objects, "Deployment")
                .map(|d| serde_json::from_value::<Deployment>(d.clone()).unwrap())
                .map(|d| {
                    (
                        d.metadata.name.unwrap(),
                        d.spec.unwrap().template.spec.unwrap(),
                    )
                })
                .chain(
                    of_kind(&objects, "Job")
                        .map(|j| serde_json::from_value::<Job>(j.clone()).unwrap())
                        .map(|j| {
                            (
                                j.metadata.name.unwrap(),
                                j.spec.unwrap().template.spec.unwrap(),
                            )
                        }),
                )
                .collect();
        if let Some(restart) = annotations.get(annotations::RESTART_ON_URL_CHANGE) {
            for deployment in annotations::parse_restart_on_url_change(restart).unwrap() {
                assert!(
                    workloads.iter().any(|(name, _)| *name == deployment),
                    "{app}: {deployment}"
                );
            }
        }
        for (workload, pod) in &workloads {
            assert_eq!(
                pod.enable_service_links,
                Some(false),
                "{app}/{workload}: service links set <SERVICE>_PORT variables apps misread"
            );
            for container in &pod.containers {
                let mut available = BTreeSet::new();
                let mut reads_database = false;
                for source in container.env_from.iter().flatten() {
                    if let Some(secret) = &source.secret_ref
                        && secret.name == "hearth-db"
                    {
                        reads_database = true;
                        available.extend(database_keys.iter().cloned());
                    }
                    if let Some(map) = &source.config_map_ref
                        && map.name == "hearth-url"
                    {
                        assert!(
                            !url_keys.is_empty(),
                            "{app}: reads hearth-url but exposes nothing"
                        );
                        assert_eq!(
                            map.optional,
                            Some(true),
                            "{app}: it starts before its URL exists"
                        );
                        available.extend(url_keys.iter().cloned());
                    }
                }
                assert!(reads_database, "{app}/{workload}: reads hearth-db");
                for var in container.env.iter().flatten() {
                    available.insert(var.name.clone());
                    let from = var.value_from.as_ref();
                    if let Some(key) = from.and_then(|f| f.secret_key_ref.as_ref())
                        && key.name == "hearth-db"
                    {
                        assert!(
                            database_keys.contains(&key.key),
                            "{app}: hearth-db has no {}",
                            key.key
                        );
                    }
                    if let Some(key) = from.and_then(|f| f.config_map_key_ref.as_ref())
                        && key.name == "hearth-url"
                    {
                        assert!(
                            url_keys.contains(&key.key),
                            "{app}: hearth-url has no {}",
                            key.key
                        );
                    }
                }
                // $(VAR) references resolve to a variable the container has.
                let texts = container
                    .env
                    .iter()
                    .flatten()
                    .filter_map(|v| v.value.clone())
                    .chain(container.command.iter().flatten().cloned())
                    .chain(container.args.iter().flatten().cloned());
                for text in texts {
                    for reference in text.split("$(").skip(1) {
                        let variable = reference.split(')').next().unwrap();
                        assert!(
                            available.contains(variable),
                            "{app}: $({variable}) is not set"
                        );
                    }
                }
            }
            for volume in pod.volumes.iter().flatten() {
                if let Some(secret) = &volume.secret
                    && secret.secret_name.as_deref() == Some("hearth-db")
                {
                    for item in secret.items.iter().flatten() {
                        assert!(
                            database_keys.contains(&item.key),
                            "{app}: hearth-db has no {}",
                            item.key
                        );
                        if item.key == "pgpass" {
                            assert_eq!(
                                item.mode.or(secret.default_mode),
                                Some(0o600),
                                "{app}: libpq refuses a pgpass others can read"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_cluster_secret_store_is_what_esos_bitwarden_provider_reads() {
    let objects = render_with_every_component();
    let store = named(&objects, "ClusterSecretStore", "hearth-bitwarden");
    let provider = &store["spec"]["provider"]["bitwardensecretsmanager"];
    // hearth's own credentials come through a store only hearth-system may use.
    let admin = named(&objects, "ClusterSecretStore", "hearth-bitwarden-admin");
    assert_eq!(
        admin["spec"]["conditions"],
        json!([{"namespaces": [rbac::NAMESPACE]}])
    );
    assert_eq!(
        admin["spec"]["provider"]["bitwardensecretsmanager"]["caProvider"],
        provider["caProvider"]
    );
    for external in of_kind(&render("deploy/examples/admin-secrets"), "ExternalSecret") {
        assert_eq!(
            external["spec"]["secretStoreRef"]["name"],
            "hearth-bitwarden-admin"
        );
    }
    for app in ["paperless", "wallabag", "miniflux"] {
        for external in of_kind(&render(&format!("deploy/examples/{app}")), "ExternalSecret") {
            assert_eq!(
                external["spec"]["secretStoreRef"]["name"],
                "hearth-bitwarden"
            );
        }
    }
    // Required by ESO's ValidateStore: the SDK server URL, organization, project, credentials.
    for field in ["bitwardenServerSDKURL", "organizationID", "projectID"] {
        assert!(
            provider[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field}"
        );
    }
    let credentials = &provider["auth"]["secretRef"]["credentials"];
    assert!(credentials["name"].is_string() && credentials["key"].is_string());
    // It reaches secret-bridge's Service over HTTPS by a name in its certificate...
    let url = url::Url::parse(provider["bitwardenServerSDKURL"].as_str().unwrap()).unwrap();
    assert_eq!(url.scheme(), "https");
    let names = secret_bridge::certs::subject_alt_names(rbac::NAMESPACE, &[]);
    assert!(names.contains(&url.host_str().unwrap().to_owned()), "{url}");
    assert_eq!(url.host_str(), Some("secret-bridge.hearth-system.svc"));
    let service = named(&objects, "Service", "secret-bridge");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == url.port().unwrap())
    );
    // ...and trusts the CA secret-bridge publishes (ESO fails without one).
    assert_eq!(
        provider["caProvider"],
        json!({"type": "ConfigMap", "name": secret_bridge::certs::CA_CONFIG_MAP,
               "key": "ca.crt", "namespace": rbac::NAMESPACE})
    );
    // The SDK-server alias points at the bridge, and the bridge's certificate names it.
    let alias = named(&objects, "Service", "bitwarden-sdk-server");
    assert_eq!(alias["spec"]["type"], "ExternalName");
    assert_eq!(
        alias["spec"]["externalName"],
        format!("{}.cluster.local", url.host_str().unwrap())
    );
    let alias_name = format!(
        "bitwarden-sdk-server.{}.svc.cluster.local",
        alias["metadata"]["namespace"].as_str().unwrap()
    );
    let bridge = hearth_deployments(&objects)
        .into_iter()
        .find(|d| d.metadata.name.as_deref() == Some("secret-bridge"))
        .unwrap();
    let extra = bridge.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .find(|v| v.name == "TLS_EXTRA_SANS")
        .and_then(|v| v.value.clone())
        .unwrap();
    assert!(extra.split(',').any(|name| name == alias_name), "{extra}");
    // The ServiceMonitor keeps health-exporter's namespace label, scraping every service.
    let monitor = named(&objects, "ServiceMonitor", "hearth");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
    let dashboard = named(&objects, "ConfigMap", "hearth-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert!(
        Path::new(&repo_root().join("deploy/components/monitoring/dashboards/hearth.json"))
            .is_file()
    );
}
