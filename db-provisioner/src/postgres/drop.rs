//! Dropping a namespace's database and role (deletion policy `drop`): everything that would
//! stop the drop is checked before anything is dropped, so a drop never stops half-way.

use hearth_runtime::annotations::PgName;
use postgres_protocol::escape::escape_identifier as ident;

use super::{Heritage, PostgresAdmin, Session, VERSION_16, sql};
use crate::Error;

#[derive(Debug, Default)]
pub struct DropReport {
    pub dropped: Vec<String>,
    pub kept: Vec<String>,
}

struct DatabaseToDrop {
    oid: u32,
    owner: String,
    owner_usable: bool,
}

struct RoleToDrop {
    oid: u32,
    admin_option: bool,
    settable: bool,
}

impl PostgresAdmin {
    /// Drops the database (forcing sessions off) and the role, but only what carries this
    /// namespace's heritage comment, and only once nothing can stop either: otherwise
    /// `Error::DropBlocked` says what stands in the way and what to run, and nothing is dropped.
    pub async fn drop(&self, namespace: &str, name: &PgName) -> Result<DropReport, Error> {
        let session = self.session(namespace).await?;
        let mut report = DropReport::default();
        let database = self
            .database_to_drop(&session, namespace, name, &mut report)
            .await?;
        let role = self
            .role_to_drop(&session, namespace, name, &mut report)
            .await?;
        let blockers = self
            .blockers(&session, name, database.as_ref(), role.as_ref())
            .await?;
        if !blockers.is_empty() {
            return Err(Error::DropBlocked(format!(
                "nothing was dropped: {}. Once that is done hearth drops the rest; to keep the \
                 data instead, set hearth.dev/deletion-policy: retain",
                blockers.join("; ")
            )));
        }
        if let Some(database) = database {
            let statement = format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                ident(name.as_str())
            );
            let as_owner =
                acts_as_owner(&session, name, &database, role.as_ref()).then_some(name.as_str());
            self.ddl_alone(&session.client, &statement, as_owner, "drop database")
                .await?;
            report.dropped.push(format!("database {name}"));
        }
        if role.is_some() {
            let statement = format!("DROP ROLE IF EXISTS {}", ident(name.as_str()));
            self.ddl(&session.client, &[statement.as_str()], "drop role")
                .await?;
            report.dropped.push(format!("role {name}"));
        }
        Ok(report)
    }

    async fn database_to_drop(
        &self,
        session: &Session,
        namespace: &str,
        name: &PgName,
        report: &mut DropReport,
    ) -> Result<Option<DatabaseToDrop>, Error> {
        let row = session
            .client
            .query_opt(
                "SELECT oid, shobj_description(oid, 'pg_database'), \
                 pg_get_userbyid(datdba)::text, pg_has_role(current_user, datdba, 'USAGE') \
                 FROM pg_database WHERE datname = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(sql("read database"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let comment: Option<String> = row.get(1);
        match Heritage::read(comment.as_deref(), namespace) {
            Heritage::Ours => Ok(Some(DatabaseToDrop {
                oid: row.get(0),
                owner: row.get(2),
                owner_usable: row.get(3),
            })),
            other => {
                report
                    .kept
                    .push(format!("database {name} ({})", other.describe()));
                Ok(None)
            }
        }
    }

    async fn role_to_drop(
        &self,
        session: &Session,
        namespace: &str,
        name: &PgName,
        report: &mut DropReport,
    ) -> Result<Option<RoleToDrop>, Error> {
        let settable = if session.admin.version >= VERSION_16 {
            "pg_has_role(current_user, oid, 'SET')"
        } else {
            "pg_has_role(current_user, oid, 'MEMBER')"
        };
        let query = format!(
            "SELECT oid, shobj_description(oid, 'pg_authid'), \
             pg_has_role(current_user, oid, 'MEMBER WITH ADMIN OPTION'), {settable} \
             FROM pg_roles WHERE rolname = $1"
        );
        let row = session
            .client
            .query_opt(&query, &[&name.as_str()])
            .await
            .map_err(sql("read role"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let comment: Option<String> = row.get(1);
        match Heritage::read(comment.as_deref(), namespace) {
            Heritage::Ours => Ok(Some(RoleToDrop {
                oid: row.get(0),
                admin_option: row.get(2),
                settable: row.get(3),
            })),
            other => {
                report
                    .kept
                    .push(format!("role {name} ({})", other.describe()));
                Ok(None)
            }
        }
    }

    /// Everything that would make the drop fail, each with what to run about it.
    async fn blockers(
        &self,
        session: &Session,
        name: &PgName,
        database: Option<&DatabaseToDrop>,
        role: Option<&RoleToDrop>,
    ) -> Result<Vec<String>, Error> {
        let admin = &session.admin;
        let quoted = ident(name.as_str());
        let admin_name = ident(&admin.name);
        let mut blockers = Vec::new();
        if let Some(database) = database {
            let as_owner = acts_as_owner(session, name, database, role);
            if !admin.superuser && !as_owner && !database.owner_usable {
                blockers.push(format!(
                    "database {name} is owned by role {}, which hearth's admin cannot act for; as \
                     a superuser run: DROP DATABASE {quoted} WITH (FORCE)",
                    database.owner
                ));
            }
        }
        let Some(role) = role else {
            return Ok(blockers);
        };
        if admin.needs_admin_option() && !role.admin_option {
            blockers.push(format!(
                "hearth's admin {} lacks the ADMIN option on role {name}, which PostgreSQL 16 and \
                 later need to drop it; as a superuser run: GRANT {quoted} TO {admin_name} WITH \
                 ADMIN TRUE, INHERIT FALSE, SET TRUE",
                admin.name
            ));
        }
        // What the role owns or holds anywhere but in the database that goes with it.
        let dropped_database = database.map_or(0, |d| d.oid);
        let rows = session
            .client
            .query(
                "SELECT DISTINCT coalesce(d.datname::text, ''), \
                 CASE WHEN s.classid = 'pg_database'::regclass \
                      THEN (SELECT datname::text FROM pg_database WHERE oid = s.objid) END \
                 FROM pg_shdepend s LEFT JOIN pg_database d ON d.oid = s.dbid \
                 WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = $1 \
                 AND s.dbid <> $2 \
                 AND NOT (s.classid = 'pg_database'::regclass AND s.objid = $2) \
                 ORDER BY 1, 2",
                &[&role.oid, &dropped_database],
            )
            .await
            .map_err(sql("read what the role owns"))?;
        for row in rows {
            let in_database: String = row.get(0);
            let owned_database: Option<String> = row.get(1);
            blockers.push(match (in_database.as_str(), owned_database) {
                ("", Some(owned)) => format!(
                    "role {name} owns database {owned}, which is not this namespace's; as a \
                     superuser run: ALTER DATABASE {} OWNER TO postgres",
                    ident(&owned)
                ),
                ("", None) => format!(
                    "role {name} owns or holds privileges on a tablespace or another shared \
                     object; see pg_shdepend, and move or revoke them"
                ),
                (other, _) => format!(
                    "role {name} owns objects or holds privileges in database {other}; as a \
                     superuser, connected to {other}, run: REASSIGN OWNED BY {quoted} TO postgres; \
                     DROP OWNED BY {quoted}"
                ),
            });
        }
        Ok(blockers)
    }
}

/// Only a database's owner may drop it. A non-superuser admin that does not inherit the app
/// role's privileges (PostgreSQL 16 and later) becomes the owner with `SET ROLE`.
fn acts_as_owner(
    session: &Session,
    name: &PgName,
    database: &DatabaseToDrop,
    role: Option<&RoleToDrop>,
) -> bool {
    !session.admin.superuser && database.owner == name.as_str() && role.is_some_and(|r| r.settable)
}
