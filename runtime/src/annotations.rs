//! The annotation contract (DESIGN.md §3.1) as typed values.
//!
//! Each `parse_*` function is pure: it turns one annotation value into a typed value or an
//! [`AnnotationError`] that names the annotation, quotes the bad value and says what is accepted.
//! Values are matched exactly: no trimming, no case folding, ASCII only, so a look-alike such as
//! `trսe` (Armenian `ս`) or `True` is refused instead of being half-understood.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub const PREFIX: &str = "hearth.dev/";

pub const POSTGRES: &str = "hearth.dev/postgres";
pub const POSTGRES_EXTENSIONS: &str = "hearth.dev/postgres-extensions";
pub const REDIS: &str = "hearth.dev/redis";
pub const PROFILE: &str = "hearth.dev/profile";
pub const DELETION_POLICY: &str = "hearth.dev/deletion-policy";
pub const ADOPT: &str = "hearth.dev/adopt";
pub const ROTATE: &str = "hearth.dev/rotate";
pub const EXPOSE: &str = "hearth.dev/expose";
pub const HOSTNAME: &str = "hearth.dev/hostname";
pub const TAILSCALE_TAGS: &str = "hearth.dev/tailscale-tags";
pub const FUNNEL: &str = "hearth.dev/funnel";
pub const PROXY_GROUP: &str = "hearth.dev/proxy-group";
pub const RESTART_ON_URL_CHANGE: &str = "hearth.dev/restart-on-url-change";
pub const PROBE: &str = "hearth.dev/probe";

/// Written back by the services for people and for each other; never an input.
pub const POSTGRES_DATABASE: &str = "hearth.dev/postgres-database";
pub const REDIS_DB: &str = "hearth.dev/redis-db";
pub const URL: &str = "hearth.dev/url";

const INPUTS: [&str; 14] = [
    POSTGRES,
    POSTGRES_EXTENSIONS,
    REDIS,
    PROFILE,
    DELETION_POLICY,
    ADOPT,
    ROTATE,
    EXPOSE,
    HOSTNAME,
    TAILSCALE_TAGS,
    FUNNEL,
    PROXY_GROUP,
    RESTART_ON_URL_CHANGE,
    PROBE,
];
const OUTPUTS: [&str; 3] = [POSTGRES_DATABASE, REDIS_DB, URL];

/// The highest Redis index an annotation may claim (Redis's default of 16 databases).
pub const MAX_REDIS_INDEX: u8 = 15;

/// A list annotation longer than this is refused before it is split.
const MAX_LIST_LEN: usize = 1024;
/// How much of a bad value an error quotes.
const QUOTE_LIMIT: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnotationError {
    pub annotation: String,
    pub value: String,
    pub accepted: &'static str,
}

impl AnnotationError {
    pub fn new(annotation: &str, value: &str, accepted: &'static str) -> Self {
        Self {
            annotation: annotation.to_owned(),
            value: value.to_owned(),
            accepted,
        }
    }
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {} has the value {} which is not accepted; {}",
            self.annotation,
            quote(&self.value),
            self.accepted
        )
    }
}

impl std::error::Error for AnnotationError {}

/// Quotes a value for a message: control characters and non-ASCII escaped, long values cut.
fn quote(value: &str) -> String {
    let mut quoted = String::from("\"");
    for c in value.chars().take(QUOTE_LIMIT) {
        quoted.extend(c.escape_default());
    }
    quoted.push('"');
    let total = value.chars().count();
    if total > QUOTE_LIMIT {
        quoted.push_str(&format!(" (cut; {} bytes in all)", value.len()));
    }
    quoted
}

/// A PostgreSQL role or database name hearth will create: `^[a-z][a-z0-9_]{0,62}$`, and not one
/// of the names PostgreSQL keeps for itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgName(String);

impl PgName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const PG_NAME_ACCEPTED: &str = "expected \"true\" (named after the namespace, '-' becoming '_'), \
    \"false\", or a name of 1-63 characters a-z, 0-9 and '_' starting with a letter, \
    not postgres, template0, template1 or pg_*";

fn is_pg_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with("pg_")
        && !matches!(name, "postgres" | "template0" | "template1")
}

/// `hearth.dev/postgres`: `Ok(None)` for `"false"`, else the database and role name.
pub fn parse_postgres(value: &str, namespace: &str) -> Result<Option<PgName>, AnnotationError> {
    let name = match value {
        "false" => return Ok(None),
        "true" => namespace.replace('-', "_"),
        other => other.to_owned(),
    };
    if is_pg_name(&name) {
        Ok(Some(PgName(name)))
    } else if value == "true" {
        Err(AnnotationError::new(
            POSTGRES,
            value,
            "the namespace name does not make a valid PostgreSQL name (it must start with a \
             letter and must not be postgres, template0, template1 or pg_*); give the name \
             explicitly instead of \"true\"",
        ))
    } else {
        Err(AnnotationError::new(POSTGRES, value, PG_NAME_ACCEPTED))
    }
}

/// An extension name as `CREATE EXTENSION` takes it, e.g. `pg_trgm`, `uuid-ossp`, `vector`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtensionName(String);

impl ExtensionName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `hearth.dev/postgres-extensions`: a comma list, spaces after commas allowed, no duplicates.
/// Whether each one is allowed is the operator's `POSTGRES_EXTENSIONS_ALLOWED`, checked later.
pub fn parse_postgres_extensions(value: &str) -> Result<Vec<ExtensionName>, AnnotationError> {
    const ACCEPTED: &str = "expected a comma-separated list of extension names, each 1-63 \
        characters a-z, 0-9, '_' or '-' starting with a letter, e.g. \"pg_trgm, uuid-ossp\"";
    let items = split_list(POSTGRES_EXTENSIONS, value, ACCEPTED)?;
    let valid = |name: &str| {
        let mut chars = name.chars();
        name.len() <= 63
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    items
        .into_iter()
        .map(|item| {
            if valid(item) {
                Ok(ExtensionName(item.to_owned()))
            } else {
                Err(AnnotationError::new(POSTGRES_EXTENSIONS, value, ACCEPTED))
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisRequest {
    /// `"true"`: the next free database index.
    NextFree,
    /// `"N"`: exactly this index (the migration path for existing apps).
    Claim(u8),
}

/// `hearth.dev/redis`: `Ok(None)` for `"false"`.
pub fn parse_redis(value: &str) -> Result<Option<RedisRequest>, AnnotationError> {
    const ACCEPTED: &str = "expected \"true\" (the next free database index), \"false\", or an \
        index from \"1\" to \"15\" written without sign or leading zeros";
    match value {
        "true" => return Ok(Some(RedisRequest::NextFree)),
        "false" => return Ok(None),
        _ => {}
    }
    let canonical = value.len() <= 2
        && value.bytes().all(|b| b.is_ascii_digit())
        && !(value.len() == 2 && value.starts_with('0'));
    match value.parse::<u8>() {
        // Every connection starts in database 0 before any SELECT, so every other app's user
        // reaches it: an app kept there cannot be kept apart.
        Ok(0) if canonical => Err(AnnotationError::new(
            REDIS,
            value,
            "expected an index from \"1\" to \"15\": 0 is refused, because every Redis \
             connection starts there, so every other app can read and delete its keys. Move the \
             data to a free index N first (an admin runs SWAPDB 0 N), then set hearth.dev/redis \
             to \"N\"",
        )),
        Ok(index) if canonical && index <= MAX_REDIS_INDEX => Ok(Some(RedisRequest::Claim(index))),
        _ => Err(AnnotationError::new(REDIS, value, ACCEPTED)),
    }
}

/// Which keys the `hearth-db` Secret carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    #[default]
    Generic,
    Paperless,
    Wallabag,
    Miniflux,
    Immich,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::Paperless => "paperless",
            Self::Wallabag => "wallabag",
            Self::Miniflux => "miniflux",
            Self::Immich => "immich",
        }
    }
}

/// `hearth.dev/profile`; an absent annotation means `generic`.
pub fn parse_profile(value: &str) -> Result<Profile, AnnotationError> {
    match value {
        "generic" => Ok(Profile::Generic),
        "paperless" => Ok(Profile::Paperless),
        "wallabag" => Ok(Profile::Wallabag),
        "miniflux" => Ok(Profile::Miniflux),
        "immich" => Ok(Profile::Immich),
        _ => Err(AnnotationError::new(
            PROFILE,
            value,
            "expected one of generic, paperless, wallabag, miniflux, immich",
        )),
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Keep the database, role and Redis data when the app opts out or its namespace goes.
    #[default]
    Retain,
    /// Drop them, guarded by a finalizer on the namespace.
    Drop,
}

/// `hearth.dev/deletion-policy`; an absent annotation means `retain`.
pub fn parse_deletion_policy(value: &str) -> Result<DeletionPolicy, AnnotationError> {
    match value {
        "retain" => Ok(DeletionPolicy::Retain),
        "drop" => Ok(DeletionPolicy::Drop),
        _ => Err(AnnotationError::new(
            DELETION_POLICY,
            value,
            "expected \"retain\" (the default: keep the data) or \"drop\"",
        )),
    }
}

/// `hearth.dev/adopt` and `hearth.dev/funnel`: exactly `"true"` or `"false"`.
pub fn parse_flag(annotation: &'static str, value: &str) -> Result<bool, AnnotationError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(AnnotationError::new(
            annotation,
            value,
            "expected \"true\" or \"false\"",
        )),
    }
}

/// `hearth.dev/rotate`: any new value asks for one rotation; it is compared, never interpreted.
pub fn parse_rotate(value: &str) -> Result<String, AnnotationError> {
    let printable = value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if !value.is_empty() && value.len() <= 253 && printable {
        Ok(value.to_owned())
    } else {
        Err(AnnotationError::new(
            ROTATE,
            value,
            "expected 1-253 printable ASCII characters, e.g. a date such as \"2026-11-25\"; \
             change the value to rotate again",
        ))
    }
}

/// A DNS-1123 label: 1-63 characters a-z, 0-9 and '-', starting and ending alphanumeric.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS-1035 label, as Service names must be: a DNS-1123 label that starts with a letter.
fn is_service_name(name: &str) -> bool {
    is_dns_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
}

/// A DNS-1123 subdomain, as most object names must be: dot-separated labels, ≤ 253 characters.
fn is_object_name(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(number) => write!(f, "{number}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// Parses a port as a Service spells it: 1-65535, or an IANA-style name of ≤ 15 characters
/// with at least one letter.
fn parse_service_port(port: &str) -> Option<ServicePort> {
    if port.bytes().all(|b| b.is_ascii_digit()) {
        if port.starts_with('0') {
            return None;
        }
        return port
            .parse::<u16>()
            .ok()
            .filter(|n| *n > 0)
            .map(ServicePort::Number);
    }
    let has_letter = port.bytes().any(|b| b.is_ascii_lowercase());
    (port.len() <= 15 && has_letter && is_dns_label(port) && !port.contains("--"))
        .then(|| ServicePort::Name(port.to_owned()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposedService {
    pub service: String,
    pub port: ServicePort,
}

/// `hearth.dev/expose`: `"<service>:<port>"`, comma-separated for several.
pub fn parse_expose(value: &str) -> Result<Vec<ExposedService>, AnnotationError> {
    const ACCEPTED: &str = "expected \"<service>:<port>\", comma-separated for several, where \
        <service> is a Service name (a-z, 0-9, '-', starting with a letter) and <port> a number \
        1-65535 or a port name, e.g. \"paperless:8000\"";
    let items = split_list(EXPOSE, value, ACCEPTED)?;
    items
        .into_iter()
        .map(|item| {
            let (service, port) = item
                .split_once(':')
                .ok_or_else(|| AnnotationError::new(EXPOSE, value, ACCEPTED))?;
            match (is_service_name(service), parse_service_port(port)) {
                (true, Some(port)) => Ok(ExposedService {
                    service: service.to_owned(),
                    port,
                }),
                _ => Err(AnnotationError::new(EXPOSE, value, ACCEPTED)),
            }
        })
        .collect()
}

/// `hearth.dev/hostname`: the tailnet host label.
pub fn parse_hostname(value: &str) -> Result<String, AnnotationError> {
    if is_service_name(value) {
        Ok(value.to_owned())
    } else {
        Err(AnnotationError::new(
            HOSTNAME,
            value,
            "expected a host label of 1-63 characters a-z, 0-9 and '-', starting with a letter \
             and not ending with '-'",
        ))
    }
}

/// `hearth.dev/tailscale-tags`: comma-separated `tag:<name>` values.
pub fn parse_tailscale_tags(value: &str) -> Result<Vec<String>, AnnotationError> {
    const ACCEPTED: &str = "expected comma-separated Tailscale tags such as \"tag:k8s,tag:apps\", \
        each \"tag:\" and a name of letters, digits and '-' starting with a letter";
    let items = split_list(TAILSCALE_TAGS, value, ACCEPTED)?;
    items
        .into_iter()
        .map(|item| {
            let valid = item.strip_prefix("tag:").is_some_and(|name| {
                name.len() <= 63
                    && name.starts_with(|c: char| c.is_ascii_alphabetic())
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
            if valid {
                Ok(item.to_owned())
            } else {
                Err(AnnotationError::new(TAILSCALE_TAGS, value, ACCEPTED))
            }
        })
        .collect()
}

/// `hearth.dev/proxy-group`: the name of a Tailscale ProxyGroup.
pub fn parse_proxy_group(value: &str) -> Result<String, AnnotationError> {
    if is_object_name(value) {
        Ok(value.to_owned())
    } else {
        Err(AnnotationError::new(
            PROXY_GROUP,
            value,
            "expected the name of a ProxyGroup (lower-case DNS name, at most 253 characters)",
        ))
    }
}

/// `hearth.dev/restart-on-url-change`: comma-separated Deployment names in the same namespace.
pub fn parse_restart_on_url_change(value: &str) -> Result<Vec<String>, AnnotationError> {
    const ACCEPTED: &str = "expected comma-separated Deployment names of this namespace, e.g. \
        \"paperless,paperless-worker\"";
    let items = split_list(RESTART_ON_URL_CHANGE, value, ACCEPTED)?;
    items
        .into_iter()
        .map(|item| {
            if is_object_name(item) {
                Ok(item.to_owned())
            } else {
                Err(AnnotationError::new(RESTART_ON_URL_CHANGE, value, ACCEPTED))
            }
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeTarget {
    /// A Service of the app's namespace, probed over plain HTTP inside the cluster.
    Service {
        service: String,
        port: ServicePort,
        path: String,
    },
    /// Any http(s) URL.
    Url(url::Url),
}

/// `hearth.dev/probe`: `"<service>:<port><path>"` or an `http(s)://` URL without credentials.
pub fn parse_probe(value: &str) -> Result<ProbeTarget, AnnotationError> {
    const ACCEPTED: &str = "expected \"<service>:<port><path>\" such as \"paperless:8000/api/\", \
        or an http:// or https:// URL without a user name or password";
    let shown = without_userinfo(value);
    let error = || AnnotationError::new(PROBE, &shown, ACCEPTED);
    if value.len() > 2048 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(error());
    }
    if value.starts_with("http://") || value.starts_with("https://") {
        let url = url::Url::parse(value).map_err(|_| error())?;
        let credentials = !url.username().is_empty() || url.password().is_some();
        return if credentials || url.host_str().is_none() {
            Err(error())
        } else {
            Ok(ProbeTarget::Url(url))
        };
    }
    let (service, rest) = value.split_once(':').ok_or_else(error)?;
    let path_start = rest.find('/').ok_or_else(error)?;
    let (port, path) = rest.split_at(path_start);
    match (is_service_name(service), parse_service_port(port)) {
        (true, Some(port)) => Ok(ProbeTarget::Service {
            service: service.to_owned(),
            port,
            path: path.to_owned(),
        }),
        _ => Err(error()),
    }
}

/// A URL-like value with anything that may be a `user:password@` part hidden, for messages:
/// everything between `://` and the last `@`, wherever a `/`, `?` or `#` falls (a password may
/// hold any of them, and a value that fails to parse is still quoted).
fn without_userinfo(value: &str) -> String {
    match (value.split_once("://"), value.rfind('@')) {
        (Some((scheme, _)), Some(at)) => {
            format!(
                "{scheme}://(user and password not shown)@{}",
                &value[at + 1..]
            )
        }
        _ => value.to_owned(),
    }
}

/// Splits a comma list: items may have spaces around them, none may be empty or repeated.
fn split_list<'v>(
    annotation: &'static str,
    value: &'v str,
    accepted: &'static str,
) -> Result<Vec<&'v str>, AnnotationError> {
    let error = || AnnotationError::new(annotation, value, accepted);
    if value.is_empty() || value.len() > MAX_LIST_LEN {
        return Err(error());
    }
    let items: Vec<&str> = value
        .split(',')
        .map(|item| item.trim_matches(' '))
        .collect();
    let unique: BTreeSet<&str> = items.iter().copied().collect();
    if items.iter().any(|item| item.is_empty()) || unique.len() != items.len() {
        return Err(error());
    }
    Ok(items)
}

/// The value of a parse, or `None` with its error added to `problems`: for reading every
/// annotation of a namespace and reporting every problem at once.
pub fn keep_valid<T>(
    problems: &mut Vec<AnnotationError>,
    result: Result<T, AnnotationError>,
) -> Option<T> {
    result.map_err(|error| problems.push(error)).ok()
}

/// `hearth.dev/*` keys that are neither inputs nor hearth's own outputs: most often a typo such
/// as `hearth.dev/postgress`, which would otherwise be ignored without a word.
pub fn unknown_annotations(annotations: &BTreeMap<String, String>) -> Vec<AnnotationError> {
    annotations
        .keys()
        .filter(|key| key.starts_with(PREFIX))
        .filter(|key| !INPUTS.contains(&key.as_str()) && !OUTPUTS.contains(&key.as_str()))
        .map(|key| AnnotationError {
            annotation: key.clone(),
            value: annotations[key].clone(),
            accepted: "hearth does not know this annotation; see the list of hearth.dev/ \
                annotations in hearth's documentation",
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values every parser must refuse.
    fn hostile() -> Vec<String> {
        vec![
            String::new(),
            "x".repeat(10 * 1024),
            "\"true\"".to_owned(),
            "'true'".to_owned(),
            "true;DROP DATABASE x".to_owned(),
            "a;b".to_owned(),
            "tr\0ue".to_owned(),
            "tr\u{057d}e".to_owned(), // Armenian small letter seh, looks like 'u'
            "\u{0430}bc".to_owned(),  // Cyrillic 'а'
            "TRUE".to_owned(),
            "True".to_owned(),
            "\ttrue".to_owned(),
            "true\n".to_owned(),
            "-1".to_owned(),
        ]
    }

    fn assert_refused<T: fmt::Debug>(
        annotation: &str,
        parse: impl Fn(&str) -> Result<T, AnnotationError>,
    ) {
        for value in hostile() {
            let error = parse(&value).expect_err(&format!("{annotation} accepted {value:?}"));
            let message = error.to_string();
            assert_eq!(error.annotation, annotation);
            assert!(message.contains(annotation), "{message}");
            assert!(message.contains("expected"), "{message}");
            assert!(
                message.len() < 600,
                "message too long for an Event: {message}"
            );
            assert!(!message.contains('\0'), "{message}");
        }
    }

    #[test]
    fn every_parser_refuses_hostile_input() {
        assert_refused(POSTGRES, |v| parse_postgres(v, "paperless"));
        assert_refused(POSTGRES_EXTENSIONS, parse_postgres_extensions);
        assert_refused(REDIS, parse_redis);
        assert_refused(PROFILE, parse_profile);
        assert_refused(DELETION_POLICY, parse_deletion_policy);
        assert_refused(ADOPT, |v| parse_flag(ADOPT, v));
        assert_refused(EXPOSE, parse_expose);
        assert_refused(HOSTNAME, parse_hostname);
        assert_refused(TAILSCALE_TAGS, parse_tailscale_tags);
        assert_refused(PROXY_GROUP, parse_proxy_group);
        assert_refused(RESTART_ON_URL_CHANGE, parse_restart_on_url_change);
        assert_refused(PROBE, parse_probe);
    }

    #[test]
    fn errors_quote_the_value_escaped_and_cut() {
        let error = parse_redis(&format!("1\0{}", "9".repeat(10_000))).unwrap_err();
        let message = error.to_string();
        assert!(message.contains(r#""1\u{0}999"#), "{message}");
        assert!(message.contains("(cut; 10002 bytes in all)"), "{message}");
        let error = parse_profile("tr\u{057d}e").unwrap_err();
        assert!(error.to_string().contains(r#""tr\u{57d}e""#), "{error}");
    }

    #[test]
    fn postgres_names() {
        let named = |v: &str| parse_postgres(v, "paper-less").map(|n| n.map(|n| n.to_string()));
        assert_eq!(named("true").unwrap().as_deref(), Some("paper_less"));
        assert_eq!(named("false").unwrap(), None);
        assert_eq!(
            named("paperless_2").unwrap().as_deref(),
            Some("paperless_2")
        );
        assert_eq!(
            named(&format!("a{}", "b".repeat(62)))
                .unwrap()
                .unwrap()
                .len(),
            63
        );
        for bad in [
            "Paperless",
            "2fa",
            "_x",
            "a-b",
            "a b",
            &format!("a{}", "b".repeat(63)),
            "postgres",
            "template1",
            "pg_catalog",
            "x\"; DROP ROLE y; --",
        ] {
            assert!(named(bad).is_err(), "{bad}");
        }
        let error = parse_postgres("true", "1password").unwrap_err();
        assert!(
            error.to_string().contains("give the name explicitly"),
            "{error}"
        );
    }

    #[test]
    fn extensions() {
        let names: Vec<String> = parse_postgres_extensions("pg_trgm, uuid-ossp,vector")
            .unwrap()
            .iter()
            .map(|e| e.as_str().to_owned())
            .collect();
        assert_eq!(names, ["pg_trgm", "uuid-ossp", "vector"]);
        for bad in [
            "pg_trgm,,vector",
            "pg_trgm,pg_trgm",
            ",",
            "Vector",
            "vector;drop",
        ] {
            assert!(parse_postgres_extensions(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redis_indexes() {
        assert_eq!(parse_redis("true").unwrap(), Some(RedisRequest::NextFree));
        assert_eq!(parse_redis("false").unwrap(), None);
        assert_eq!(parse_redis("1").unwrap(), Some(RedisRequest::Claim(1)));
        assert_eq!(parse_redis("15").unwrap(), Some(RedisRequest::Claim(15)));
        let zero = parse_redis("0").unwrap_err().to_string();
        assert!(zero.contains("SWAPDB 0 N"), "{zero}");
        for bad in [
            "16",
            "-1",
            "abc",
            "01",
            "+1",
            "1.0",
            "255",
            "256",
            "0x1",
            "١",
            "99999999999999999999",
        ] {
            let error = parse_redis(bad).unwrap_err();
            assert!(error.to_string().contains("\"1\" to \"15\""), "{error}");
        }
    }

    #[test]
    fn enums_and_flags() {
        assert_eq!(parse_profile("paperless").unwrap(), Profile::Paperless);
        assert_eq!(parse_profile("immich").unwrap().as_str(), "immich");
        assert_eq!(parse_deletion_policy("drop").unwrap(), DeletionPolicy::Drop);
        assert_eq!(
            parse_deletion_policy("retain").unwrap(),
            DeletionPolicy::Retain
        );
        assert!(parse_flag(FUNNEL, "true").unwrap());
        assert!(!parse_flag(FUNNEL, "false").unwrap());
        assert!(parse_flag(FUNNEL, "yes").is_err());
        assert!(parse_flag(FUNNEL, "1").is_err());
        // Only list items are trimmed; a whole value with spaces around it is refused.
        assert!(parse_flag(FUNNEL, " true").is_err());
        assert!(parse_profile("immich ").is_err());
    }

    #[test]
    fn rotate_takes_any_printable_token() {
        assert_eq!(parse_rotate("2026-11-25").unwrap(), "2026-11-25");
        assert_eq!(parse_rotate("after leak #3").unwrap(), "after leak #3");
        for bad in ["", "a\nb", "\u{feff}x", &"x".repeat(254)] {
            assert!(parse_rotate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expose() {
        let exposed = parse_expose("paperless:8000, admin:http").unwrap();
        assert_eq!(
            exposed,
            [
                ExposedService {
                    service: "paperless".into(),
                    port: ServicePort::Number(8000)
                },
                ExposedService {
                    service: "admin".into(),
                    port: ServicePort::Name("http".into())
                },
            ]
        );
        for bad in [
            "paperless",
            "paperless:",
            ":80",
            "paperless:0",
            "paperless:65536",
            "paperless:080",
            "Paperless:80",
            "1app:80",
            "a:80,a:80",
            "a:b:c",
            "a:very-long-port-name",
        ] {
            assert!(parse_expose(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames_tags_groups_and_deployments() {
        assert_eq!(parse_hostname("photos").unwrap(), "photos");
        for bad in ["-photos", "photos-", "pho.tos", "Photos", &"a".repeat(64)] {
            assert!(parse_hostname(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_tailscale_tags("tag:k8s, tag:apps").unwrap(),
            ["tag:k8s", "tag:apps"]
        );
        for bad in ["k8s", "tag:", "tag:1x", "tag:a b", "tag:a,tag:a"] {
            assert!(parse_tailscale_tags(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_proxy_group("ingress.proxies").unwrap(),
            "ingress.proxies"
        );
        assert!(parse_proxy_group("a..b").is_err());
        assert_eq!(
            parse_restart_on_url_change("paperless,paperless-worker").unwrap(),
            ["paperless", "paperless-worker"]
        );
    }

    #[test]
    fn probes() {
        assert_eq!(
            parse_probe("paperless:8000/api/").unwrap(),
            ProbeTarget::Service {
                service: "paperless".into(),
                port: ServicePort::Number(8000),
                path: "/api/".into()
            }
        );
        assert!(matches!(
            parse_probe("https://photos.tail1234.ts.net/api/server/ping").unwrap(),
            ProbeTarget::Url(_)
        ));
        for bad in [
            "paperless:8000",
            "paperless/health",
            "ftp://host/",
            "https://user:pw@host/",
            "https://",
            "paperless:8000/a b",
        ] {
            assert!(parse_probe(bad).is_err(), "{bad}");
        }
        for leaky in [
            "https://user:Hunter2@host/x",
            "http://:Hunter2@[::1/",
            "https://Hunter2@h",
            "https://user:Hun/ter2@host/",
            "https://user:Hun#ter2@host/",
            "https://user:Hun?ter2@host/",
            "https://user:Hun@ter2@host/",
        ] {
            let message = parse_probe(leaky).unwrap_err().to_string();
            assert!(
                !message.contains("Hun") && !message.contains("ter2"),
                "{message}"
            );
            assert!(message.contains("not shown"), "{message}");
        }
    }

    #[test]
    fn unknown_keys_are_reported_and_known_ones_are_not() {
        let annotations: BTreeMap<String, String> = [
            ("hearth.dev/postgress", "true"),
            ("hearth.dev/postgres", "true"),
            ("hearth.dev/url", "https://x.ts.net"),
            ("example.com/other", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let unknown = unknown_annotations(&annotations);
        assert_eq!(unknown.len(), 1);
        assert_eq!(unknown[0].annotation, "hearth.dev/postgress");
    }
}
