//! The engine under input an unfriendly stream sends (issue 16's defects,
//! each reproduced against the real engine: embedded broker, real Redis,
//! ONNX Runtime with the real text encoder).
//!
//! 1. `poison_and_bad_messages_do_not_hold_the_stream`: a 1 MiB message
//!    (accepted by its topic, over the decoder's 64 KiB) used to become a
//!    1.4 MB dead letter that the DLQ producer refused for ever, stopping
//!    ingest; and each dead letter was awaited before the next read (about
//!    200/s). Here a poison message and 6,000 bad messages sit among valid
//!    ones: everything valid is published, every bad one is in the DLQ with
//!    its reason, in well under what one-by-one delivery would take.
//! 2. `a_far_future_timestamp_is_capped`: one valid event with
//!    `ts` = 2^53 − 1 is capped to its Kafka time plus the tolerance.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::FutureProducer;
use thaw::ingest::batch::now_ms;
use thaw::ingest::events::{sha256_hex, MAX_TS};
use thaw::serve::Engine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_bad_messages_do_not_hold_the_stream() {
    let (_tmp, broker, mut s) = fixture("hostile").await;
    let brokers = broker.bootstrap_servers().to_string();
    // librdkafka's default record limit (the DLQ topic allows 3 MiB): the
    // poison's 1.33 MB base64 must be cut to fit.
    s.kafka
        .properties
        .insert("message.max.bytes".into(), "1000000".into());
    let prefix = s.redis.prefix.clone();
    let mut pc = s.kafka.producer_config();
    pc.set("message.max.bytes", "2000000");
    let producer: FutureProducer = pc.create().unwrap();

    // The poison message first, so that everything after it waits on it;
    // then 30 bad messages before each valid one.
    let poison: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut raw: Vec<(&str, Vec<u8>, Vec<u8>)> =
        vec![("items", b"poison".to_vec(), poison.clone())];
    let mut valid = 0u64;
    let mut bad = 0u64;
    for i in 0..200u64 {
        for k in 0..30 {
            let topic = ["items", "interactions", "item-relations"][k % 3];
            raw.push((topic, b"junk".to_vec(), b"{not json".to_vec()));
            bad += 1;
        }
        let e = if i % 4 == 0 {
            item(&format!("h{i}"), &format!("Hostile test item {i}"), i)
        } else {
            click(&format!("u{}", i % 7), &format!("h{}", i / 4 * 4), i)
        };
        raw.push((e.topic().name(), e.key().into_bytes(), e.encode().unwrap()));
        valid += 1;
    }
    // Sent together (in order: each send is queued at its first poll).
    let sends = raw
        .iter()
        .map(|(t, k, p)| produce_raw(&producer, t, Some(k), p));
    futures::future::join_all(sends).await;
    let total = 1 + bad + valid;

    let t0 = Instant::now();
    let engine = Engine::start(s.clone()).await.expect("engine started");
    let (metrics, progress, health) = (
        engine.metrics.clone(),
        engine.progress.clone(),
        engine.health.clone(),
    );
    // One by one at ~200/s, 6,001 dead letters took 30 s on their own; the
    // poison stopped everything for good.
    let limit = Duration::from_secs(25);
    while progress.messages.load(Ordering::SeqCst) < total {
        assert!(
            t0.elapsed() < limit,
            "{} of {total} messages published after {limit:?} ({} dead-lettered)",
            progress.messages.load(Ordering::SeqCst),
            progress.dead_lettered.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("all {total} published in {:?}", t0.elapsed());
    // Interactions may be read before their item's event (other topic): the
    // idle refresh after the stream settles lists every user.
    while progress.idle_at_messages.load(Ordering::SeqCst) < total {
        assert!(
            t0.elapsed() < limit + Duration::from_secs(20),
            "no idle refresh"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(progress.dead_lettered.load(Ordering::SeqCst), 1 + bad);
    assert!(health.is_ready());

    let mut c = redis().await;
    for i in (0..200).step_by(4) {
        assert!(
            emb(&mut c, &format!("{prefix}:test-1:item:h{i}"))
                .await
                .is_some(),
            "h{i} published"
        );
    }
    let users = keys(&mut c, &format!("{prefix}:test-1:user:*")).await;
    let lists = keys(&mut c, &format!("{prefix}:test-1:recs:*")).await;
    let events: Vec<String> = metrics
        .encode()
        .lines()
        .filter(|l| l.contains("events_total") || l.contains("core_users"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        (users.len(), lists.len()),
        (7, 7),
        "{users:?} {lists:?} {events:?}"
    );

    let dl = dead_letters(&brokers);
    assert_eq!(
        dl.len() as u64,
        1 + bad,
        "every bad message dead-lettered once"
    );
    let p = dl
        .iter()
        .find(|d| d.payload_bytes == poison.len())
        .expect("the poison message's dead letter");
    assert_eq!(p.reason_code.as_str(), "oversized");
    assert!(p.truncated, "cut to the record limit");
    assert!(poison.starts_with(&p.original_payload().unwrap()));
    assert_eq!(p.payload_sha256, sha256_hex(&poison));
    assert!(dl
        .iter()
        .filter(|d| d.payload_bytes != poison.len())
        .all(|d| d.reason_code.as_str() == "json" && !d.reason.is_empty()));
    let text = metrics.encode();
    assert!(
        text.contains(&format!(
            "thaw_ingest_dead_letters_total{{reason=\"json\"}} {bad}"
        )),
        "{text}"
    );

    engine.shutdown().await.expect("clean shutdown");
    clear(&mut c, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_timestamp_is_capped() {
    let (_tmp, _broker, s) = fixture("future").await;
    let prefix = s.redis.prefix.clone();
    let producer: FutureProducer = s.kafka.producer_config().create().unwrap();
    let now = now_ms() as u64;
    let mut events = vec![
        item("f1", "A film", now - 10_000),
        item("f2", "Another film", now - 9_000),
        click("alice", "f1", now - 5_000),
    ];
    events.push(click("mallory", "f2", MAX_TS));
    produce(&producer, &events).await;

    let engine = Engine::start(s.clone()).await.expect("engine started");
    wait_for(&engine.progress, events.len() as u64, "events").await;
    let mut c = redis().await;
    let ts: u64 = redis::cmd("HGET")
        .arg(format!("{prefix}:test-1:user:{{mallory}}"))
        .arg("ts")
        .query_async(&mut c)
        .await
        .unwrap();
    let after = now_ms() as u64;
    assert!(
        ts <= after + s.ingest.max_future_ms,
        "mallory's time {ts} is past now + tolerance"
    );
    assert!(
        ts >= now + s.ingest.max_future_ms - 1_000,
        "capped, not dropped"
    );
    assert!(engine
        .metrics
        .encode()
        .contains("thaw_ingest_future_timestamps_capped_total 1"));
    engine.shutdown().await.expect("clean shutdown");
    clear(&mut c, &prefix).await;
}

/// Defect: every user ever seen was kept (RSS 316 MB → 1.55 GB in a burst of
/// new users, never down). Users past `users.ttl_secs` (event time) are
/// evicted, then, above `users.max_users`, the least recently active; their
/// Redis keys are deleted, and kept users' keys expire with the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_bounded_by_ttl_and_count() {
    let (_tmp, _broker, mut s) = fixture("bounded").await;
    s.users.max_users = 32;
    s.users.ttl_secs = 60;
    let prefix = s.redis.prefix.clone();
    let producer: FutureProducer = s.kafka.producer_config().create().unwrap();
    let now = now_ms() as u64;
    let old = now - 600_000;
    let mut first: Vec<_> = (0..6)
        .map(|i| item(&format!("b{i}"), &format!("Bounded film {i}"), old))
        .collect();
    first.extend((0..5).map(|i| click(&format!("stale{i}"), &format!("b{i}"), old + i)));
    produce(&producer, &first).await;
    let engine = Engine::start(s.clone()).await.expect("engine started");
    let mut sent = first.len() as u64;
    wait_for(&engine.progress, sent, "stale users").await;
    let mut c = redis().await;
    assert_eq!(
        keys(&mut c, &format!("{prefix}:test-1:recs:{{stale*"))
            .await
            .len(),
        5
    );
    let users_kept = |text: String| -> usize {
        text.lines()
            .find_map(|l| l.strip_prefix("thaw_core_users "))
            .expect("thaw_core_users exported")
            .trim()
            .parse()
            .unwrap()
    };

    // Ten minutes later (event time): 30 new users, under the count limit:
    // only the TTL evicts the stale ones.
    let second: Vec<_> = (0..30)
        .map(|i| click(&format!("u{i:02}"), &format!("b{}", i % 6), now + i))
        .collect();
    produce(&producer, &second).await;
    sent += second.len() as u64;
    wait_for(&engine.progress, sent, "new users").await;
    assert_eq!(
        users_kept(engine.metrics.encode()),
        30,
        "the 5 stale users evicted by the TTL"
    );
    assert!(keys(&mut c, &format!("{prefix}:test-1:recs:{{stale*"))
        .await
        .is_empty());
    assert!(keys(&mut c, &format!("{prefix}:test-1:user:{{stale*"))
        .await
        .is_empty());
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{prefix}:test-1:user:{{u29}}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "user key TTL {ttl}");

    // Ten more: over 32, the least recently active go, down to 90%.
    let third: Vec<_> = (30..40)
        .map(|i| click(&format!("u{i:02}"), &format!("b{}", i % 6), now + i))
        .collect();
    produce(&producer, &third).await;
    sent += third.len() as u64;
    wait_for(&engine.progress, sent, "more users").await;
    let kept = users_kept(engine.metrics.encode());
    assert!((29..=32).contains(&kept), "{kept} users kept, max 32");
    let recs = keys(&mut c, &format!("{prefix}:test-1:recs:*")).await;
    assert_eq!(recs.len(), kept, "{recs:?}");
    assert!(
        recs.contains(&format!("{prefix}:test-1:recs:{{u39}}")),
        "{recs:?}"
    );
    assert!(
        !recs.contains(&format!("{prefix}:test-1:recs:{{u00}}")),
        "the least recent evicted: {recs:?}"
    );
    engine.shutdown().await.expect("clean shutdown");
    clear(&mut c, &prefix).await;
}

/// Placeholder slots (ids named by relations or interactions whose item
/// event never comes) used to be kept for ever, each as costly as an item.
/// Those not named for `graph.placeholder_ttl_secs` (event time) go, then,
/// above `graph.max_placeholders`, the least recently named; their edges go
/// with them, and an id that comes back starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_expire_by_ttl_and_count() {
    let (_tmp, _broker, mut s) = fixture("placeholders").await;
    s.graph.max_placeholders = 20;
    s.graph.placeholder_ttl_secs = 60;
    let prefix = s.redis.prefix.clone();
    let producer: FutureProducer = s.kafka.producer_config().create().unwrap();
    let now = now_ms() as u64;
    let old = now - 600_000;
    let gauge = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} exported"))
            .trim()
            .parse()
            .unwrap()
    };
    // Six items, each with edges to ghosts g0..g9 that are never described.
    let mut first: Vec<_> = (0..6)
        .map(|i| item(&format!("p{i}"), &format!("Placeholder test film {i}"), old))
        .collect();
    for g in 0..10 {
        first.push(edge(
            &format!("p{}", g % 6),
            &format!("g{g}"),
            "also_bought",
            old + g,
        ));
    }
    produce(&producer, &first).await;
    let engine = Engine::start(s.clone()).await.expect("engine started");
    let mut sent = first.len() as u64;
    wait_for(&engine.progress, sent, "the ghosts' edges").await;
    let m = engine.metrics.encode();
    assert_eq!(gauge(&m, "thaw_graph_placeholders"), 10.0);
    assert_eq!(gauge(&m, "thaw_graph_items"), 16.0);

    // Ten minutes later (event time): clicks on 30 more ghosts. The first
    // sweeps g0..g9 out (past the TTL); past 20, the oldest go down to 18.
    let second: Vec<_> = (0..30)
        .map(|i| click(&format!("pu{}", i % 4), &format!("h{i:02}"), now + i))
        .collect();
    produce(&producer, &second).await;
    sent += second.len() as u64;
    wait_for(&engine.progress, sent, "clicks on new ghosts").await;
    let m = engine.metrics.encode();
    let kept = gauge(&m, "thaw_graph_placeholders");
    assert!(
        (18.0..=20.0).contains(&kept),
        "{kept} placeholders kept, max 20"
    );
    let expired = gauge(&m, "thaw_graph_placeholders_expired_total");
    assert_eq!(expired, 40.0 - kept, "every placeholder is kept or expired");
    assert!(
        m.contains("thaw_graph_edges{relation=\"also_bought\"} 0"),
        "the ghosts' edges went with them"
    );
    assert_eq!(gauge(&m, "thaw_graph_items"), 6.0 + kept);

    // A ghost described at last starts afresh: a new item, published.
    let third = vec![item("g0", "Placeholder test film g0", now + 100)];
    produce(&producer, &third).await;
    sent += 1;
    wait_for(&engine.progress, sent, "g0 described").await;
    let mut c = redis().await;
    assert!(
        emb(&mut c, &format!("{prefix}:test-1:item:g0"))
            .await
            .is_some(),
        "g0 published"
    );
    let m = engine.metrics.encode();
    assert_eq!(gauge(&m, "thaw_graph_placeholders"), kept);
    engine.shutdown().await.expect("clean shutdown");
    clear(&mut c, &prefix).await;
}

/// Defect: while messages kept arriving, the batch window never fired (the
/// read that would time out always had a message waiting), so a batch
/// closed only at `max_batch` messages. Here a backlog of 150,000 messages
/// waits when the engine starts, `max_batch` is far above it: the first
/// publish must come long before the whole backlog is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_window_closes_under_a_backlog() {
    let (_tmp, _broker, mut s) = fixture("window").await;
    s.ingest.max_batch = 10_000_000;
    let prefix = s.redis.prefix.clone();
    let producer: FutureProducer = s.kafka.producer_config().create().unwrap();
    let n = 150_000u64;
    let keys_: Vec<String> = (0..n).map(|i| format!("u{}", i % 997)).collect();
    for chunk in keys_.chunks(10_000) {
        let sends = chunk
            .iter()
            .map(|k| produce_raw(&producer, "interactions", Some(k.as_bytes()), b"{bad"));
        futures::future::join_all(sends).await;
    }
    let engine = Engine::start(s.clone()).await.expect("engine started");
    let t0 = Instant::now();
    let first = loop {
        let m = engine.progress.messages.load(Ordering::SeqCst);
        if m > 0 {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "nothing published");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    eprintln!("first publish covered {first} of {n} messages");
    assert!(
        first < n / 2,
        "the first batch held {first} of {n} backlog messages: the window did not close it"
    );
    wait_for(&engine.progress, n, "the backlog").await;
    engine.shutdown().await.expect("clean shutdown");
    let mut c = redis().await;
    clear(&mut c, &prefix).await;
}

/// Hostile messages: mutations of the valid examples in
/// `streams/examples/` (cut, bytes flipped or inserted, values of the wrong
/// type or out of range, ids too long, invalid UTF-8, deep nesting, huge
/// payloads) and random bytes, seeded.
struct Hostile {
    rng: rand_chacha::ChaCha8Rng,
    examples: Vec<(thaw::ingest::Topic, Vec<u8>)>,
    k: usize,
}

const VALUES: [&[u8]; 14] = [
    b"null",
    b"1e400",
    b"-1",
    b"18446744073709551616",
    b"\"\"",
    b"[]",
    b"{}",
    b"true",
    b"NaN",
    b"\"\\ud800\"",
    b"0.5",
    b"\"x\"",
    b"9007199254740993",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]",
];

impl Hostile {
    fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        use thaw::ingest::Topic;
        let examples = [
            (Topic::Items, "items"),
            (Topic::ItemRelations, "item-relations"),
            (Topic::Interactions, "interactions"),
        ]
        .iter()
        .flat_map(|(t, f)| {
            std::fs::read_to_string(format!("streams/examples/{f}.valid.jsonl"))
                .unwrap()
                .lines()
                .map(|l| (*t, l.as_bytes().to_vec()))
                .collect::<Vec<_>>()
        })
        .collect();
        Self {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            examples,
            k: 0,
        }
    }

    /// The next message: its topic, key and payload.
    fn next(&mut self) -> (thaw::ingest::Topic, Option<Vec<u8>>, Vec<u8>) {
        use rand::Rng;
        let k = self.k;
        self.k += 1;
        let (topic, base) = &self.examples[self.rng.random_range(0..self.examples.len())];
        let mut p = base.clone();
        match k % 10 {
            0 => p.truncate(self.rng.random_range(0..p.len())),
            1 => {
                for _ in 0..self.rng.random_range(1..4) {
                    let i = self.rng.random_range(0..p.len());
                    p[i] = self.rng.random();
                }
            }
            2 => {
                let i = self.rng.random_range(0..p.len());
                let junk: Vec<u8> = (0..self.rng.random_range(1..8))
                    .map(|_| self.rng.random())
                    .collect();
                p.splice(i..i, junk);
            }
            3 | 4 => {
                // A value of the wrong type or range: after a random `":`.
                let colons: Vec<usize> = p
                    .windows(2)
                    .enumerate()
                    .filter(|(_, w)| w == b"\":")
                    .map(|(i, _)| i + 2)
                    .collect();
                let at = colons[self.rng.random_range(0..colons.len())];
                let end = p[at..]
                    .iter()
                    .position(|&c| c == b',' || c == b'}')
                    .map_or(p.len(), |e| at + e);
                let v = VALUES[self.rng.random_range(0..VALUES.len())];
                p.splice(at..end, v.iter().copied());
            }
            5 => {
                // An id far over the limit.
                let long = "x".repeat(self.rng.random_range(257..5000));
                p = String::from_utf8(p)
                    .unwrap()
                    .replacen("\"i1\"", &format!("\"{long}\""), 1)
                    .replacen("\"u1\"", &format!("\"{long}\""), 1)
                    .into_bytes();
            }
            6 => p.extend_from_slice(&[0xff, 0xfe, 0xc0]),
            7 => {
                p = (0..self.rng.random_range(0..300))
                    .map(|_| self.rng.random())
                    .collect()
            }
            8 => {
                let depth = self.rng.random_range(129..20_000);
                p = format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
            }
            // Over the decoder's 64 KiB; one in a hundred over the 1 MB
            // record limit of the dead letter.
            _ if k % 100 == 9 => p.resize(self.rng.random_range(1_000_000..1_100_000), b' '),
            _ => p.resize(self.rng.random_range(65_537..100_000), b' '),
        }
        let key = k.is_multiple_of(3).then(|| format!("k{k}").into_bytes());
        (*topic, key, p)
    }
}

/// Generated hostile messages (`HOSTILE_MESSAGES`, default 100,000; `make
/// chaos` sends 1,000,000) through ingest's decode-and-dead-letter path,
/// the code `Ingest::take` runs per message: mutations of the valid
/// examples (cut, bytes flipped or inserted, values of the wrong type or
/// out of range, ids too long, invalid UTF-8, deep nesting, huge payloads)
/// and random bytes. No panic; every message refused has a reason and a
/// dead letter that fits a 1 MB record with the payload's digest; every
/// message accepted passes validation. Through the engine itself, the 6,000
/// bad messages of the test above (the embedded broker holds 5 MiB a
/// partition, not a million dead letters).
#[test]
fn generated_hostile_messages_each_get_a_reason() {
    use std::collections::BTreeMap;
    use thaw::ingest::events::Source;
    use thaw::ingest::{decode, DeadLetter, Limits};

    let n: usize = std::env::var("HOSTILE_MESSAGES")
        .ok()
        .map_or(100_000, |v| v.parse().expect("HOSTILE_MESSAGES: a number"));
    let mut gen = Hostile::new(16);
    let limits = Limits::default();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let (mut accepted, mut refused) = (0usize, 0usize);
    let t0 = Instant::now();
    for k in 0..n {
        let (topic, key, p) = gen.next();
        match decode(topic, key.as_deref(), &p, &limits) {
            Ok(event) => {
                event.validate(&limits).expect("an accepted event is valid");
                accepted += 1;
            }
            Err(rejection) => {
                let reason = rejection.to_string();
                assert!(!reason.is_empty());
                let source = Source {
                    topic: topic.name(),
                    partition: 0,
                    offset: k as i64,
                    key: key.as_deref(),
                    payload: &p,
                };
                let letter = DeadLetter::within(&source, &rejection, 0, 1_000_000);
                let bytes = letter.encode().unwrap().len();
                assert!(bytes <= 1_000_000, "a dead letter of {bytes} bytes");
                assert_eq!(letter.reason_code, rejection.reason_code());
                refused += 1;
                *reasons
                    .entry(rejection.reason_code().as_str().to_string())
                    .or_default() += 1;
            }
        }
    }
    eprintln!(
        "hostile: {n} generated in {:.1} s: {refused} refused with a reason ({reasons:?}), {accepted} accepted and valid",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(accepted + refused, n);
    assert!(
        refused >= n * 7 / 10,
        "most mutations are refused: {refused}"
    );
    if let Ok(path) = std::env::var("HOSTILE_REPORT") {
        let report = serde_json::json!({
            "generated": n, "refused_with_reason": refused, "accepted_valid": accepted,
            "reasons": reasons, "panics": 0,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
}

/// The generated hostile messages through the engine itself: the embedded
/// broker, ingest, the dead-letter producer, the core, Redis
/// (`HOSTILE_ENGINE_MESSAGES`, default 20,000; `make chaos` sends
/// 1,000,000). The broker keeps 5 MiB a partition (older messages roll
/// off), so they go round-robin over 16 partitions a topic, in chunks, each
/// produced once the engine has read the one before. No panic, the engine ready throughout; each message the
/// decoder refuses (counted here by the same decoder and limits) is
/// dead-lettered with its reason, reason by reason, and every other one is
/// applied or ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_messages_through_the_engine() {
    use std::collections::BTreeMap;
    use thaw::ingest::{decode, Limits};

    let n: usize = std::env::var("HOSTILE_ENGINE_MESSAGES")
        .ok()
        .map_or(20_000, |v| {
            v.parse().expect("HOSTILE_ENGINE_MESSAGES: a number")
        });
    // 16 partitions a topic, each message to the next: the broker keeps
    // 5 MiB a partition and drops the oldest beyond it, so no partition may
    // take more than that between two reads (a chunk holds about ten of the
    // 1 MB messages).
    const PARTITIONS: i32 = 16;
    require_text_encoder();
    let _tmp = tempfile::tempdir().unwrap();
    untrained_model(_tmp.path());
    let broker = thaw::kafka::EmbeddedBroker::start_with_partitions(
        None,
        &["items", "item-relations", "interactions"]
            .iter()
            .map(|t| (t.to_string(), PARTITIONS))
            .collect(),
    )
    .await
    .unwrap();
    let s = settings(broker.bootstrap_servers(), _tmp.path(), "hostile-engine");
    let prefix = s.redis.prefix.clone();
    let mut pc = s.kafka.producer_config();
    pc.set("message.max.bytes", "2000000");
    let producer: FutureProducer = pc.create().unwrap();
    let engine = Engine::start(s.clone()).await.expect("engine started");
    let limits = Limits::default();
    let mut gen = Hostile::new(17);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let (mut accepted, mut refused) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut sent = 0usize;
    while sent < n {
        // About 18 KB a message on average.
        let chunk: Vec<_> = (0..500.min(n - sent)).map(|_| gen.next()).collect();
        for (topic, key, p) in &chunk {
            match decode(*topic, key.as_deref(), p, &limits) {
                Ok(_) => accepted += 1,
                Err(r) => {
                    refused += 1;
                    *reasons
                        .entry(r.reason_code().as_str().to_string())
                        .or_default() += 1;
                }
            }
        }
        let sends = chunk.iter().enumerate().map(|(i, (t, k, p))| {
            let mut rec = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(t.name())
                .payload(p)
                .partition(((sent + i) as i32) % PARTITIONS);
            if let Some(k) = k {
                rec = rec.key(k);
            }
            let producer = &producer;
            async move {
                producer
                    .send(rec, Duration::from_secs(10))
                    .await
                    .expect("delivered");
            }
        });
        futures::future::join_all(sends).await;
        sent += chunk.len();
        let t_chunk = Instant::now();
        while engine.progress.received.load(Ordering::SeqCst) < sent as u64 {
            assert!(
                !engine.is_finished(),
                "the engine stopped after {sent} messages"
            );
            assert!(
                t_chunk.elapsed() < Duration::from_secs(120),
                "{} of {sent} messages read after 120 s",
                engine.progress.received.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    wait_for(&engine.progress, n as u64, "the hostile messages").await;
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(!engine.is_finished(), "the engine stopped");
    let m = engine.metrics.encode();
    let family = |name: &str| -> BTreeMap<String, u64> {
        m.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|l| {
                let (labels, v) = l.rsplit_once(' ')?;
                Some((labels.to_string(), v.parse::<f64>().ok()? as u64))
            })
            .collect()
    };
    let letters: BTreeMap<String, u64> = family("thaw_ingest_dead_letters_total{reason=\"")
        .into_iter()
        .map(|(l, v)| (l.trim_end_matches("\"}").to_string(), v))
        .filter(|(_, v)| *v > 0)
        .collect();
    let outcomes = family("thaw_ingest_events_total{");
    let count = |outcome: &str| -> u64 {
        outcomes
            .iter()
            .filter(|(l, _)| l.contains(&format!("outcome=\"{outcome}\"")))
            .map(|(_, v)| v)
            .sum()
    };
    eprintln!(
        "hostile through the engine: {n} in {elapsed:.1} s; {refused} refused ({reasons:?}), {accepted} accepted; engine: {letters:?}, applied {} ignored {}",
        count("applied"),
        count("ignored")
    );
    if let Ok(path) = std::env::var("HOSTILE_ENGINE_REPORT") {
        let report = serde_json::json!({
            "sent": n, "seconds": elapsed, "refused_by_decoder": refused,
            "accepted_by_decoder": accepted, "reasons": reasons,
            "dead_letters_by_reason": letters,
            "applied": count("applied"), "ignored": count("ignored"),
            "dead_lettered": engine.progress.dead_lettered.load(Ordering::SeqCst),
            "panics": 0,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    assert_eq!(letters, reasons, "dead letters by reason");
    assert_eq!(count("dead_lettered"), refused);
    assert_eq!(
        engine.progress.dead_lettered.load(Ordering::SeqCst),
        refused
    );
    assert_eq!(count("applied") + count("ignored"), accepted);
    let health = &engine.health;
    assert!(health.ready.load(Ordering::SeqCst), "ready at the end");
    engine.shutdown().await.expect("clean shutdown");
    let mut c = redis().await;
    clear(&mut c, &prefix).await;
    drop(broker);
}
