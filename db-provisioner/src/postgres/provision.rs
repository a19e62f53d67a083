//! Creating and repairing an app's role, database and extensions.

use hearth_runtime::Sensitive;
use hearth_runtime::annotations::PgName;
use postgres_protocol::escape::{escape_identifier as ident, escape_literal as literal};
use tokio_postgres::Client;

use super::{Heritage, PostgresAdmin, PostgresPlan, Session, VERSION_16, as_role, heritage, sql};
use crate::Error;
use crate::credentials::scram_verifier;

/// What one `ensure` changed or had to leave undone, for Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostgresChange {
    RoleCreated,
    DatabaseCreated,
    RoleAdopted,
    DatabaseAdopted,
    /// A rotation's new password was set.
    PasswordRotated,
    /// The role no longer accepted the kept password (changed by hand, or the kept one was
    /// lost and made anew), so the kept one was set again.
    PasswordReset,
    LoginRestored,
    OwnerRepaired,
    PublicAccessRevoked,
    /// The admin's membership no longer inherits the role's privileges.
    AdminInheritanceRemoved,
    /// The admin still inherits the role's privileges through a grant it cannot change.
    AdminStillInherits {
        admin: String,
    },
    ExtensionCreated(String),
    ExtensionSkipped {
        name: String,
        why: String,
    },
}

impl PostgresChange {
    /// Whether this is something the operator must look at.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Self::AdminStillInherits { .. } | Self::ExtensionSkipped { .. }
        )
    }

    /// The Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::RoleCreated => "RoleCreated",
            Self::DatabaseCreated => "DatabaseCreated",
            Self::RoleAdopted => "RoleAdopted",
            Self::DatabaseAdopted => "DatabaseAdopted",
            Self::PasswordRotated => "PasswordRotated",
            Self::PasswordReset => "PasswordReset",
            Self::LoginRestored => "LoginRestored",
            Self::OwnerRepaired => "OwnerRepaired",
            Self::PublicAccessRevoked => "PublicAccessRevoked",
            Self::AdminInheritanceRemoved => "AdminInheritanceRemoved",
            Self::AdminStillInherits { .. } => "AdminInheritsAppRole",
            Self::ExtensionCreated(_) => "ExtensionCreated",
            Self::ExtensionSkipped { .. } => "ExtensionSkipped",
        }
    }

    /// The Event action: the step that made the change.
    pub fn action(&self) -> &'static str {
        match self {
            Self::RoleCreated
            | Self::RoleAdopted
            | Self::LoginRestored
            | Self::AdminInheritanceRemoved
            | Self::AdminStillInherits { .. } => "EnsureRole",
            Self::DatabaseCreated
            | Self::DatabaseAdopted
            | Self::OwnerRepaired
            | Self::PublicAccessRevoked => "EnsureDatabase",
            Self::PasswordRotated | Self::PasswordReset => "SetPassword",
            Self::ExtensionCreated(_) | Self::ExtensionSkipped { .. } => "EnsureExtension",
        }
    }

    pub fn describe(&self, name: &PgName) -> String {
        match self {
            Self::RoleCreated => format!("created PostgreSQL role {name}"),
            Self::DatabaseCreated => {
                format!(
                    "created PostgreSQL database {name}, owned by role {name}, closed to PUBLIC"
                )
            }
            Self::RoleAdopted => format!(
                "adopted the existing PostgreSQL role {name}: marked as this namespace's, with a \
                 new password"
            ),
            Self::DatabaseAdopted => format!(
                "adopted the existing PostgreSQL database {name}: marked as this namespace's, \
                 owned by role {name}"
            ),
            Self::PasswordRotated => format!("set the rotated password on PostgreSQL role {name}"),
            Self::PasswordReset => format!(
                "PostgreSQL role {name} no longer accepted the password hearth keeps (changed \
                 outside hearth, or the kept one was lost and made anew); set it again"
            ),
            Self::LoginRestored => format!("PostgreSQL role {name} may log in again"),
            Self::OwnerRepaired => format!("made role {name} the owner of database {name} again"),
            Self::PublicAccessRevoked => {
                format!("revoked CONNECT and TEMPORARY on database {name} from PUBLIC again")
            }
            Self::AdminInheritanceRemoved => format!(
                "hearth's admin no longer inherits the privileges of role {name} (it keeps SET, \
                 to act as the role when it must)"
            ),
            Self::AdminStillInherits { admin } => format!(
                "hearth's admin {admin} still inherits the privileges of role {name}, so it can \
                 read the app's tables, through a grant hearth did not make (a superuser's, or \
                 createrole_self_grant with inherit). As a superuser run: GRANT \"{name}\" TO \
                 \"{admin}\" WITH INHERIT FALSE; and if it is set: ALTER ROLE \"{admin}\" RESET \
                 createrole_self_grant"
            ),
            Self::ExtensionCreated(extension) => {
                format!("created extension {extension} in database {name}")
            }
            Self::ExtensionSkipped {
                name: extension,
                why,
            } => {
                format!("extension {extension} was not created in database {name}: {why}")
            }
        }
    }
}

/// What the server says of the app role, from the admin's point of view.
struct RoleFacts {
    comment: Option<String>,
    can_login: bool,
    /// The admin may change it (superuser, or holds it WITH ADMIN OPTION).
    admin_option: bool,
    /// The admin inherits its privileges.
    inherited: bool,
    /// The admin may `SET ROLE` to it.
    settable: bool,
    /// The admin's own grant of it inherits (made before PostgreSQL 16's options were used).
    own_grant_inherits: bool,
}

struct DatabaseFacts {
    owner: String,
    comment: Option<String>,
    public_access: bool,
    /// The admin holds the owner's privileges, so it may give the database away.
    owner_usable: bool,
    /// The admin may connect (to create extensions).
    admin_connects: bool,
}

impl PostgresAdmin {
    /// Creates or repairs the role and database, makes sure the role accepts `plan.password`,
    /// and creates the extensions the operator allows. `Err(Error::Conflict)` when they exist
    /// and belong to someone else.
    pub async fn ensure(&self, plan: &PostgresPlan<'_>) -> Result<Vec<PostgresChange>, Error> {
        let session = self.session(plan.namespace).await?;
        // The lock is released when this connection closes, whatever happens below.
        let mut changes = Vec::new();
        let password_sent = self.ensure_role(&session, plan, &mut changes).await?;
        let role_adopted = changes.contains(&PostgresChange::RoleAdopted);
        self.ensure_database(&session, plan, role_adopted, &mut changes)
            .await?;
        if !password_sent && self.accepts(plan.name, plan.password).await == Some(false) {
            self.set_password(&session, plan.name, plan.password)
                .await?;
            changes.push(PostgresChange::PasswordReset);
        }
        if !plan.extensions.is_empty() {
            self.ensure_extensions(&session, plan, &mut changes).await?;
        }
        Ok(changes)
    }

    async fn role_facts(
        &self,
        session: &Session,
        name: &PgName,
    ) -> Result<Option<RoleFacts>, Error> {
        // `SET` as a privilege to test, and the grant options, exist from PostgreSQL 16 on.
        let query = if session.admin.version >= VERSION_16 {
            "SELECT shobj_description(r.oid, 'pg_authid'), r.rolcanlogin, \
             pg_has_role(current_user, r.oid, 'MEMBER WITH ADMIN OPTION'), \
             pg_has_role(current_user, r.oid, 'USAGE'), pg_has_role(current_user, r.oid, 'SET'), \
             EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.roleid = r.oid \
                     AND m.member = a.oid AND m.grantor = a.oid AND m.inherit_option) \
             FROM pg_roles r, pg_roles a WHERE r.rolname = $1 AND a.rolname = current_user"
        } else {
            "SELECT shobj_description(r.oid, 'pg_authid'), r.rolcanlogin, \
             pg_has_role(current_user, r.oid, 'MEMBER WITH ADMIN OPTION'), \
             pg_has_role(current_user, r.oid, 'USAGE'), \
             pg_has_role(current_user, r.oid, 'MEMBER'), false \
             FROM pg_roles r WHERE r.rolname = $1"
        };
        let row = session
            .client
            .query_opt(query, &[&name.as_str()])
            .await
            .map_err(sql("read role"))?;
        Ok(row.map(|row| RoleFacts {
            comment: row.get(0),
            can_login: row.get(1),
            admin_option: row.get(2),
            inherited: row.get(3),
            settable: row.get(4),
            own_grant_inherits: row.get(5),
        }))
    }

    /// Creates, adopts or repairs the role. Returns whether `plan.password` was sent to it.
    async fn ensure_role(
        &self,
        session: &Session,
        plan: &PostgresPlan<'_>,
        changes: &mut Vec<PostgresChange>,
    ) -> Result<bool, Error> {
        let admin = &session.admin;
        let role = ident(plan.name.as_str());
        let comment = format!(
            "COMMENT ON ROLE {role} IS {}",
            literal(&heritage(plan.namespace))
        );
        let membership = admin.membership_grant(&role);
        let Some(facts) = self.role_facts(session, plan.name).await? else {
            // LOGIN and nothing else, spelled out; the password only as a SCRAM verifier.
            let create = role_with_password(&role, plan.password, true);
            let mut statements = vec![create.expose().as_str(), comment.as_str()];
            if !admin.superuser {
                statements.push(&membership);
            }
            match self.ddl(&session.client, &statements, "create role").await {
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
            changes.push(PostgresChange::RoleCreated);
            return Ok(true);
        };
        let adopting = match Heritage::read(facts.comment.as_deref(), plan.namespace) {
            Heritage::Ours => false,
            Heritage::Foreign(_) if plan.adopt => true,
            Heritage::Namespace(owner) => {
                return Err(Error::Conflict(format!(
                    "PostgreSQL role {} belongs to namespace {owner}; hearth never hands one \
                     namespace's role to another, even with hearth.dev/adopt",
                    plan.name
                )));
            }
            found @ Heritage::Foreign(_) => {
                return Err(Error::Conflict(format!(
                    "PostgreSQL role {} already exists and is not this namespace's ({}); set \
                     hearth.dev/adopt: \"true\" to take it over",
                    plan.name,
                    found.describe()
                )));
            }
        };
        let send_password = adopting || plan.set_password;
        let alter = if send_password {
            Some(role_with_password(&role, plan.password, false))
        } else {
            None
        };
        let mut statements: Vec<&str> = Vec::new();
        if let Some(alter) = &alter {
            statements.push(alter.expose());
        }
        let login = format!("ALTER ROLE {role} WITH LOGIN");
        if !send_password && !facts.can_login {
            statements.push(&login);
        }
        if adopting {
            statements.push(&comment);
        }
        // Made a member that can act as the role, without inheriting its privileges.
        if !admin.superuser && (!facts.settable || facts.own_grant_inherits) {
            statements.push(&membership);
        }
        if !statements.is_empty() && admin.needs_admin_option() && !facts.admin_option {
            return Err(admin.admin_option_missing(plan.name));
        }
        if !statements.is_empty() {
            let action = if adopting {
                "adopt role"
            } else {
                "repair role"
            };
            self.ddl(&session.client, &statements, action).await?;
        }
        if adopting {
            changes.push(PostgresChange::RoleAdopted);
        } else if plan.set_password {
            changes.push(PostgresChange::PasswordRotated);
        } else if !facts.can_login {
            changes.push(PostgresChange::LoginRestored);
        }
        if admin.version >= VERSION_16 && !admin.superuser && facts.inherited {
            let still = self
                .role_facts(session, plan.name)
                .await?
                .is_some_and(|f| f.inherited);
            changes.push(if still {
                PostgresChange::AdminStillInherits {
                    admin: admin.name.clone(),
                }
            } else {
                PostgresChange::AdminInheritanceRemoved
            });
        }
        Ok(send_password)
    }

    async fn set_password(
        &self,
        session: &Session,
        name: &PgName,
        password: &Sensitive<String>,
    ) -> Result<(), Error> {
        if session.admin.needs_admin_option()
            && !self
                .role_facts(session, name)
                .await?
                .is_some_and(|f| f.admin_option)
        {
            return Err(session.admin.admin_option_missing(name));
        }
        let alter = role_with_password(&ident(name.as_str()), password, false);
        self.ddl(&session.client, &[alter.expose()], "set password")
            .await
    }

    async fn ensure_database(
        &self,
        session: &Session,
        plan: &PostgresPlan<'_>,
        role_adopted: bool,
        changes: &mut Vec<PostgresChange>,
    ) -> Result<(), Error> {
        let admin = &session.admin;
        let database = ident(plan.name.as_str());
        let role = ident(plan.name.as_str());
        let mine = heritage(plan.namespace);
        let comment = format!("COMMENT ON DATABASE {database} IS {}", literal(&mine));
        let revoke = format!("REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC");
        let admin_connect = format!(
            "GRANT CONNECT ON DATABASE {database} TO {}",
            ident(&admin.name)
        );
        let row = session
            .client
            .query_opt(
                "SELECT pg_get_userbyid(datdba)::text, shobj_description(oid, 'pg_database'), \
                 has_database_privilege('public', oid, 'CONNECT') \
                 OR has_database_privilege('public', oid, 'TEMPORARY'), \
                 pg_has_role(current_user, datdba, 'USAGE'), \
                 has_database_privilege(current_user, oid, 'CONNECT') \
                 FROM pg_database WHERE datname = $1",
                &[&plan.name.as_str()],
            )
            .await
            .map_err(sql("read database"))?;
        let Some(row) = row else {
            // CREATE DATABASE cannot share a transaction: it goes alone, the rest after it.
            let create = format!("CREATE DATABASE {database} OWNER {role}");
            match self
                .ddl_alone(&session.client, &create, None, "create database")
                .await
            {
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
            // Only the owner may comment on a database or revoke from it: as the role.
            let mut statements = vec![comment.as_str(), revoke.as_str()];
            if !admin.superuser {
                statements.push(&admin_connect);
            }
            self.ddl(
                &session.client,
                &as_role(&role, &statements),
                "secure database",
            )
            .await?;
            changes.push(PostgresChange::DatabaseCreated);
            return Ok(());
        };
        let facts = DatabaseFacts {
            owner: row.get(0),
            comment: row.get(1),
            public_access: row.get(2),
            owner_usable: row.get(3),
            admin_connects: row.get(4),
        };
        let heritage = Heritage::read(facts.comment.as_deref(), plan.namespace);
        // No comment but owned by our own role: we created it and stopped before commenting.
        // Owned by a role adopted just now, it is the homelab's database, adopted with it.
        let unfinished =
            facts.comment.is_none() && facts.owner == plan.name.as_str() && !role_adopted;
        let adopting = match heritage {
            Heritage::Ours => false,
            _ if unfinished => false,
            Heritage::Foreign(_) if plan.adopt => true,
            Heritage::Namespace(owner) => {
                return Err(Error::Conflict(format!(
                    "PostgreSQL database {} belongs to namespace {owner}; hearth never hands one \
                     namespace's database to another, even with hearth.dev/adopt",
                    plan.name
                )));
            }
            found @ Heritage::Foreign(_) => {
                return Err(Error::Conflict(format!(
                    "PostgreSQL database {} already exists and is not this namespace's ({}); set \
                     hearth.dev/adopt: \"true\" to take it over",
                    plan.name,
                    found.describe()
                )));
            }
        };
        let mut statements: Vec<String> = Vec::new();
        if facts.owner != plan.name.as_str() {
            if !facts.owner_usable {
                return Err(Error::OwnerUnmanageable {
                    database: plan.name.as_str().to_owned(),
                    owner: facts.owner,
                });
            }
            statements.push(format!("ALTER DATABASE {database} OWNER TO {role}"));
            if !adopting {
                changes.push(PostgresChange::OwnerRepaired);
            }
        }
        let mut as_owner: Vec<&str> = Vec::new();
        if facts.comment.as_deref() != Some(mine.as_str()) {
            as_owner.push(&comment);
        }
        if facts.public_access {
            as_owner.push(&revoke);
            if !adopting {
                changes.push(PostgresChange::PublicAccessRevoked);
            }
        }
        if !admin.superuser && !facts.admin_connects {
            as_owner.push(&admin_connect);
        }
        if !as_owner.is_empty() {
            statements.extend(as_role(&role, &as_owner));
        }
        if !statements.is_empty() {
            self.ddl(&session.client, &statements, "repair database")
                .await?;
        }
        if adopting {
            changes.push(PostgresChange::DatabaseAdopted);
        }
        Ok(())
    }

    /// Creates what is allowed and missing. An extension that cannot be created (not installed,
    /// or not trusted while the admin is no superuser) is skipped and said, never fatal.
    async fn ensure_extensions(
        &self,
        session: &Session,
        plan: &PostgresPlan<'_>,
        changes: &mut Vec<PostgresChange>,
    ) -> Result<(), Error> {
        let in_database = self.connect(Some(plan.name.as_str())).await?;
        let present: Vec<String> = in_database
            .query("SELECT extname::text FROM pg_extension", &[])
            .await
            .map_err(sql("list extensions"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for extension in plan.extensions {
            let name = extension.as_str();
            if present.iter().any(|p| p == name) {
                continue;
            }
            let skipped = |why: String| PostgresChange::ExtensionSkipped {
                name: name.to_owned(),
                why,
            };
            match self
                .create_extension(&in_database, session, plan.name, name)
                .await?
            {
                Ok(()) => changes.push(PostgresChange::ExtensionCreated(name.to_owned())),
                Err(why) => changes.push(skipped(why)),
            }
        }
        Ok(())
    }

    /// `Ok(Err(why))` when the extension cannot be created here.
    async fn create_extension(
        &self,
        in_database: &Client,
        session: &Session,
        database: &PgName,
        name: &str,
    ) -> Result<Result<(), String>, Error> {
        let availability = in_database
            .query_one(
                "SELECT count(*) > 0, coalesce(bool_or(trusted), false), \
                 coalesce(bool_and(superuser), false) \
                 FROM pg_available_extension_versions WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(sql("read extensions"))?;
        let (installed, trusted, needs_superuser): (bool, bool, bool) = (
            availability.get(0),
            availability.get(1),
            availability.get(2),
        );
        if !installed {
            return Ok(Err(
                "it is not installed on the PostgreSQL server (no control file)".to_owned(),
            ));
        }
        let superuser = session.admin.superuser;
        if !superuser && needs_superuser && !trusted {
            return Ok(Err(format!(
                "it is not a trusted extension, so only a superuser may create it; as a \
                 superuser, in database {database}, run: CREATE EXTENSION {}",
                ident(name)
            )));
        }
        let create = format!("CREATE EXTENSION IF NOT EXISTS {} CASCADE", ident(name));
        // A trusted extension is created as the database's owner, who then owns it.
        let statements = if superuser {
            vec![create]
        } else {
            as_role(&ident(database.as_str()), &[create.as_str()])
        };
        match self.ddl(in_database, &statements, "create extension").await {
            Ok(()) => Ok(Ok(())),
            Err(Error::Postgres { detail, .. }) => Ok(Err(detail)),
            Err(other) => Err(other),
        }
    }
}

/// `CREATE ROLE` (when `new`) or `ALTER ROLE … PASSWORD '<SCRAM verifier>'`: the password
/// itself never travels.
fn role_with_password(role: &str, password: &Sensitive<String>, new: bool) -> Sensitive<String> {
    let verifier = scram_verifier(password);
    // A new role gets LOGIN and nothing else, spelled out. An existing one only gets LOGIN and
    // the password: a non-superuser admin may not even restate NOSUPERUSER.
    let (verb, attributes) = if new {
        (
            "CREATE",
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION",
        )
    } else {
        ("ALTER", "LOGIN")
    };
    Sensitive::new(format!(
        "{verb} ROLE {role} WITH {attributes} PASSWORD {}",
        literal(verifier.expose())
    ))
}
