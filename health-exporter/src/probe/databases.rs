//! PostgreSQL and Redis probes: a fresh, short-lived connection each time (the connection is the
//! health check), and only cheap reads: `SELECT` from `pg_database` and `pg_stat_database`;
//! `PING` and `INFO`.

use std::str::FromStr;
use std::time::Duration;

use hearth_runtime::Sensitive;
use tokio_postgres::error::SqlState;
use tokio_util::task::AbortOnDropHandle;

use super::{Database, Detail, Reason, Report};
use crate::Error;

pub struct PostgresProbe {
    config: tokio_postgres::Config,
}

/// The part of a probe's deadline each step may take, so that the server's own refusal (a
/// connect timeout, a cancelled statement) comes back before the probe is cut off and says
/// which step was slow.
fn share(deadline: Duration) -> Duration {
    deadline.mul_f64(0.45)
}

impl PostgresProbe {
    /// `deadline` is the probe's; the connection and the statement each get under half of it,
    /// the statement's enforced by the server too.
    pub fn new(url: &Sensitive<String>, deadline: Duration) -> Result<Self, Error> {
        let mut config = tokio_postgres::Config::from_str(url.expose())
            .map_err(|_| Error::Config("POSTGRES_URL is not a valid PostgreSQL URL".into()))?;
        config
            .connect_timeout(share(deadline))
            .application_name("hearth-health-exporter")
            .options(format!(
                "-c statement_timeout={}",
                share(deadline).as_millis().max(1)
            ));
        Ok(Self { config })
    }

    pub async fn probe(&self) -> Report {
        let (client, connection) = match self.config.connect(tokio_postgres::NoTls).await {
            Ok(connected) => connected,
            Err(error) => return failure(&error),
        };
        // Ends with the probe, however the probe ends (cut off at its deadline included): a
        // server that hangs keeps no task or socket of ours.
        let _driver = AbortOnDropHandle::new(tokio::spawn(connection));
        // Sizes only of databases this role may see the size of (hearth closes app databases to
        // PUBLIC; pg_monitor sees them all).
        let rows = client
            .query(
                "SELECT d.oid, d.datname::text, \
                 CASE WHEN has_database_privilege(d.oid, 'CONNECT') \
                      OR pg_has_role('pg_read_all_stats', 'MEMBER') \
                      THEN pg_database_size(d.oid) END, \
                 coalesce(s.numbackends, 0)::bigint \
                 FROM pg_database d LEFT JOIN pg_stat_database s ON s.datid = d.oid \
                 WHERE NOT d.datistemplate ORDER BY 2",
                &[],
            )
            .await;
        match rows {
            Ok(rows) => Report::success(Detail::Postgres {
                databases: rows
                    .iter()
                    .map(|row| Database {
                        oid: row.get(0),
                        name: row.get(1),
                        size_bytes: row.get(2),
                        backends: row.get(3),
                    })
                    .collect(),
            }),
            Err(error) => failure(&error),
        }
    }
}

fn failure(error: &tokio_postgres::Error) -> Report {
    let Some(db) = error.as_db_error() else {
        let mut message = error.to_string();
        if let Some(cause) = std::error::Error::source(error) {
            message = format!("{message}: {cause}");
        }
        return Report::failure(Reason::Connect, message);
    };
    let reason = if *db.code() == SqlState::INVALID_PASSWORD
        || *db.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        Reason::Auth
    } else if *db.code() == SqlState::QUERY_CANCELED {
        Reason::Timeout
    } else {
        Reason::Protocol
    };
    Report::failure(
        reason,
        format!("{} (SQLSTATE {})", db.message(), db.code().code()),
    )
}

pub struct RedisProbe {
    client: redis::Client,
    deadline: Duration,
}

impl RedisProbe {
    pub fn new(url: &Sensitive<String>, deadline: Duration) -> Result<Self, Error> {
        let client = redis::Client::open(url.expose().as_str()).map_err(|_| {
            Error::Config(
                "REDIS_URL is not a valid Redis URL (redis://[user:password@]host[:port]; \
                 TLS, rediss://, is not supported)"
                    .into(),
            )
        })?;
        Ok(Self { client, deadline })
    }

    pub async fn probe(&self) -> Report {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(share(self.deadline)))
            .set_response_timeout(Some(share(self.deadline)));
        let mut connection = match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(connection) => connection,
            Err(error) => return redis_failure(&error),
        };
        let answered: redis::RedisResult<(String, String)> = redis::pipe()
            .cmd("PING")
            .cmd("INFO")
            .query_async(&mut connection)
            .await;
        match answered {
            Ok((_, info)) => Report::success(parse_info(&info)),
            Err(error) => redis_failure(&error),
        }
    }
}

fn redis_failure(error: &redis::RedisError) -> Report {
    let reason = match error.kind() {
        redis::ErrorKind::AuthenticationFailed => Reason::Auth,
        _ if error.is_timeout() => Reason::Timeout,
        _ if error.is_io_error() || error.is_connection_refusal() => Reason::Connect,
        _ => Reason::Protocol,
    };
    Report::failure(reason, error.to_string())
}

/// The few INFO fields exported: connected clients, memory used, keys per database.
fn parse_info(info: &str) -> Detail {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    // "db3:keys=12,expires=0,avg_ttl=0"
    let keys = info
        .lines()
        .filter_map(|line| {
            let (db, stats) = line.strip_prefix("db")?.split_once(':')?;
            let index: u8 = db.parse().ok()?;
            let keys = stats
                .split(',')
                .find_map(|stat| stat.strip_prefix("keys="))?
                .trim()
                .parse()
                .ok()?;
            Some((index, keys))
        })
        .collect();
    Detail::Redis {
        connected_clients: field("connected_clients"),
        memory_used_bytes: field("used_memory"),
        keys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_read_for_the_exported_fields_only() {
        let info = "# Clients\r\nconnected_clients:7\r\n# Memory\r\nused_memory:1048576\r\n\
                    used_memory_human:1.00M\r\n# Keyspace\r\ndb0:keys=3,expires=0,avg_ttl=0\r\n\
                    db12:keys=40,expires=2,avg_ttl=10\r\n";
        assert_eq!(
            parse_info(info),
            Detail::Redis {
                connected_clients: 7,
                memory_used_bytes: 1_048_576,
                keys: vec![(0, 3), (12, 40)],
            }
        );
        assert_eq!(
            parse_info("garbage\r\ndbx:keys=1\r\n"),
            Detail::Redis {
                connected_clients: 0,
                memory_used_bytes: 0,
                keys: vec![],
            }
        );
    }
}
