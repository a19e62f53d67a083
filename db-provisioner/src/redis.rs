//! Apply: the app's Redis database index, its owner sentinel and its ACL user.
//!
//! Redis cannot keep one ACL user out of another's database: `SELECT` can be limited to one
//! index, but an app that never sends SELECT works in database 0, and keys are not tied to a
//! database. The ACL here is as tight as Redis 7 allows, and no tighter than that.

use hearth_runtime::Sensitive;
use prometheus::IntCounter;
use redis::aio::MultiplexedConnection;

use crate::Error;
use crate::credentials::redis_password_hash;

/// The key in each allocated database that names the namespace owning it.
pub const SENTINEL_KEY: &str = "__hearth:owner";

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

    /// Creates or resets the app's ACL user: its password (as a hash), all keys and channels,
    /// no dangerous commands, no MOVE or COPY, and SELECT of its own index only.
    pub async fn set_user(
        &self,
        session: &mut Session,
        user: &str,
        password: &Sensitive<String>,
        index: u8,
    ) -> Result<(), Error> {
        let hash = redis_password_hash(password);
        let select = format!("+select|{index}");
        self.counted().inc();
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(user)
            .arg("reset")
            .arg("on")
            .arg(hash.expose())
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg("-@dangerous")
            .arg("-move")
            .arg("-copy")
            .arg("-select")
            .arg(&select)
            .query_async::<()>(&mut session.connection)
            .await
            // Redis may quote the rule that failed; the rule holds the password hash.
            .map_err(|e| Error::Redis {
                action: "ACL SETUSER",
                detail: format!("{:?}", e.kind()),
            })
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

    /// Writes the sentinel naming `namespace` into `index` unless one is there.
    pub async fn claim(
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
            .arg("NX")
            .query_async::<Option<String>>(&mut session.connection)
            .await
            .map_err(redis_error("SET sentinel"))?;
        Ok(())
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
/// without a sentinel goes only to an explicit claim.
pub async fn choose_index(
    session: &mut Session,
    namespace: &str,
    request: hearth_runtime::annotations::RedisRequest,
    databases: u8,
    taken: &(dyn Fn(u8) -> Option<String> + Sync),
) -> Result<Option<u8>, Error> {
    use hearth_runtime::annotations::RedisRequest;
    match request {
        RedisRequest::Claim(index) => {
            if index >= databases {
                return Err(Error::Invalid(format!(
                    "hearth.dev/redis claims index {index}, but this Redis has databases 0 to {}",
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
            for index in 0..databases {
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
