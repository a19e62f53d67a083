//! The status page loaded in a real headless Chromium (Debian `chromium`): one card per app,
//! each with the state, URL and failure `/status.json` gives, and nothing from the cluster
//! ever taken as markup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use hearth_tests::browser::dump_dom;
use hearth_tests::sites::{Behaviour, TestSite};
use support::{Stack, WAIT, eventually, status};

/// (namespace → state) of every card in a DOM, read from its `data-` attributes.
fn cards(dom: &str) -> BTreeMap<String, String> {
    dom.split("<section ")
        .skip(1)
        .filter_map(|card| {
            let attribute = |name: &str| {
                let start = card.find(&format!("{name}=\""))? + name.len() + 2;
                let end = card[start..].find('"')? + start;
                Some(card[start..end].to_owned())
            };
            Some((attribute("data-namespace")?, attribute("data-state")?))
        })
        .collect()
}

/// The text of the card of `namespace`, tags and all.
fn card<'a>(dom: &'a str, namespace: &str) -> &'a str {
    let start = dom
        .find(&format!("data-namespace=\"{namespace}\""))
        .unwrap();
    let end = dom[start..].find("</section>").unwrap() + start;
    &dom[start..end]
}

#[tokio::test]
async fn the_status_page_shows_each_app_as_status_json_does() {
    let stack = Stack::start().await;
    let up = TestSite::start(Behaviour::Status(200)).await.unwrap();
    let broken = TestSite::start(Behaviour::Status(503)).await.unwrap();
    let probe = |site: &TestSite| format!("http://127.0.0.1:{}/", site.port());
    let (published, ca_file) = stack.published_site(None).await;
    let published_url = format!("https://localhost:{}", published.port());
    stack
        .namespace_with(
            "paperless",
            &[
                ("hearth.dev/probe", &probe(&up)),
                ("hearth.dev/postgres", "true"),
                ("hearth.dev/postgres-database", "paperless"),
                ("hearth.dev/url", &published_url),
            ],
        )
        .await;
    stack.database("paperless").await;
    stack.database_secret("paperless", true).await;
    stack
        .namespace_with("wallabag", &[("hearth.dev/probe", &probe(&broken))])
        .await;
    stack
        .namespace_with("miniflux", &[("hearth.dev/probe", &probe(&up))])
        .await;
    // ESO's reason, as the cluster says it, holding markup.
    stack
        .external_secret(
            "miniflux",
            "miniflux-secrets",
            Some((
                false,
                "<img src=x onerror=alert(1)>",
                "could not reach the provider",
            )),
        )
        .await;
    let process = stack
        .exporter(&[("PROBE_CA_FILE", &support::path_value(&ca_file))])
        .await;
    let expected = eventually("every app checked", WAIT, || async {
        let facts = status(&process).await;
        let states: BTreeMap<String, String> = facts["apps"]
            .as_array()?
            .iter()
            .map(|app| {
                (
                    app["namespace"].as_str().unwrap().to_owned(),
                    app["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        // Every app's HTTP check where the sites put it: a first check can fail on a loaded
        // machine, and the page is read after /status.json, so both must show the settled state.
        let http_as_expected = facts["apps"].as_array()?.iter().all(|app| {
            let expected_up = app["namespace"] != "wallabag";
            app["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["kind"] == "http")
                .all(|t| t["up"] == expected_up)
        });
        let settled = states.len() == 3
            && http_as_expected
            && states.values().all(|state| state != "unknown")
            && facts["postgres"]["up"] == true
            && facts["apps"]
                .as_array()?
                .iter()
                .any(|app| app["databaseSizeBytes"].is_number());
        settled.then_some((states, facts))
    })
    .await;
    let (states, facts) = expected;
    assert_eq!(states["paperless"], "up");
    assert_eq!(states["wallabag"], "down");
    assert_eq!(states["miniflux"], "degraded");

    let url = format!("http://{}/", process.admin);
    let dom = dump_dom(&url).await.unwrap();
    assert_eq!(cards(&dom), states, "{dom}");
    assert!(dom.contains("<title>hearth status</title>"));
    // Every card says what /status.json says of its app.
    for app in facts["apps"].as_array().unwrap() {
        let namespace = app["namespace"].as_str().unwrap();
        let shown = card(&dom, namespace);
        if let Some(url) = app["url"].as_str() {
            assert!(
                shown.contains(&format!(r#"<a href="{url}">{url}</a>"#)),
                "{shown}"
            );
        }
        if let Some(database) = app["database"].as_str() {
            assert!(shown.contains(&format!("<dd>{database} · ")), "{shown}");
            assert_eq!(
                shown.contains("size unknown"),
                app["databaseSizeBytes"].is_null(),
                "{shown}"
            );
        }
        if app["secretsTotal"].as_u64().unwrap() > 0 {
            let synced = format!("{} of {} synced", app["secretsSynced"], app["secretsTotal"]);
            assert!(shown.contains(&synced), "{shown}");
        }
        for target in app["targets"].as_array().unwrap() {
            let mark = if target["up"] == true { "✓" } else { "✗" };
            let line = format!(
                "{mark} {} {}",
                target["kind"].as_str().unwrap(),
                target["target"].as_str().unwrap()
            );
            assert!(shown.contains(&line), "{line} in {shown}");
        }
        assert_eq!(
            shown.contains("Last failure"),
            !app["lastFailure"].is_null(),
            "{shown}"
        );
    }
    assert_eq!(
        card(&dom, "paperless").matches("<dd>paperless · ").count(),
        1
    );
    let wallabag = card(&dom, "wallabag");
    assert!(wallabag.contains("503"), "{wallabag}");
    // The browser built no element from the message: it is text.
    let miniflux = card(&dom, "miniflux");
    assert!(!miniflux.contains("<img"), "{miniflux}");
    assert!(miniflux.contains("&lt;img src=x"), "{miniflux}");
    assert!(miniflux.contains("0 of 1 synced"), "{miniflux}");
}
