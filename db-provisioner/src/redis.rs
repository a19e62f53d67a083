//! Apply: the app's Redis database index, its owner sentinel and its ACL user.
//!
//! Redis cannot keep one ACL user out of another's database: `SELECT` can be limited to one
//! index, but an app that never sends SELECT works in database 0, and keys are not tied to a
//! database. The ACL here is as tight as Redis 7 allows, and no tighter than that.

use std::collections::HashMap;

use hearth_runtime::Sensitive;
use hearth_runtime::annotations::RedisRequest;
use prometheus::IntCounter;
use redis::aio::MultiplexedConnection;

use crate::Error;
use crate::credentials::redis_password_hash;

/// The key in each allocated database that names the namespace owning it.
pub const SENTINEL_KEY: &str = "__hearth:owner";

/// What an app's ACL user may run, in Redis's rule syntax, applied left to right:
/// - everything but `@dangerous` (FLUSHALL, CONFIG, DEBUG, SWAPDB, …), yet `INFO`, which BullMQ
///   sends on connect (it shows server-wide statistics and every index's key count);
/// - not `MOVE` or `COPY`, which write into other indexes;
/// - not what reaches other apps through the whole server: flushing the script cache, loading,
///   deleting, flushing or restoring functions, and client-side tracking (whose BCAST mode
///   would send it the names of keys other apps write);
/// - `SELECT` of no index; [`own_index_rule`] then allows its own.
pub const APP_RULES: &str = "+@all -@dangerous +info -move -copy -script|flush \
    -function|load -function|delete -function|flush -function|restore -client|tracking -select";

/// The rule that lets an app's user `SELECT` its own index, and only that one.
fn own_index_rule(index: u8) -> String {
    format!("+select|{index}")
}

pub struct RedisAdmin {
    client: redis::Client,
    /// Counts commands that change Redis (ACL SETUSER, sentinel writes, FLUSHDB, ACL DELUSER).
    writes: IntCounter,
}

/// A fresh connection per reconcile: `SELECT` changes a connection's state, so it is never shared.
pub struct Session {
    connection: MultiplexedConnection,
    selected: Option<u8>,
}

impl RedisAdmin {
    pub fn new(url: &Sensitive<String>, writes: IntCounter) -> Result<Self, Error> {
        let client = redis::Client::open(url.expose().as_str())
            .map_err(|_| Error::Config("REDIS_ADMIN_URL is not a valid Redis URL".into()))?;
        Ok(Self { client, writes })
    }

    /// The host and port the admin URL names, the default for what apps are told.
    pub fn address(&self) -> (String, u16) {
        match self.client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
            _ => ("localhost".to_owned(), 6379),
        }
    }

    pub async fn session(&self) -> Result<Session, Error> {
        let connect = self.client.get_multiplexed_async_connection();
        let connection = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
            .await
            .map_err(|_| Error::RedisUnavailable("connecting timed out".into()))?
            .map_err(|e| Error::RedisUnavailable(e.to_string()))?;
        Ok(Session {
            connection,
            selected: None,
        })
    }

    fn counted(&self) -> &IntCounter {
        &self.writes
    }

    /// Creates or resets the app's ACL user: its passwords (as hashes; two while a rotation is
    /// under way, so the Secret's keeps working until it is rewritten), all keys and channels,
    /// and the commands of [`APP_RULES`] with SELECT of its own index only.
    pub async fn set_user(
        &self,
        session: &mut Session,
        user: &str,
        passwords: &[&Sensitive<String>],
        index: u8,
    ) -> Result<(), Error> {
        let hashes: Vec<Sensitive<String>> = passwords
            .iter()
            .map(|password| redis_password_hash(password))
            .collect();
        let mut command = redis::cmd("ACL");
        command.arg("SETUSER").arg(user).arg("reset").arg("on");
        for hash in &hashes {
            command.arg(hash.expose());
        }
        command.arg("~*").arg("&*");
        for rule in APP_RULES.split_whitespace() {
            command.arg(rule);
        }
        command.arg(own_index_rule(index));
        self.counted().inc();
        command
            .query_async::<()>(&mut session.connection)
            .await
            // Redis may quote the rule that failed; the rule holds the password hash.
            .map_err(|e| Error::Redis {
                action: "ACL SETUSER",
                detail: format!("{:?}", e.kind()),
            })
    }

    /// Whether ACL user `user` exists and was made by hearth for `index`: it holds the hash of a
    /// password hearth keeps, or (when the kept passwords were lost) it may SELECT exactly the
    /// index allocated to it, which no user hearth did not make is given. `None`: no such user.
    pub async fn user_is_ours(
        &self,
        session: &mut Session,
        user: &str,
        kept: &[&Sensitive<String>],
        index: u8,
    ) -> Result<Option<bool>, Error> {
        let reply: Option<HashMap<String, redis::Value>> = redis::cmd("ACL")
            .arg("GETUSER")
            .arg(user)
            .query_async(&mut session.connection)
            .await
            .map_err(redis_error("ACL GETUSER"))?;
        let Some(reply) = reply else {
            return Ok(None);
        };
        let field = |name: &str| reply.get(name).cloned().unwrap_or(redis::Value::Nil);
        let hashes: Vec<String> = redis::from_redis_value(field("passwords")).unwrap_or_default();
        let commands: String = redis::from_redis_value(field("commands")).unwrap_or_default();
        let knows_password = kept.iter().any(|password| {
            let hash = redis_password_hash(password);
            hashes
                .iter()
                .any(|h| Some(h.as_str()) == hash.expose().strip_prefix('#'))
        });
        let own_index = own_index_rule(index);
        let selects_its_index = commands.split(' ').any(|rule| rule == own_index);
        Ok(Some(knows_password || selects_its_index))
    }

    pub async fn delete_user(&self, session: &mut Session, user: &str) -> Result<(), Error> {
        self.counted().inc();
        redis::cmd("ACL")
            .arg("DELUSER")
            .arg(user)
            .query_async::<i64>(&mut session.connection)
            .await
            .map_err(redis_error("ACL DELUSER"))?;
        Ok(())
    }

    /// Writes the sentinel naming `namespace` into `index`, replacing a wrong one: the
    /// allocation record decides who owns an index, the sentinel only mirrors it.
    pub async fn write_sentinel(
        &self,
        session: &mut Session,
        index: u8,
        namespace: &str,
    ) -> Result<(), Error> {
        session.select(index).await?;
        self.counted().inc();
        redis::cmd("SET")
            .arg(SENTINEL_KEY)
            .arg(namespace)
            .query_async::<()>(&mut session.connection)
            .await
            .map_err(redis_error("SET sentinel"))
    }

    /// Empties `index`.
    pub async fn flush(&self, session: &mut Session, index: u8) -> Result<(), Error> {
        session.select(index).await?;
        self.counted().inc();
        redis::cmd("FLUSHDB")
            .query_async::<()>(&mut session.connection)
            .await
            .map_err(redis_error("FLUSHDB"))
    }
}

impl Session {
    async fn select(&mut self, index: u8) -> Result<(), Error> {
        if self.selected != Some(index) {
            redis::cmd("SELECT")
                .arg(index)
                .query_async::<()>(&mut self.connection)
                .await
                .map_err(redis_error("SELECT"))?;
            self.selected = Some(index);
        }
        Ok(())
    }

    /// How many databases the server has (`CONFIG GET databases`).
    pub async fn databases(&mut self) -> Result<u8, Error> {
        let reply: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("databases")
            .query_async(&mut self.connection)
            .await
            .map_err(redis_error("CONFIG GET databases"))?;
        reply
            .get(1)
            .and_then(|n| n.parse::<u32>().ok())
            .map(|n| u8::try_from(n.min(256)).unwrap_or(u8::MAX))
            .ok_or_else(|| Error::Redis {
                action: "CONFIG GET databases",
                detail: "unexpected reply".into(),
            })
    }

    /// The namespace the sentinel in `index` names, and how many keys the database holds.
    pub async fn inspect(&mut self, index: u8) -> Result<(Option<String>, u64), Error> {
        self.select(index).await?;
        let (owner, size): (Option<String>, u64) = redis::pipe()
            .cmd("GET")
            .arg(SENTINEL_KEY)
            .cmd("DBSIZE")
            .query_async(&mut self.connection)
            .await
            .map_err(redis_error("inspect database"))?;
        Ok((owner, size))
    }
}

fn redis_error(action: &'static str) -> impl Fn(redis::RedisError) -> Error {
    move |error| {
        if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
            Error::RedisUnavailable(format!("{action}: {error}"))
        } else {
            Error::Redis {
                action,
                detail: error.to_string(),
            }
        }
    }
}

/// Picks the index for a namespace that has none yet. `Ok(None)`: nothing is free.
///
/// `taken` is the authoritative allocation record; each candidate is also inspected in Redis,
/// so an index whose sentinel names someone else is never handed out, and one holding keys
/// without a sentinel goes only to an explicit claim. Index 0 is never handed out: every
/// connection starts there, so every other app's user could reach it.
pub async fn choose_index(
    session: &mut Session,
    namespace: &str,
    request: RedisRequest,
    databases: u8,
    taken: &(dyn Fn(u8) -> Option<String> + Sync),
) -> Result<Option<u8>, Error> {
    match request {
        RedisRequest::Claim(index) => {
            if index == 0 || index >= databases {
                return Err(Error::Invalid(format!(
                    "hearth.dev/redis claims index {index}, but this Redis has databases 1 to {} \
                     to give out (0 is never given out)",
                    databases.saturating_sub(1)
                )));
            }
            if let Some(owner) = taken(index).filter(|owner| owner != namespace) {
                return Err(Error::Conflict(format!(
                    "Redis index {index} is allocated to namespace {owner}"
                )));
            }
            match session.inspect(index).await?.0 {
                Some(owner) if owner != namespace => Err(Error::Conflict(format!(
                    "Redis index {index} holds data of namespace {owner} (its {SENTINEL_KEY} key)"
                ))),
                _ => Ok(Some(index)),
            }
        }
        RedisRequest::NextFree => {
            for index in 1..databases {
                if taken(index).is_some() {
                    continue;
                }
                match session.inspect(index).await? {
                    (Some(owner), _) if owner == namespace => return Ok(Some(index)),
                    (None, 0) => return Ok(Some(index)),
                    _ => {}
                }
            }
            Ok(None)
        }
    }
}

/// The index above 0 whose sentinel names `namespace` and that no one else is allocated: where
/// an admin's `SWAPDB 0 N` moved the data of a namespace that still has index 0.
pub async fn moved_from_zero(
    session: &mut Session,
    namespace: &str,
    databases: u8,
    taken: &(dyn Fn(u8) -> Option<String> + Sync),
) -> Result<Option<u8>, Error> {
    for index in 1..databases {
        if taken(index).is_some_and(|owner| owner != namespace) {
            continue;
        }
        if session.inspect(index).await?.0.as_deref() == Some(namespace) {
            return Ok(Some(index));
        }
    }
    Ok(None)
}
