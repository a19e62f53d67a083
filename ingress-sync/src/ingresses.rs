//! Apply: each exposure's Ingress, checked before it is written and written only when it
//! differs; hearth's Ingresses no longer asked for, removed. Only Ingresses that carry hearth's
//! label and the matching source annotation are ever changed or deleted, always by server-side
//! apply or a uid-checked delete, never a replace; a new one is created, never applied, so an
//! Ingress of its name made by someone else a moment before is refused, not taken over.

use std::sync::Arc;

use hearth_runtime::annotations::ServicePort;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::build::{self, FIELD_MANAGER, Owner};
use crate::controller::{Context, Step};
use crate::desired::{Desired, Exposure};

/// Ingresses per page of the live list a new Ingress is checked against.
const LIVE_PAGE: u32 = 20;

/// Makes the exposure's Ingress what it should be. `None` when it was refused (and said why).
pub async fn ensure(
    namespace: &Namespace,
    desired: &Desired,
    exposure: &Exposure,
    context: &Context,
) -> Result<Option<Ingress>, Error> {
    let ns = desired.namespace.as_str();
    let services: Api<Service> = Api::namespaced(context.client.clone(), ns);
    let Some(service) = services
        .get_opt(&exposure.service)
        .await
        .map_err(crate::kube("read Service"))?
    else {
        let note = format!(
            "hearth.dev/expose names Service {} with port {}, but namespace {ns} has no such \
             Service; create it, or correct the annotation",
            exposure.service, exposure.port
        );
        context
            .refuse(namespace, Step::ApplyIngress, "ServiceMissing", &note)
            .await;
        return Ok(None);
    };
    if let Some(why) = not_routable(&service) {
        let note = format!(
            "Service {} {why}, and the Tailscale operator only sends to a Service with a cluster \
             IP; expose a ClusterIP Service instead",
            exposure.service
        );
        context
            .refuse(namespace, Step::ApplyIngress, "ServiceNotRoutable", &note)
            .await;
        return Ok(None);
    }
    if !has_port(&service, &exposure.port) {
        let note = format!(
            "Service {} has no port {} (it has {}); the operator would route nowhere. Correct \
             hearth.dev/expose",
            exposure.service,
            exposure.port,
            ports_of(&service)
        );
        context
            .refuse(namespace, Step::ApplyIngress, "PortMissing", &note)
            .await;
        return Ok(None);
    }
    let name = build::ingress_name(&exposure.service);
    let uid = service.uid().unwrap_or_default();
    let owner = Owner {
        name: &exposure.service,
        uid: &uid,
    };
    let body = build::ingress(desired, exposure, &context.class, &owner);
    let ingresses: Api<Ingress> = Api::namespaced(context.client.clone(), ns);
    let all = context.ingresses.state();
    let mut existing = context.ingresses.get(&ObjectRef::new(&name).within(ns));
    let mut taken = build::claimed_by(
        all.iter().map(AsRef::as_ref),
        &context.class,
        &exposure.hostname,
        ns,
        &name,
    );
    if existing.is_none() && taken.is_none() {
        // About to make a new one: the cache may not yet have heard of an Ingress made a moment
        // ago (ours to refuse, or the host name's holder), so this is decided on the API's own
        // list. It happens once per app, a page at a time to hold little memory.
        let all: Api<Ingress> = Api::all(context.client.clone());
        let mut page = ListParams::default().limit(LIVE_PAGE);
        loop {
            let live = all
                .list(&page)
                .await
                .map_err(crate::kube("list Ingresses"))?;
            taken = taken.or_else(|| {
                build::claimed_by(&live.items, &context.class, &exposure.hostname, ns, &name)
            });
            existing = existing.or_else(|| {
                live.items
                    .into_iter()
                    .find(|i| i.metadata.namespace.as_deref() == Some(ns) && i.name_any() == name)
                    .map(Arc::new)
            });
            match live.metadata.continue_ {
                Some(token) if !token.is_empty() => page = page.continue_token(&token),
                _ => break,
            }
        }
    }
    if let Some(holder) = taken {
        let note = format!(
            "host name {} is already asked for by Ingress {holder}, and the operator would \
             publish this app under a suffixed name; set hearth.dev/hostname to another name",
            exposure.hostname
        );
        context
            .refuse(namespace, Step::ApplyIngress, "HostnameTaken", &note)
            .await;
        return Ok(None);
    }
    if existing.is_none() {
        // A create, unlike an apply, fails rather than take over one made since the list.
        context.metrics.api_writes.inc();
        match create(&ingresses, &body).await? {
            Some(created) => {
                let note = format!(
                    "created Ingress {name} for Service {}, port {}, asking the tailnet for host \
                     name {}",
                    exposure.service, exposure.port, exposure.hostname
                );
                context
                    .normal(namespace, Step::ApplyIngress, "IngressCreated", &note)
                    .await;
                return Ok(Some(created));
            }
            None => {
                existing = ingresses
                    .get_opt(&name)
                    .await
                    .map_err(crate::kube("read Ingress"))?
                    .map(Arc::new);
            }
        }
    }
    // Gone again between the create and the read: the next pass starts over.
    let Some(existing) = existing else {
        return Ok(None);
    };
    if !build::is_ours(&existing, ns, &exposure.service) {
        let note = format!(
            "Ingress {name} exists and was not made by hearth for Service {}; hearth never \
             changes or deletes it. Rename or delete it to let hearth publish this Service",
            exposure.service
        );
        context
            .refuse(namespace, Step::ApplyIngress, "Conflict", &note)
            .await;
        return Ok(None);
    }
    if build::up_to_date(&existing, &body, &|key| owns_annotation(&existing, key)) {
        return Ok(Some(existing.as_ref().clone()));
    }
    context.metrics.api_writes.inc();
    let applied = ingresses
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(crate::kube("apply Ingress"))?;
    let note = format!(
        "brought Ingress {name} back to what hearth.dev/* asks (it had been changed or the \
         annotations changed)"
    );
    context
        .normal(namespace, Step::ApplyIngress, "IngressUpdated", &note)
        .await;
    Ok(Some(applied))
}

/// Creates the Ingress `body` describes under hearth's field manager; `None` when one of that
/// name exists already (whoever made it).
async fn create(
    ingresses: &Api<Ingress>,
    body: &serde_json::Value,
) -> Result<Option<Ingress>, Error> {
    let ingress: Ingress = serde_json::from_value(body.clone()).map_err(Error::Build)?;
    let params = PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.to_owned()),
    };
    match ingresses.create(&params, &ingress).await {
        Ok(created) => Ok(Some(created)),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
        Err(error) => Err(crate::kube("create Ingress")(error)),
    }
}

/// Why the operator could not send to this Service, if it could not.
fn not_routable(service: &Service) -> Option<&'static str> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some("is of type ExternalName");
    }
    (spec.cluster_ip.as_deref() == Some("None")).then_some("is headless (clusterIP: None)")
}

fn has_port(service: &Service, port: &ServicePort) -> bool {
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports.is_some_and(|ports| {
        ports.iter().any(|p| match port {
            ServicePort::Number(number) => p.port == i32::from(*number),
            ServicePort::Name(name) => p.name.as_deref() == Some(name.as_str()),
        })
    })
}

fn ports_of(service: &Service) -> String {
    let ports: Vec<String> = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .map(|p| match &p.name {
            Some(name) => format!("{}/{name}", p.port),
            None => p.port.to_string(),
        })
        .collect();
    if ports.is_empty() {
        "no ports".to_owned()
    } else {
        ports.join(", ")
    }
}

/// Whether hearth's field manager set annotation `key` (read from managedFields), so that a
/// pass-through annotation hearth no longer wants is removed, and one someone else set is not
/// mistaken for drift.
fn owns_annotation(ingress: &Ingress, key: &str) -> bool {
    ingress
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| entry.manager.as_deref() == Some(FIELD_MANAGER))
        .filter_map(|entry| entry.fields_v1.as_ref())
        .any(|fields| fields.0["f:metadata"]["f:annotations"][format!("f:{key}")].is_object())
}

/// Deletes hearth's Ingresses in the namespace that no exposure asks for any more.
pub async fn remove_stale(
    namespace: &Namespace,
    desired: &Desired,
    context: &Context,
) -> Result<(), Error> {
    for ingress in context.ours_in(&desired.namespace) {
        let Some(service) = build::served_service(&ingress) else {
            continue;
        };
        let wanted = desired.exposures.iter().any(|e| e.service == service);
        if !wanted && build::is_ours(&ingress, &desired.namespace, service) {
            remove(namespace, &ingress, context).await?;
        }
    }
    Ok(())
}

/// Deletes one of hearth's Ingresses, only if it is still the object that was checked.
pub async fn remove(
    namespace: &Namespace,
    ingress: &Ingress,
    context: &Context,
) -> Result<(), Error> {
    let name = ingress.name_any();
    let ingresses: Api<Ingress> = Api::namespaced(
        context.client.clone(),
        &ingress.namespace().unwrap_or_default(),
    );
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: ingress.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    context.metrics.api_writes.inc();
    match ingresses.delete(&name, &params).await {
        Ok(_) => {}
        // Gone already, or replaced by another object of the same name: not ours to delete.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => return Ok(()),
        Err(error) => return Err(crate::kube("delete Ingress")(error)),
    }
    let note = format!(
        "deleted Ingress {name}: no hearth.dev/expose entry asks for it any more (the Tailscale \
         operator removes its device)"
    );
    context
        .normal(namespace, Step::RemoveIngress, "IngressRemoved", &note)
        .await;
    Ok(())
}
