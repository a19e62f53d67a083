//! Apply: the app's role and database in the shared PostgreSQL.
//!
//! Every identifier and literal goes through the client library's escaping, on top of the name
//! validation the annotation parser already did. Work on one namespace is serialised by a
//! session advisory lock, so two instances or two reconciles never race into each other.

use std::str::FromStr;

use hearth_runtime::Sensitive;
use hearth_runtime::annotations::{ExtensionName, PgName};
use postgres_protocol::escape::{escape_identifier as ident, escape_literal as literal};
use prometheus::IntCounter;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

use crate::Error;
use crate::credentials::scram_verifier;

/// The first key of every advisory lock db-provisioner takes ("hear").
const LOCK_CLASS: i32 = 0x6865_6172;

pub struct PostgresAdmin {
    config: Config,
    /// Counts every DDL statement sent, so "nothing to change" can be checked as "no DDL".
    ddl: IntCounter,
}

/// What one `ensure` changed, for Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostgresChange {
    CreatedRole,
    CreatedDatabase,
    AdoptedRole,
    AdoptedDatabase,
    SetPassword,
    RepairedOwner,
    RevokedPublicAccess,
    CreatedExtension(String),
}

pub struct PostgresPlan<'a> {
    pub namespace: &'a str,
    pub name: &'a PgName,
    pub password: &'a Sensitive<String>,
    /// Set the password even on an existing role we own (rotation).
    pub set_password: bool,
    pub adopt: bool,
    pub extensions: &'a [ExtensionName],
}

/// The comment that marks a role or database as this namespace's.
pub fn heritage(namespace: &str) -> String {
    format!("managed by hearth-db-provisioner for namespace {namespace}")
}

/// Duplicate-object errors, including the unique violation concurrent creates can raise.
fn is_duplicate(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(code) if *code == SqlState::DUPLICATE_OBJECT
            || *code == SqlState::DUPLICATE_DATABASE
            || *code == SqlState::UNIQUE_VIOLATION
    )
}

impl PostgresAdmin {
    pub fn new(url: &Sensitive<String>, ddl: IntCounter) -> Result<Self, Error> {
        let config = Config::from_str(url.expose()).map_err(|_| {
            Error::Config("POSTGRES_ADMIN_URL is not a valid PostgreSQL URL".into())
        })?;
        Ok(Self { config, ddl })
    }

    /// The host and port the admin URL names, the default for what apps are told.
    pub fn address(&self) -> (String, u16) {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "localhost".to_owned(),
        };
        (
            host,
            self.config.get_ports().first().copied().unwrap_or(5432),
        )
    }

    async fn connect(&self, database: Option<&str>) -> Result<Client, Error> {
        let mut config = self.config.clone();
        if let Some(database) = database {
            config.dbname(database);
        }
        config.connect_timeout(std::time::Duration::from_secs(5));
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| Error::PostgresUnavailable(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Checks that the server answers, for readiness.
    pub async fn ping(&self) -> Result<(), Error> {
        let client = self.connect(None).await?;
        client.simple_query("SELECT 1").await.map_err(sql("ping"))?;
        Ok(())
    }

    /// Sends DDL statements as one simple query, which PostgreSQL runs as one implicit
    /// transaction: a role is never left half-made (created but without its comment).
    async fn ddl(
        &self,
        client: &Client,
        statements: &[&str],
        action: &'static str,
    ) -> Result<(), Error> {
        self.ddl.inc_by(statements.len() as u64);
        client
            .batch_execute(&statements.join(";\n"))
            .await
            .map_err(sql(action))
    }

    async fn lock(&self, client: &Client, namespace: &str) -> Result<(), Error> {
        client
            .execute(
                "SELECT pg_advisory_lock($1, hashtext($2))",
                &[&LOCK_CLASS, &namespace],
            )
            .await
            .map_err(sql("lock"))?;
        Ok(())
    }

    /// Creates or repairs the role and database. `Err(Error::Conflict)` when they exist and
    /// belong to someone else (and adoption was not asked for).
    pub async fn ensure(&self, plan: &PostgresPlan<'_>) -> Result<Vec<PostgresChange>, Error> {
        let client = self.connect(None).await?;
        self.lock(&client, plan.namespace).await?;
        // The lock is released when this connection closes, whatever happens below.
        let mut changes = Vec::new();
        self.ensure_role(&client, plan, &mut changes).await?;
        self.ensure_database(&client, plan, &mut changes).await?;
        if !plan.extensions.is_empty() {
            let in_database = self.connect(Some(plan.name.as_str())).await?;
            let present: Vec<String> = in_database
                .query("SELECT extname::text FROM pg_extension", &[])
                .await
                .map_err(sql("list extensions"))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            for extension in plan.extensions {
                if !present.iter().any(|p| p == extension.as_str()) {
                    let statement = format!(
                        "CREATE EXTENSION IF NOT EXISTS {}",
                        ident(extension.as_str())
                    );
                    self.ddl(&in_database, &[&statement], "create extension")
                        .await?;
                    changes.push(PostgresChange::CreatedExtension(
                        extension.as_str().to_owned(),
                    ));
                }
            }
        }
        Ok(changes)
    }

    async fn ensure_role(
        &self,
        client: &Client,
        plan: &PostgresPlan<'_>,
        changes: &mut Vec<PostgresChange>,
    ) -> Result<(), Error> {
        let role = ident(plan.name.as_str());
        let mine = heritage(plan.namespace);
        let comment = format!("COMMENT ON ROLE {role} IS {}", literal(&mine));
        // A new role gets LOGIN and nothing else, spelled out. An existing one only gets LOGIN
        // and the password: a non-superuser admin may not even restate NOSUPERUSER.
        let with_password = |verb: &str| {
            let verifier = scram_verifier(plan.password);
            let attributes = if verb == "CREATE" {
                "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
            } else {
                "LOGIN"
            };
            Sensitive::new(format!(
                "{verb} ROLE {role} WITH {attributes} PASSWORD {}",
                literal(verifier.expose())
            ))
        };
        match self.role_heritage(client, plan.name).await? {
            None => {
                let grant = self.grant_to_admin(client, &role).await?;
                let create = with_password("CREATE");
                let mut statements = vec![create.expose().as_str(), comment.as_str()];
                statements.extend(grant.as_deref());
                match self.ddl(client, &statements, "create role").await {
                    Err(Error::Postgres {
                        duplicate: true, ..
                    }) => {
                        return Err(Error::Conflict(format!(
                            "PostgreSQL role {} was created by someone else at the same moment",
                            plan.name
                        )));
                    }
                    result => result?,
                }
                changes.push(PostgresChange::CreatedRole);
            }
            Some(Some(found)) if found == mine => {
                if plan.set_password {
                    let alter = with_password("ALTER");
                    self.ddl(client, &[alter.expose()], "set password").await?;
                    changes.push(PostgresChange::SetPassword);
                }
            }
            Some(found) if plan.adopt => {
                tracing::info!(role = %plan.name, previous = ?found, "adopting role");
                let grant = self.grant_to_admin(client, &role).await?;
                let alter = with_password("ALTER");
                let mut statements = vec![alter.expose().as_str(), comment.as_str()];
                statements.extend(grant.as_deref());
                self.ddl(client, &statements, "adopt role").await?;
                changes.push(PostgresChange::AdoptedRole);
            }
            Some(found) => {
                return Err(Error::Conflict(format!(
                    "PostgreSQL role {} already exists and is not this namespace's ({}); set \
                     hearth.dev/adopt: \"true\" to take it over",
                    plan.name,
                    describe_heritage(found.as_deref())
                )));
            }
        }
        Ok(())
    }

    /// `None`: no such role; `Some(comment)`: it exists, with that comment if any.
    async fn role_heritage(
        &self,
        client: &Client,
        name: &PgName,
    ) -> Result<Option<Option<String>>, Error> {
        let row = client
            .query_opt(
                "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(sql("read role"))?;
        Ok(row.map(|row| row.get(0)))
    }

    /// A non-superuser admin (CREATEROLE) must be a member of the app role to give it a
    /// database (PostgreSQL 15 and 16 alike): the GRANT that makes it one, if needed.
    async fn grant_to_admin(&self, client: &Client, role: &str) -> Result<Option<String>, Error> {
        let superuser: bool = client
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(sql("read admin"))?
            .get(0);
        Ok((!superuser).then(|| format!("GRANT {role} TO CURRENT_USER")))
    }

    async fn ensure_database(
        &self,
        client: &Client,
        plan: &PostgresPlan<'_>,
        changes: &mut Vec<PostgresChange>,
    ) -> Result<(), Error> {
        let database = ident(plan.name.as_str());
        let role = ident(plan.name.as_str());
        let mine = heritage(plan.namespace);
        let comment = format!("COMMENT ON DATABASE {database} IS {}", literal(&mine));
        let revoke = format!("REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC");
        let row = client
            .query_opt(
                "SELECT pg_get_userbyid(datdba)::text, shobj_description(oid, 'pg_database'), \
                 has_database_privilege('public', oid, 'CONNECT') \
                 OR has_database_privilege('public', oid, 'TEMPORARY') \
                 FROM pg_database WHERE datname = $1",
                &[&plan.name.as_str()],
            )
            .await
            .map_err(sql("read database"))?;
        let Some(row) = row else {
            // CREATE DATABASE cannot share a transaction: it goes alone, the rest after it.
            let create = format!("CREATE DATABASE {database} OWNER {role}");
            match self.ddl(client, &[&create], "create database").await {
                Err(Error::Postgres {
                    duplicate: true, ..
                }) => {
                    return Err(Error::Conflict(format!(
                        "PostgreSQL database {} was created by someone else at the same moment",
                        plan.name
                    )));
                }
                result => result?,
            }
            self.ddl(client, &[&comment, &revoke], "secure database")
                .await?;
            changes.push(PostgresChange::CreatedDatabase);
            return Ok(());
        };
        let owner: String = row.get(0);
        let found: Option<String> = row.get(1);
        let public_access: bool = row.get(2);
        // No comment but owned by our role: we created it and stopped before commenting.
        let unfinished = found.is_none() && owner == plan.name.as_str();
        let ours = found.as_deref() == Some(mine.as_str()) || unfinished;
        if !ours && !plan.adopt {
            return Err(Error::Conflict(format!(
                "PostgreSQL database {} already exists and is not this namespace's ({}); set \
                 hearth.dev/adopt: \"true\" to take it over",
                plan.name,
                describe_heritage(found.as_deref())
            )));
        }
        let mut statements = Vec::new();
        let set_owner = format!("ALTER DATABASE {database} OWNER TO {role}");
        if owner != plan.name.as_str() {
            statements.push(set_owner.as_str());
            if ours {
                changes.push(PostgresChange::RepairedOwner);
            }
        }
        if found.as_deref() != Some(mine.as_str()) {
            statements.push(comment.as_str());
            if !ours {
                changes.push(PostgresChange::AdoptedDatabase);
            }
        }
        if public_access {
            statements.push(revoke.as_str());
            changes.push(PostgresChange::RevokedPublicAccess);
        }
        if !statements.is_empty() {
            self.ddl(client, &statements, "repair database").await?;
        }
        Ok(())
    }

    /// Drops the database (forcing sessions off) and the role, but only what carries this
    /// namespace's heritage comment. Returns what was dropped; what belongs to someone else is
    /// left and named.
    pub async fn drop(&self, namespace: &str, name: &PgName) -> Result<DropReport, Error> {
        let client = self.connect(None).await?;
        self.lock(&client, namespace).await?;
        let mine = heritage(namespace);
        let mut report = DropReport::default();
        let database: Option<Option<String>> = client
            .query_opt(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(sql("read database"))?
            .map(|row| row.get(0));
        match database {
            Some(Some(found)) if found == mine => {
                let statement = format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    ident(name.as_str())
                );
                self.ddl(&client, &[&statement], "drop database").await?;
                report.dropped.push(format!("database {name}"));
            }
            Some(found) => report.kept.push(format!(
                "database {name} ({})",
                describe_heritage(found.as_deref())
            )),
            None => {}
        }
        match self.role_heritage(&client, name).await? {
            Some(Some(found)) if found == mine => {
                let statement = format!("DROP ROLE IF EXISTS {}", ident(name.as_str()));
                self.ddl(&client, &[&statement], "drop role").await?;
                report.dropped.push(format!("role {name}"));
            }
            Some(found) => report.kept.push(format!(
                "role {name} ({})",
                describe_heritage(found.as_deref())
            )),
            None => {}
        }
        Ok(report)
    }
}

#[derive(Debug, Default)]
pub struct DropReport {
    pub dropped: Vec<String>,
    pub kept: Vec<String>,
}

fn describe_heritage(found: Option<&str>) -> String {
    match found {
        Some(comment) => format!("its comment says {comment:?}"),
        None => "it has no hearth comment".to_owned(),
    }
}

/// Maps a failed statement to the service error, naming what was being done. The statement
/// itself is never part of the error: it may carry a password verifier.
fn sql(action: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |error| {
        if error.is_closed() || error.code().is_none() {
            Error::PostgresUnavailable(format!("{action}: {error}"))
        } else {
            Error::Postgres {
                action,
                duplicate: is_duplicate(&error),
                detail: error
                    .as_db_error()
                    .map_or_else(|| error.to_string(), |db| db.message().to_owned()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heritage_names_the_namespace() {
        assert_eq!(
            heritage("paperless"),
            "managed by hearth-db-provisioner for namespace paperless"
        );
        assert_eq!(describe_heritage(None), "it has no hearth comment");
    }

    #[test]
    fn the_admin_url_gives_the_default_app_address() {
        let admin = PostgresAdmin::new(
            &Sensitive::new("postgres://admin:pw@pg.db.svc:5433/postgres".to_owned()),
            IntCounter::new("t", "t").unwrap(),
        )
        .unwrap();
        assert_eq!(admin.address(), ("pg.db.svc".to_owned(), 5433));
        let bad = PostgresAdmin::new(
            &Sensitive::new("nonsense://".to_owned()),
            IntCounter::new("t", "t").unwrap(),
        );
        let error = bad.err().unwrap().to_string();
        assert!(!error.contains("nonsense"), "{error}");
    }
}
