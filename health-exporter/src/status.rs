//! The status page for people (`/`) and the same facts for scripts (`/status.json`): one card
//! per app with its state, its URL, database size, Redis keys, secrets synced and the last
//! failure. Server-rendered, no external assets, readable on a phone, dark and light.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::probe::{Detail, Reason};
use crate::registry::{App, Registry, Target};
use crate::targets::{Kind, TargetKey};

/// How often the page reloads itself.
const REFRESH_SECONDS: u32 = 30;

/// What the page may load: its own inline styles, nothing else.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'";

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status.json", get(json))
        .with_state(registry)
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Unix seconds.
    pub generated: u64,
    pub apps: Vec<AppStatus>,
    pub postgres: Option<TargetStatus>,
    pub redis: Option<TargetStatus>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppStatus {
    pub namespace: String,
    /// `down` (the app's own check failed), `degraded` (something it needs failed: a Secret,
    /// an Ingress, a database it uses), `unknown` (not everything checked yet), or `up`.
    pub state: &'static str,
    /// Unix seconds of its least recent check, `None` until checked.
    pub checked: Option<u64>,
    pub url: Option<String>,
    pub database: Option<String>,
    pub database_size_bytes: Option<i64>,
    pub redis_db: Option<u8>,
    pub redis_keys: Option<i64>,
    pub secrets_synced: usize,
    pub secrets_total: usize,
    pub last_failure: Option<Failure>,
    pub targets: Vec<TargetStatus>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    pub kind: &'static str,
    pub target: String,
    /// `None` until checked once.
    pub up: Option<bool>,
    /// Unix seconds of the last check.
    pub checked: Option<u64>,
    pub reason: Option<&'static str>,
    pub message: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub at: u64,
    pub target: String,
    pub reason: &'static str,
    pub message: String,
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn target_status(key: &TargetKey, target: &Target) -> TargetStatus {
    let report = target.last.as_ref().map(|(_, report)| report);
    TargetStatus {
        kind: key.kind.as_str(),
        target: key.target.clone(),
        up: report.map(|_| target.up()),
        checked: target.last.as_ref().map(|(at, _)| unix(*at)),
        reason: report.and_then(|r| r.reason).map(Reason::as_str),
        message: report
            .filter(|r| !r.message.is_empty())
            .map(|r| r.message.clone()),
    }
}

/// An app's state from its checks: those of its own and the shared databases it uses.
fn state(checks: &[(&TargetKey, &Target)]) -> &'static str {
    let failed = |target: &Target| target.last.is_some() && !target.up();
    if checks
        .iter()
        .any(|(key, target)| key.kind == Kind::Http && failed(target))
    {
        "down"
    } else if checks.iter().any(|(_, target)| failed(target)) {
        "degraded"
    } else if checks.is_empty() || checks.iter().any(|(_, target)| target.last.is_none()) {
        "unknown"
    } else {
        "up"
    }
}

/// What a shared database's last check learned.
fn detail<'a>(target: Option<(&TargetKey, &'a Target)>) -> Option<&'a Detail> {
    target
        .and_then(|(_, t)| t.last.as_ref())
        .map(|(_, report)| &report.detail)
}

/// The facts, from the registry. Pure given the registry's content.
pub fn status(targets: &BTreeMap<TargetKey, Target>, apps: &BTreeMap<String, App>) -> Status {
    let shared = |kind: Kind| targets.iter().find(|(key, _)| key.kind == kind);
    let postgres = shared(Kind::Postgres);
    let redis = shared(Kind::Redis);
    let apps = apps
        .iter()
        .map(|(namespace, app)| {
            let mut checks: Vec<(&TargetKey, &Target)> = targets
                .iter()
                .filter(|(key, _)| key.namespace == *namespace)
                .collect();
            // The shared databases it uses count towards its state, and are shown with it.
            if app.targets.database.is_some() {
                checks.extend(postgres);
            }
            if app.targets.redis_db.is_some() {
                checks.extend(redis);
            }
            let last_failure = checks
                .iter()
                .filter_map(|(key, t)| {
                    t.last_failure
                        .as_ref()
                        .map(|(at, reason, message)| Failure {
                            at: unix(*at),
                            target: format!("{} {}", key.kind.as_str(), key.target),
                            reason: reason.as_str(),
                            message: message.clone(),
                        })
                })
                .max_by_key(|failure| failure.at);
            let database_size_bytes =
                app.targets
                    .database
                    .as_ref()
                    .and_then(|name| match detail(postgres) {
                        Some(Detail::Postgres { databases }) => databases
                            .iter()
                            .find(|database| database.name == *name)
                            .and_then(|database| database.size_bytes),
                        _ => None,
                    });
            let redis_keys = app.targets.redis_db.and_then(|index| match detail(redis) {
                Some(Detail::Redis { keys, .. }) => Some(
                    keys.iter()
                        .find(|(db, _)| *db == index)
                        .map_or(0, |(_, count)| *count),
                ),
                _ => None,
            });
            let secrets: Vec<&Target> = checks
                .iter()
                .filter(|(key, _)| key.kind == Kind::ExternalSecret)
                .map(|(_, t)| *t)
                .collect();
            let checked = checks
                .iter()
                .map(|(_, t)| t.last.as_ref().map(|(at, _)| unix(*at)))
                .collect::<Option<Vec<u64>>>()
                .and_then(|times| times.into_iter().min());
            AppStatus {
                namespace: namespace.clone(),
                state: state(&checks),
                checked,
                url: app
                    .targets
                    .url
                    .as_ref()
                    .map(|u| u.as_str().trim_end_matches('/').to_owned()),
                database: app.targets.database.clone(),
                database_size_bytes,
                redis_db: app.targets.redis_db,
                redis_keys,
                secrets_synced: secrets.iter().filter(|t| t.up()).count(),
                secrets_total: secrets.len(),
                last_failure,
                targets: checks
                    .iter()
                    .map(|(key, t)| target_status(key, t))
                    .collect(),
            }
        })
        .collect();
    Status {
        generated: unix(SystemTime::now()),
        apps,
        postgres: postgres.map(|(key, t)| target_status(key, t)),
        redis: redis.map(|(key, t)| target_status(key, t)),
    }
}

async fn json(State(registry): State<Arc<Registry>>) -> Response {
    let status = registry.read(status);
    match serde_json::to_vec(&status) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            error.to_string(),
        )
            .into_response(),
    }
}

/// `?refresh=<seconds>`; `?refresh=0` turns the page's reloading off (each reload loses a
/// reader's place). Clamped to a day.
fn refresh_from(uri: &axum::http::Uri) -> u32 {
    url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(name, _)| name == "refresh")
        .and_then(|(_, value)| value.parse::<u32>().ok())
        .map_or(REFRESH_SECONDS, |seconds| seconds.min(86_400))
}

async fn page(State(registry): State<Arc<Registry>>, uri: axum::http::Uri) -> Response {
    let refresh = refresh_from(&uri);
    let html = render(&registry.read(status), refresh);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html,
    )
        .into_response()
}

/// Text made safe for HTML: every name and message comes from the cluster.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn bytes(size: i64) -> String {
    let size = size as f64;
    match size {
        s if s >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1} GiB", s / 1024.0 / 1024.0 / 1024.0),
        s if s >= 1024.0 * 1024.0 => format!("{:.1} MiB", s / 1024.0 / 1024.0),
        s => format!("{:.0} KiB", s / 1024.0),
    }
}

fn ago(at: u64, now: u64) -> String {
    let seconds = now.saturating_sub(at);
    match seconds {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

const STYLE: &str = "\
:root{color-scheme:light dark;--bg:#f6f7f9;--card:#fff;--text:#1c1e21;--muted:#5f6368;\
--up:#137333;--down:#c5221f;--degraded:#a35200;--unknown:#5f6368;--border:#dadce0}\
@media (prefers-color-scheme:dark){:root{--bg:#17181a;--card:#222326;--text:#e8eaed;\
--muted:#9aa0a6;--up:#81c995;--down:#f28b82;--degraded:#fdd663;--unknown:#9aa0a6;--border:#3c4043}}\
*{box-sizing:border-box}body{margin:0;padding:1rem;background:var(--bg);color:var(--text);\
font:16px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif}\
h1{font-size:1.3rem;margin:0 0 .25rem}p.sub{margin:0 0 1rem;color:var(--muted);font-size:.9rem}\
.cards{display:grid;gap:.75rem;grid-template-columns:repeat(auto-fill,minmax(17rem,1fr))}\
.card{background:var(--card);border:1px solid var(--border);border-left:.4rem solid var(--unknown);\
border-radius:.5rem;padding:.75rem 1rem}.card.up{border-left-color:var(--up)}\
.card.down{border-left-color:var(--down)}.card.degraded{border-left-color:var(--degraded)}\
.card h2{font-size:1.05rem;margin:0;display:flex;justify-content:space-between;gap:.5rem}\
.state{font-size:.8rem;text-transform:uppercase;letter-spacing:.04em}\
.up .state{color:var(--up)}.down .state{color:var(--down)}.degraded .state{color:var(--degraded)}\
.unknown .state{color:var(--unknown)}a{color:inherit;word-break:break-all}\
dl{margin:.5rem 0 0;display:grid;grid-template-columns:auto 1fr;gap:.15rem .75rem;font-size:.9rem}\
dt{color:var(--muted)}dd{margin:0}.failure{margin-top:.5rem;font-size:.85rem;color:var(--muted)}";

/// The page, from the facts; it reloads itself every `refresh` seconds (0: never). Pure.
pub fn render(status: &Status, refresh: u32) -> String {
    let (reload, reloading) = if refresh == 0 {
        (
            String::new(),
            "<a href=\"?\">reload every 30 s</a>".to_owned(),
        )
    } else {
        (
            format!("<meta http-equiv=\"refresh\" content=\"{refresh}\">"),
            format!("refreshes every {refresh} s (<a href=\"?refresh=0\">stop</a>)"),
        )
    };
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">{reload}\
         <title>hearth status</title><style>{STYLE}</style></head><body>\
         <h1>hearth</h1><p class=\"sub\">{} · PostgreSQL {} · Redis {} · {reloading}</p>\
         <main class=\"cards\">",
        summary(&status.apps),
        shared_state(status.postgres.as_ref()),
        shared_state(status.redis.as_ref()),
    );
    // Trouble first: the cards that need a look lead, the healthy ones follow.
    let mut apps: Vec<&AppStatus> = status.apps.iter().collect();
    apps.sort_by_key(|app| (severity(app.state), app.namespace.as_str()));
    for app in apps {
        let _ = write!(
            html,
            "<section class=\"card {state}\" data-namespace=\"{ns}\" data-state=\"{state}\">\
             <h2><span>{ns}</span><span class=\"state\">{state}</span></h2><dl>",
            state = app.state,
            ns = escape(&app.namespace),
        );
        if let Some(url) = &app.url {
            let url = escape(url);
            let _ = write!(html, "<dt>URL</dt><dd><a href=\"{url}\">{url}</a></dd>");
        }
        if let Some(database) = &app.database {
            let size = app
                .database_size_bytes
                .map_or_else(|| "size unknown".to_owned(), bytes);
            let _ = write!(
                html,
                "<dt>Database</dt><dd>{} · {size}</dd>",
                escape(database)
            );
        }
        if let Some(index) = app.redis_db {
            let keys = app
                .redis_keys
                .map_or_else(|| "keys unknown".to_owned(), |k| format!("{k} keys"));
            let _ = write!(html, "<dt>Redis</dt><dd>db{index} · {keys}</dd>");
        }
        if app.secrets_total > 0 {
            let _ = write!(
                html,
                "<dt>Secrets</dt><dd>{} of {} synced</dd>",
                app.secrets_synced, app.secrets_total
            );
        }
        let checks: Vec<String> = app
            .targets
            .iter()
            .map(|t| {
                let mark = match t.up {
                    Some(true) => "✓",
                    Some(false) => "✗",
                    None => "…",
                };
                format!("{mark} {} {}", t.kind, escape(&t.target))
            })
            .collect();
        let _ = write!(html, "<dt>Checks</dt><dd>{}</dd>", checks.join("<br>"));
        let checked = app
            .checked
            .map_or_else(|| "not yet".to_owned(), |at| ago(at, status.generated));
        let _ = write!(html, "<dt>Checked</dt><dd>{checked}</dd></dl>");
        if let Some(failure) = &app.last_failure {
            let _ = write!(
                html,
                "<p class=\"failure\">Last failure {}: {} — {} ({})</p>",
                ago(failure.at, status.generated),
                escape(&failure.target),
                escape(&failure.message),
                failure.reason
            );
        }
        html.push_str("</section>");
    }
    if status.apps.is_empty() {
        html.push_str("<p>No namespace has opted in to hearth yet.</p>");
    }
    html.push_str("</main></body></html>");
    html
}

/// The order in which states need attention.
const STATES: [&str; 4] = ["down", "degraded", "unknown", "up"];

fn severity(state: &str) -> usize {
    STATES
        .iter()
        .position(|s| *s == state)
        .unwrap_or(STATES.len())
}

/// "4 apps: 1 down, 3 up".
fn summary(apps: &[AppStatus]) -> String {
    let counts: Vec<String> = STATES
        .iter()
        .filter_map(|state| {
            let count = apps.iter().filter(|app| app.state == *state).count();
            (count > 0).then(|| format!("{count} {state}"))
        })
        .collect();
    match apps.len() {
        0 => "no apps".to_owned(),
        1 => format!("1 app: {}", counts.join(", ")),
        n => format!("{n} apps: {}", counts.join(", ")),
    }
}

/// A shared database's state for the page's header, with the reason when it is down.
fn shared_state(target: Option<&TargetStatus>) -> String {
    match target {
        None => "not watched".to_owned(),
        Some(TargetStatus { up: None, .. }) => "not checked yet".to_owned(),
        Some(TargetStatus { up: Some(true), .. }) => "up".to_owned(),
        Some(TargetStatus { reason, .. }) => {
            format!("<strong>down</strong> ({})", reason.unwrap_or("unknown"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_messages_are_escaped() {
        let status = Status {
            generated: 1000,
            apps: vec![AppStatus {
                namespace: "blog".into(),
                state: "down",
                checked: Some(990),
                url: Some("https://blog.ts.net/?a=<b>".into()),
                database: None,
                database_size_bytes: None,
                redis_db: None,
                redis_keys: None,
                secrets_synced: 0,
                secrets_total: 0,
                last_failure: Some(Failure {
                    at: 940,
                    target: "http web".into(),
                    reason: "http_status",
                    message: "<script>alert(1)</script>".into(),
                }),
                targets: vec![],
            }],
            postgres: None,
            redis: None,
        };
        let html = render(&status, 30);
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("60 s ago"));
        assert!(html.contains("<dt>Checked</dt><dd>10 s ago</dd>"), "{html}");
        assert!(html.contains("data-state=\"down\""));
        assert!(html.contains("1 app: 1 down"), "{html}");
        assert!(html.contains("prefers-color-scheme:dark"));
        assert!(html.contains("http-equiv=\"refresh\" content=\"30\""));
        for external in ["<link", "src=", "url(", "@import"] {
            assert!(!html.contains(external), "no external assets: {external}");
        }
        assert!(!render(&status, 0).contains("http-equiv"), "refresh off");
    }

    fn target(kind: Kind, namespace: &str, name: &str, up: Option<bool>) -> (TargetKey, Target) {
        use crate::probe::{Reason, Report};
        let key = TargetKey {
            kind,
            namespace: namespace.into(),
            target: name.into(),
        };
        let mut registry_target = Target {
            check: crate::registry::Check::Cluster,
            generation: 0,
            last: None,
            last_success: None,
            last_failure: None,
            probes: BTreeMap::new(),
            errors: BTreeMap::new(),
            due: std::time::Instant::now(),
            in_flight: false,
        };
        registry_target.last = up.map(|up| {
            let report = if up {
                Report::success(Detail::None)
            } else {
                Report::failure(Reason::Connect, "refused")
            };
            (SystemTime::now(), report)
        });
        (key, registry_target)
    }

    #[test]
    fn an_app_is_degraded_by_a_shared_database_it_uses_and_unknown_until_checked() {
        let app = |database: Option<&str>| App {
            targets: crate::targets::AppTargets {
                database: database.map(str::to_owned),
                ..Default::default()
            },
        };
        let apps = BTreeMap::from([
            ("uses-pg".to_owned(), app(Some("uses_pg"))),
            ("no-pg".to_owned(), app(None)),
        ]);
        let targets = BTreeMap::from([
            target(Kind::Http, "uses-pg", "web", Some(true)),
            target(Kind::Http, "no-pg", "web", Some(true)),
            target(Kind::Secret, "no-pg", "hearth-db", None),
            target(Kind::Postgres, "", "postgres", Some(false)),
        ]);
        let facts = status(&targets, &apps);
        let state = |name: &str| {
            facts
                .apps
                .iter()
                .find(|a| a.namespace == name)
                .unwrap()
                .state
        };
        assert_eq!(state("uses-pg"), "degraded");
        assert_eq!(state("no-pg"), "unknown");
        let html = render(&facts, 30);
        assert!(
            html.contains("PostgreSQL <strong>down</strong> (connect)"),
            "{html}"
        );
    }
}
