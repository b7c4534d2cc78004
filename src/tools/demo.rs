//! `thaw demo`: the embedded broker, the engine, a replay of a dataset with
//! its cold-start split, and a report of what landed in Redis.
//!
//! The lists are read back from Redis for the split's query users and scored
//! with the evaluation code of `thaw eval` (Recall@K, NDCG@K; MRR is over the
//! published top K only, 0 when no query item is in it).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::dataset::Dataset;
use crate::eval::metrics::{user_metrics, ScenarioMetrics};
use crate::eval::split::Split;
use crate::kafka::{EmbeddedBroker, KafkaSettings};
use crate::publish;
use crate::serve::config::Settings;
use crate::serve::metrics::Quantiles;
use crate::serve::{Engine, EngineHandle, Progress};
use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Settings of `thaw demo`.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    /// Dataset folder.
    pub dataset: PathBuf,
    /// Split folder.
    pub split: PathBuf,
    /// Engine settings (model folders, Redis URL, ...); Kafka is replaced by
    /// the embedded broker.
    pub settings: Settings,
    /// Rate of the live phase, events per second (None: as fast as possible).
    pub rate: Option<f64>,
    /// K of the scored lists.
    pub k: usize,
    /// Where to write the JSON report.
    pub out: Option<PathBuf>,
}

/// Freshness figures of the report, ms.
#[derive(Debug, Clone, Serialize)]
pub struct Freshness {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioFigures {
    /// Query users with a list in Redis.
    pub users: usize,
    /// Query users of the scenario.
    pub query_users: usize,
    /// Mean Recall@K.
    pub recall: f64,
    /// Mean NDCG@K.
    pub ndcg: f64,
    /// Mean reciprocal rank within the top K.
    pub mrr: f64,
}

/// The demo's report (`--out`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Input events replayed.
    pub events: u64,
    /// Events of the history replay (as fast as possible) through ingest,
    /// graph, inference and publish per second, group join included.
    pub events_per_second: f64,
    /// Publish time minus Kafka time of the live phase (support
    /// interactions at `--rate`), all kinds.
    pub freshness_ms: Freshness,
    /// Per kind (`item`, `edge`, `user`).
    pub freshness_by_kind_ms: std::collections::BTreeMap<String, Quantiles>,
    /// New (zero-shot) items of the split with an embedding in Redis.
    pub zero_shot_items_embedded: usize,
    /// New items of the split.
    pub zero_shot_items: usize,
    /// New users (UC and UIC tasks) with a list in Redis.
    pub cold_users_with_recs: usize,
    /// Items with an embedding in Redis.
    pub items_embedded: usize,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// K of the scores.
    pub k: usize,
    /// Per scenario.
    pub scenarios: std::collections::BTreeMap<String, ScenarioFigures>,
    /// `thaw eval --model mpkg` (blind) on the same split and model, per
    /// scenario: the figures the lists above should equal.
    pub offline: std::collections::BTreeMap<String, ScenarioFigures>,
    /// Query users' lists compared between Redis and offline evaluation.
    pub lists_compared: usize,
    /// Of those, lists identical item for item, in order.
    pub lists_identical: usize,
    /// Mean share of a Redis list's items that are in the offline list.
    pub lists_overlap: f64,
    /// Model version served.
    pub model: String,
    /// Execution provider.
    pub provider: String,
    /// Prequential quality of the live phase: each support interaction of
    /// the scenario users scored against the list Redis held for the user
    /// just before it (HitRate@K, MRR@K over the engine's top K).
    pub online_quality: crate::serve::metrics::Prequential,
}

async fn redis_connection(
    url: &str,
) -> Result<(
    redis::aio::MultiplexedConnection,
    Option<std::process::Child>,
)> {
    let client = publish::client(url)?;
    if let Ok(Ok(mut c)) = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        if redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
        {
            return Ok((c, None));
        }
    }
    let info = client.get_connection_info();
    let port = match &info.addr() {
        redis::ConnectionAddr::Tcp(h, p) if h == "127.0.0.1" || h == "localhost" => *p,
        _ => bail!("no Redis answers at {url}, and it is not local: start one or set REDIS_URL"),
    };
    eprintln!("no Redis at {url}: starting redis-server on port {port}");
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
        .context("starting redis-server (install it, or set REDIS_URL to a running Redis)")?;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            if redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
            {
                return Ok((c, Some(child)));
            }
        }
    }
    bail!("redis-server did not answer on port {port}")
}

/// Waits until `n` messages are published and an idle refresh ran after
/// them (so the lists reflect the final catalogue).
async fn wait_published(progress: &Progress, n: u64, engine: &EngineHandle) -> Result<()> {
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        if engine.is_finished() {
            bail!("the engine stopped early (see the log above)");
        }
        let m = progress.messages.load(Ordering::SeqCst);
        if m != last {
            last = m;
            last_change = Instant::now();
        }
        if m >= n && progress.idle_at_messages.load(Ordering::SeqCst) >= n {
            return Ok(());
        }
        if last_change.elapsed() > Duration::from_secs(120) {
            bail!("the engine made no progress for 2 minutes ({m} of {n} messages)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the demo and returns its report.
pub async fn run(args: DemoArgs) -> Result<DemoReport> {
    let ds = Dataset::load(&args.dataset)
        .with_context(|| format!("loading {} (make data)", args.dataset.display()))?;
    let split = Split::read(&args.split, &ds)
        .with_context(|| format!("reading the split {}", args.split.display()))?;
    let card: crate::train::ModelCard = serde_json::from_str(
        &std::fs::read_to_string(args.settings.model.dir.join("model.json")).with_context(
            || {
                format!(
                    "reading {}/model.json (make train)",
                    args.settings.model.dir.display()
                )
            },
        )?,
    )?;
    let (mut conn, redis_child) = redis_connection(&args.settings.redis.url).await?;
    let prefix = args.settings.redis.prefix.clone();
    let cleared = publish::clear_prefix(&mut conn, &prefix).await?;
    eprintln!(
        "redis: {} ({cleared} old `{prefix}:*` keys cleared)",
        crate::redact::url(&args.settings.redis.url)
    );

    let broker = EmbeddedBroker::start(None).await?;
    eprintln!("embedded Kafka broker: {}", broker.bootstrap_servers());
    let mut settings = args.settings.clone();
    settings.kafka = KafkaSettings {
        brokers: broker.bootstrap_servers().to_string(),
        group_id: "thaw-demo".into(),
        properties: Default::default(),
        replica_id: String::new(),
    };
    settings.users.top_k = settings.users.top_k.max(args.k);
    settings.model.reload_check_secs = 0;

    let engine = Engine::start(settings.clone()).await?;
    eprintln!("metrics: http://{}/metrics", engine.http_addr());
    let (metrics, progress) = (engine.metrics.clone(), engine.progress.clone());

    let events = crate::tools::replay::dataset_events(&ds, Some(&split), &card.config.pkg)?;
    let total = events.len() as u64;
    // Phase 1, the history (items, edges, meta-training interactions), as
    // fast as the engine takes it: throughput. Phase 2, the scenario users'
    // support interactions, at a steady rate: freshness of live traffic.
    let live: usize = split
        .scenarios
        .values()
        .flatten()
        .map(|t| t.support.len())
        .sum();
    let history = events.len().saturating_sub(live);
    eprintln!(
        "replaying {total} events: {history} of history (items, relations, meta-training interactions) as fast as possible, then {live} support interactions of the scenario users at {} events/s",
        args.rate.map_or("an unthrottled rate".to_string(), |r| format!("{r:.0}"))
    );
    let t0 = Instant::now();
    let s1 = crate::tools::replay::produce(&events[..history], &settings.kafka, None).await?;
    wait_published(&progress, history as u64, &engine).await?;
    let elapsed = t0.elapsed().as_secs_f64();
    eprintln!(
        "history: {} events produced in {:.1} s, all published after {:.1} s",
        s1.events, s1.seconds, elapsed
    );
    metrics.reset_freshness();
    let before = metrics.prequential_summary();
    let s2 = crate::tools::replay::produce(&events[history..], &settings.kafka, args.rate).await?;
    wait_published(&progress, total, &engine).await?;
    eprintln!("live: {} events produced in {:.1} s", s2.events, s2.seconds);

    // Offline evaluation of the same model on the same split, with the
    // engine's adaptation settings: its lists are what Redis should hold.
    let k = args.k;
    let (offline_report, offline_lists) = crate::eval::run_with_lists(
        &ds,
        &split,
        &crate::eval::EvalConfig {
            model: crate::eval::baselines::ModelName::Mpkg,
            mode: crate::eval::Mode::Blind,
            k,
            seed: 2020,
            model_dir: Some(settings.model.dir.clone()),
            neighbour_weights: None,
            fresh_weight: None,
            knn_weight: None,
            fresh_knn_weight: None,
            user_adapt: Some(settings.users.adapt_for(&card)),
        },
        true,
    )?;
    let (mut compared, mut identical, mut overlap) = (0usize, 0usize, 0f64);

    // Read back and score.
    let mut scenarios = std::collections::BTreeMap::new();
    let mut cold_users = 0;
    for (sc, tasks) in &split.scenarios {
        let mut per_user = Vec::new();
        let mut with = 0;
        let off = offline_lists.get(sc.name());
        for (n, t) in tasks.iter().enumerate() {
            let uid = ds.users.id(t.user);
            let recs = publish::read_recs(&mut conn, &prefix, uid, k).await?;
            if let Some(want) = off.and_then(|l| l.get(n)) {
                let want: Vec<&str> = want.iter().map(|&i| ds.items.id(i)).collect();
                let got: Vec<&str> = recs.iter().map(|(id, _)| id.as_str()).collect();
                compared += 1;
                identical += (want == got) as usize;
                if !got.is_empty() {
                    let common = got.iter().filter(|g| want.contains(g)).count();
                    overlap += common as f64 / got.len() as f64;
                }
            }
            if !recs.is_empty() {
                with += 1;
            }
            let mut scores = vec![f32::NEG_INFINITY; ds.n_items()];
            let mut listed = vec![false; ds.n_items()];
            for (rank, (item, _)) in recs.iter().enumerate() {
                if let Some(i) = ds.items.get(item) {
                    scores[i as usize] = (k - rank) as f32;
                    listed[i as usize] = true;
                }
            }
            per_user.push(user_metrics(&scores, |i| !listed[i as usize], &t.query, k));
        }
        if matches!(
            sc,
            crate::eval::split::Scenario::Uc | crate::eval::split::Scenario::Uic
        ) {
            cold_users += with;
        }
        let m = ScenarioMetrics::from_users(&per_user, 7);
        scenarios.insert(
            sc.name().to_string(),
            ScenarioFigures {
                users: with,
                query_users: tasks.len(),
                recall: m.recall,
                ndcg: m.ndcg,
                mrr: m.mrr,
            },
        );
    }
    // Zero-shot items: those absent from meta-training.
    let mut in_training = vec![false; ds.n_items()];
    for (_, its) in &split.meta_training {
        for &i in its {
            in_training[i as usize] = true;
        }
    }
    let mut zero_shot = 0;
    let mut zero_shot_embedded = 0;
    let mut embedded = 0;
    let root = publish::resolve(&mut conn, &prefix)
        .await?
        .context("Redis holds no model marker after the replay")?;
    for (i, &trained) in in_training.iter().enumerate() {
        let key = publish::keys::item(&root, ds.items.id(i as u32));
        let exists: bool = redis::cmd("HEXISTS")
            .arg(&key)
            .arg("emb")
            .query_async(&mut conn)
            .await?;
        embedded += exists as usize;
        if !trained {
            zero_shot += 1;
            zero_shot_embedded += exists as usize;
        }
    }
    let all = metrics.freshness_summary(None);
    let mut by_kind = std::collections::BTreeMap::new();
    for kind in ["item", "edge", "user"] {
        if let Some(q) = metrics.freshness_summary(Some(kind)) {
            by_kind.insert(kind.to_string(), q);
        }
    }
    let report = DemoReport {
        events: total,
        events_per_second: history as f64 / elapsed.max(1e-9),
        freshness_ms: Freshness {
            p50: all.as_ref().map_or(0.0, |q| q.p50),
            p99: all.as_ref().map_or(0.0, |q| q.p99),
            max: all.as_ref().map_or(0.0, |q| q.max),
        },
        freshness_by_kind_ms: by_kind,
        zero_shot_items_embedded: zero_shot_embedded,
        zero_shot_items: zero_shot,
        cold_users_with_recs: cold_users,
        items_embedded: embedded,
        dead_lettered: progress.dead_lettered.load(Ordering::SeqCst),
        k,
        scenarios,
        offline: offline_report
            .scenarios
            .iter()
            .map(|(name, m)| {
                (
                    name.clone(),
                    ScenarioFigures {
                        users: m.users,
                        query_users: m.users,
                        recall: m.recall,
                        ndcg: m.ndcg,
                        mrr: m.mrr,
                    },
                )
            })
            .collect(),
        lists_compared: compared,
        lists_identical: identical,
        lists_overlap: overlap / compared.max(1) as f64,
        model: card.version.clone(),
        provider: metrics.provider_name(),
        online_quality: metrics.prequential_summary().since(&before),
    };
    engine.shutdown().await?;
    drop(broker);
    if let Some(mut c) = redis_child {
        let _ = c.kill();
    }
    if let Some(p) = &args.out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(report)
}

/// The report as text.
pub fn render(r: &DemoReport) -> String {
    let mut s = String::new();
    s += &format!(
        "thaw demo — model {}\n\n{} events in, {:.0} events/s through ingest, graph, inference and publish\nfreshness (publish − Kafka time): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
        r.model, r.events, r.events_per_second, r.freshness_ms.p50, r.freshness_ms.p99, r.freshness_ms.max
    );
    for (k, q) in &r.freshness_by_kind_ms {
        s += &format!(
            "  {k:<5} p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} samples)\n",
            q.p50, q.p99, q.max, q.count
        );
    }
    s += &format!(
        "items embedded: {} (zero-shot: {} of {}); cold users with a list: {}; dead-lettered: {}\n\n",
        r.items_embedded, r.zero_shot_items_embedded, r.zero_shot_items, r.cold_users_with_recs, r.dead_lettered
    );
    s += &format!(
        "lists read back from Redis, scored on the split's query items (K = {}):\n",
        r.k
    );
    s += "| scenario | users | Recall | NDCG | MRR@K | offline Recall | offline NDCG |\n|---|---|---|---|---|---|---|\n";
    for name in ["warm", "uc", "ic", "uic"] {
        if let Some(f) = r.scenarios.get(name) {
            let (or, on) = r
                .offline
                .get(name)
                .map_or((f64::NAN, f64::NAN), |o| (o.recall, o.ndcg));
            s += &format!(
                "| {name} | {}/{} | {:.3} | {:.3} | {:.3} | {or:.3} | {on:.3} |\n",
                f.users, f.query_users, f.recall, f.ndcg, f.mrr
            );
        }
    }
    s += &format!(
        "\nlists equal to offline `thaw eval --model mpkg`: {} of {} identical, {:.1}% of their items shared\n",
        r.lists_identical,
        r.lists_compared,
        100.0 * r.lists_overlap
    );
    let q = &r.online_quality;
    s += &format!(
        "online quality of the live phase (prequential: each interaction against the user's list just before it): HitRate@{} {:.3}, MRR@{} {:.3} over {} interactions\n",
        r.k, q.hit_rate, r.k, q.mrr, q.interactions
    );
    s
}
