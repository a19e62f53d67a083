//! Apply: the app's role and database in the shared PostgreSQL.
//!
//! Every identifier and literal goes through the client library's escaping, on top of the name
//! validation the annotation parser already did. Work on one namespace is serialised by a
//! session advisory lock, so two instances or two reconciles never race into each other.
//!
//! The admin need not be a superuser. On PostgreSQL 16 and later it holds each app role with
//! `SET` but without `INHERIT`, so it can act as the role when it must (give it a database,
//! comment on that database, create a trusted extension) but cannot read the app's tables; and
//! it needs the `ADMIN` option on a role to change it.

mod drop;
mod provision;

use std::str::FromStr;
use std::time::Duration;

use hearth_runtime::Sensitive;
use hearth_runtime::annotations::{ExtensionName, PgName};
use postgres_protocol::escape::escape_identifier as ident;
use prometheus::IntCounter;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

use crate::Error;

pub use drop::DropReport;
pub use provision::PostgresChange;

/// The first key of every advisory lock db-provisioner takes ("hear").
const LOCK_CLASS: i32 = 0x6865_6172;
/// PostgreSQL 16 changed what CREATEROLE allows and added the SET and INHERIT grant options.
const VERSION_16: i32 = 160_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HERITAGE_PREFIX: &str = "managed by hearth-db-provisioner for namespace ";

pub struct PostgresAdmin {
    config: Config,
    /// Counts every DDL statement sent, so "nothing to change" can be checked as "no DDL".
    ddl: IntCounter,
}

pub struct PostgresPlan<'a> {
    pub namespace: &'a str,
    pub name: &'a PgName,
    /// The password the role must accept: the kept one, or a rotation's staged one.
    pub password: &'a Sensitive<String>,
    /// Set the password even on an existing role we own (a rotation is under way).
    pub set_password: bool,
    pub adopt: bool,
    pub extensions: &'a [ExtensionName],
}

/// The comment that marks a role or database as this namespace's.
pub fn heritage(namespace: &str) -> String {
    format!("{HERITAGE_PREFIX}{namespace}")
}

/// Who owns an object, by its comment.
#[derive(Debug, PartialEq, Eq)]
enum Heritage {
    /// This namespace's.
    Ours,
    /// Another hearth namespace's: never touched.
    Namespace(String),
    /// No hearth comment: only adoption takes it.
    Foreign(Option<String>),
}

impl Heritage {
    fn read(comment: Option<&str>, namespace: &str) -> Self {
        match comment.and_then(|c| c.strip_prefix(HERITAGE_PREFIX)) {
            Some(owner) if owner == namespace => Self::Ours,
            Some(owner) => Self::Namespace(owner.to_owned()),
            None => Self::Foreign(comment.map(str::to_owned)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Ours => "it is this namespace's".to_owned(),
            Self::Namespace(owner) => format!("it belongs to namespace {owner}"),
            Self::Foreign(Some(comment)) => format!("its comment says {comment:?}"),
            Self::Foreign(None) => "it has no hearth comment".to_owned(),
        }
    }
}

/// What the admin role is on this server.
struct AdminRole {
    name: String,
    superuser: bool,
    version: i32,
}

impl AdminRole {
    /// PostgreSQL 16 lets a CREATEROLE admin change only roles it holds with ADMIN.
    fn needs_admin_option(&self) -> bool {
        !self.superuser && self.version >= VERSION_16
    }

    /// How the admin is made a member of an app role: able to act as it, not inheriting its
    /// privileges, where the server has those options.
    fn membership_grant(&self, role: &str) -> String {
        if self.version >= VERSION_16 {
            format!("GRANT {role} TO CURRENT_USER WITH INHERIT FALSE, SET TRUE")
        } else {
            format!("GRANT {role} TO CURRENT_USER")
        }
    }

    fn admin_option_missing(&self, role: &PgName) -> Error {
        Error::AdminOptionMissing {
            role: role.as_str().to_owned(),
            admin: self.name.clone(),
        }
    }
}

/// One admin connection holding a namespace's advisory lock (released when it closes).
struct Session {
    client: Client,
    admin: AdminRole,
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

    /// A connection as `config` says, its driver task running in the background.
    async fn open(config: &Config) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "postgres connection ended");
            }
        });
        Ok(client)
    }

    async fn connect(&self, database: Option<&str>) -> Result<Client, Error> {
        let mut config = self.config.clone();
        if let Some(database) = database {
            config.dbname(database);
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("hearth-db-provisioner");
        Self::open(&config).await.map_err(sql("connect"))
    }

    /// Whether `role` can log in to `database` with `password`: `Some(false)` when PostgreSQL
    /// says the password is wrong, `None` when it could not be told (pg_hba.conf, load, …).
    async fn accepts(&self, role: &PgName, password: &Sensitive<String>) -> Option<bool> {
        let mut config = self.config.clone();
        config
            .user(role.as_str())
            .password(password.expose().as_bytes())
            .dbname(role.as_str())
            .connect_timeout(CONNECT_TIMEOUT)
            .application_name("hearth-db-provisioner");
        match Self::open(&config).await {
            Ok(_) => Some(true),
            Err(error) if error.code() == Some(&SqlState::INVALID_PASSWORD) => Some(false),
            Err(error) => {
                tracing::warn!(role = %role, error = %describe(&error), "could not check the role's password by logging in");
                None
            }
        }
    }

    /// Checks that the server answers, for readiness, and says once what it leaves open.
    pub async fn ping(&self) -> Result<(), Error> {
        let client = self.connect(None).await?;
        let open: Vec<String> = client
            .query(
                "SELECT datname::text FROM pg_database WHERE datname IN ('postgres', 'template1') \
                 AND (has_database_privilege('public', oid, 'CONNECT') \
                 OR has_database_privilege('public', oid, 'TEMPORARY')) ORDER BY 1",
                &[],
            )
            .await
            .map_err(sql("ping"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !open.is_empty() {
            tracing::warn!(
                databases = %open.join(", "),
                "every role, app roles included, may connect to and make temporary tables in \
                 these databases: PUBLIC holds CONNECT and TEMPORARY there, which only their owner \
                 can revoke (REVOKE CONNECT, TEMPORARY ON DATABASE <name> FROM PUBLIC, then GRANT \
                 CONNECT to the roles that need it); hearth leaves databases it did not make alone"
            );
        }
        Ok(())
    }

    /// Whether database `name` exists and carries this namespace's heritage comment.
    pub async fn database_is_ours(&self, namespace: &str, name: &PgName) -> Result<bool, Error> {
        let client = self.connect(None).await?;
        let comment: Option<Option<String>> = client
            .query_opt(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(sql("read database"))?
            .map(|row| row.get(0));
        Ok(comment.is_some_and(|c| Heritage::read(c.as_deref(), namespace) == Heritage::Ours))
    }

    /// Connects as the admin, takes the namespace's lock and reads what the admin may do.
    async fn session(&self, namespace: &str) -> Result<Session, Error> {
        let client = self.connect(None).await?;
        client
            .execute(
                "SELECT pg_advisory_lock($1, hashtext($2))",
                &[&LOCK_CLASS, &namespace],
            )
            .await
            .map_err(sql("lock"))?;
        let row = client
            .query_one(
                "SELECT current_user::text, rolsuper, current_setting('server_version_num')::int \
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(sql("read admin"))?;
        Ok(Session {
            client,
            admin: AdminRole {
                name: row.get(0),
                superuser: row.get(1),
                version: row.get(2),
            },
        })
    }

    /// Sends statements as one simple query, which PostgreSQL runs as one implicit
    /// transaction: a role is never left half-made (created but without its comment), and a
    /// `SET ROLE` in it is undone if a later statement fails.
    async fn ddl<S: AsRef<str>>(
        &self,
        client: &Client,
        statements: &[S],
        action: &'static str,
    ) -> Result<(), Error> {
        let statements: Vec<&str> = statements.iter().map(AsRef::as_ref).collect();
        let role_switches = statements
            .iter()
            .filter(|s| s.starts_with("SET ROLE") || s.starts_with("RESET ROLE"))
            .count();
        self.ddl.inc_by((statements.len() - role_switches) as u64);
        client
            .batch_execute(&statements.join(";\n"))
            .await
            .map_err(sql(action))
    }

    /// Runs `statement` alone (outside any transaction, as CREATE and DROP DATABASE need),
    /// as `role` when given.
    async fn ddl_alone(
        &self,
        client: &Client,
        statement: &str,
        as_role: Option<&str>,
        action: &'static str,
    ) -> Result<(), Error> {
        if let Some(role) = as_role {
            client
                .batch_execute(&format!("SET ROLE {}", ident(role)))
                .await
                .map_err(sql(action))?;
        }
        self.ddl.inc();
        let result = client.batch_execute(statement).await.map_err(sql(action));
        if as_role.is_some() {
            client
                .batch_execute("RESET ROLE")
                .await
                .map_err(sql(action))?;
        }
        result
    }
}

/// Statements that run as `role` (an escaped identifier), for one implicit transaction.
fn as_role(role: &str, statements: &[&str]) -> Vec<String> {
    let mut wrapped = vec![format!("SET ROLE {role}")];
    wrapped.extend(statements.iter().map(|s| (*s).to_owned()));
    wrapped.push("RESET ROLE".to_owned());
    wrapped
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

/// What PostgreSQL said, whole: message, SQLSTATE, DETAIL and HINT for a server error, the
/// chain of causes for a connection error. Never the statement, which may carry a verifier.
pub fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str("; DETAIL: ");
            text.push_str(detail);
        }
        if let Some(hint) = db.hint() {
            text.push_str("; HINT: ");
            text.push_str(hint);
        }
        return text;
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Maps a failed statement to the service error, naming what was being done.
fn sql(action: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |error| {
        if error.as_db_error().is_none() {
            Error::PostgresUnavailable(format!("{action}: {}", describe(&error)))
        } else {
            Error::Postgres {
                action,
                duplicate: is_duplicate(&error),
                detail: describe(&error),
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
        assert_eq!(Heritage::read(Some(&heritage("a")), "a"), Heritage::Ours);
        assert_eq!(
            Heritage::read(Some(&heritage("b")), "a"),
            Heritage::Namespace("b".into())
        );
        assert_eq!(
            Heritage::read(Some("legacy db"), "a"),
            Heritage::Foreign(Some("legacy db".into()))
        );
        assert_eq!(
            Heritage::Foreign(None).describe(),
            "it has no hearth comment"
        );
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

    #[test]
    fn the_admin_keeps_its_hands_off_app_data_on_16() {
        let admin = |version| AdminRole {
            name: "hearth".into(),
            superuser: false,
            version,
        };
        assert_eq!(
            admin(160_002).membership_grant("\"app\""),
            "GRANT \"app\" TO CURRENT_USER WITH INHERIT FALSE, SET TRUE"
        );
        assert_eq!(
            admin(150_010).membership_grant("\"app\""),
            "GRANT \"app\" TO CURRENT_USER"
        );
        assert!(admin(160_002).needs_admin_option());
        assert!(!admin(150_010).needs_admin_option());
    }
}
