//! Scale-out (`kafka.replica_id`, `src/serve/replica.rs`): three `thaw
//! serve` processes in one group share the users of `interactions`, end in
//! the Redis state one instance ends in, and, when one of them is killed
//! with SIGKILL mid-stream (the leader, which writes the items), the others
//! take its share over: nothing is lost.
//!
//! Against the embedded broker (librdkafka's mock cluster: real protocol,
//! real group coordination) and the real Redis; then the same against a
//! local Redis Cluster of three nodes (`redis.cluster`: writes routed by
//! slot, pipelines grouped by node). Needs `make models redis`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::FutureProducer;
use thaw::ingest::Event;
use thaw::kafka::{EmbeddedBroker, KafkaSettings};

/// 120 items in a graph and 60 users' clicks (`first`); then 10 new items
/// linked into it, and more clicks, of old and new users, on old and new
/// items (`second`).
fn stream() -> (Vec<Event>, Vec<Event>) {
    let mut first = Vec::new();
    for i in 0..120u64 {
        first.push(item(&format!("i{i}"), &format!("Catalogue film {i}"), i));
        if i > 0 {
            let (a, b) = (format!("i{i}"), format!("i{}", (i * 7) % i));
            first.push(edge(&a, &b, "also_bought", 200 + i));
            first.push(edge(&a, &format!("i{}", i / 2), "also_viewed", 400 + i));
        }
    }
    for u in 0..60u64 {
        for k in 0..(3 + u % 5) {
            let i = (u * 13 + k * 29) % 120;
            first.push(click(
                &format!("u{u}"),
                &format!("i{i}"),
                1_000 + u * 10 + k,
            ));
        }
    }
    let mut second = Vec::new();
    for i in 120..130u64 {
        second.push(item(&format!("i{i}"), &format!("Late film {i}"), 5_000 + i));
        second.push(edge(
            &format!("i{i}"),
            &format!("i{}", i - 100),
            "also_viewed",
            5_200 + i,
        ));
    }
    for u in 40..80u64 {
        for k in 0..3 {
            let i = (u * 11 + k * 17) % 130;
            second.push(click(
                &format!("u{u}"),
                &format!("i{i}"),
                6_000 + u * 10 + k,
            ));
        }
    }
    (first, second)
}

/// Where the runs write: the Redis at `REDIS_URL`, or a local cluster.
struct Target {
    url: String,
    cluster: bool,
}

/// The environment of one run; `replica` set: a member of the replicas'
/// group.
fn env(t: &Target, replica: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        // A dead member is noticed within seconds (librdkafka's default
        // session is 45 s).
        (
            "THAW__KAFKA__PROPERTIES__session.timeout.ms",
            "6000".to_string(),
        ),
        (
            "THAW__KAFKA__PROPERTIES__heartbeat.interval.ms",
            "500".to_string(),
        ),
        ("THAW__REDIS__CLUSTER", t.cluster.to_string()),
    ];
    if let Some(r) = replica {
        env.push(("THAW__KAFKA__REPLICA_ID", r.to_string()));
    }
    env
}

/// One instance over what was produced so far, to its settled state.
async fn single(
    t: &Target,
    brokers: &str,
    dir: &std::path::Path,
    nodes: &mut [redis::aio::MultiplexedConnection],
    tag: &str,
    want: (usize, usize),
) -> Snapshot {
    let mut s = settings(brokers, dir, tag);
    s.redis.url = t.url.clone();
    let log = dir.join(format!("{tag}.log"));
    let p = Killed(spawn_serve_with(&s, dir, &log, &env(t, None)));
    let whole = converge_on(nodes, &s.redis.prefix, None).await;
    drop(p);
    for c in nodes.iter_mut() {
        clear(c, &s.redis.prefix).await;
    }
    assert_eq!(
        (whole.items.len(), whole.recs.len()),
        want,
        "the single instance's items and lists"
    );
    whole
}

async fn replicas_share_and_survive(t: Target, mut nodes: Vec<redis::aio::MultiplexedConnection>) {
    require_text_encoder();
    let tmp = tempfile::tempdir().unwrap();
    untrained_model(tmp.path());
    let broker = EmbeddedBroker::start(None).await.unwrap();
    let brokers = broker.bootstrap_servers().to_string();
    let producer: FutureProducer = KafkaSettings::with_brokers(&brokers)
        .producer_config()
        .create()
        .unwrap();
    let (first, second) = stream();
    produce(&producer, &first).await;
    producer_flush(&producer);
    let whole1 = single(&t, &brokers, tmp.path(), &mut nodes, "one-a", (120, 60)).await;

    // Three replicas, one group, one prefix.
    let mut r = settings(&brokers, tmp.path(), "three");
    r.redis.url = t.url.clone();
    let prefix = r.redis.prefix.clone();
    let mut procs: Vec<Option<Killed>> = (0..3)
        .map(|k| {
            let log = tmp.path().join(format!("r{k}.log"));
            let name = format!("r{k}");
            Some(Killed(spawn_serve_with(
                &r,
                tmp.path(),
                &log,
                &env(&t, Some(&name)),
            )))
        })
        .collect();
    let three = converge_on(&mut nodes, &prefix, Some(&whole1)).await;
    assert_eq!(three.users.len(), 60);
    let log = |k: usize| std::fs::read_to_string(tmp.path().join(format!("r{k}.log"))).unwrap();
    // Every replica took a share: the work was split, not done three times.
    let shares: Vec<String> = (0..3)
        .map(|k| {
            log(k)
                .lines()
                .rfind(|l| l.contains("replica share changed"))
                .unwrap_or_else(|| panic!("r{k} never got a share:\n{}", log(k)))
                .to_string()
        })
        .collect();
    let leader = shares
        .iter()
        .position(|l| l.contains("leader=true"))
        .unwrap_or_else(|| panic!("no replica leads: {shares:#?}"));

    // The leader (items, marker) dies mid-stream; the stream goes on.
    let mut dead = procs[leader].take().unwrap();
    dead.0.kill().unwrap();
    dead.0.wait().unwrap();
    produce(&producer, &second).await;
    producer_flush(&producer);
    let whole2 = single(&t, &brokers, tmp.path(), &mut nodes, "one-b", (130, 80)).await;
    let t0 = Instant::now();
    let after = converge_on(&mut nodes, &prefix, Some(&whole2)).await;
    assert_eq!((after.items.len(), after.recs.len()), (130, 80));
    eprintln!(
        "3 replicas{}, leader r{leader} killed: converged to the single instance's state in {:.1} s",
        if t.cluster { " on a Redis Cluster" } else { "" },
        t0.elapsed().as_secs_f64()
    );
    // A survivor took the lead.
    let new_leader = (0..3).filter(|&k| k != leader).any(|k| {
        log(k)
            .lines()
            .any(|l| l.contains("replica share changed") && l.contains("leader=true"))
    });
    assert!(new_leader, "no survivor took the lead");
    drop(procs);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (n, c) in nodes.iter_mut().enumerate() {
        // On a cluster every node holds keys of the run: the writes went
        // where their slots are.
        let here = keys(c, &format!("{prefix}:*")).await.len();
        assert!(here > 0, "node {n} holds none of the run's keys");
        clear(c, &prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_users_and_survive_a_kill() {
    let t = Target {
        url: redis_url(),
        cluster: false,
    };
    replicas_share_and_survive(t, vec![redis().await]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_redis_cluster() {
    let cluster = LocalCluster::start();
    let t = Target {
        url: cluster.url(),
        cluster: true,
    };
    let nodes = cluster.nodes().await;
    replicas_share_and_survive(t, nodes).await;
    drop(cluster);
}
