//! Apply, for Redis: the namespace's database index (allocated once and recorded in ConfigMap
//! `hearth-redis-allocations`), the sentinel key naming its owner, and its ACL user.

use hearth_runtime::Sensitive;
use hearth_runtime::annotations::RedisRequest;
use k8s_openapi::api::core::v1::Namespace;

use crate::Error;
use crate::controller::Context;
use crate::desired::Desired;
use crate::redis::{Session, choose_index, moved_from_zero};
use crate::report::Step;
use crate::store::{Allocation, Credentials};

/// The index the allocation record gives `namespace`, if any.
pub async fn recorded_index(namespace: &str, context: &Context) -> Result<Option<u8>, Error> {
    Ok(owned_index(&context.allocations.load().await?, namespace))
}

pub fn owned_index(allocation: &Allocation, namespace: &str) -> Option<u8> {
    allocation
        .iter()
        .find(|(_, owner)| owner.as_str() == namespace)
        .map(|(index, _)| *index)
}

/// Allocates or finds the namespace's index, puts its sentinel right and (re)sets its ACL user,
/// which Redis forgets when it restarts. Returns the index.
pub async fn ensure_redis(
    namespace: &Namespace,
    desired: &Desired,
    request: RedisRequest,
    credentials: &Credentials,
    context: &Context,
) -> Result<u8, Error> {
    let redis = context.redis()?;
    let name = desired.namespace.as_str();
    if name == "default" {
        return Err(Error::Invalid(
            "the namespace \"default\" cannot have a Redis ACL user: Redis reserves the user \
             name default for itself"
                .into(),
        ));
    }
    let mut session = redis.session().await?;
    let databases = session.databases().await?;
    let allocation = context.allocations.load().await?;
    let index = match owned_index(&allocation, name) {
        Some(0) => {
            leave_zero(
                namespace,
                name,
                &allocation,
                databases,
                &mut session,
                context,
            )
            .await?
        }
        Some(index) => {
            if let RedisRequest::Claim(claimed) = request
                && claimed != index
            {
                let note = format!(
                    "hearth.dev/redis claims index {claimed}, but this namespace already holds \
                     index {index}; it keeps {index}. Moving data between indexes is not done \
                     automatically"
                );
                context
                    .report
                    .warning(namespace, Step::ProvisionRedis, "RedisIndexMismatch", &note)
                    .await;
            }
            record_indexes(context, &allocation, databases);
            index
        }
        None => allocate(&mut session, name, request, databases, context).await?,
    };
    // The record decides who owns an index; a missing or wrong sentinel is put right, and never
    // keeps the rightful owner from its ACL user.
    match session.inspect(index).await?.0 {
        Some(owner) if owner == name => {}
        found => {
            if let Some(other) = found {
                let note = format!(
                    "the {} key in Redis index {index} named namespace {other}, but the \
                     allocation record gives the index to this namespace; it was set back",
                    crate::redis::SENTINEL_KEY
                );
                context
                    .report
                    .warning(
                        namespace,
                        Step::ProvisionRedis,
                        "RedisSentinelRepaired",
                        &note,
                    )
                    .await;
            }
            redis.write_sentinel(&mut session, index, name).await?;
        }
    }
    let mut kept: Vec<&Sensitive<String>> = Vec::new();
    kept.extend(credentials.redis_password.as_ref());
    kept.extend(credentials.next_redis_password.as_ref());
    if redis.user_is_ours(&mut session, name, &kept, index).await? == Some(false) {
        return Err(Error::Conflict(format!(
            "Redis ACL user {name} exists and was not made by hearth (it has neither a password \
             hearth keeps nor access to index {index}); hearth never changes or deletes a user it \
             did not make. Delete or rename that user if it is stale, or run this app in a \
             namespace of another name"
        )));
    }
    redis.set_user(&mut session, name, &kept, index).await?;
    Ok(index)
}

/// A namespace still on index 0 (allocated before hearth stopped handing it out), where every
/// connection starts, so every other app can reach its keys. Once an admin has moved its data
/// with `SWAPDB 0 N`, the sentinel shows where, and the allocation follows.
async fn leave_zero(
    namespace: &Namespace,
    name: &str,
    allocation: &Allocation,
    databases: u8,
    session: &mut Session,
    context: &Context,
) -> Result<u8, Error> {
    let taken = |index: u8| allocation.get(&index).cloned();
    if let Some(moved) = moved_from_zero(session, name, databases, &taken).await? {
        let written = context
            .allocations
            .update(|record| {
                record.retain(|_, owner| owner.as_str() != name);
                record.insert(moved, name.to_owned());
                Ok(())
            })
            .await?;
        record_indexes(context, &written, databases);
        let note = format!(
            "this namespace's data is now in Redis index {moved} (moved with SWAPDB 0 {moved}), \
             so it has index {moved} instead of 0; restart the app so it reads the new index \
             from its Secret"
        );
        context
            .report
            .normal(namespace, Step::ProvisionRedis, "RedisIndexMoved", &note)
            .await;
        return Ok(moved);
    }
    let free = choose_index(session, name, RedisRequest::NextFree, databases, &taken).await?;
    let example = free.map_or_else(
        || "N is a free index (none is free now)".to_owned(),
        |n| format!("for example N = {n}, which is free"),
    );
    let note = format!(
        "this namespace has Redis index 0, where every connection starts before it selects \
         another, so every other app's user can read and delete its keys. Move it: as a Redis \
         admin run SWAPDB 0 N ({example}); hearth then gives this namespace index N at its next \
         check"
    );
    context
        .report
        .warning(namespace, Step::ProvisionRedis, "RedisIndexZero", &note)
        .await;
    record_indexes(context, allocation, databases);
    Ok(0)
}

/// Finds and records a new index. Reconciles in this process take turns; another process
/// racing for the same index loses the optimistic write, and then this one simply looks again.
async fn allocate(
    session: &mut Session,
    name: &str,
    request: RedisRequest,
    databases: u8,
    context: &Context,
) -> Result<u8, Error> {
    let _turn = context.allocating.lock().await;
    for _ in 0..usize::from(databases) + 1 {
        let allocation = context.allocations.load().await?;
        let taken = |index: u8| allocation.get(&index).cloned();
        let Some(index) = choose_index(session, name, request, databases, &taken).await? else {
            record_indexes(context, &allocation, databases);
            return Err(Error::RedisIndexExhausted);
        };
        let mut lost_race = false;
        let written = context
            .allocations
            .update(|allocation| {
                lost_race = allocation.get(&index).is_some_and(|owner| owner != name);
                if !lost_race {
                    allocation.insert(index, name.to_owned());
                }
                Ok(())
            })
            .await?;
        if !lost_race {
            record_indexes(context, &written, databases);
            return Ok(index);
        }
    }
    Err(Error::Conflict(
        "the Redis allocation kept changing while choosing an index; will try again".into(),
    ))
}

/// The index gauges: used and free (0 is never free: it is never handed out), and how many
/// namespaces are still on index 0.
pub fn record_indexes(context: &Context, allocation: &Allocation, databases: u8) {
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let used = count(allocation.keys().filter(|index| **index != 0).count());
    let gauges = &context.metrics.redis_indexes;
    gauges.with_label_values(&["used"]).set(used);
    gauges
        .with_label_values(&["free"])
        .set((i64::from(databases) - 1 - used).max(0));
    context
        .metrics
        .redis_index_zero
        .set(count(usize::from(allocation.contains_key(&0))));
}
