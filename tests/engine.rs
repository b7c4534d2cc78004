//! The streaming engine end to end: the embedded Kafka broker (librdkafka's
//! mock cluster, real protocol on a real port), the real Redis at
//! `REDIS_URL` (default 127.0.0.1:6379), ONNX Runtime with the real text
//! encoder (`make models`), and an item model with MPKG's initial weights
//! (the mechanics under test do not depend on training).
//!
//! 1. `serve_end_to_end`: items, relations and interactions, malformed
//!    messages among them; every item gets an embedding, a zero-shot item
//!    published later gets one, a user with three interactions gets a list
//!    without their items, the malformed messages are in the DLQ with their
//!    reasons, and nothing else is lost. A new model in the folder is
//!    written under its own version before `thaw:model` flips to it; the
//!    example reader (`examples/reader.rs`) reads one version throughout.
//! 2. `kill_and_restart_converges`: `thaw serve` as a process, killed with
//!    SIGKILL mid-stream and restarted, ends with the Redis state of an
//!    uninterrupted run.
//! 3. `chaos_kills_and_restarts_converge`: the chaos suite's kill points
//!    (`make chaos` runs it with `CHAOS_KILLS=20`): `thaw serve` with
//!    snapshots on, killed with SIGKILL at seeded points while the stream
//!    is produced, with a Redis restart (its data lost) and a broker outage
//!    among the kills; it ends with 0 keys different from an uninterrupted
//!    run.

mod common;
/// The serving-side reader of `examples/`, run against the engine's keys.
#[path = "../examples/reader.rs"]
mod reader;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::FutureProducer;
use thaw::ingest::Event;
use thaw::kafka::{EmbeddedBroker, KafkaSettings};
use thaw::serve::Engine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_end_to_end() {
    require_text_encoder();
    let tmp = tempfile::tempdir().unwrap();
    untrained_model(tmp.path());
    let broker = EmbeddedBroker::start(None).await.unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let mut s = settings(&brokers, tmp.path(), "e2e");
    s.model.reload_check_secs = 1;
    let prefix = s.redis.prefix.clone();
    let producer: FutureProducer = s.kafka.producer_config().create().unwrap();

    let mut events = Vec::new();
    for i in 0..30 {
        events.push(item(
            &format!("m{i}"),
            &format!("Movie number {i}"),
            1_000 + i,
        ));
    }
    for i in 0..29 {
        events.push(edge(
            &format!("m{i}"),
            &format!("m{}", i + 1),
            "also_bought",
            2_000 + i,
        ));
    }
    events.push(edge("m0", "m5", "also_viewed", 2_100));
    events.push(edge("m0", "m7", "not_a_model_relation", 2_101));
    for (u, its) in [("alice", vec![1, 2, 3]), ("bob", vec![4, 5, 6, 7, 8])] {
        for (k, i) in its.into_iter().enumerate() {
            events.push(click(u, &format!("m{i}"), 3_000 + k as u64));
        }
    }
    produce(&producer, &events).await;
    // Malformed: bad JSON, a missing field, a key that does not match, too big.
    type Raw<'a> = (&'a str, Option<&'a [u8]>, Vec<u8>);
    let bad: Vec<Raw> = vec![
        ("items", Some(b"x1".as_slice()), b"{not json".to_vec()),
        (
            "interactions",
            Some(b"carol".as_slice()),
            br#"{"user_id":"carol","kind":"click","ts":5}"#.to_vec(),
        ),
        (
            "items",
            Some(b"other".as_slice()),
            br#"{"item_id":"m99","title":"t","ts":5}"#.to_vec(),
        ),
        ("items", Some(b"big".as_slice()), vec![b' '; 70_000]),
    ];
    for (t, k, p) in &bad {
        produce_raw(&producer, t, *k, p).await;
    }
    let first = (events.len() + bad.len()) as u64;

    let engine = Engine::start(s.clone()).await.expect("engine started");
    let (metrics, progress) = (engine.metrics.clone(), engine.progress.clone());
    wait_for(&progress, first, "first batch").await;
    let mut c = redis().await;
    for i in 0..30 {
        let e = emb(&mut c, &format!("{prefix}:test-1:item:m{i}")).await;
        let e = e.unwrap_or_else(|| panic!("item m{i} has no embedding"));
        assert_eq!(e.len(), 64);
        assert!(e.iter().all(|x| x.is_finite()));
    }
    let alice = recs(&mut c, &format!("{prefix}:test-1:recs:{{alice}}")).await;
    assert_eq!(alice.len(), 10, "top 10 of 27 candidates");
    for (id, _) in &alice {
        assert!(
            !["m1", "m2", "m3"].contains(&id.as_str()),
            "alice's own item {id} recommended"
        );
    }
    assert!(alice.windows(2).all(|w| w[0].1 >= w[1].1));
    assert!(emb(&mut c, &format!("{prefix}:test-1:user:{{alice}}"))
        .await
        .is_some());
    let model: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{prefix}:model"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(model.get("version").map(String::as_str), Some("test-1"));

    // A zero-shot item arrives after startup, linked to m0.
    let before_m0 = emb(&mut c, &format!("{prefix}:test-1:item:m0"))
        .await
        .unwrap();
    let later = vec![
        item("fresh", "A brand new film nobody has seen", 9_000),
        edge("fresh", "m0", "also_viewed", 9_001),
    ];
    produce(&producer, &later).await;
    wait_for(&progress, first + 2, "zero-shot item").await;
    let fresh = emb(&mut c, &format!("{prefix}:test-1:item:fresh")).await;
    assert!(fresh.is_some(), "the zero-shot item has an embedding");
    let after_m0 = emb(&mut c, &format!("{prefix}:test-1:item:m0"))
        .await
        .unwrap();
    assert_ne!(
        before_m0, after_m0,
        "m0's embedding follows its new neighbour"
    );

    // Malformed messages are in the DLQ with reasons; nothing else is.
    let dl = dead_letters(&brokers);
    let mut reasons: Vec<String> = dl
        .iter()
        .map(|d| d.reason_code.as_str().to_string())
        .collect();
    reasons.sort();
    assert_eq!(dl.len(), 4, "{reasons:?}");
    assert!(dl.iter().all(|d| !d.reason.is_empty() && d.offset >= 0));
    assert!(reasons.contains(&"oversized".to_string()), "{reasons:?}");
    assert_eq!(progress.dead_lettered.load(Ordering::SeqCst), 4);
    // Nothing lost: 31 items and 2 users published, the unknown relation counted.
    assert_eq!(
        keys(&mut c, &format!("{prefix}:test-1:item:*")).await.len(),
        31
    );
    assert_eq!(
        keys(&mut c, &format!("{prefix}:test-1:recs:*")).await.len(),
        2
    );
    let text = metrics.encode();
    assert!(
        text.contains("thaw_core_unknown_relations_total 1"),
        "unknown relation counted, without its name as a label"
    );
    assert!(!text.contains("not_a_model_relation"));
    assert!(
        text.contains("thaw_ingest_events_total{topic=\"item-relations\",outcome=\"ignored\"} 1"),
        "an unknown relation's event counts as ignored, not applied: {text}"
    );

    // A new model version in the folder: every item is recomputed and
    // published under it, then `thaw:model` flips.
    untrained_model_version(tmp.path(), "test-2", 99);
    let t0 = Instant::now();
    loop {
        let v: Option<String> = redis::cmd("HGET")
            .arg(format!("{prefix}:model"))
            .arg("version")
            .query_async(&mut c)
            .await
            .unwrap();
        if v.as_deref() == Some("test-2") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the new model was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new version's keys, written in full before the flip; the old
    // version's left to expire (redis.old_version_ttl_secs).
    let root: Option<String> = redis::cmd("HGET")
        .arg(format!("{prefix}:model"))
        .arg("root")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(root, Some(format!("{prefix}:test-2")));
    assert_eq!(
        keys(&mut c, &format!("{prefix}:test-2:item:*")).await.len(),
        31
    );
    assert_eq!(
        keys(&mut c, &format!("{prefix}:test-2:recs:*")).await.len(),
        2
    );
    let old_ttl: i64 = redis::cmd("TTL")
        .arg(format!("{prefix}:test-1:item:m0"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        (1..=300).contains(&old_ttl),
        "the old version expires after the grace period: TTL {old_ttl}"
    );
    for k in keys(&mut c, &format!("{prefix}:test-2:item:*")).await {
        let m: String = redis::cmd("HGET")
            .arg(&k)
            .arg("model")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(
            m, "test-2",
            "{k} still under the old version after the flip"
        );
    }
    let swapped_m0 = emb(&mut c, &format!("{prefix}:test-2:item:m0"))
        .await
        .unwrap();
    let view = reader::read_user(&mut c, &prefix, "alice")
        .await
        .unwrap()
        .expect("a model is published");
    assert_eq!(view.version, "test-2");
    assert_eq!(view.recs.len(), 10);
    assert_eq!(view.embedding.map(|e| e.len()), Some(64));
    assert_ne!(swapped_m0, after_m0, "new weights, new embedding");
    assert!(text.contains("thaw_infer_provider_info"));

    engine.shutdown().await.expect("clean shutdown");
    clear(&mut c, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_converges() {
    require_text_encoder();
    let tmp = tempfile::tempdir().unwrap();
    untrained_model(tmp.path());
    let broker = EmbeddedBroker::start(None).await.unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let producer: FutureProducer = KafkaSettings::with_brokers(&brokers)
        .producer_config()
        .create()
        .unwrap();
    // 150 items, a power-law-ish graph, 40 users; produced before either run.
    let mut events = Vec::new();
    for i in 0..150u64 {
        events.push(item(
            &format!("i{i}"),
            &format!("Item {i} of the catalogue"),
            i,
        ));
        if i > 0 {
            events.push(edge(
                &format!("i{i}"),
                &format!("i{}", (i * 7) % i),
                "also_bought",
                200 + i,
            ));
            events.push(edge(
                &format!("i{i}"),
                &format!("i{}", i / 2),
                "also_viewed",
                400 + i,
            ));
        }
    }
    for u in 0..40u64 {
        for k in 0..(3 + u % 6) {
            events.push(click(
                &format!("u{u}"),
                &format!("i{}", (u * 13 + k * 29) % 150),
                1_000 + u * 10 + k,
            ));
        }
    }
    produce(&producer, &events).await;
    producer_flush(&producer);

    let mut c = redis().await;
    // Uninterrupted run.
    let mut a = settings(&brokers, tmp.path(), "whole");
    a.ingest.max_batch = 25;
    let log_a = tmp.path().join("whole.log");
    let mut p = spawn_serve(&a, tmp.path(), &log_a);
    let whole = converge(&mut c, &a.redis.prefix, None).await;
    p.kill().unwrap();
    p.wait().unwrap();
    assert_eq!(whole.items.len(), 150);
    assert_eq!(whole.recs.len(), 40);

    // Killed mid-stream (SIGKILL: no drain, no commit), then restarted.
    let mut b = settings(&brokers, tmp.path(), "killed");
    b.ingest.max_batch = 25;
    let log_b = tmp.path().join("killed.log");
    let mut p = spawn_serve(&b, tmp.path(), &log_b);
    let t0 = Instant::now();
    loop {
        let n = keys(&mut c, &format!("{}:test-1:item:*", b.redis.prefix))
            .await
            .len();
        if n >= 20 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the engine published nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.kill().unwrap();
    p.wait().unwrap();
    let partial = snapshot(&mut c, &b.redis.prefix).await;
    assert!(
        !differences(&whole, &partial).is_empty(),
        "the kill came too late to test anything"
    );
    let restart_log = tmp.path().join("restarted.log");
    let mut p = spawn_serve(&b, tmp.path(), &restart_log);
    converge(&mut c, &b.redis.prefix, Some(&whole)).await;
    p.kill().unwrap();
    p.wait().unwrap();
    let log = std::fs::read_to_string(&restart_log).unwrap();
    let restored = log
        .lines()
        .find(|l| l.contains("state restored from the log"))
        .unwrap_or_else(|| panic!("no restore line in the restarted engine's log:\n{log}"));
    eprintln!("{restored}");
    assert!(
        !restored.contains("messages=0 "),
        "the restart re-read nothing: the kill came before any commit ({restored})"
    );
    for prefix in [&a.redis.prefix, &b.redis.prefix] {
        clear(&mut c, prefix).await;
    }
}

/// Redis goes away mid-stream: the engine keeps the batch, stops reading and
/// committing (backpressure), reports not-ready, and publishes the batch once
/// Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_applies_backpressure() {
    require_text_encoder();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis_proc = start_redis(port);
    let tmp = tempfile::tempdir().unwrap();
    untrained_model(tmp.path());
    let broker = EmbeddedBroker::start(None).await.unwrap();
    let mut s = settings(broker.bootstrap_servers(), tmp.path(), "outage");
    s.redis.url = format!("redis://127.0.0.1:{port}");
    s.redis.retry_max_ms = 200;
    s.redis.repair_check_ms = 300;
    let prefix = s.redis.prefix.clone();
    let producer: FutureProducer = s.kafka.producer_config().create().unwrap();
    let first: Vec<Event> = (0..10)
        .map(|i| item(&format!("a{i}"), "An item", i))
        .collect();
    produce(&producer, &first).await;

    let engine = Engine::start(s.clone()).await.expect("engine started");
    let (metrics, health, progress) = (
        engine.metrics.clone(),
        engine.health.clone(),
        engine.progress.clone(),
    );
    wait_for(&progress, 10, "before the outage").await;
    assert!(health.is_ready());

    redis_proc.kill().unwrap();
    redis_proc.wait().unwrap();
    let second: Vec<Event> = (0..5)
        .map(|i| item(&format!("b{i}"), "A later item", 100 + i))
        .collect();
    produce(&producer, &second).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        progress.messages.load(Ordering::SeqCst),
        10,
        "nothing counted as published while Redis is down"
    );
    assert!(!health.is_ready(), "not ready while Redis is down");
    let text = metrics.encode();
    assert!(text.contains("thaw_publish_redis_errors_total"));
    assert!(
        text.contains("thaw_serve_errors_total{stage=\"publish\",kind=\"retryable\"}"),
        "{text}"
    );

    let _redis_back = start_redis(port);
    wait_for(&progress, 15, "after the outage").await;
    let url = format!("redis://127.0.0.1:{port}");
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for i in 0..5 {
        assert!(
            emb(&mut c, &format!("{prefix}:test-1:item:b{i}"))
                .await
                .is_some(),
            "b{i} published after the outage"
        );
    }
    // The restarted Redis kept nothing (no persistence): the engine sees the
    // model marker gone and publishes everything again, the items from
    // before the outage and the marker included (it used to leave them
    // missing until its own restart).
    let t0 = Instant::now();
    loop {
        let mut missing = Vec::new();
        for i in 0..10 {
            if emb(&mut c, &format!("{prefix}:test-1:item:a{i}"))
                .await
                .is_none()
            {
                missing.push(format!("a{i}"));
            }
        }
        let version: Option<String> = redis::cmd("HGET")
            .arg(format!("{prefix}:model"))
            .arg("version")
            .query_async(&mut c)
            .await
            .unwrap();
        if missing.is_empty() && version.as_deref() == Some("test-1") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not repaired after 30 s: missing {missing:?}, model {version:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metrics.encode().contains("thaw_publish_repairs_total 1"));
    assert!(health.is_ready());
    engine.shutdown().await.expect("clean shutdown");
    let mut back = _redis_back;
    let _ = back.kill();
    let _ = back.wait();
}

/// A number from the environment, else `default`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// Messages re-read and whether a snapshot was loaded, from an engine's log
/// (`None`: it was killed before its restore finished).
fn restore_line(log: &str) -> Option<(u64, bool)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("state restored from the log"))?;
    let n = line
        .split("messages=")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some((n, line.contains("from_snapshot=true")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_and_restarts_converge() {
    use rand::{Rng, SeedableRng};
    require_text_encoder();
    let kills = env_or("CHAOS_KILLS", 3).max(3);
    let seed = env_or("CHAOS_SEED", 1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis_proc = Killed(start_redis(port));
    let url = format!("redis://127.0.0.1:{port}");
    let tmp = tempfile::tempdir().unwrap();
    untrained_model(tmp.path());
    let broker = EmbeddedBroker::start(None).await.unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let new_producer = || -> FutureProducer {
        KafkaSettings::with_brokers(&brokers)
            .producer_config()
            .create()
            .unwrap()
    };
    let mut producer = new_producer();

    // The stream, produced in as many chunks as there are kill rounds (plus
    // one): items, edges of two relations, clicks, in time order.
    let n_items = 100 + 10 * kills;
    let mut events = Vec::new();
    for i in 0..n_items {
        events.push(item(
            &format!("i{i}"),
            &format!("Item {i} of the catalogue"),
            i,
        ));
        if i > 0 {
            events.push(edge(
                &format!("i{i}"),
                &format!("i{}", (i * 7) % i),
                "also_bought",
                i,
            ));
            events.push(edge(
                &format!("i{i}"),
                &format!("i{}", i / 2),
                "also_viewed",
                i,
            ));
        }
        if i % 3 == 0 {
            let u = rng.random_range(0..n_items / 4);
            let j = rng.random_range(0..=i);
            events.push(click(&format!("u{u}"), &format!("i{j}"), i));
        }
    }
    let chunk = events.len().div_ceil(kills as usize + 1);

    let mut s = settings(&brokers, tmp.path(), "chaos");
    s.redis.url = url.clone();
    s.ingest.max_batch = 25;
    let snaps = tmp.path().join("snapshots");
    let env = [
        ("THAW__SNAPSHOT__DIR", snaps.display().to_string()),
        ("THAW__SNAPSHOT__EVERY_SECS", "1".to_string()),
        // Rarer idle snapshots: kills then find the latest usable snapshot
        // behind the committed offsets, and the restore reads the log after it.
        ("THAW__INGEST__IDLE_MS", "3000".to_string()),
        ("THAW__REDIS__REPAIR_CHECK_MS", "500".to_string()),
        ("THAW__REDIS__RETRY_MAX_MS", "500".to_string()),
    ];
    let (redis_round, broker_round) = (kills / 3, 2 * kills / 3);
    let mut restores = Vec::new();
    for k in 0..kills {
        let round = &events[k as usize * chunk..((k as usize + 1) * chunk).min(events.len())];
        let log = tmp.path().join(format!("chaos-{k}.log"));
        let mut p = spawn_serve_with(&s, tmp.path(), &log, &env);
        // Seeded: from the start (model load, restore, group join) to well
        // into the stream. The round's events are produced meanwhile, in ten
        // steps, so that the kill lands while they arrive.
        let delay = Duration::from_millis(rng.random_range(500..9000));
        for part in round.chunks(round.len().div_ceil(10).max(1)) {
            produce(&producer, part).await;
            producer_flush(&producer);
            tokio::time::sleep(delay / 10).await;
        }
        if k == redis_round {
            // Redis restarts without its data while the engine runs.
            drop(redis_proc);
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis_proc = Killed(start_redis(port));
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if k == broker_round {
            broker.set_down(true).unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            broker.set_down(false).unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            // The test's own producer may still be backing off its
            // reconnects; the engine is what is under test.
            producer = new_producer();
        }
        p.kill().unwrap();
        p.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        restores.push(restore_line(&text));
        eprintln!(
            "kill {k} after {delay:?}: restore {:?}",
            restores.last().unwrap()
        );
    }
    produce(
        &producer,
        &events[(kills as usize * chunk).min(events.len())..],
    )
    .await;
    producer_flush(&producer);

    let mut c = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The uninterrupted run, on the whole log.
    let mut a = settings(&brokers, tmp.path(), "chaosref");
    a.redis.url = url.clone();
    a.ingest.max_batch = 25;
    let mut p = spawn_serve(&a, tmp.path(), &tmp.path().join("reference.log"));
    let whole = converge(&mut c, &a.redis.prefix, None).await;
    p.kill().unwrap();
    p.wait().unwrap();
    assert_eq!(whole.items.len() as u64, n_items);

    // Nothing left from the killed runs: the final engine finds the model
    // marker gone and publishes its whole restored state, so every key
    // compared below comes from the state the last restore rebuilt.
    clear(&mut c, &s.redis.prefix).await;
    let log = tmp.path().join("chaos-final.log");
    let mut p = spawn_serve_with(&s, tmp.path(), &log, &env);
    let end = converge(&mut c, &s.redis.prefix, Some(&whole)).await;
    p.kill().unwrap();
    p.wait().unwrap();
    let divergent = differences(&whole, &end).len();
    let text = std::fs::read_to_string(&log).unwrap();
    restores.push(restore_line(&text));
    let from_snapshot = restores.iter().flatten().filter(|r| r.1).count();
    let report = serde_json::json!({
        "seed": seed,
        "kill_points": kills,
        "redis_restarts": 1,
        "broker_outages": 1,
        "messages": events.len(),
        "restores": restores.iter().flatten().count(),
        "restores_from_snapshot": from_snapshot,
        "messages_reread": restores.iter().flatten().map(|r| r.0).collect::<Vec<_>>(),
        "keys_compared": whole.items.len() + whole.users.len() + whole.recs.len(),
        "divergent_keys": divergent,
    });
    eprintln!("chaos: {report}");
    if let Ok(path) = std::env::var("CHAOS_REPORT") {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    assert_eq!(divergent, 0);
    assert!(
        from_snapshot >= 1,
        "no restart loaded a snapshot: {restores:?}"
    );
    let after_snapshot = restores
        .iter()
        .flatten()
        .filter(|r| r.1 && r.0 > 0 && (r.0 as usize) < events.len())
        .count();
    eprintln!("restores from a snapshot that read the log after it: {after_snapshot}");
    if kills >= 10 {
        assert!(
            after_snapshot >= 1,
            "no restore read the log after its snapshot: {restores:?}"
        );
    }
    drop(redis_proc);
}
