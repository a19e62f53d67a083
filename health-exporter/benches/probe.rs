//! health-exporter's benchmark: `cargo bench -p health-exporter`.
//!
//! The release binary against the fake Kubernetes API, a real PostgreSQL and Redis, and 100 app
//! namespaces whose probes go to stand-in sites, 20 of which accept connections and never
//! answer. With the default interval (30 s), deadline (10 s) and concurrency, measured:
//! - the time one full round of checks takes (goal: at most the deadline plus 10 %);
//! - `/metrics` latency p50/p99 over 1000 scrapes made while the first round runs (goal: p99
//!   at most 20 ms);
//! - resident memory.
//!
//! Beside it in the same run, Debian's exporters doing the same job — postgres_exporter and
//! redis_exporter on the same PostgreSQL and Redis, blackbox_exporter probing the same 100
//! sites the way Prometheus drives it (one `/probe` scrape per site, 10 s budget) — with their
//! scrape latencies and the sum of their resident memory. They are skipped, saying so, when
//! their packages are not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hearth_tests::bench::figure;

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth_tests::admin::{HttpReply, http_get, http_request, resident_kib};
use hearth_tests::sites::{Behaviour, TestSite};
use hearth_tests::{free_port, sample};
use support::{Stack, eventually};

const APPS: usize = 100;
const SILENT: usize = 20;
const SCRAPES: usize = 1000;
const DEADLINE: Duration = Duration::from_secs(10);

fn percentile(sorted: &[Duration], at: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * at).round() as usize]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// p50 and p99 of `count` sequential GETs of `path`, each on a fresh connection, `pause` apart.
async fn scrape_latency(
    addr: SocketAddr,
    path: &str,
    count: usize,
    pause: Duration,
) -> (Duration, Duration, usize) {
    let mut latencies = Vec::with_capacity(count);
    let mut size = 0;
    for _ in 0..count {
        let started = Instant::now();
        let reply = http_get(addr, path).await.unwrap();
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        size = reply.body.len();
        tokio::time::sleep(pause).await;
    }
    latencies.sort();
    (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        size,
    )
}

/// One of Debian's exporters, run as a process on a free loopback port; killed when dropped.
struct Foreign {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Foreign {
    /// Starts `/usr/bin/<binary>`; `None` (said on stderr) when it is not installed.
    async fn start(binary: &'static str, args: &[String], env: &[(&str, &str)]) -> Option<Self> {
        let path = Path::new("/usr/bin").join(binary);
        if !path.is_file() {
            eprintln!("  {binary} is not installed (apt-get install {binary}); skipped");
            return None;
        }
        let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
        let child = Command::new(path)
            .arg(format!("--web.listen-address={addr}"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let foreign = Self {
            name: binary,
            child,
            addr,
        };
        eventually(
            &format!("{binary} answering"),
            Duration::from_secs(30),
            || async {
                http_get(addr, "/metrics")
                    .await
                    .ok()
                    .filter(|reply| reply.status == 200)
            },
        )
        .await;
        Some(foreign)
    }

    fn rss_kib(&self) -> u64 {
        resident_kib(self.child.id(), false).unwrap_or(0)
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blackbox `/probe` scrape as Prometheus sends it, with its timeout header; its latency.
async fn blackbox_probe(addr: SocketAddr, site: SocketAddr) -> (Duration, HttpReply) {
    let path = format!("/probe?module=http_2xx&target=http://{site}/");
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let budget = DEADLINE.as_secs().to_string();
    let reply = http_request(
        stream,
        &addr.to_string(),
        "GET",
        &path,
        &[("X-Prometheus-Scrape-Timeout-Seconds", &budget)],
        Vec::new(),
    )
    .await
    .unwrap();
    (started.elapsed(), reply)
}

fn write_blackbox_config(dir: &Path) -> PathBuf {
    let path = dir.join("blackbox.yml");
    let config = format!(
        "modules:\n  http_2xx:\n    prober: http\n    timeout: {}s\n    http:\n      \
         preferred_ip_protocol: ip4\n",
        DEADLINE.as_secs()
    );
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::main]
async fn main() {
    let stack = Stack::start().await;
    for i in 0..10 {
        stack.database(&format!("app_{i:03}")).await;
    }
    let mut sites = Vec::with_capacity(APPS);
    for i in 0..APPS {
        let behaviour = if i < SILENT {
            Behaviour::Silent
        } else {
            Behaviour::Status(200)
        };
        sites.push(TestSite::start(behaviour).await.unwrap());
    }
    for (i, site) in sites.iter().enumerate() {
        let probe = format!("http://{}/", site.addr());
        stack
            .namespace_with(&format!("app-{i:03}"), &[("hearth.dev/probe", &probe)])
            .await;
    }
    let process = stack
        .exporter(&[
            ("PROBE_INTERVAL", "30s"),
            ("PROBE_TIMEOUT", "10s"),
            ("RUST_LOG", "info"),
        ])
        .await;
    let idle_kib = resident_kib(process.pid(), false).unwrap();
    // Scrapes from the start, so they run while the first round's silent targets are waited
    // out (each holds a check for the whole 10 s deadline).
    let scraping = tokio::spawn(scrape_latency(
        process.admin,
        "/metrics",
        SCRAPES,
        Duration::from_millis(10),
    ));

    // One full round: every app and both databases checked once.
    let text = eventually("one full round", Duration::from_secs(60), || async {
        let text = process.get("/metrics").await.ok()?.body;
        let checked = text
            .lines()
            .filter(|line| line.starts_with("hearth_target_up{"))
            .count();
        (checked == APPS + 2).then_some(text)
    })
    .await;
    let mut first_start = f64::MAX;
    let mut last_end = 0.0_f64;
    for (i, site) in sites.iter().enumerate() {
        let labels = format!(
            r#"{{kind="http",namespace="app-{i:03}",target="{}"}}"#,
            site.addr()
        );
        let ended = sample(
            &text,
            &format!("hearth_probe_last_run_timestamp_seconds{labels}"),
        )
        .unwrap();
        let took = sample(&text, &format!("hearth_probe_duration_seconds{labels}")).unwrap();
        first_start = first_start.min(ended - took);
        last_end = last_end.max(ended);
    }
    let round = Duration::from_secs_f64(last_end - first_start);
    let up = text
        .lines()
        .filter(|line| line.starts_with("hearth_target_up{kind=\"http\"") && line.ends_with(" 1"))
        .count();
    assert_eq!(up, APPS - SILENT, "the answering sites are up");

    let (p50, p99, size) = scraping.await.unwrap();
    let loaded_kib = resident_kib(process.pid(), false).unwrap();
    let peak_kib = resident_kib(process.pid(), true).unwrap();

    println!(
        "health-exporter ({APPS} apps, {SILENT} of them never answering, + PostgreSQL + Redis):"
    );
    println!(
        "  one full round of checks: {:.2} s (deadline {} s; goal <= {:.1} s)",
        round.as_secs_f64(),
        DEADLINE.as_secs(),
        DEADLINE.as_secs_f64() * 1.1
    );
    figure(
        "health-exporter",
        "one round, 100 apps (20 silent)",
        "<= 11 s (deadline + 10 %)",
        &format!("{:.2} s", round.as_secs_f64()),
        Some("deadline 10 s"),
        Some(round.as_secs_f64() / DEADLINE.as_secs_f64()),
    );
    println!(
        "  /metrics over {SCRAPES} scrapes: p50 {:.2} ms, p99 {:.2} ms (goal p99 <= 20 ms), {} KiB",
        ms(p50),
        ms(p99),
        size / 1024
    );
    figure(
        "health-exporter",
        "/metrics p99 during a round",
        "<= 20 ms",
        &format!("{:.2} ms", ms(p99)),
        None,
        None,
    );
    println!(
        "  resident memory: {:.1} MiB (idle before discovery {:.1} MiB, peak {:.1} MiB)",
        mib(loaded_kib),
        mib(idle_kib),
        mib(peak_kib)
    );

    // The same job with Debian's three exporters.
    let dir = tempfile::tempdir().unwrap();
    let dsn = format!("{}?sslmode=disable", stack.postgres.url());
    let postgres = Foreign::start(
        "prometheus-postgres-exporter",
        &[],
        &[("DATA_SOURCE_NAME", dsn.as_str())],
    )
    .await;
    let redis = Foreign::start(
        "prometheus-redis-exporter",
        &[format!(
            "--redis.addr=redis://127.0.0.1:{}",
            stack.redis.port()
        )],
        &[],
    )
    .await;
    let blackbox = Foreign::start(
        "prometheus-blackbox-exporter",
        &[format!(
            "--config.file={}",
            write_blackbox_config(dir.path()).display()
        )],
        &[],
    )
    .await;
    println!("Debian's exporters, the same job:");
    let hearth_p99 = p99;
    let mut foreign_kib = 0;
    let mut complete = true;
    for exporter in [&postgres, &redis] {
        let Some(exporter) = exporter else {
            complete = false;
            continue;
        };
        let (p50, p99, size) =
            scrape_latency(exporter.addr, "/metrics", SCRAPES / 10, Duration::ZERO).await;
        let kib = exporter.rss_kib();
        foreign_kib += kib;
        println!(
            "  {}: /metrics over {} scrapes p50 {:.2} ms, p99 {:.2} ms, {} KiB; resident {:.1} MiB; \
             hearth's /metrics p99 is {:.2}x of its",
            exporter.name,
            SCRAPES / 10,
            ms(p50),
            ms(p99),
            size / 1024,
            mib(kib),
            ms(hearth_p99) / ms(p99),
        );
        figure(
            "health-exporter",
            &format!("/metrics p99 beside {}", exporter.name),
            "no slower",
            &format!("{:.2} ms", ms(hearth_p99)),
            Some(&format!("{:.2} ms", ms(p99))),
            Some(ms(hearth_p99) / ms(p99)),
        );
    }
    match &blackbox {
        None => complete = false,
        Some(exporter) => {
            // One round as Prometheus drives it: a scrape per site, all within the interval.
            let started = Instant::now();
            let results = futures::future::join_all(
                sites
                    .iter()
                    .map(|site| blackbox_probe(exporter.addr, site.addr())),
            )
            .await;
            let round = started.elapsed();
            let (silent, answering) = results.split_at(SILENT);
            for (_, reply) in answering {
                assert!(reply.body.contains("probe_success 1"), "{}", reply.body);
            }
            let mut every: Vec<Duration> = results.iter().map(|(took, _)| *took).collect();
            every.sort();
            let mut answering: Vec<Duration> = answering.iter().map(|(took, _)| *took).collect();
            answering.sort();
            let mut silent: Vec<Duration> = silent.iter().map(|(took, _)| *took).collect();
            silent.sort();
            let kib = exporter.rss_kib();
            foreign_kib += kib;
            println!(
                "  {}: one round of {APPS} /probe scrapes {:.2} s; answering sites p50 {:.2} ms, \
                 p99 {:.2} ms; each never-answering site's scrape {:.2} s (hearth's /metrics p99 \
                 is {:.4}x of that); resident {:.1} MiB",
                exporter.name,
                round.as_secs_f64(),
                ms(percentile(&answering, 0.5)),
                ms(percentile(&answering, 0.99)),
                percentile(&silent, 0.5).as_secs_f64(),
                ms(hearth_p99) / ms(percentile(&silent, 0.5)),
                mib(kib),
            );
            // Its scrapes are the probes themselves, so a silent site's scrape lasts the probe's
            // timeout; hearth's scrape only reads the last results.
            let p99 = percentile(&every, 0.99);
            figure(
                "health-exporter",
                &format!("scrape p99 beside {} (scrapes that probe)", exporter.name),
                "no slower",
                &format!("{:.2} ms", ms(hearth_p99)),
                Some(&format!("{:.2} s", p99.as_secs_f64())),
                Some(ms(hearth_p99) / ms(p99)),
            );
        }
    }
    if complete {
        println!(
            "Resident memory: hearth's one process {:.1} MiB against the three exporters' {:.1} MiB \
             together: {:.2}x",
            mib(loaded_kib),
            mib(foreign_kib),
            loaded_kib as f64 / foreign_kib as f64
        );
        figure(
            "health-exporter",
            "resident memory, the same job",
            "less than the exporters it replaces",
            &format!("{:.1} MiB", mib(loaded_kib)),
            Some(&format!("3 Debian exporters {:.1} MiB", mib(foreign_kib))),
            Some(loaded_kib as f64 / foreign_kib as f64),
        );
    } else {
        println!("Resident memory: not compared, an exporter is missing (see above).");
    }
}
