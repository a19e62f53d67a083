//! The RBAC that `deploy/` grants each service, rendered by `kubectl kustomize` and evaluated as
//! the API server's RBAC authorizer does, so that what a service asked of the fake API in a test
//! can be checked against what its ServiceAccount would be allowed in a real cluster.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

use crate::HarnessError;
use crate::fake_api::ApiRequest;
use crate::manifests::{kustomize, yaml_documents};

/// The namespace `deploy/` installs into.
pub const NAMESPACE: &str = "hearth-system";

/// One rule, where it applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `None` for a ClusterRole bound cluster-wide; the Role's namespace otherwise.
    pub namespace: Option<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    /// Empty: any name.
    pub resource_names: Vec<String>,
    pub verbs: Vec<String>,
}

impl Grant {
    /// Whether this rule allows `request`, as the RBAC authorizer decides.
    pub fn allows(&self, request: &ApiRequest) -> bool {
        let resource = match &request.subresource {
            Some(sub) => format!("{}/{sub}", request.resource),
            None => request.resource.clone(),
        };
        let in_scope = match &self.namespace {
            None => true,
            Some(namespace) => request.namespace.as_deref() == Some(namespace.as_str()),
        };
        let named = self.resource_names.is_empty()
            || request
                .name
                .as_ref()
                .is_some_and(|name| self.resource_names.contains(name));
        in_scope
            && named
            && self.api_groups.contains(&request.group)
            && self.resources.contains(&resource)
            && self.verbs.iter().any(|v| v == request.verb)
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every ServiceAccount's grants, from rendered manifests.
pub fn grants(objects: &[Value]) -> BTreeMap<String, Vec<Grant>> {
    let roles: BTreeMap<(String, Option<String>, String), &Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
        .map(|o| {
            let kind = o["kind"].as_str().unwrap_or_default().to_owned();
            let namespace = o["metadata"]["namespace"].as_str().map(str::to_owned);
            let name = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            ((kind, namespace, name), o)
        })
        .collect();
    let mut grants: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        // A RoleBinding grants within its namespace, whichever kind of role it names.
        let scope = (binding["kind"] == "RoleBinding")
            .then(|| binding["metadata"]["namespace"].as_str().map(str::to_owned))
            .flatten();
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_namespace = (role_kind == "Role").then(|| scope.clone()).flatten();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let Some(role) = roles.get(&(role_kind.to_owned(), role_namespace, role_name.to_owned()))
        else {
            continue;
        };
        for subject in binding["subjects"].as_array().into_iter().flatten() {
            if subject["kind"] != "ServiceAccount" {
                continue;
            }
            let account = subject["name"].as_str().unwrap_or_default().to_owned();
            for rule in role["rules"].as_array().into_iter().flatten() {
                grants.entry(account.clone()).or_default().push(Grant {
                    namespace: scope.clone(),
                    api_groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    resource_names: strings(&rule["resourceNames"]),
                    verbs: strings(&rule["verbs"]),
                });
            }
        }
    }
    grants
}

/// The grants `deploy/` gives each ServiceAccount, rendered once per test process.
pub fn deployed() -> Result<&'static BTreeMap<String, Vec<Grant>>, HarnessError> {
    static GRANTS: OnceLock<BTreeMap<String, Vec<Grant>>> = OnceLock::new();
    if let Some(grants) = GRANTS.get() {
        return Ok(grants);
    }
    let objects = yaml_documents(&kustomize("deploy")?)?;
    Ok(GRANTS.get_or_init(|| grants(&objects)))
}

/// Checks every request a hearth service made (its User-Agent names it, `hearth-<account>`)
/// against the RBAC `deploy/` gives that service's ServiceAccount; the requests it would be
/// refused, described, or an error when there are any.
pub fn check_requests(requests: &[ApiRequest]) -> Result<(), HarnessError> {
    let grants = deployed()?;
    let refused: Vec<String> = requests
        .iter()
        .filter(|r| !r.from_harness)
        .filter_map(|request| {
            let Some(account) = request.agent.strip_prefix("hearth-") else {
                // Neither the harness nor a hearth service: no RBAC to check it against.
                return Some(format!(
                    "a client that did not say who it is (User-Agent {:?}): {} {}",
                    request.agent, request.verb, request.resource
                ));
            };
            let allowed = grants
                .get(account)
                .is_some_and(|grants| grants.iter().any(|g| g.allows(request)));
            (!allowed).then(|| {
                format!(
                    "{account}: {} {}{}{} in {} named {}",
                    request.verb,
                    if request.group.is_empty() {
                        ""
                    } else {
                        &request.group
                    },
                    if request.group.is_empty() { "" } else { "/" },
                    request.resource,
                    request.namespace.as_deref().unwrap_or("(cluster)"),
                    request.name.as_deref().unwrap_or("(any)"),
                )
            })
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        let mut unique = refused;
        unique.sort();
        unique.dedup();
        Err(HarnessError::Startup(format!(
            "deploy/ RBAC would refuse requests the services made:\n  {}",
            unique.join("\n  ")
        )))
    }
}
