//! Helpers shared by the engine's integration tests: the real text encoder,
//! an untrained item model, the embedded broker's producer, and Redis reads.
#![allow(dead_code)] // each test binary uses its own share of these

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use thaw::ingest::{DeadLetter, Event, InteractionEvent, ItemEvent, Kind, Op, RelationEvent};
use thaw::kafka::KafkaSettings;
use thaw::publish::emb_from_bytes;
use thaw::serve::config::Settings;
use thaw::serve::Progress;

pub const TEXT_DIR: &str = "models/text";

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The text encoder from `make models`: a test that needs it fails with
/// what to run when it is missing (CI builds it first: `make test`).
pub fn require_text_encoder() {
    let p = Path::new(TEXT_DIR).join("text_encoder.onnx");
    assert!(
        p.is_file(),
        "no text encoder at {}: run `make models` first",
        p.display()
    );
}

pub fn untrained_model(dir: &Path) {
    untrained_model_version(dir, "test-1", 7);
}

pub fn untrained_model_version(dir: &Path, version: &str, seed: u64) {
    let mut cfg = thaw::train::TrainConfig {
        text_model_dir: PathBuf::from(TEXT_DIR),
        ..Default::default()
    };
    cfg.mpkg.seed = seed;
    thaw::train::write_untrained_model(
        dir,
        vec![
            "co_interacted".into(),
            "also_bought".into(),
            "also_viewed".into(),
        ],
        384 + cfg.kg_dim,
        &cfg,
        version,
    )
    .expect("model folder");
}

pub fn unique(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("thaw-test-{tag}-{}-{n}", std::process::id())
}

pub fn item(id: &str, title: &str, ts: u64) -> Event {
    Event::Item(ItemEvent {
        item_id: id.into(),
        title: title.into(),
        description: Some(format!("{title}, a film")),
        categories: vec![format!("+genre={}", ts % 3)],
        features: None,
        ts,
    })
}

pub fn edge(a: &str, b: &str, relation: &str, ts: u64) -> Event {
    Event::Relation(RelationEvent {
        src: a.into(),
        dst: b.into(),
        relation: relation.into(),
        op: Op::Add,
        ts,
    })
}

pub fn click(user: &str, item: &str, ts: u64) -> Event {
    Event::Interaction(InteractionEvent {
        user_id: user.into(),
        item_id: item.into(),
        kind: Kind::Click,
        value: None,
        ts,
    })
}

pub async fn produce_raw(p: &FutureProducer, topic: &str, key: Option<&[u8]>, payload: &[u8]) {
    let mut rec = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    p.send(rec, Duration::from_secs(10))
        .await
        .expect("delivered");
}

pub async fn produce(p: &FutureProducer, events: &[Event]) {
    for e in events {
        let key = e.key();
        produce_raw(
            p,
            e.topic().name(),
            Some(key.as_bytes()),
            &e.encode().unwrap(),
        )
        .await;
    }
}

/// What an engine test starts from: the text encoder checked, an untrained
/// model in a temporary folder (kept while the first value lives), the
/// embedded broker, and [`settings`] for them under `tag`.
pub async fn fixture(tag: &str) -> (tempfile::TempDir, thaw::kafka::EmbeddedBroker, Settings) {
    require_text_encoder();
    let tmp = tempfile::tempdir().unwrap();
    untrained_model(tmp.path());
    let broker = thaw::kafka::EmbeddedBroker::start(None).await.unwrap();
    let s = settings(broker.bootstrap_servers(), tmp.path(), tag);
    (tmp, broker, s)
}

pub fn settings(brokers: &str, model_dir: &Path, tag: &str) -> Settings {
    let mut s = Settings {
        kafka: KafkaSettings {
            brokers: brokers.into(),
            group_id: unique(tag),
            properties: Default::default(),
            replica_id: String::new(),
        },
        ..Default::default()
    };
    s.redis.url = redis_url();
    s.redis.prefix = unique(tag);
    s.model.dir = model_dir.to_path_buf();
    s.model.text_dir = PathBuf::from(TEXT_DIR);
    s.model.reload_check_secs = 0;
    s.ingest.idle_ms = 300;
    s.ingest.window_ms = 10;
    s.users.top_k = 10;
    s.http.listen = "127.0.0.1:0".into();
    s
}

pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis at REDIS_URL (default 127.0.0.1:6379)")
}

pub async fn keys(c: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, ks): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await
            .unwrap();
        out.extend(ks);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out.sort();
    out
}

pub async fn emb(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<f32>> {
    let b: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(key)
        .arg("emb")
        .query_async(c)
        .await
        .unwrap();
    b.and_then(|b| emb_from_bytes(&b))
}

pub async fn recs(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<(String, f64)> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .arg("REV")
        .arg("WITHSCORES")
        .query_async(c)
        .await
        .unwrap()
}

pub async fn wait_for(progress: &Progress, messages: u64, what: &str) {
    let t0 = Instant::now();
    while progress.messages.load(Ordering::SeqCst) < messages {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "{what}: {} of {messages} messages published after 90 s",
            progress.messages.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn dead_letters(brokers: &str) -> Vec<DeadLetter> {
    let c: BaseConsumer = KafkaSettings::with_brokers(brokers)
        .client_config(&[
            ("group.id", &unique("dlq-reader")),
            ("enable.auto.commit", "false"),
        ])
        .create()
        .unwrap();
    let parts = thaw::kafka::topics()
        .into_iter()
        .find(|t| t.name == "thaw-dlq")
        .unwrap()
        .partitions;
    let mut tpl = TopicPartitionList::new();
    let mut total = 0;
    for p in 0..parts {
        let (lo, hi) = c
            .fetch_watermarks("thaw-dlq", p, Duration::from_secs(5))
            .unwrap();
        total += hi - lo;
        tpl.add_partition_offset("thaw-dlq", p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let t0 = Instant::now();
    while (out.len() as i64) < total && t0.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(serde_json::from_slice::<DeadLetter>(m.payload().unwrap()).unwrap());
        }
    }
    out
}

pub fn producer_flush(p: &FutureProducer) {
    use rdkafka::producer::Producer;
    p.flush(Duration::from_secs(10)).unwrap();
}

pub fn start_redis(port: u16) -> std::process::Child {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Deletes every key under `prefix` (a test's own).
pub async fn clear(c: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    for k in keys(c, &format!("{prefix}:*")).await {
        let _: () = redis::cmd("DEL").arg(k).query_async(c).await.unwrap();
    }
}

/// Runs `thaw serve` as a process with `s` (a TOML file plus environment
/// variables), its log going to `log`.
pub fn spawn_serve(s: &Settings, dir: &Path, log: &Path) -> std::process::Child {
    spawn_serve_with(s, dir, log, &[])
}

/// [`spawn_serve`] with more environment variables.
pub fn spawn_serve_with(
    s: &Settings,
    dir: &Path,
    log: &Path,
    env: &[(&str, String)],
) -> std::process::Child {
    let cfg = dir.join(format!("{}.toml", s.redis.prefix));
    // Offsets committed every 100 ms, so the kill lands after some commits and
    // the restart exercises the restore from the log.
    std::fs::write(
        &cfg,
        "[kafka.properties]\n\"auto.commit.interval.ms\" = \"100\"\n",
    )
    .unwrap();
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("THAW__KAFKA__BROKERS", &s.kafka.brokers)
        .env("THAW__KAFKA__GROUP_ID", &s.kafka.group_id)
        .env("THAW__REDIS__URL", &s.redis.url)
        .env("THAW__REDIS__PREFIX", &s.redis.prefix)
        .env("THAW__MODEL__DIR", &s.model.dir)
        .env("THAW__MODEL__TEXT_DIR", &s.model.text_dir)
        .env("THAW__MODEL__RELOAD_CHECK_SECS", "0")
        .env("THAW__INGEST__IDLE_MS", "300")
        .env("THAW__INGEST__MAX_BATCH", s.ingest.max_batch.to_string())
        .env("THAW__USERS__TOP_K", s.users.top_k.to_string())
        .env("THAW__HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(err)
        .spawn()
        .expect("thaw serve starts")
}

/// A child process killed when dropped (an assertion failing midway leaves
/// no server behind).
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything under `prefix`, decoded: item and user embeddings, lists.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub items: BTreeMap<String, Vec<f32>>,
    pub users: BTreeMap<String, Vec<f32>>,
    pub recs: BTreeMap<String, Vec<(String, f64)>>,
}

pub async fn snapshot(c: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Snapshot {
    snapshot_of(std::slice::from_mut(c), prefix).await
}

/// [`snapshot`] over the nodes of a Redis Cluster (each holds its own
/// slots' keys, read there).
pub async fn snapshot_of(
    nodes: &mut [redis::aio::MultiplexedConnection],
    prefix: &str,
) -> Snapshot {
    let mut s = Snapshot::default();
    for c in nodes {
        let part = snapshot_one(c, prefix).await;
        s.items.extend(part.items);
        s.users.extend(part.users);
        s.recs.extend(part.recs);
    }
    s
}

async fn snapshot_one(c: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Snapshot {
    let mut s = Snapshot::default();
    // The data keys are under the model version: `{prefix}:test-1:item:...`;
    // user ids as they are published, in their hash-tag braces.
    let prefix = &format!("{prefix}:test-1");
    for k in keys(c, &format!("{prefix}:item:*")).await {
        let e = emb(c, &k).await.unwrap();
        s.items.insert(k[prefix.len() + 6..].to_string(), e);
    }
    for k in keys(c, &format!("{prefix}:user:*")).await {
        let e = emb(c, &k).await.unwrap();
        s.users.insert(k[prefix.len() + 6..].to_string(), e);
    }
    for k in keys(c, &format!("{prefix}:recs:*")).await {
        let r = recs(c, &k).await;
        s.recs.insert(k[prefix.len() + 6..].to_string(), r);
    }
    s
}

/// Equal up to float rounding: the restarted engine assigned graph slots in
/// another order, so sums ran in another order. Lists must hold the same
/// items, but two items whose scores are within rounding may swap places.
pub fn differences(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let close = |x: &[f32], y: &[f32], tol: f32| {
        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() <= tol)
    };
    for (what, x, y) in [("item", &a.items, &b.items), ("user", &a.users, &b.users)] {
        if x.keys().ne(y.keys()) {
            out.push(format!("{what} keys differ: {} vs {}", x.len(), y.len()));
            continue;
        }
        for (k, v) in x {
            if !close(v, &y[k], 1e-4) {
                out.push(format!("{what} {k} differs"));
            }
        }
    }
    if a.recs.keys().ne(b.recs.keys()) {
        out.push(format!(
            "recs keys differ: {} vs {}",
            a.recs.len(),
            b.recs.len()
        ));
    } else {
        for (k, x) in &a.recs {
            let y = &b.recs[k];
            let sx: BTreeMap<&str, f64> = x.iter().map(|(i, s)| (i.as_str(), *s)).collect();
            let sy: BTreeMap<&str, f64> = y.iter().map(|(i, s)| (i.as_str(), *s)).collect();
            let last = x.last().map_or(f64::NEG_INFINITY, |l| l.1);
            for (i, s) in &sx {
                match sy.get(i) {
                    Some(t) if (s - t).abs() <= 1e-3 => {}
                    None if (s - last).abs() <= 1e-3 => {} // a tie at the cut
                    other => out.push(format!("recs {k}: {i} {s} vs {other:?}")),
                }
            }
        }
    }
    out
}

pub async fn converge(
    c: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    want: Option<&Snapshot>,
) -> Snapshot {
    converge_on(std::slice::from_mut(c), prefix, want).await
}

/// [`converge`] over the nodes of a Redis Cluster.
pub async fn converge_on(
    c: &mut [redis::aio::MultiplexedConnection],
    prefix: &str,
    want: Option<&Snapshot>,
) -> Snapshot {
    // Settled: the snapshot stops changing (idle refresh done) or equals `want`.
    let t0 = Instant::now();
    let mut prev: Option<Snapshot> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s = snapshot_of(c, prefix).await;
        if let Some(w) = want {
            if differences(w, &s).is_empty() {
                return s;
            }
        } else if let Some(p) = &prev {
            if !s.items.is_empty()
                && !s.recs.is_empty()
                && differences(p, &s).is_empty()
                && p.recs == s.recs
            {
                return s;
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            if let Some(w) = want {
                let d = differences(w, &s);
                panic!(
                    "no convergence after 120 s: {} differences, first {:?}",
                    d.len(),
                    &d[..d.len().min(10)]
                );
            }
            panic!("the uninterrupted run did not settle in 120 s");
        }
        prev = Some(s);
    }
}

/// A local Redis Cluster: three `redis-server --cluster-enabled yes` on
/// loopback, joined by `redis-cli --cluster create` (no replicas), killed
/// on drop. Needs `redis-server` and `redis-cli` (`make redis` installs
/// them).
pub struct LocalCluster {
    pub ports: Vec<u16>,
    children: Vec<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl LocalCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| cluster_port()).collect();
        let mut children = Vec::new();
        for &p in &ports {
            let child = std::process::Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--cluster-config-file")
                .arg(dir.path().join(format!("nodes-{p}.conf")))
                .arg("--dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server runs (run `make redis`, which installs it)");
            children.push(child);
        }
        let mut me = Self {
            ports,
            children,
            _dir: dir,
        };
        for &p in &me.ports {
            wait_port(p);
        }
        let nodes: Vec<String> = me.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (run `make redis`, which installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let t0 = Instant::now();
        while !me.ports.iter().all(|&p| cluster_ok(p)) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the cluster is not ok after 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me.children.shrink_to_fit();
        me
    }

    /// A seed node's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// A connection to each node (each holds its own slots' keys).
    pub async fn nodes(&self) -> Vec<redis::aio::MultiplexedConnection> {
        let mut out = Vec::new();
        for p in &self.ports {
            out.push(
                redis::Client::open(format!("redis://127.0.0.1:{p}"))
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            );
        }
        out
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cluster_ok(port: u16) -> bool {
    std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
}

fn wait_port(port: u16) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "redis-server on {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}
