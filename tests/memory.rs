//! The engine's memory under a burst (issue 16: "RSS 316 MB → 1.55 GB in a
//! burst of new users, never down").
//!
//! `rss_stays_under_the_budget_through_a_burst`: `thaw serve` as a process
//! with `memory.budget_mb` set, on the embedded broker and the real Redis,
//! (`MEMORY_BUDGET_MB`, default 450: the steady state here takes about
//! 310 MB, so the burst puts it under pressure) takes a steady stream, then a burst of `BURST_INTERACTIONS` (default
//! 200,000) interactions from `BURST_USERS` (86,000) new users, about ten
//! times the steady state's users, all waiting at once. Its RSS is read
//! from `/proc` every 50 ms: the peak stays under the budget, and once the
//! burst is published and evicted (`users.max_users`) RSS comes back down.
//! With `MEMORY_REPORT=path` the figures are written there as JSON (`make
//! chaos`); `MEMORY_LOG=path` keeps the engine's log (`MEMORY_RUST_LOG`
//! sets its filter).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::FutureProducer;
use thaw::kafka::EmbeddedBroker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Resident set of `pid`, bytes.
fn rss(pid: u32) -> Option<u64> {
    thaw::serve::memory::resident_bytes_of(&pid.to_string())
}

/// `/metrics` of the engine at `port` (empty while it does not answer).
async fn metrics(port: u16) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

/// Sum of the samples of `family` (every label set).
fn sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the engine has applied `sent` events and every partition's
/// lag is 0 (published and committed); returns the last `/metrics`.
async fn drained(port: u16, sent: u64, what: &str, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let m = metrics(port).await;
        let events = sum(&m, "thaw_ingest_events_total");
        let lag = sum(&m, "thaw_ingest_consumer_lag_messages");
        if events >= sent as f64 && m.contains("thaw_ingest_consumer_lag_messages") && lag == 0.0 {
            return m;
        }
        assert!(
            t0.elapsed() < limit,
            "{what}: {events} of {sent} events applied, lag {lag}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_under_the_budget_through_a_burst() {
    require_text_encoder();
    let budget_mb = env_or("MEMORY_BUDGET_MB", 450);
    let burst = env_or("BURST_INTERACTIONS", 200_000);
    let burst_users = env_or("BURST_USERS", 86_000);
    let max_users = env_or("BURST_MAX_USERS", 20_000);
    let tmp = tempfile::tempdir().unwrap();
    untrained_model(tmp.path());
    // The burst's ~25 MB over enough partitions for the mock's 5 MiB each.
    let broker = EmbeddedBroker::start_with_partitions(
        None,
        &BTreeMap::from([("interactions".to_string(), 16)]),
    )
    .await
    .unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let s = settings(&brokers, tmp.path(), "memory");
    let prefix = s.redis.prefix.clone();
    let producer: FutureProducer = s.kafka.producer_config().create().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    // The steady state: 300 items, 1,000 users with 3 interactions each.
    let n_items = 300u64;
    let mut steady = Vec::new();
    for i in 0..n_items {
        steady.push(item(&format!("m{i}"), &format!("Memory test film {i}"), i));
    }
    for k in 0..3_000u64 {
        steady.push(click(
            &format!("s{}", k % 1_000),
            &format!("m{}", (k * 7 + k / 1_000) % n_items),
            n_items + k,
        ));
    }
    produce(&producer, &steady).await;
    let mut sent = steady.len() as u64;

    let log = tmp.path().join("memory.log");
    let env = [
        ("THAW__MEMORY__BUDGET_MB", budget_mb.to_string()),
        ("THAW__USERS__MAX_USERS", max_users.to_string()),
        ("THAW__HTTP__LISTEN", format!("127.0.0.1:{port}")),
        (
            "RUST_LOG",
            std::env::var("MEMORY_RUST_LOG").unwrap_or_else(|_| "info".into()),
        ),
    ];
    let p = Killed(spawn_serve_with(&s, tmp.path(), &log, &env));
    let pid = p.0.id();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            let mut series = Vec::new();
            let t0 = Instant::now();
            while !done.load(Ordering::SeqCst) {
                if let Some(r) = rss(pid) {
                    peak.fetch_max(r, Ordering::SeqCst);
                    series.push((t0.elapsed().as_millis() as u64, r));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            series
        })
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    drained(port, sent, "the steady stream", Duration::from_secs(120)).await;
    // The idle refresh after it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base = rss(pid).expect("thaw serve is running");
    let base_peak = peak.load(Ordering::SeqCst);

    // The burst: new users, 2–3 interactions each, all produced before the
    // engine catches up.
    let t_burst = Instant::now();
    let clicks: Vec<_> = (0..burst)
        .map(|k| {
            click(
                &format!("b{}", k % burst_users),
                &format!("m{}", (k * 13 + k / burst_users) % n_items),
                10_000 + k,
            )
        })
        .collect();
    for chunk in clicks.chunks(10_000) {
        let sends =
            chunk.iter().map(|e| {
                let key = e.key();
                let payload = e.encode().unwrap();
                let producer = &producer;
                async move {
                    produce_raw(producer, "interactions", Some(key.as_bytes()), &payload).await
                }
            });
        futures::future::join_all(sends).await;
    }
    sent += burst;
    let produced_s = t_burst.elapsed().as_secs_f64();
    let m = drained(port, sent, "the burst", Duration::from_secs(600)).await;
    let burst_s = t_burst.elapsed().as_secs_f64();
    let users_kept = sum(&m, "thaw_core_users");
    let evicted = sum(&m, "thaw_core_users_evicted_total");
    // Back down: the idle refresh, then what the allocator hands back.
    let t_down = Instant::now();
    // Half the rise, or 32 MB over the steady state when the rise was small.
    let target = base + (peak.load(Ordering::SeqCst).saturating_sub(base) / 2).max(32 << 20);
    let mut after = rss(pid).unwrap();
    while after > target && t_down.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = rss(pid).unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let series = sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    let final_m = metrics(port).await;
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    let report = serde_json::json!({
        "budget_mb": budget_mb,
        "rss_steady_mb": mb(base),
        "rss_peak_before_burst_mb": mb(base_peak),
        "rss_peak_mb": mb(peak),
        "rss_after_mb": mb(after),
        "seconds_to_come_down": t_down.elapsed().as_secs_f64(),
        "burst_interactions": burst,
        "burst_users": burst_users,
        "burst_produced_seconds": produced_s,
        "burst_published_seconds": burst_s,
        "max_users": max_users,
        "users_kept": users_kept,
        "users_evicted": evicted,
        "memory_pressure_seconds": sum(&final_m, "thaw_memory_pressure_seconds_total"),
        "rss_series_ms_mb": series.iter().step_by(10).map(|&(t, r)| (t, mb(r))).collect::<Vec<_>>(),
    });
    eprintln!(
        "burst: steady {:.0} MB, peak {:.0} MB (budget {budget_mb} MB), after {:.0} MB; {burst} interactions in {burst_s:.1} s; {users_kept} users kept, {evicted} evicted",
        mb(base),
        mb(peak),
        mb(after)
    );
    if let Ok(path) = std::env::var("MEMORY_LOG") {
        std::fs::write(&path, log_text()).unwrap();
    }
    if let Ok(path) = std::env::var("MEMORY_REPORT") {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    drop(p);
    let mut c = redis().await;
    clear(&mut c, &prefix).await;
    let budget = budget_mb * 1024 * 1024;
    assert!(
        peak < budget,
        "peak RSS {:.0} MB over the {budget_mb} MB budget; log:\n{}",
        mb(peak),
        log_text()
    );
    assert!(
        after <= target,
        "RSS did not come back down: {:.0} MB steady, {:.0} MB peak, {:.0} MB 30 s after the burst",
        mb(base),
        mb(peak),
        mb(after)
    );
    assert!(
        users_kept <= max_users as f64,
        "{users_kept} users kept, max {max_users}"
    );
}
