//! The ValidatingAdmissionPolicies in deploy/admission.yaml, evaluated with a CEL interpreter
//! against the writes hearth's services make (which they must allow) and the writes a
//! compromised hearth pod could try with the same RBAC (which they must refuse). No API server
//! runs here, so this is the policies' logic, not the server's admission chain: the interpreter
//! is not the API server's CEL environment (no type checking against the schemas, no cost
//! limits), which the expressions keep to plain CEL to stay within.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cel::{Context, Program, Value as Cel};
use hearth_tests::manifests::{deploy_file, yaml_documents};
use serde_json::{Value, json};

const NAMESPACE_SA: &str = "system:serviceaccount:hearth-system:";

fn policy(name: &str) -> Value {
    let text = std::fs::read_to_string(deploy_file("admission.yaml")).unwrap();
    yaml_documents(&text)
        .unwrap()
        .into_iter()
        .find(|o| o["kind"] == "ValidatingAdmissionPolicy" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no policy {name}"))
}

fn evaluate(expression: &str, request: &Value, object: &Value, old: &Value) -> bool {
    let program = Program::compile(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
    let mut context = Context::default();
    context.add_variable("request", request).unwrap();
    context.add_variable("object", object).unwrap();
    context.add_variable("oldObject", old).unwrap();
    match program.execute(&context) {
        Ok(Cel::Bool(result)) => result,
        other => panic!("{expression} gave {other:?}"),
    }
}

/// Whether `name` lets the write through: not matched (another user), or every validation holds.
fn admits(name: &str, user: &str, operation: &str, object: &Value, old: &Value) -> bool {
    let policy = policy(name);
    let request = json!({"operation": operation, "userInfo": {"username": user}});
    let matched = policy["spec"]["matchConditions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| evaluate(c["expression"].as_str().unwrap(), &request, object, old));
    let operations = &policy["spec"]["matchConstraints"]["resourceRules"][0]["operations"];
    if !matched || !operations.as_array().unwrap().contains(&json!(operation)) {
        return true;
    }
    policy["spec"]["validations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| evaluate(v["expression"].as_str().unwrap(), &request, object, old))
}

fn account(name: &str) -> String {
    format!("{NAMESPACE_SA}{name}")
}

#[test]
fn hearth_writes_only_opaque_and_tls_secrets() {
    let secret = |kind: &str| json!({"metadata": {"name": "hearth-db"}, "type": kind});
    let provisioner = account("db-provisioner");
    assert!(admits(
        "hearth-secret-types",
        &provisioner,
        "CREATE",
        &secret("Opaque"),
        &Value::Null
    ));
    assert!(admits(
        "hearth-secret-types",
        &account("secret-bridge"),
        "UPDATE",
        &secret("kubernetes.io/tls"),
        &secret("kubernetes.io/tls")
    ));
    // A token Secret for some other ServiceAccount: refused.
    for user in [provisioner.as_str(), &account("secret-bridge")] {
        assert!(!admits(
            "hearth-secret-types",
            user,
            "CREATE",
            &secret("kubernetes.io/service-account-token"),
            &Value::Null
        ));
    }
    // Nobody else is concerned.
    assert!(admits(
        "hearth-secret-types",
        "kubernetes-admin",
        "CREATE",
        &secret("kubernetes.io/service-account-token"),
        &Value::Null
    ));
}

#[test]
fn ingress_sync_only_rolls_deployments() {
    let deployment = |image: &str, replicas: u32, annotations: Value| {
        json!({"spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "paperless"}},
            "template": {
                "metadata": {"labels": {"app": "paperless"}, "annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": image}], "serviceAccountName": "paperless"},
            },
        }})
    };
    let before = deployment("paperless:2", 1, json!({}));
    let rolled = deployment("paperless:2", 1, json!({"hearth.dev/url-hash": "ab12"}));
    let sync = account("ingress-sync");
    assert!(admits(
        "hearth-deployment-restarts",
        &sync,
        "UPDATE",
        &rolled,
        &before
    ));
    assert!(!admits(
        "hearth-deployment-restarts",
        &sync,
        "UPDATE",
        &deployment("evil:1", 1, json!({})),
        &before
    ));
    assert!(!admits(
        "hearth-deployment-restarts",
        &sync,
        "UPDATE",
        &deployment("paperless:2", 0, json!({})),
        &before
    ));
    let mut relabelled = before.clone();
    relabelled["spec"]["template"]["metadata"]["labels"]["extra"] = json!("x");
    assert!(!admits(
        "hearth-deployment-restarts",
        &sync,
        "UPDATE",
        &relabelled,
        &before
    ));
    assert!(admits(
        "hearth-deployment-restarts",
        "kubernetes-admin",
        "UPDATE",
        &deployment("evil:1", 1, json!({})),
        &before
    ));
}

#[test]
fn controllers_never_change_namespace_labels() {
    let namespace = |labels: Value, annotations: Value| json!({"metadata": {"name": "paperless", "labels": labels, "annotations": annotations}});
    let labels = json!({"kubernetes.io/metadata.name": "paperless",
                        "pod-security.kubernetes.io/enforce": "restricted"});
    let before = namespace(labels.clone(), json!({"hearth.dev/postgres": "true"}));
    let written = namespace(
        labels.clone(),
        json!({"hearth.dev/postgres": "true", "hearth.dev/postgres-database": "paperless"}),
    );
    for controller in ["db-provisioner", "ingress-sync"] {
        let user = account(controller);
        assert!(admits(
            "hearth-namespace-labels",
            &user,
            "UPDATE",
            &written,
            &before
        ));
        let relaxed = namespace(
            json!({"kubernetes.io/metadata.name": "paperless",
                                       "pod-security.kubernetes.io/enforce": "privileged"}),
            json!({}),
        );
        assert!(!admits(
            "hearth-namespace-labels",
            &user,
            "UPDATE",
            &relaxed,
            &before
        ));
        let unlabelled = json!({"metadata": {"name": "paperless"}});
        assert!(!admits(
            "hearth-namespace-labels",
            &user,
            "UPDATE",
            &unlabelled,
            &before
        ));
    }
}

#[test]
fn ingress_sync_only_writes_its_own_ingresses() {
    let ours = json!({"metadata": {"name": "hearth-web", "labels": {"app.kubernetes.io/managed-by": "hearth-ingress-sync"}}});
    let foreign = json!({"metadata": {"name": "web", "labels": {"app": "web"}}});
    let unlabelled = json!({"metadata": {"name": "web"}});
    let sync = account("ingress-sync");
    let admits = |operation: &str, object: &Value, old: &Value| {
        admits("hearth-own-ingresses", &sync, operation, object, old)
    };
    assert!(admits("CREATE", &ours, &Value::Null));
    assert!(admits("UPDATE", &ours, &ours));
    assert!(admits("DELETE", &Value::Null, &ours));
    assert!(!admits("CREATE", &foreign, &Value::Null));
    assert!(!admits("CREATE", &unlabelled, &Value::Null));
    // Taking over someone's Ingress by labelling it, or deleting it: refused.
    assert!(!admits("UPDATE", &ours, &foreign));
    assert!(!admits("UPDATE", &ours, &unlabelled));
    assert!(!admits("DELETE", &Value::Null, &foreign));
    assert!(!admits("UPDATE", &foreign, &ours));
}
