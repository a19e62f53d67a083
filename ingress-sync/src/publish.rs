//! Apply: the app's URL, once the Tailscale operator has given its Ingress a host name, in
//! ConfigMap `hearth-url` and the namespace annotation `hearth.dev/url`; the Deployments named in
//! `hearth.dev/restart-on-url-change` rolled when it changes; and all of it removed on opt-out.

use hearth_runtime::annotations;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::Error;
use crate::build::{self, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, URL_CONFIG_MAP, URL_HASH};
use crate::controller::{Context, Step};
use crate::desired::{Desired, Exposure};
use crate::ingresses;

fn made_by_us(config_map: &ConfigMap) -> bool {
    config_map
        .labels()
        .get(MANAGED_BY_LABEL)
        .map(String::as_str)
        == Some(MANAGED_BY)
}

/// Publishes the URL the operator gave `ingress`, if it gave one yet. Returns whether a URL is
/// published.
pub async fn publish(
    namespace: &Namespace,
    desired: &Desired,
    exposure: &Exposure,
    ingress: &Ingress,
    context: &Context,
) -> Result<bool, Error> {
    let Some(host) = build::published_host(ingress) else {
        // The operator has not given it a name yet; its status change brings us back.
        return Ok(false);
    };
    let ns = desired.namespace.as_str();
    let url = format!("https://{host}");
    let data = build::url_data(desired.profile, host);
    let config_maps: Api<ConfigMap> = Api::namespaced(context.client.clone(), ns);
    let existing = config_maps
        .get_opt(URL_CONFIG_MAP)
        .await
        .map_err(crate::kube("read ConfigMap"))?;
    if let Some(existing) = &existing
        && !made_by_us(existing)
    {
        let note = format!(
            "ConfigMap {URL_CONFIG_MAP} exists and was not made by hearth; hearth never \
             overwrites it. Rename or delete it to let hearth publish this app's URL ({url})"
        );
        context
            .refuse(namespace, Step::PublishUrl, "Conflict", &note)
            .await;
        return Ok(false);
    }
    if existing.as_ref().and_then(|c| c.data.as_ref()) != Some(&data) {
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": URL_CONFIG_MAP,
                "namespace": ns,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                "ownerReferences": ingress_owner(ingress),
            },
            "data": data,
        });
        context.metrics.api_writes.inc();
        config_maps
            .patch(
                URL_CONFIG_MAP,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(crate::kube("write ConfigMap"))?;
        let note = format!(
            "published {url} in ConfigMap {URL_CONFIG_MAP} (keys {}) and annotation {}",
            data.keys().cloned().collect::<Vec<_>>().join(", "),
            annotations::URL
        );
        context
            .normal(namespace, Step::PublishUrl, "UrlPublished", &note)
            .await;
        if build::first_label(host) != exposure.hostname {
            let note = format!(
                "the tailnet already had a device named {}, so the Tailscale operator published \
                 this app as {host}. If that device is gone for good, delete it in the Tailscale \
                 admin console (or let hearth: TAILSCALE_DEVICE_CLEANUP=delete), then restart \
                 this Ingress's proxy to get the name back",
                exposure.hostname
            );
            context
                .events
                .publish_about(
                    namespace,
                    hearth_runtime::events::EventType::Warning,
                    "HostnameSuffixed",
                    Step::PublishUrl.action(),
                    &note,
                )
                .await;
        }
    }
    annotate(namespace, Some(&url), context).await?;
    restart(namespace, desired, &url, context).await?;
    Ok(true)
}

/// The Ingress (so its Service) owns the ConfigMap: it goes when the app's Service goes.
fn ingress_owner(ingress: &Ingress) -> serde_json::Value {
    json!([{
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "name": ingress.name_any(),
        "uid": ingress.uid().unwrap_or_default(),
    }])
}

/// Sets (or with `None` removes) the namespace annotation `hearth.dev/url`. A merge patch: an
/// apply would re-create a namespace deleted meanwhile.
async fn annotate(
    namespace: &Namespace,
    url: Option<&str>,
    context: &Context,
) -> Result<(), Error> {
    if namespace
        .annotations()
        .get(annotations::URL)
        .map(String::as_str)
        == url
    {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": {annotations::URL: url}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let namespaces: Api<Namespace> = Api::all(context.client.clone());
    context.metrics.api_writes.inc();
    match namespaces
        .patch(&namespace.name_any(), &params, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(crate::kube("annotate namespace")(error)),
    }
}

/// Rolls each named Deployment whose pods were not started with this URL: none of the apps
/// reads its URL again while running.
async fn restart(
    namespace: &Namespace,
    desired: &Desired,
    url: &str,
    context: &Context,
) -> Result<(), Error> {
    let hash = build::url_hash(url);
    let deployments: Api<Deployment> = Api::namespaced(context.client.clone(), &desired.namespace);
    for name in &desired.restart {
        let Some(deployment) = deployments
            .get_opt(name)
            .await
            .map_err(crate::kube("read Deployment"))?
        else {
            let note = format!(
                "hearth.dev/restart-on-url-change names Deployment {name}, which namespace {} \
                 does not have; correct the annotation",
                desired.namespace
            );
            context
                .refuse(
                    namespace,
                    Step::RestartDeployments,
                    "DeploymentMissing",
                    &note,
                )
                .await;
            continue;
        };
        let current = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(URL_HASH));
        if current.map(String::as_str) == Some(hash.as_str()) {
            continue;
        }
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {URL_HASH: hash}}}}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        context.metrics.api_writes.inc();
        deployments
            .patch(name, &params, &Patch::Merge(&patch))
            .await
            .map_err(crate::kube("restart Deployment"))?;
        let note = format!("restarted Deployment {name} so its pods read the new URL {url}");
        context
            .normal(
                namespace,
                Step::RestartDeployments,
                "DeploymentRestarted",
                &note,
            )
            .await;
    }
    Ok(())
}

/// The namespace asks for nothing any more: hearth's Ingresses, its ConfigMap and the
/// annotation go; nothing else is touched.
pub async fn opt_out(namespace: &Namespace, context: &Context) -> Result<(), Error> {
    let name = namespace.name_any();
    for ingress in context.ours_in(&name) {
        let serves_ours = build::served_service(&ingress)
            .is_some_and(|service| build::is_ours(&ingress, &name, service));
        if serves_ours {
            ingresses::remove(namespace, &ingress, context).await?;
        }
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(context.client.clone(), &name);
    let existing = config_maps
        .get_opt(URL_CONFIG_MAP)
        .await
        .map_err(crate::kube("read ConfigMap"))?;
    if existing.as_ref().is_some_and(made_by_us) {
        context.metrics.api_writes.inc();
        match config_maps
            .delete(URL_CONFIG_MAP, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(crate::kube("delete ConfigMap")(error)),
        }
    }
    annotate(namespace, None, context).await?;
    context
        .normal(
            namespace,
            Step::OptOut,
            "OptedOut",
            "no hearth.dev/expose annotation: removed hearth's Ingresses, ConfigMap hearth-url \
             and annotation hearth.dev/url",
        )
        .await;
    Ok(())
}
