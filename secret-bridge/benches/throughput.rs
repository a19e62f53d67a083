//! secret-bridge's benchmark: `cargo bench -p secret-bridge`.
//!
//! The release binary serves ESO-shaped `GET /rest/api/1/secret` requests over TLS keep-alive
//! from a warm cache, against the fake Bitwarden. Measured in the same run, beside each figure:
//! - requests/s and p50/p99 latency, against the fake Bitwarden answering the same GET itself
//!   (plain HTTP, no crypto) as the baseline;
//! - Bitwarden calls for 1,000 ESO requests across 50 secrets, against the SDK server's
//!   documented one login per request;
//! - resident memory idle, after 100,000 requests, and after 100,000 more;
//! - under attack, beside the same ESO workload: 300 slow-header TLS connections from another
//!   address (how many the per-address cap refused, how long the longest-lived stayed open) and
//!   20,000 requests with bogus tokens (resident memory, logins sent to Bitwarden), with the
//!   workload's p99 against the clean run's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hearth_tests::bench::figure;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hearth_tests::admin::ServiceProcess;
use hearth_tests::metric;
use hearth_tests::tls::{TestCa, client_trusting};
use hearth_tests::{FakeBitwarden, free_port};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

const CONNECTIONS: usize = 16;
const REQUESTS: usize = 100_000;
const SECRETS: usize = 50;
/// From one address other than ESO's, as a hostile pod's would be: the 256 that one address may
/// hold are accepted and must be closed by the header timeout, the rest are refused at once.
const SLOW_CONNECTIONS: usize = 300;
const ATTACKER: [u8; 4] = [127, 0, 0, 2];
/// The bridge's header timeout, which every slow connection must be closed within (plus the
/// scheduling slack of a loaded 2-core machine).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const BOGUS_TOKENS: usize = 20_000;
/// The ESO workload run beside each attack.
const BESIDE: usize = 20_000;

struct Target {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    path: &'static str,
    headers: Vec<(String, String)>,
    /// The JSON key ESO puts the id in: `id`, or `organizationID` for a list.
    body_key: &'static str,
    expect: u16,
    /// Each request carries a fresh well-formed token Bitwarden does not know (an attack).
    bogus_tokens: bool,
    /// The pause between one connection's requests (zero: as fast as answers come).
    pause: Duration,
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for S {}

/// Sends `total` requests over up to `CONNECTIONS` keep-alive connections; returns each latency.
async fn load(
    target: Arc<Target>,
    ids: Arc<Vec<String>>,
    total: usize,
) -> (Duration, Vec<Duration>) {
    let connections = CONNECTIONS.min(total);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|connection| {
            let target = Arc::clone(&target);
            let ids = Arc::clone(&ids);
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(target.addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let stream: Box<dyn Stream> = match &target.tls {
                    Some(connector) => {
                        let name = ServerName::try_from("secret-bridge.hearth-system.svc").unwrap();
                        Box::new(connector.connect(name, tcp).await.unwrap())
                    }
                    None => Box::new(tcp),
                };
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut latencies = Vec::with_capacity(total / connections);
                for i in 0..total / connections {
                    let id = &ids[(connection * 7 + i) % ids.len()];
                    let mut request = hyper::Request::get(target.path.replace("{id}", id))
                        .header("host", "secret-bridge.hearth-system.svc");
                    for (name, value) in &target.headers {
                        request = request.header(name.as_str(), value.as_str());
                    }
                    if target.bogus_tokens {
                        request =
                            request.header("Warden-Access-Token", FakeBitwarden::unknown_token());
                    }
                    let body = Bytes::from(format!(r#"{{"{}":"{id}"}}"#, target.body_key));
                    let request = request.body(Full::new(body)).unwrap();
                    if !target.pause.is_zero() {
                        tokio::time::sleep(target.pause).await;
                    }
                    let sent = Instant::now();
                    sender.ready().await.unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    assert_eq!(response.status().as_u16(), target.expect);
                    response.into_body().collect().await.unwrap();
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    (started.elapsed(), latencies)
}

fn summary(elapsed: Duration, mut latencies: Vec<Duration>) -> (f64, f64, f64) {
    latencies.sort();
    let at =
        |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0;
    (
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
    )
}

/// A slow-header connection: when it was opened, and the TLS stream (None: refused at once).
type Held = (
    Instant,
    Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
);

/// Opens `count` connections from `ATTACKER` that each send half a request head over TLS and
/// then nothing.
async fn slow_headers(
    addr: SocketAddr,
    client: &tokio_rustls::TlsConnector,
    count: usize,
) -> Vec<Held> {
    use tokio::io::AsyncWriteExt;
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((ATTACKER, 0).into()).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let opened = Instant::now();
        let name = ServerName::try_from("secret-bridge.hearth-system.svc").unwrap();
        // A connection over the per-address cap is closed before its handshake completes.
        let Ok(mut stream) = client.connect(name, tcp).await else {
            held.push((opened, None));
            continue;
        };
        stream
            .write_all(b"GET /rest/api/1/secret HTTP/1.1\r\nHost: secret-bridge\r\nX-Slow: ")
            .await
            .unwrap();
        held.push((opened, Some(stream)));
    }
    held
}

/// How many of `held` the server had refused, and the longest any accepted one stayed open.
async fn until_closed(held: Vec<Held>) -> (usize, Duration) {
    use tokio::io::AsyncReadExt;
    let refused = held.iter().filter(|(_, stream)| stream.is_none()).count();
    let waits = held
        .into_iter()
        .filter_map(|(opened, stream)| Some((opened, stream?)))
        .map(|(opened, mut stream)| async move {
            let mut buffer = [0_u8; 64];
            loop {
                match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buffer)).await
                {
                    Ok(Ok(0) | Err(_)) | Err(_) => return opened.elapsed(),
                    Ok(Ok(_)) => {}
                }
            }
        });
    let longest = futures::future::join_all(waits)
        .await
        .into_iter()
        .max()
        .unwrap_or_default();
    (refused, longest)
}

#[tokio::main]
async fn main() {
    let fake = FakeBitwarden::start().await.unwrap();
    let ids: Arc<Vec<String>> = Arc::new(
        (0..SECRETS)
            .map(|i| fake.add_secret(&format!("key-{i}"), &format!("value-{i}"), "", Some("p")))
            .collect(),
    );
    let token = fake.add_token();

    // Certificate files for the bridge, and a client that trusts only their CA.
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("benchmark CA").unwrap();
    let (cert, key) = ca
        .issue_files(&["secret-bridge.hearth-system.svc"], dir.path(), "tls")
        .unwrap();
    let client = client_trusting(ca.pem()).unwrap();

    let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
    let listen = addr.to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let allowed = fake.api_url().replace("/api", "");
    let process = ServiceProcess::start(
        Path::new(env!("CARGO_BIN_EXE_secret-bridge")),
        &[
            ("LISTEN_ADDR", listen.as_str()),
            ("TLS_CERT_FILE", cert.as_str()),
            ("TLS_KEY_FILE", key.as_str()),
            ("ALLOWED_UPSTREAMS", allowed.as_str()),
            ("CACHE_TTL", "1h"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = metric(
        &process.get("/metrics").await.unwrap().body,
        "process_resident_memory_bytes",
    );

    let headers = vec![
        ("Warden-Access-Token".to_owned(), token.clone()),
        ("Warden-Api-Url".to_owned(), fake.api_url()),
        ("Warden-Identity-Url".to_owned(), fake.identity_url()),
    ];
    let bridge = Arc::new(Target {
        addr,
        tls: Some(client),
        path: "/rest/api/1/secret",
        headers,
        body_key: "id",
        expect: 200,
        bogus_tokens: false,
        pause: Duration::ZERO,
    });

    // 1,000 ESO requests across 50 secrets in one cache window, shaped as ESO sends them for
    // `dataFrom.find`: a list, then GETs.
    let list = Arc::new(Target {
        addr,
        tls: bridge.tls.clone(),
        path: "/rest/api/1/secrets",
        headers: bridge.headers.clone(),
        body_key: "organizationID",
        expect: 200,
        bogus_tokens: false,
        pause: Duration::ZERO,
    });
    load(list, Arc::new(vec![fake.organization()]), 1).await;
    load(
        Arc::clone(&bridge),
        Arc::clone(&ids),
        999 - 999 % CONNECTIONS,
    )
    .await;
    let logins = fake.calls("login");
    let data_calls = fake.data_calls();

    let (elapsed, latencies) = load(Arc::clone(&bridge), Arc::clone(&ids), REQUESTS).await;
    let (rps, p50, p99) = summary(elapsed, latencies);
    let after = metric(
        &process.get("/metrics").await.unwrap().body,
        "process_resident_memory_bytes",
    );
    load(Arc::clone(&bridge), Arc::clone(&ids), REQUESTS).await;
    let after_more = metric(
        &process.get("/metrics").await.unwrap().body,
        "process_resident_memory_bytes",
    );

    // Baseline: an axum server on this machine answering small JSON over plain HTTP, with no
    // TLS, no crypto and no cache (the fake Bitwarden's not-found answer).
    let baseline_target = Arc::new(Target {
        addr: fake
            .api_url()
            .trim_start_matches("http://")
            .trim_end_matches("/api")
            .parse()
            .unwrap(),
        tls: None,
        path: "/nowhere/{id}",
        headers: Vec::new(),
        body_key: "id",
        expect: 404,
        bogus_tokens: false,
        pause: Duration::ZERO,
    });
    let (baseline_elapsed, baseline_latencies) =
        load(baseline_target, Arc::clone(&ids), REQUESTS).await;
    let (baseline_rps, baseline_p50, baseline_p99) = summary(baseline_elapsed, baseline_latencies);

    // Under attack, beside the same ESO workload.
    let rss = || async {
        metric(
            &process.get("/metrics").await.unwrap().body,
            "process_resident_memory_bytes",
        )
    };
    let (clean_elapsed, clean_latencies) =
        load(Arc::clone(&bridge), Arc::clone(&ids), BESIDE).await;
    let (_, _, clean_p99) = summary(clean_elapsed, clean_latencies);
    let held = slow_headers(addr, bridge.tls.as_ref().unwrap(), SLOW_CONNECTIONS).await;
    let rss_slow = rss().await;
    let (slow_elapsed, slow_latencies) = load(Arc::clone(&bridge), Arc::clone(&ids), BESIDE).await;
    let (_, _, slow_p99) = summary(slow_elapsed, slow_latencies);
    let (slow_refused, longest_open) = until_closed(held).await;
    let logins_before = fake.calls("login");
    // The attacker keeps its connections alive, as one after throughput would.
    let headers = bridge
        .headers
        .iter()
        .filter(|(name, _)| name != "Warden-Access-Token")
        .cloned()
        .collect();
    let bogus = Arc::new(Target {
        addr,
        tls: bridge.tls.clone(),
        path: bridge.path,
        headers,
        body_key: "id",
        expect: 400,
        bogus_tokens: true,
        // 1,000 a second: a flood, yet one that leaves this 2-core machine (client and bridge
        // alike) some CPU, so the ESO workload's latency shows the bridge, not the scheduler.
        pause: Duration::from_millis(16),
    });
    let attack = tokio::spawn(load(bogus, Arc::clone(&ids), BOGUS_TOKENS));
    let (bogus_elapsed, bogus_latencies) =
        load(Arc::clone(&bridge), Arc::clone(&ids), BESIDE).await;
    attack.await.unwrap();
    let (_, _, bogus_p99) = summary(bogus_elapsed, bogus_latencies);
    let bogus_logins = fake.calls("login") - logins_before;
    let rss_bogus = rss().await;
    let (after_elapsed, after_latencies) =
        load(Arc::clone(&bridge), Arc::clone(&ids), BESIDE).await;
    let (_, after_p50, after_p99) = summary(after_elapsed, after_latencies);

    let mib = |bytes: f64| bytes / 1024.0 / 1024.0;
    println!(
        "secret-bridge benchmark (release build, {CONNECTIONS} keep-alive connections, {REQUESTS} requests)"
    );
    println!(
        "  ESO GET /secret over TLS, warm cache: {rps:.0} requests/s, p50 {p50:.2} ms, p99 {p99:.2} ms \
         (goal >= 25,000/s, p99 <= 1 ms); baseline plain-HTTP axum JSON {baseline_rps:.0}/s, \
         p50 {baseline_p50:.2} ms, p99 {baseline_p99:.2} ms; ratio {:.2}x",
        rps / baseline_rps
    );
    figure(
        "secret-bridge",
        "ESO GET over TLS, requests/s",
        ">= 25,000/s",
        &format!("{rps:.0}/s"),
        Some(&format!("plain-HTTP axum {baseline_rps:.0}/s")),
        Some(rps / baseline_rps),
    );
    figure(
        "secret-bridge",
        "ESO GET over TLS, p99",
        "<= 1 ms",
        &format!("{p99:.2} ms"),
        Some(&format!("plain-HTTP axum {baseline_p99:.2} ms")),
        Some(p99 / baseline_p99),
    );
    println!(
        "  Bitwarden calls for 1,000 ESO requests across {SECRETS} secrets: {logins} login(s), \
         {data_calls} data call(s) (goal 1 and <= 2); the SDK server before v0.8: 1,000 logins"
    );
    figure(
        "secret-bridge",
        "Bitwarden logins for 1,000 ESO requests",
        "1",
        &logins.to_string(),
        Some("SDK server before v0.8: 1,000"),
        None,
    );
    println!(
        "  resident memory: idle {:.1} MiB, after {REQUESTS} requests {:.1} MiB, after {} {:.1} MiB \
         (goal <= 20 MiB, no growth)",
        mib(idle),
        mib(after),
        2 * REQUESTS,
        mib(after_more)
    );
    // Memory against the idle process, and ESO's p99 beside an attack against the clean run's.
    let memory_figure = |name: &str, bytes: f64| {
        figure(
            "secret-bridge",
            name,
            "<= 20 MiB",
            &format!("{:.1} MiB", mib(bytes)),
            Some(&format!("idle {:.1} MiB", mib(idle))),
            Some(bytes / idle),
        );
    };
    let beside_figure = |name: &str, p99: f64| {
        figure(
            "secret-bridge",
            name,
            "no worse than 2x",
            &format!("{p99:.2} ms"),
            Some(&format!("clean {clean_p99:.2} ms")),
            Some(p99 / clean_p99),
        );
    };
    memory_figure("resident memory after 200,000 requests", after_more);
    println!(
        "  {SLOW_CONNECTIONS} slow-header TLS connections from one address: {slow_refused} refused \
         at once (256 per address), the longest-lived of the rest closed {:.2} s after opening \
         (header timeout {} s); resident memory with them open {:.1} MiB (goal <= 20 MiB); ESO \
         p99 beside them {slow_p99:.2} ms vs {clean_p99:.2} ms clean (ratio {:.2}x)",
        longest_open.as_secs_f64(),
        HEADER_TIMEOUT.as_secs(),
        mib(rss_slow),
        slow_p99 / clean_p99
    );
    figure(
        "secret-bridge",
        "300 slow-header connections, longest open",
        "the header timeout",
        &format!("{:.2} s", longest_open.as_secs_f64()),
        Some(&format!("header timeout {} s", HEADER_TIMEOUT.as_secs())),
        Some(longest_open.as_secs_f64() / HEADER_TIMEOUT.as_secs_f64()),
    );
    memory_figure(
        "resident memory, 300 slow-header connections open",
        rss_slow,
    );
    beside_figure("ESO p99 beside 300 slow-header connections", slow_p99);
    println!(
        "  {BOGUS_TOKENS} requests with bogus tokens, 1,000/s over {CONNECTIONS} keep-alive \
         connections: {bogus_logins} logins sent to Bitwarden (a burst of 20, then 5/s), resident \
         memory after {:.1} MiB (goal <= 20 MiB); ESO p99 beside them {bogus_p99:.2} ms vs \
         {clean_p99:.2} ms clean (ratio {:.2}x); after them p50 {after_p50:.2} ms, p99 \
         {after_p99:.2} ms",
        mib(rss_bogus),
        bogus_p99 / clean_p99
    );
    memory_figure("resident memory after 20,000 bogus tokens", rss_bogus);
    beside_figure("ESO p99 beside 20,000 bogus tokens", bogus_p99);
}
