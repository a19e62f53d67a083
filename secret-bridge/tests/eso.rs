//! secret-bridge as ESO sees it: the real binary serving its self-managed certificate, a client
//! that trusts only the CA it publishes and checks the host name, the exact requests ESO v2.9
//! sends, and a fake Bitwarden with real crypto that counts every call.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use hearth_tests::admin::HttpReply;
use hearth_tests::fake_bitwarden::Fault;
use serde_json::{Value, json};
use support::Bridge;

fn json_of(reply: &HttpReply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

#[tokio::test]
async fn get_by_uuid_returns_the_sdk_servers_shape() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let id = bridge
        .fake
        .add_secret("db-password", "s3cr3t-value", "a note", Some("proj-1"));
    let secret = json_of(&bridge.get_secret(&token, &id).await);
    assert_eq!(
        secret,
        json!({
            "creationDate": "2026-01-26T21:46:02.2182556Z",
            "id": id,
            "key": "db-password",
            "note": "a note",
            "organizationId": bridge.fake.organization(),
            "projectId": "proj-1",
            "revisionDate": "2026-01-26T21:46:02.2182556Z",
            "value": "s3cr3t-value",
        })
    );
    // Without a project, projectId is left out, as Go's omitempty does.
    let lone = bridge.fake.add_secret("lone", "v", "", None);
    let secret = json_of(&bridge.get_secret(&token, &lone).await);
    assert!(secret.get("projectId").is_none(), "{secret}");
    assert!(!bridge.process.logs().contains("s3cr3t-value"));
    assert!(
        !bridge
            .process
            .logs()
            .contains(token.split(':').next().unwrap().split('.').nth(2).unwrap())
    );
}

#[tokio::test]
async fn eso_name_lookups_find_by_project_and_see_duplicates() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let in_a = bridge
        .fake
        .add_secret("shared-name", "value-a", "", Some("project-a"));
    let in_b = bridge
        .fake
        .add_secret("shared-name", "value-b", "", Some("project-b"));
    bridge.fake.add_secret("twin", "1", "", Some("project-a"));
    bridge.fake.add_secret("twin", "2", "", Some("project-a"));

    // ESO: one list, then a GET for every entry whose key matches, then filter by projectId.
    let list = bridge.list(&token).await;
    assert_eq!(list.len(), 4);
    for item in &list {
        let keys: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "key", "organizationId"]);
    }
    let matches = |name: &str| -> Vec<String> {
        list.iter()
            .filter(|i| i["key"] == name)
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut in_project_b = Vec::new();
    for id in matches("shared-name") {
        let secret = json_of(&bridge.get_secret(&token, &id).await);
        if secret["projectId"] == "project-b" {
            in_project_b.push(secret["value"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(in_project_b, ["value-b"]);
    assert!(matches("shared-name").contains(&in_a) && matches("shared-name").contains(&in_b));
    // Two of the same name in one project: ESO sees both and reports its error.
    let mut twins = 0;
    for id in matches("twin") {
        if json_of(&bridge.get_secret(&token, &id).await)["projectId"] == "project-a" {
            twins += 1;
        }
    }
    assert_eq!(twins, 2);
}

#[tokio::test]
async fn data_from_find_over_many_secrets_costs_one_login_and_two_data_calls() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let ids: Vec<String> = (0..50)
        .map(|i| {
            bridge
                .fake
                .add_secret(&format!("key-{i}"), &format!("value-{i}"), "", Some("p"))
        })
        .collect();
    // dataFrom.find: a list, then a GET for every secret; ESO repeats it each refresh.
    for _ in 0..3 {
        let list = bridge.list(&token).await;
        assert_eq!(list.len(), 50);
        for (i, item) in list.iter().enumerate() {
            let secret = json_of(
                &bridge
                    .get_secret(&token, item["id"].as_str().unwrap())
                    .await,
            );
            assert_eq!(secret["value"], format!("value-{i}"));
        }
    }
    assert!(ids.len() == 50);
    assert_eq!(bridge.fake.calls("login"), 1);
    assert!(
        bridge.fake.data_calls() <= 2,
        "data calls: {}",
        bridge.fake.data_calls()
    );
}

#[tokio::test]
async fn concurrent_requests_share_one_login() {
    let bridge = Bridge::start(&[("CACHE_TTL", "0")]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    bridge.fake.set_delay(Duration::from_millis(100));
    let replies = futures::future::join_all((0..40).map(|_| bridge.get_secret(&token, &id))).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(bridge.fake.calls("login"), 1);
    assert_eq!(
        bridge.fake.calls("get"),
        40,
        "cache off: every GET goes upstream"
    );
}

#[tokio::test]
async fn push_secret_create_unchanged_and_value_change() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let org = bridge.fake.organization();
    // Create, with the exact body ESO marshals.
    let body = format!(
        r#"{{"key":"pushed","note":"from ESO","organizationId":"{org}","projectIds":["project-a"],"value":"v1"}}"#
    );
    let identity = bridge.fake.identity_url();
    let api = bridge.fake.api_url();
    let headers = [
        ("Warden-Access-Token", token.as_str()),
        ("Warden-Api-Url", api.as_str()),
        ("Warden-Identity-Url", identity.as_str()),
    ];
    let created = json_of(
        &bridge
            .raw("POST", "/rest/api/1/secret", &headers, body.into_bytes())
            .await,
    );
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["value"], "v1");
    assert_eq!(created["projectId"], "project-a");
    assert_eq!(
        bridge.fake.value_of(&id).unwrap(),
        (
            "pushed".into(),
            "v1".into(),
            "from ESO".into(),
            Some("project-a".into())
        )
    );

    // An unchanged re-push: ESO lists, gets, compares, and writes nothing.
    let writes_before = bridge.fake.calls("create") + bridge.fake.calls("update");
    let list = bridge.list(&token).await;
    let found = list.iter().find(|i| i["key"] == "pushed").unwrap();
    let current = json_of(
        &bridge
            .get_secret(&token, found["id"].as_str().unwrap())
            .await,
    );
    assert_eq!(
        current["value"], "v1",
        "the cache was invalidated by the create"
    );
    assert_eq!(
        bridge.fake.calls("create") + bridge.fake.calls("update"),
        writes_before
    );

    // A value change: PUT, and the next read sees it at once.
    let update = json!({"id": id, "key": "pushed", "note": "from ESO", "organizationId": org, "projectIds": ["project-a"], "value": "v2"});
    let updated = json_of(
        &bridge
            .eso("PUT", "/rest/api/1/secret", &token, update)
            .await,
    );
    assert_eq!(updated["value"], "v2");
    assert_eq!(
        json_of(&bridge.get_secret(&token, &id).await)["value"],
        "v2"
    );
    assert_eq!(bridge.fake.value_of(&id).unwrap().1, "v2");
}

#[tokio::test]
async fn delete_by_id_and_unknown_ids() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("gone-soon", "v", "", None);
    let deleted = json_of(
        &bridge
            .eso("DELETE", "/rest/api/1/secret", &token, json!({"ids": [id]}))
            .await,
    );
    assert_eq!(deleted, json!({"data": [{"id": id}]}));
    assert!(bridge.fake.value_of(&id).is_none());
    let missing = bridge.get_secret(&token, &id).await;
    assert_eq!(missing.status, 400);
    assert!(
        missing
            .body
            .starts_with("failed to get secret: [404 Not Found]"),
        "{}",
        missing.body
    );
    assert!(missing.content_type.starts_with("text/plain"));
    // Bitwarden refuses the whole delete when one id is unknown; so does the bridge.
    let other = bridge.fake.add_secret("stays", "v", "", None);
    let refused = bridge
        .eso(
            "DELETE",
            "/rest/api/1/secret",
            &token,
            json!({"ids": [other, "00000000-0000-4000-8000-000000000000"]}),
        )
        .await;
    assert_eq!(refused.status, 400);
    assert!(bridge.fake.value_of(&other).is_some());
}

#[tokio::test]
async fn rate_limits_are_honoured_per_token() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    bridge.fake.fail_next(
        "login",
        Fault {
            status: 429,
            body: "Slow down! Too many requests. Try again in 2s.".into(),
            retry_after: None,
        },
    );
    let limited = bridge.get_secret(&token, &id).await;
    assert_eq!(limited.status, 400);
    assert!(limited.body.contains("rate limit"), "{}", limited.body);
    // Inside the hinted window nothing is sent to Bitwarden.
    for _ in 0..5 {
        assert_eq!(bridge.get_secret(&token, &id).await.status, 400);
    }
    assert_eq!(bridge.fake.calls("login"), 1);
    // Another token is not held back.
    let other = bridge.fake.add_token();
    assert_eq!(bridge.get_secret(&other, &id).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
    let text = bridge.process.get("/metrics").await.unwrap().body;
    assert!(
        text.contains("hearth_secret_bridge_rate_limited_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn an_expired_session_logs_in_again_once() {
    let bridge = Bridge::start(&[("CACHE_TTL", "0")]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
    bridge.fake.expire_bearers();
    assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
    assert_eq!(bridge.fake.calls("login"), 2);
    assert_eq!(
        bridge.fake.calls("get"),
        3,
        "one 401, one retry after the new login"
    );
}

#[tokio::test]
async fn a_slow_upstream_is_cut_off_inside_esos_timeout() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    bridge.fake.set_delay(Duration::from_secs(5));
    let started = Instant::now();
    let reply = bridge.get_secret(&token, &id).await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("no answer within"), "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_undecryptable_item_is_an_error_and_the_process_stays_healthy() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let broken = bridge.fake.add_undecryptable_secret("broken");
    let reply = bridge.get_secret(&token, &broken).await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("MAC does not match"), "{}", reply.body);
    assert_eq!(bridge.process.get("/livez").await.unwrap().status, 200);
    let fine = bridge.fake.add_secret("fine", "v", "", None);
    assert_eq!(bridge.get_secret(&token, &fine).await.status, 200);
}

#[tokio::test]
async fn cached_data_is_never_served_to_another_token() {
    let bridge = Bridge::start(&[]).await;
    let first = bridge.fake.add_token();
    let second = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "private", "", None);
    assert_eq!(bridge.get_secret(&first, &id).await.status, 200);
    assert_eq!(bridge.fake.calls("get"), 1);
    assert_eq!(bridge.get_secret(&first, &id).await.status, 200);
    assert_eq!(
        bridge.fake.calls("get"),
        1,
        "the same token reads from the cache"
    );
    // Another valid token goes upstream itself.
    assert_eq!(bridge.get_secret(&second, &id).await.status, 200);
    assert_eq!(bridge.fake.calls("get"), 2);
    // A wrong token with the same id part, or a revoked one, gets nothing.
    let (head, _) = first.split_once(':').unwrap();
    let forged = format!("{head}:AAAAAAAAAAAAAAAAAAAAAA==");
    let reply = bridge.get_secret(&forged, &id).await;
    assert_eq!(reply.status, 400);
    assert!(!reply.body.contains("private"));
    bridge.fake.revoke(&second);
    let third_party = bridge.fake.add_token();
    bridge.fake.revoke(&third_party);
    let reply = bridge.get_secret(&third_party, &id).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(!reply.body.contains("private"));
}

#[tokio::test]
async fn upstreams_off_the_allow_list_are_refused_before_any_credential_leaves() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let api = bridge.fake.api_url();
    for (name, value) in [
        ("Warden-Api-Url", "https://attacker.example"),
        ("Warden-Identity-Url", "http://127.0.0.2:1"),
    ] {
        let mut headers = vec![("Warden-Access-Token", token.as_str())];
        if name == "Warden-Identity-Url" {
            headers.push(("Warden-Api-Url", api.as_str()));
        }
        headers.push((name, value));
        let reply = bridge
            .raw(
                "GET",
                "/rest/api/1/secret",
                &headers,
                br#"{"id":"x"}"#.to_vec(),
            )
            .await;
        assert_eq!(reply.status, 403, "{}", reply.body);
        assert!(reply.body.contains("not allowed"));
    }
    // Empty URL headers mean Bitwarden's cloud, which this test's allow-list does not include.
    let headers = [
        ("Warden-Access-Token", token.as_str()),
        ("Warden-Api-Url", ""),
        ("Warden-Identity-Url", ""),
    ];
    let reply = bridge
        .raw(
            "GET",
            "/rest/api/1/secret",
            &headers,
            br#"{"id":"x"}"#.to_vec(),
        )
        .await;
    assert_eq!(reply.status, 403);
    assert!(
        reply.body.contains("https://identity.bitwarden.com"),
        "{}",
        reply.body
    );
    assert_eq!(bridge.fake.calls("login"), 0);
}

#[tokio::test]
async fn bad_requests_get_the_documented_errors_and_the_process_stays_healthy() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let missing = bridge
        .raw("GET", "/rest/api/1/secret", &[], br#"{"id":"x"}"#.to_vec())
        .await;
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (401, "Missing Warden access token\n")
    );
    let malformed_token = bridge
        .eso(
            "GET",
            "/rest/api/1/secret",
            "0.not-a-token",
            json!({"id": "x"}),
        )
        .await;
    assert_eq!(malformed_token.status, 400);
    assert!(
        malformed_token
            .body
            .starts_with("failed to login to bitwarden using access token")
    );
    let broken_json = bridge
        .raw_with_token(&token, "GET", "/rest/api/1/secret", b"{not json")
        .await;
    assert_eq!(
        broken_json.status, 500,
        "GET routes answer a bad body with 500"
    );
    let empty = bridge
        .raw_with_token(&token, "GET", "/rest/api/1/secrets", b"")
        .await;
    assert_eq!(empty.status, 500);
    let bad_write = bridge
        .raw_with_token(&token, "POST", "/rest/api/1/secret", b"[1,2]")
        .await;
    assert_eq!(bad_write.status, 400);
    let wrong_type = bridge
        .raw_with_token(&token, "GET", "/rest/api/1/secret", br#"{"id": 5}"#)
        .await;
    assert_eq!(wrong_type.status, 500);
    let huge = bridge
        .raw_with_token(
            &token,
            "POST",
            "/rest/api/1/secret",
            &vec![b' '; 1024 * 1024],
        )
        .await;
    assert_eq!(huge.status, 413);
    let wrong_method = bridge
        .raw_with_token(&token, "PATCH", "/rest/api/1/secret", b"{}")
        .await;
    assert_eq!(wrong_method.status, 405);
    let unknown = bridge
        .raw_with_token(&token, "GET", "/rest/api/2/secret", b"{}")
        .await;
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (404, "404 page not found\n")
    );
    // Unknown fields are ignored and key case does not matter, as in Go.
    let id = bridge.fake.add_secret("k", "v", "", None);
    let odd = bridge
        .raw_with_token(
            &token,
            "GET",
            "/rest/api/1/secret",
            format!(r#"{{"ID":"{id}","extra":[1]}}"#).as_bytes(),
        )
        .await;
    assert_eq!(odd.status, 200, "{}", odd.body);
    for (path, expected) in [("/ready", "ready"), ("/live", "live")] {
        let reply = bridge.raw("GET", path, &[], Vec::new()).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, expected));
    }
    assert_eq!(bridge.process.get("/livez").await.unwrap().status, 200);
    let text = bridge.process.get("/metrics").await.unwrap().body;
    hearth_tests::admin::promtool_check_metrics(&text).unwrap();
    assert!(
        text.contains("hearth_secret_bridge_requests_total{route=\"GET secret\",status=\"500\"}"),
        "{text}"
    );
}

impl Bridge {
    async fn raw_with_token(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> HttpReply {
        let identity = self.fake.identity_url();
        let api = self.fake.api_url();
        let headers = [
            ("Warden-Access-Token", token),
            ("Warden-Api-Url", api.as_str()),
            ("Warden-Identity-Url", identity.as_str()),
        ];
        self.raw(method, path, &headers, body.to_vec()).await
    }
}
