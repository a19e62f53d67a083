//! Apply, for a namespace that opted out or is being deleted: remove what was delivered into it
//! and, with deletion policy `drop`, its database, role, ACL user and Redis data.

use hearth_runtime::annotations::{self, DeletionPolicy, parse_postgres};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::Error;
use crate::allocation::{owned_index, record_indexes};
use crate::controller::Context;
use crate::desired::Desired;
use crate::provision::write_back;
use crate::redis::SENTINEL_KEY;
use crate::report::Step;
use crate::secret::{MANAGED_BY, MANAGED_BY_LABEL, SECRET_NAME};

/// Holds a namespace's deletion until its databases are dropped (deletion policy `drop`).
pub const FINALIZER: &str = "hearth.dev/db-provisioner";

fn kube(action: &'static str) -> impl Fn(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

fn not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// Adds or removes this service's finalizer, guarded by a JSON-patch test so a concurrent
/// change to the list is never overwritten. A namespace already gone needs neither.
pub async fn set_finalizer(
    namespace: &Namespace,
    context: &Context,
    wanted: bool,
) -> Result<(), Error> {
    let current = namespace.finalizers().to_vec();
    let present = current.iter().any(|f| f == FINALIZER);
    if present == wanted {
        return Ok(());
    }
    let mut next = current.clone();
    if wanted {
        next.push(FINALIZER.to_owned());
    } else {
        next.retain(|f| f != FINALIZER);
    }
    let patch = if namespace.metadata.finalizers.is_some() {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "replace", "path": "/metadata/finalizers", "value": next},
        ])
    } else {
        json!([{"op": "add", "path": "/metadata/finalizers", "value": next}])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch)
        .map_err(|e| Error::Invalid(format!("building the finalizer patch: {e}")))?;
    let namespaces: Api<Namespace> = Api::all(context.client.clone());
    match namespaces
        .patch(
            &namespace.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if not_found(&error) => Ok(()),
        Err(error) => Err(kube("update finalizers")(error)),
    }
}

/// The namespace no longer asks for anything: remove what was delivered into it and the
/// finalizer, and keep the databases (and the Redis index reserved) as the retain policy says.
pub async fn opt_out(namespace: &Namespace, context: &Context) -> Result<(), Error> {
    let name = namespace.name_any();
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &name);
    let existing = secrets
        .get_opt(SECRET_NAME)
        .await
        .map_err(kube("read Secret"))?;
    let ours = existing
        .as_ref()
        .is_some_and(|s| s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY));
    if ours {
        match secrets.delete(SECRET_NAME, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(error) if not_found(&error) => {}
            Err(error) => return Err(kube("delete Secret")(error)),
        }
        let note = format!(
            "no hearth.dev/postgres or hearth.dev/redis annotation: deleted Secret \
             {SECRET_NAME}; databases and the Redis index are kept"
        );
        context
            .report
            .normal(namespace, Step::OptOut, "OptedOut", &note)
            .await;
    }
    set_finalizer(namespace, context, false).await?;
    write_back(namespace, None, None, context).await
}

/// The namespace is being deleted. With `drop`, its database, role, ACL user and Redis data go
/// first, and only what carries this namespace's heritage; then the finalizer is removed.
pub async fn finalize(
    namespace: &Namespace,
    desired: &Desired,
    context: &Context,
) -> Result<(), Error> {
    if !namespace.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let name = namespace.name_any();
    if desired.deletion_policy == DeletionPolicy::Drop {
        // What was provisioned is recorded on the namespace; the request may differ or be gone.
        let database = namespace
            .annotations()
            .get(annotations::POSTGRES_DATABASE)
            .and_then(|value| parse_postgres(value, &name).ok().flatten())
            .or_else(|| desired.postgres.clone());
        if let Some(database) = database {
            let report = context.postgres()?.drop(&name, &database).await?;
            if !report.dropped.is_empty() {
                let note = format!("dropped {}", report.dropped.join(" and "));
                context
                    .report
                    .normal(namespace, Step::Drop, "Dropped", &note)
                    .await;
            }
            if !report.kept.is_empty() {
                let note = format!(
                    "kept, since not this namespace's: {}",
                    report.kept.join(", ")
                );
                context
                    .report
                    .warning(namespace, Step::Drop, "Kept", &note)
                    .await;
            }
        }
        drop_redis(namespace, context).await?;
        context.credentials.delete(&name).await?;
    }
    set_finalizer(namespace, context, false).await
}

/// Deletes the namespace's ACL user (if hearth made it) and flushes and frees its index (if its
/// sentinel names this namespace). Index 0 is shared by every connection: it is never flushed.
async fn drop_redis(namespace: &Namespace, context: &Context) -> Result<(), Error> {
    let name = namespace.name_any();
    let allocation = context.allocations.load().await?;
    let Some(index) = owned_index(&allocation, &name) else {
        return Ok(());
    };
    let redis = context.redis()?;
    let mut session = redis.session().await?;
    let credentials = context.credentials.load(&name).await?.unwrap_or_default();
    let kept: Vec<_> = [
        credentials.redis_password.as_ref(),
        credentials.next_redis_password.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut done = Vec::new();
    if redis
        .user_is_ours(&mut session, &name, &kept, index)
        .await?
        == Some(true)
    {
        redis.delete_user(&mut session, &name).await?;
        done.push(format!("deleted ACL user {name}"));
    }
    let (owner, keys) = session.inspect(index).await?;
    let flushable = index != 0
        && match owner.as_deref() {
            Some(owner) => owner == name,
            // Without a sentinel only an empty database is released: keys there are unaccounted
            // for.
            None => keys == 0,
        };
    if index == 0 {
        context
            .report
            .warning(
                namespace,
                Step::Drop,
                "Kept",
                "Redis index 0 was not flushed: every connection starts there, so other apps' \
                 keys may be in it too; delete this app's keys by hand. The allocation is freed",
            )
            .await;
    } else if !flushable {
        let note = format!(
            "Redis index {index} was not flushed and stays reserved: its {SENTINEL_KEY} key does \
             not name this namespace"
        );
        context
            .report
            .warning(namespace, Step::Drop, "Kept", &note)
            .await;
        return Ok(());
    } else {
        redis.flush(&mut session, index).await?;
        done.push(format!("flushed Redis index {index}"));
    }
    let databases = session.databases().await?;
    let written = context
        .allocations
        .update(|allocation| {
            allocation.retain(|_, owner| owner.as_str() != name);
            Ok(())
        })
        .await?;
    record_indexes(context, &written, databases);
    done.push(format!("freed index {index}"));
    let note = done.join(", ");
    context
        .report
        .normal(namespace, Step::Drop, "Dropped", &note)
        .await;
    Ok(())
}
