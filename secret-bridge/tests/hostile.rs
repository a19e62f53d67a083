//! secret-bridge as a hostile pod in the cluster would try it, and against a Bitwarden that
//! misbehaves: the real binary over TLS, a fake Bitwarden that counts every call. Slow-client
//! tests are bounded in count and time, on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use hearth_tests::fake_bitwarden::Fault;
use hearth_tests::metric;
use serde_json::json;
use support::{Bridge, SERVICE_NAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metrics(bridge: &Bridge) -> String {
    bridge.process.get("/metrics").await.unwrap().body
}

/// A TLS connection to the bridge as ESO's client makes it.
async fn connect(bridge: &Bridge) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(SERVICE_NAME).unwrap();
    bridge.tls.connect(name, tcp).await.unwrap()
}

/// Sends raw bytes as a request and reads the answer's status line (or "closed").
async fn raw_status(bridge: &Bridge, request: &[u8]) -> String {
    let mut stream = connect(bridge).await;
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("closed")
        .to_owned()
}

/// Whether the peer has closed `stream` (reads end) within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut buffer = [0_u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn the_allow_list_cannot_be_bypassed() {
    // Allowed: exactly the fake's identity and API paths.
    let bridge = Bridge::start_allowing(&[], |fake| {
        format!("{},{}", fake.identity_url(), fake.api_url())
    })
    .await;
    let token = bridge.fake.add_token();
    let identity = bridge.fake.identity_url();
    let authority = identity
        .trim_start_matches("http://")
        .trim_end_matches("/identity")
        .to_owned();
    let api = bridge.fake.api_url();
    let cases: &[(String, u16)] = &[
        // The fake is allowed: the same URL in other spellings still is.
        (identity.clone(), 200),
        (identity.replace("http://", "HTTP://"), 200),
        (format!("{identity}/"), 200),
        // User info naming an allowed host, a look-alike host, another port, a query, a
        // fragment, a path outside the allowed one: refused before any credential leaves.
        (format!("http://{authority}@{authority}/identity"), 400),
        (format!("http://{authority}.evil.invalid/identity"), 400),
        (identity.replace("127.0.0.1", "localhost"), 403),
        (
            format!("http://{}:1/identity", authority.split(':').next().unwrap()),
            403,
        ),
        (format!("{identity}?next=1"), 400),
        (format!("{identity}#x"), 400),
        (format!("http://{authority}/identityx"), 403),
        (format!("http://{authority}/identity/../elsewhere"), 403),
        ("https://identity.bitwarden.com".to_owned(), 403),
    ];
    for (url, expected) in cases {
        let headers = [
            ("Warden-Access-Token", token.as_str()),
            ("Warden-Api-Url", api.as_str()),
            ("Warden-Identity-Url", url.as_str()),
        ];
        let body = json!({"organizationID": bridge.fake.organization()});
        let reply = bridge
            .raw(
                "GET",
                "/rest/api/1/secrets",
                &headers,
                body.to_string().into_bytes(),
            )
            .await;
        assert_eq!(reply.status, *expected, "{url}: {}", reply.body);
    }
    assert_eq!(
        bridge.fake.calls("login"),
        1,
        "only the allowed spellings logged in"
    );

    // A URL header that is not plain text is an error, not "use Bitwarden's cloud".
    let request = format!(
        "GET /rest/api/1/secrets HTTP/1.1\r\nHost: {SERVICE_NAME}\r\nWarden-Access-Token: \
         {token}\r\nWarden-Api-Url: {api}\r\nWarden-Identity-Url: "
    );
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(
        b"http://vault.home.arpa/identity\xc2\xa0\r\nContent-Length: 2\r\n\r\n{}",
    );
    let status = raw_status(&bridge, &bytes).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_and_connections_capped() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    let rss_before = hearth_tests::admin::resident_kib(bridge.process.pid(), false).unwrap();

    // 100 TLS connections sending a header slowly, 100 holding a large unfinished header,
    // 20 idle after a request: all closed by the 5 s header timeout.
    let mut slow = Vec::new();
    for i in 0..200 {
        let mut stream = connect(&bridge).await;
        let start = format!("GET /rest/api/1/secret HTTP/1.1\r\nHost: {SERVICE_NAME}\r\n");
        stream.write_all(start.as_bytes()).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(format!("X-Padding: {}", "a".repeat(12_000)).as_bytes())
                .await
                .unwrap();
        }
        slow.push(stream);
    }
    let trickle = async {
        for _ in 0..20 {
            for stream in slow.iter_mut().step_by(2).skip(1) {
                let _ = stream.write_all(b"x").await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    // Meanwhile the bridge serves ESO.
    let (_, reply) = tokio::join!(trickle, bridge.get_secret(&token, &id));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let rss_during = hearth_tests::admin::resident_kib(bridge.process.pid(), false).unwrap();
    let started = Instant::now();
    for stream in &mut slow {
        assert!(closed_within(stream, Duration::from_secs(8)).await);
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(
        rss_during < rss_before + 12 * 1024,
        "200 slow connections took RSS from {rss_before} KiB to {rss_during} KiB"
    );

    // An idle keep-alive connection goes after the same 5 s.
    let mut idle = connect(&bridge).await;
    idle.write_all(format!("GET /live HTTP/1.1\r\nHost: {SERVICE_NAME}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut first = [0_u8; 64];
    let n = idle.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut idle, Duration::from_secs(8)).await);

    // The admin listener: the same timeouts, and at most 16 connections from one address (of 32
    // in all), so one client cannot lock out the kubelet's probes and Prometheus.
    let admin = bridge.process.admin;
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0;
    for stream in &mut held {
        if closed_within(stream, Duration::from_millis(50)).await {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 24,
        "40 connections from one address against a cap of 16"
    );
    let started = Instant::now();
    for stream in &mut held {
        assert!(closed_within(stream, Duration::from_secs(8)).await);
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    let text = metrics(&bridge).await;
    assert!(
        metric(
            &text,
            "hearth_http_connections_refused_total{listener=\"admin\"}"
        ) >= 8.0,
        "{text}"
    );
}

#[tokio::test]
async fn metric_labels_never_grow_from_what_clients_send() {
    let bridge = Bridge::start(&[]).await;
    for i in 0..300 {
        let method = format!("INVENTED{i}");
        let status = raw_status(
            &bridge,
            format!("{method} /rest/api/1/secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(status.starts_with("HTTP/1.1 405"), "{status}");
        let _ = raw_status(
            &bridge,
            format!("GET /invented/{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    }
    let text = metrics(&bridge).await;
    let series = text
        .lines()
        .filter(|line| line.starts_with("hearth_secret_bridge_requests_total{"))
        .count();
    assert!(series <= 4, "{series} series:\n{text}");
    assert!(!text.contains("INVENTED") && !text.contains("invented"));
}

#[tokio::test]
async fn bogus_tokens_cost_bounded_memory_calls_and_time() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
    let rss_before = hearth_tests::admin::resident_kib(bridge.process.pid(), false).unwrap();
    let started = Instant::now();
    // 2,000 well-formed tokens Bitwarden does not know, 8 at a time.
    let bogus: Vec<String> = (0..2000)
        .map(|_| hearth_tests::FakeBitwarden::unknown_token())
        .collect();
    for chunk in bogus.chunks(8) {
        let replies =
            futures::future::join_all(chunk.iter().map(|t| bridge.get_secret(t, &id))).await;
        assert!(replies.iter().all(|r| r.status == 400));
    }
    let elapsed = started.elapsed();
    let logins = bridge.fake.calls("login");
    // Logins of unknown tokens are rate limited: at most a burst and 5 a second.
    let allowed = 20.0 + 5.0 * elapsed.as_secs_f64() + 1.0;
    assert!(
        (logins as f64) <= allowed + 1.0,
        "{logins} logins in {elapsed:?}"
    );
    // A bogus token that failed is answered from memory when it comes again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(bridge.get_secret(&bogus[1999], &id).await.status, 400);
    let logins = bridge.fake.calls("login");
    for _ in 0..20 {
        assert_eq!(bridge.get_secret(&bogus[1999], &id).await.status, 400);
    }
    assert_eq!(bridge.fake.calls("login"), logins);
    let text = metrics(&bridge).await;
    assert_eq!(metric(&text, "hearth_secret_bridge_sessions"), 1.0);
    let rss_after = hearth_tests::admin::resident_kib(bridge.process.pid(), false).unwrap();
    assert!(
        rss_after < rss_before + 4 * 1024,
        "RSS from {rss_before} to {rss_after} KiB"
    );
    // And the real token is served throughout, from its session.
    assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
}

#[tokio::test]
async fn a_429_on_a_data_call_holds_the_token_back() {
    let bridge = Bridge::start(&[("CACHE_TTL", "0")]).await;
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
    bridge.fake.fail_next(
        "get",
        Fault {
            status: 429,
            body: "Slow down! Too many requests. Try again in 30s.".into(),
            retry_after: Some(30),
        },
    );
    assert_eq!(bridge.get_secret(&token, &id).await.status, 400);
    let gets = bridge.fake.calls("get");
    for _ in 0..5 {
        let reply = bridge.get_secret(&token, &id).await;
        assert_eq!(reply.status, 400);
        assert!(reply.body.contains("rate limit"), "{}", reply.body);
    }
    assert_eq!(bridge.fake.calls("get"), gets, "nothing reached Bitwarden");
    // A number no Instant can hold is clamped, not a panic.
    let other = bridge.fake.add_token();
    bridge.fake.fail_next(
        "login",
        Fault {
            status: 429,
            body: String::new(),
            retry_after: Some(u64::MAX),
        },
    );
    assert_eq!(bridge.get_secret(&other, &id).await.status, 400);
    assert_eq!(bridge.process.get("/livez").await.unwrap().status, 200);
}

#[tokio::test]
async fn a_huge_token_lifetime_is_clamped_not_a_panic() {
    let bridge = Bridge::start(&[]).await;
    bridge.fake.set_expires_in(1 << 63);
    let token = bridge.fake.add_token();
    let id = bridge.fake.add_secret("k", "v", "", None);
    assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
    bridge.fake.set_expires_in(u64::MAX);
    let other = bridge.fake.add_token();
    assert_eq!(bridge.get_secret(&other, &id).await.status, 200);
    assert_eq!(bridge.process.get("/livez").await.unwrap().status, 200);
}

#[tokio::test]
async fn no_stale_list_after_a_write() {
    let bridge = Bridge::start(&[]).await;
    let token = bridge.fake.add_token();
    bridge.fake.add_secret("existing", "1", "", None);
    // The list and its value prefetch are slow; a PushSecret creates a secret meanwhile.
    for kind in ["list", "sync"] {
        bridge.fake.set_delay_for(kind, Duration::from_millis(800));
    }
    let organization = bridge.fake.organization();
    let listing = bridge.list(&token);
    let creating = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bridge
            .eso(
                "POST",
                "/rest/api/1/secret",
                &token,
                json!({"key": "pushed", "value": "2", "note": "", "organizationId": organization, "projectIds": []}),
            )
            .await
    };
    let (first, created) = tokio::join!(listing, creating);
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The next list shows the new secret, so ESO never pushes a duplicate.
    let keys: Vec<String> = bridge
        .list(&token)
        .await
        .iter()
        .map(|item| item["key"].as_str().unwrap().to_owned())
        .collect();
    assert!(keys.contains(&"pushed".to_owned()), "{keys:?}");
}

#[tokio::test]
async fn a_slow_but_working_bitwarden_still_answers_lists() {
    let bridge = Bridge::start(&[("UPSTREAM_TIMEOUT", "4s")]).await;
    let token = bridge.fake.add_token();
    for i in 0..5 {
        bridge.fake.add_secret(&format!("k{i}"), "v", "", None);
    }
    bridge.fake.set_delay(Duration::from_millis(2900));
    let started = Instant::now();
    let list = bridge.list(&token).await;
    assert_eq!(list.len(), 5);
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// How often `needle` occurs in the readable, writable memory of process `pid`.
fn occurrences_in_memory(pid: u32, needle: &[u8]) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut memory = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut region = vec![0_u8; usize::try_from(end - start).unwrap()];
        if memory.seek(SeekFrom::Start(start)).is_err() || memory.read_exact(&mut region).is_err() {
            continue;
        }
        found += region
            .windows(needle.len())
            .filter(|window| *window == needle)
            .count();
    }
    found
}

#[tokio::test]
async fn keys_and_expired_values_are_wiped_from_memory() {
    let bridge = Bridge::start(&[("CACHE_TTL", "1s")]).await;
    let token = bridge.fake.add_token();
    let value = "WipeMe-0123456789-PlaintextValue";
    let id = bridge.fake.add_secret("k", value, "", None);
    // Five logins (each bearer expires, so the next call logs in again).
    for _ in 0..5 {
        bridge.fake.expire_bearers();
        assert_eq!(bridge.get_secret(&token, &id).await.status, 200);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(bridge.fake.calls("login"), 5);
    let key = bridge.fake.organization_key();
    let pid = bridge.process.pid();
    // One session is live: its key is held once (encryption and MAC halves), and no copy of
    // an earlier session's key or of a dropped cipher's key schedule is left behind.
    assert!(occurrences_in_memory(pid, &key[..32]) <= 1);
    assert!(occurrences_in_memory(pid, &key[32..]) <= 1);
    // Values read are dropped from the cache once CACHE_TTL has passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = metrics(&bridge).await;
    assert_eq!(metric(&text, "hearth_secret_bridge_cached_secrets"), 0.0);
}
