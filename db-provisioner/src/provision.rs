//! Apply, for a namespace that opted in: its kept passwords, its PostgreSQL role and database,
//! its Redis index and user, and Secret `hearth-db`.
//!
//! A password is stored before any server sees it, and the Secret only ever carries passwords
//! the servers have taken: whatever fails or is killed at any point, the Secret's passwords
//! work, or the next pass makes them work.

use std::collections::BTreeMap;

use hearth_runtime::annotations::{self, DeletionPolicy, PgName, parse_postgres};
use hearth_runtime::events::EventType;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::Error;
use crate::allocation;
use crate::controller::Context;
use crate::credentials::generate_password;
use crate::desired::{Desired, Reading};
use crate::finalize::set_finalizer;
use crate::postgres::PostgresPlan;
use crate::report::Step;
use crate::secret::{self, MANAGED_BY, MANAGED_BY_LABEL, PostgresAccess, RedisAccess, SECRET_NAME};
use crate::store::{Credentials, FIELD_MANAGER};

pub async fn provision(
    namespace: &Namespace,
    reading: &Reading,
    context: &Context,
    step: &mut Step,
) -> Result<(), Error> {
    let desired = &reading.desired;
    let name = namespace.name_any();
    if !reading.refused_extensions.is_empty() {
        let allowed = &context.settings.allowed_extensions;
        let note = format!(
            "extensions not on the operator's allow-list were skipped: {} (allowed: {})",
            reading.refused_extensions.join(", "),
            if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed.join(", ")
            }
        );
        context
            .report
            .warning(
                namespace,
                Step::ReadAnnotations,
                "ExtensionNotAllowed",
                &note,
            )
            .await;
    }
    *step = Step::WriteAnnotations;
    set_finalizer(
        namespace,
        context,
        desired.deletion_policy == DeletionPolicy::Drop,
    )
    .await?;

    *step = Step::WriteSecret;
    let mut secret = SecretWriter::read(&name, context).await?;

    *step = Step::KeepCredentials;
    let mut credentials = keep_credentials(desired, context).await?;
    let rotating = credentials.rotating();

    if let Some(database) = &desired.postgres {
        *step = Step::ProvisionPostgres;
        refuse_rename(
            namespace,
            credentials.database.as_deref(),
            database,
            context,
        )
        .await?;
        // Stored before the database is made, so a rename asked for at any moment after is
        // checked against it (the namespace's annotation is written only at the end).
        if credentials.database.as_deref() != Some(database.as_str()) {
            credentials.database = Some(database.as_str().to_owned());
            context.credentials.save(&name, &credentials).await?;
        }
        let staged = credentials.next_postgres_password.clone();
        let password = staged
            .as_ref()
            .or(credentials.postgres_password.as_ref())
            .ok_or_else(|| Error::Invalid("no PostgreSQL password is kept".into()))?;
        let plan = PostgresPlan {
            namespace: &name,
            name: database,
            password,
            set_password: staged.is_some(),
            adopt: desired.adopt,
            extensions: &desired.extensions,
        };
        let changes = context.postgres()?.ensure(&plan).await?;
        for change in &changes {
            let type_ = if change.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            context
                .report
                .publish(
                    namespace,
                    type_,
                    change.action(),
                    change.reason(),
                    &change.describe(database),
                )
                .await;
        }
        if staged.is_some() {
            credentials.promote_postgres();
            context.credentials.save(&name, &credentials).await?;
            // The app's Secret takes the new password now, whatever happens to Redis next.
            *step = Step::WriteSecret;
            let index = allocation::recorded_index(&name, context).await?;
            secret
                .write(namespace, desired, &credentials, index, context)
                .await?;
        }
    }
    let redis_index = match desired.redis {
        Some(request) => {
            *step = Step::ProvisionRedis;
            let index =
                allocation::ensure_redis(namespace, desired, request, &credentials, context)
                    .await?;
            if credentials.next_redis_password.is_some() {
                credentials.promote_redis();
                context.credentials.save(&name, &credentials).await?;
            }
            Some(index)
        }
        None => None,
    };
    *step = Step::WriteSecret;
    secret
        .write(namespace, desired, &credentials, redis_index, context)
        .await?;
    if rotating && !credentials.rotating() {
        let note = format!(
            "rotated the passwords (hearth.dev/rotate: {:?}); Secret {SECRET_NAME} has the new \
             ones, so restart the app's pods to use them",
            credentials.rotation.as_deref().unwrap_or_default()
        );
        context
            .report
            .normal(namespace, Step::Rotate, "Rotated", &note)
            .await;
    }
    *step = Step::WriteAnnotations;
    write_back(namespace, desired.postgres.as_ref(), redis_index, context).await
}

/// Loads the namespace's kept passwords. Missing ones are made, and a new `hearth.dev/rotate`
/// value stages new ones; either way they are saved before any server sees them, so a crash can
/// never leave a role with a password nobody knows.
async fn keep_credentials(desired: &Desired, context: &Context) -> Result<Credentials, Error> {
    let name = &desired.namespace;
    let loaded = context.credentials.load(name).await?;
    let mut changed = loaded.is_none();
    let mut credentials = loaded.unwrap_or_else(|| Credentials {
        // The value present at opt-in is the starting point, not a request to rotate.
        rotation: desired.rotate.clone(),
        ..Credentials::default()
    });
    let postgres = desired.postgres.is_some();
    let redis = desired.redis.is_some();
    let fresh = |wanted: bool| wanted.then(generate_password).transpose();
    if credentials.postgres_password.is_none() {
        credentials.postgres_password = fresh(postgres)?;
        changed |= postgres;
    }
    if credentials.redis_password.is_none() {
        credentials.redis_password = fresh(redis)?;
        changed |= redis;
    }
    let asked = desired.rotate.as_ref();
    if asked.is_some()
        && asked != credentials.rotation.as_ref()
        && asked != credentials.next_rotation.as_ref()
    {
        credentials.next_rotation = desired.rotate.clone();
        credentials.next_postgres_password = fresh(postgres)?;
        credentials.next_redis_password = fresh(redis)?;
        changed = true;
    }
    // A server no longer wanted has nothing to take a staged password; it just becomes the kept
    // one, which a later opt-in sets (PostgreSQL's login check puts it right).
    if !postgres && credentials.next_postgres_password.is_some() {
        credentials.promote_postgres();
        changed = true;
    }
    if !redis && credentials.next_redis_password.is_some() {
        credentials.promote_redis();
        changed = true;
    }
    if !credentials.rotating() && credentials.next_rotation.is_some() {
        credentials.finish_rotation();
        changed = true;
    }
    if changed {
        context.credentials.save(name, &credentials).await?;
    }
    Ok(credentials)
}

/// A changed `hearth.dev/postgres` would point the app at a new, empty database while its data
/// stays in the old one: refused while the old one (this namespace's) exists. The old one is
/// the stored record, or for namespaces provisioned before there was one, the annotation.
async fn refuse_rename(
    namespace: &Namespace,
    stored: Option<&str>,
    database: &PgName,
    context: &Context,
) -> Result<(), Error> {
    let name = namespace.name_any();
    let recorded = stored.or_else(|| {
        namespace
            .annotations()
            .get(annotations::POSTGRES_DATABASE)
            .map(String::as_str)
    });
    let Some(previous) = recorded
        .and_then(|value| parse_postgres(value, &name).ok().flatten())
        .filter(|previous| previous != database)
    else {
        return Ok(());
    };
    if !context
        .postgres()?
        .database_is_ours(&name, &previous)
        .await?
    {
        return Ok(());
    }
    Err(Error::RenameRefused(format!(
        "hearth.dev/postgres now names database {database}, but this namespace's database \
         {previous} still holds its data; hearth will not point the app at a new, empty \
         database. To rename it, as a superuser run: ALTER DATABASE \"{previous}\" RENAME TO \
         \"{database}\"; ALTER ROLE \"{previous}\" RENAME TO \"{database}\" (its SCRAM password \
         survives). To start afresh instead, drop database {previous}, or set hearth.dev/postgres \
         back to \"{previous}\""
    )))
}

/// Secret `hearth-db`, written only when its content changes.
struct SecretWriter {
    current: Option<BTreeMap<String, ByteString>>,
    existed: bool,
}

impl SecretWriter {
    /// Reads the Secret; one that hearth did not make is never overwritten.
    async fn read(namespace: &str, context: &Context) -> Result<Self, Error> {
        let secrets: Api<Secret> = Api::namespaced(context.client.clone(), namespace);
        let existing = secrets
            .get_opt(SECRET_NAME)
            .await
            .map_err(|source| Error::Kube {
                action: "read Secret",
                source,
            })?;
        if let Some(existing) = &existing
            && existing.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY)
        {
            return Err(Error::Conflict(format!(
                "Secret {SECRET_NAME} in namespace {namespace} exists and was not made by hearth; \
                 hearth never overwrites it. Rename or delete it to let hearth write its own"
            )));
        }
        Ok(Self {
            existed: existing.is_some(),
            current: existing.and_then(|s| s.data),
        })
    }

    async fn write(
        &mut self,
        namespace: &Namespace,
        desired: &Desired,
        credentials: &Credentials,
        redis_index: Option<u8>,
        context: &Context,
    ) -> Result<(), Error> {
        let name = namespace.name_any();
        let settings = &context.settings;
        let postgres = match (&desired.postgres, &credentials.postgres_password) {
            (Some(database), Some(password)) => Some(PostgresAccess {
                host: &settings.postgres_host,
                port: settings.postgres_port,
                database: database.as_str(),
                username: database.as_str(),
                password,
                sslmode: &settings.postgres_sslmode,
            }),
            _ => None,
        };
        let redis = match (redis_index, &credentials.redis_password) {
            (Some(index), Some(password)) => Some(RedisAccess {
                host: &settings.redis_host,
                port: settings.redis_port,
                index,
                username: desired.redis_user(),
                password,
            }),
            _ => None,
        };
        let data: BTreeMap<String, ByteString> =
            secret::render(desired.profile, postgres.as_ref(), redis.as_ref())
                .into_iter()
                .map(|(key, value)| (key, ByteString(value.into_bytes())))
                .collect();
        if self.current.as_ref() == Some(&data) {
            return Ok(());
        }
        let owner = namespace.controller_owner_ref(&()).map(|mut owner| {
            owner.controller = Some(false);
            owner.block_owner_deletion = Some(false);
            owner
        });
        let body = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": SECRET_NAME,
                "namespace": name,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
            },
            "type": "Opaque",
            "data": data,
        });
        let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &name);
        secrets
            .patch(
                SECRET_NAME,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|source| Error::Kube {
                action: "write Secret",
                source,
            })?;
        let verb = if self.existed { "updated" } else { "wrote" };
        self.current = Some(data);
        self.existed = true;
        let note = format!(
            "{verb} Secret {SECRET_NAME} ({} profile)",
            desired.profile.as_str()
        );
        context
            .report
            .normal(namespace, Step::WriteSecret, "SecretWritten", &note)
            .await;
        Ok(())
    }
}

/// Writes `hearth.dev/postgres-database` and `hearth.dev/redis-db` for people to read, and
/// removes them when they no longer apply. A merge patch, not server-side apply: an apply would
/// re-create a namespace deleted while this reconcile ran, and a patch of a missing one fails.
pub async fn write_back(
    namespace: &Namespace,
    database: Option<&PgName>,
    redis_index: Option<u8>,
    context: &Context,
) -> Result<(), Error> {
    let wanted = [
        (
            annotations::POSTGRES_DATABASE,
            database.map(|d| d.as_str().to_owned()),
        ),
        (annotations::REDIS_DB, redis_index.map(|i| i.to_string())),
    ];
    let current = namespace.annotations();
    let changes: serde_json::Map<String, serde_json::Value> = wanted
        .into_iter()
        .filter(|(key, value)| current.get(*key) != value.as_ref())
        .map(|(key, value)| (key.to_owned(), json!(value)))
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": changes}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let namespaces: Api<Namespace> = Api::all(context.client.clone());
    match namespaces
        .patch(&namespace.name_any(), &params, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing is left to annotate.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: "write annotations",
            source,
        }),
    }
}
