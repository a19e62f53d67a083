//! Build: the keys of Secret `hearth-db` for each profile. Pure.

use std::collections::BTreeMap;

use hearth_runtime::Sensitive;
use hearth_runtime::annotations::Profile;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

pub const SECRET_NAME: &str = "hearth-db";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "hearth-db-provisioner";

/// Everything but RFC 3986's unreserved characters is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub struct PostgresAccess<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub username: &'a str,
    pub password: &'a Sensitive<String>,
    pub sslmode: &'a str,
}

pub struct RedisAccess<'a> {
    pub host: &'a str,
    pub port: u16,
    pub index: u8,
    pub username: &'a str,
    pub password: &'a Sensitive<String>,
}

fn encode(part: &str) -> String {
    utf8_percent_encode(part, COMPONENT).to_string()
}

/// `host:port` with IPv6 literals bracketed, as URIs need them.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn postgres_uri(scheme: &str, pg: &PostgresAccess<'_>) -> String {
    format!(
        "{scheme}://{}:{}@{}/{}",
        encode(pg.username),
        encode(pg.password.expose()),
        authority(pg.host, pg.port),
        encode(pg.database)
    )
}

fn redis_url(redis: &RedisAccess<'_>) -> String {
    format!(
        "redis://{}:{}@{}/{}",
        encode(redis.username),
        encode(redis.password.expose()),
        authority(redis.host, redis.port),
        redis.index
    )
}

/// A `.pgpass` line: `\` and `:` escaped as libpq expects.
fn pgpass(pg: &PostgresAccess<'_>) -> String {
    let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    format!(
        "{}:{}:{}:{}:{}",
        escape(pg.host),
        pg.port,
        escape(pg.database),
        escape(pg.username),
        escape(pg.password.expose())
    )
}

/// The Secret's data (cleartext; the API carries it base64-encoded) for a profile.
pub fn render(
    profile: Profile,
    postgres: Option<&PostgresAccess<'_>>,
    redis: Option<&RedisAccess<'_>>,
) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    let mut put = |key: &str, value: String| {
        data.insert(key.to_owned(), value);
    };
    match profile {
        Profile::Generic => {
            if let Some(pg) = postgres {
                put("host", pg.host.to_owned());
                put("port", pg.port.to_string());
                put("dbname", pg.database.to_owned());
                put("username", pg.username.to_owned());
                put("password", pg.password.expose().clone());
                put("uri", postgres_uri("postgresql", pg));
                put(
                    "jdbc-uri",
                    format!(
                        "jdbc:postgresql://{}/{}?user={}&password={}",
                        authority(pg.host, pg.port),
                        encode(pg.database),
                        encode(pg.username),
                        encode(pg.password.expose())
                    ),
                );
                put("pgpass", pgpass(pg));
            }
            if let Some(r) = redis {
                put("redis-host", r.host.to_owned());
                put("redis-port", r.port.to_string());
                put("redis-db", r.index.to_string());
                put("redis-username", r.username.to_owned());
                put("redis-password", r.password.expose().clone());
                put("redis-url", redis_url(r));
            }
        }
        Profile::Paperless => {
            if let Some(pg) = postgres {
                put("PAPERLESS_DBENGINE", "postgresql".into());
                put("PAPERLESS_DBHOST", pg.host.to_owned());
                put("PAPERLESS_DBPORT", pg.port.to_string());
                put("PAPERLESS_DBNAME", pg.database.to_owned());
                put("PAPERLESS_DBUSER", pg.username.to_owned());
                put("PAPERLESS_DBPASS", pg.password.expose().clone());
            }
            if let Some(r) = redis {
                put("PAPERLESS_REDIS", redis_url(r));
            }
        }
        Profile::Wallabag => {
            if let Some(pg) = postgres {
                put("SYMFONY__ENV__DATABASE_DRIVER", "pdo_pgsql".into());
                put("SYMFONY__ENV__DATABASE_HOST", pg.host.to_owned());
                put("SYMFONY__ENV__DATABASE_PORT", pg.port.to_string());
                put("SYMFONY__ENV__DATABASE_NAME", pg.database.to_owned());
                put("SYMFONY__ENV__DATABASE_USER", pg.username.to_owned());
                put(
                    "SYMFONY__ENV__DATABASE_PASSWORD",
                    pg.password.expose().clone(),
                );
                put("SYMFONY__ENV__DATABASE_CHARSET", "utf8".into());
            }
            // No Redis keys: wallabag 2.6 could only log in as Redis's `default` user.
        }
        Profile::Miniflux => {
            if let Some(pg) = postgres {
                let url = format!("{}?sslmode={}", postgres_uri("postgres", pg), pg.sslmode);
                put("DATABASE_URL", url);
            }
        }
        Profile::Immich => {
            // What immich's server reads (server/src/repositories/config.repository.ts); never
            // DB_URL or REDIS_URL, which would override these and (for Redis) mean ioredis://.
            if let Some(pg) = postgres {
                put("DB_HOSTNAME", pg.host.to_owned());
                put("DB_PORT", pg.port.to_string());
                put("DB_DATABASE_NAME", pg.database.to_owned());
                put("DB_USERNAME", pg.username.to_owned());
                put("DB_PASSWORD", pg.password.expose().clone());
            }
            if let Some(r) = redis {
                put("REDIS_HOSTNAME", r.host.to_owned());
                put("REDIS_PORT", r.port.to_string());
                put("REDIS_DBINDEX", r.index.to_string());
                put("REDIS_USERNAME", r.username.to_owned());
                put("REDIS_PASSWORD", r.password.expose().clone());
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(data: &BTreeMap<String, String>) -> Vec<&str> {
        data.keys().map(String::as_str).collect()
    }

    fn fixtures() -> (Sensitive<String>, Sensitive<String>) {
        (
            Sensitive::new("pgSecret123".to_owned()),
            Sensitive::new("redisSecret456".to_owned()),
        )
    }

    fn render_with(profile: Profile, host: &str) -> BTreeMap<String, String> {
        let (pg_password, redis_password) = fixtures();
        let pg = PostgresAccess {
            host,
            port: 5432,
            database: "paper_less",
            username: "paper_less",
            password: &pg_password,
            sslmode: "disable",
        };
        let redis = RedisAccess {
            host: "redis.db.svc",
            port: 6379,
            index: 3,
            username: "paper-less",
            password: &redis_password,
        };
        render(profile, Some(&pg), Some(&redis))
    }

    #[test]
    fn generic_keys_and_uris() {
        let data = render_with(Profile::Generic, "pg.db.svc");
        assert_eq!(
            keys(&data),
            [
                "dbname",
                "host",
                "jdbc-uri",
                "password",
                "pgpass",
                "port",
                "redis-db",
                "redis-host",
                "redis-password",
                "redis-port",
                "redis-url",
                "redis-username",
                "uri",
                "username"
            ]
        );
        assert_eq!(
            data["uri"],
            "postgresql://paper_less:pgSecret123@pg.db.svc:5432/paper_less"
        );
        assert_eq!(
            data["jdbc-uri"],
            "jdbc:postgresql://pg.db.svc:5432/paper_less?user=paper_less&password=pgSecret123"
        );
        assert_eq!(
            data["pgpass"],
            "pg.db.svc:5432:paper_less:paper_less:pgSecret123"
        );
        assert_eq!(
            data["redis-url"],
            "redis://paper-less:redisSecret456@redis.db.svc:6379/3"
        );
    }

    #[test]
    fn uris_percent_encode_and_bracket_ipv6() {
        let data = render_with(Profile::Generic, "fd00::5");
        assert_eq!(
            data["uri"],
            "postgresql://paper_less:pgSecret123@[fd00::5]:5432/paper_less"
        );
        assert_eq!(
            data["pgpass"],
            "fd00\\:\\:5:5432:paper_less:paper_less:pgSecret123"
        );
        let odd = Sensitive::new("p@ss:w/rd%".to_owned());
        let pg = PostgresAccess {
            host: "h",
            port: 1,
            database: "d",
            username: "u",
            password: &odd,
            sslmode: "require",
        };
        assert_eq!(
            postgres_uri("postgres", &pg),
            "postgres://u:p%40ss%3Aw%2Frd%25@h:1/d"
        );
    }

    #[test]
    fn app_profiles_carry_exactly_their_keys() {
        let paperless = render_with(Profile::Paperless, "pg");
        assert_eq!(paperless["PAPERLESS_DBENGINE"], "postgresql");
        assert_eq!(
            paperless["PAPERLESS_REDIS"],
            "redis://paper-less:redisSecret456@redis.db.svc:6379/3"
        );
        assert_eq!(paperless.len(), 7);

        let wallabag = render_with(Profile::Wallabag, "pg");
        assert_eq!(wallabag["SYMFONY__ENV__DATABASE_DRIVER"], "pdo_pgsql");
        assert_eq!(wallabag["SYMFONY__ENV__DATABASE_CHARSET"], "utf8");
        assert_eq!(wallabag.len(), 7);
        assert!(!wallabag.keys().any(|k| k.contains("REDIS")));

        let miniflux = render_with(Profile::Miniflux, "pg");
        assert_eq!(
            keys(&miniflux),
            ["DATABASE_URL"],
            "miniflux reads only DATABASE_URL"
        );
        assert_eq!(
            miniflux["DATABASE_URL"],
            "postgres://paper_less:pgSecret123@pg:5432/paper_less?sslmode=disable"
        );

        let immich = render_with(Profile::Immich, "pg");
        assert_eq!(
            keys(&immich),
            [
                "DB_DATABASE_NAME",
                "DB_HOSTNAME",
                "DB_PASSWORD",
                "DB_PORT",
                "DB_USERNAME",
                "REDIS_DBINDEX",
                "REDIS_HOSTNAME",
                "REDIS_PASSWORD",
                "REDIS_PORT",
                "REDIS_USERNAME"
            ]
        );
        assert!(!immich.contains_key("REDIS_URL"));
    }

    #[test]
    fn only_what_was_provisioned_is_rendered() {
        let (pg_password, _) = fixtures();
        let pg = PostgresAccess {
            host: "pg",
            port: 5432,
            database: "d",
            username: "u",
            password: &pg_password,
            sslmode: "disable",
        };
        let data = render(Profile::Generic, Some(&pg), None);
        assert!(!data.keys().any(|k| k.starts_with("redis")));
        let immich = render(Profile::Immich, Some(&pg), None);
        assert_eq!(immich["DB_USERNAME"], "u");
        assert!(!immich.keys().any(|k| k.starts_with("REDIS")));
    }
}
