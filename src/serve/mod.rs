//! The streaming engine (`thaw serve`).
//!
//! Three stages joined by bounded channels (DESIGN.md, "Data flow"):
//!
//! 1. **ingest** (async): one consumer group on `items`, `item-relations`,
//!    `interactions`; messages are decoded and validated
//!    ([`crate::ingest::decode`]); a rejected one goes to `thaw-dlq` with its
//!    reason and source offset (delivery awaited) and the stream goes on.
//!    Messages are batched over a short window.
//! 2. **core** (one blocking thread, [`state::Core`]): graph edits,
//!    incremental propagation, ONNX inference, user adaptation.
//! 3. **publish** (async, [`publish::Publisher`]): Redis writes with retries;
//!    only then are the batch's offsets stored for the next commit
//!    (at-least-once). While Redis is down the channels fill and ingest stops
//!    reading: backpressure, nothing dropped, nothing buffered without bound.
//!
//! On start the engine rebuilds its state by re-reading every partition up to
//! the group's committed offsets (state only, nothing published: it was),
//! then joins the group and continues from there. On SIGTERM it stops
//! reading, drains the stages, publishes, commits and exits.

pub mod adapt;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod publish;
pub mod state;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::ingest::{decode, DeadLetter, Topic, DLQ_TOPIC};
use config::Settings;
use metrics::{Health, Metrics};
use publish::Publisher;
use state::{Core, LoadedModel, Mode, Msg, Publish};

/// The three input topics.
pub const INPUT_TOPICS: [Topic; 3] = [Topic::Items, Topic::ItemRelations, Topic::Interactions];

/// Counters an embedding process (the demo, tests) can watch.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input messages whose effects are published and whose offsets are
    /// stored (dead-lettered ones included).
    pub messages: AtomicU64,
    /// Messages re-read at start to rebuild the state.
    pub restored: AtomicU64,
    /// Idle refreshes published.
    pub idle_refreshes: AtomicU64,
    /// The value of `messages` when the latest idle refresh was published:
    /// once it reaches the number of messages produced, every effect of
    /// them is in Redis, lists refreshed against the final catalogue.
    pub idle_at_messages: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
}

enum Work {
    Batch {
        msgs: Vec<Msg>,
        /// Next offset to commit per partition once the batch is published.
        offsets: BTreeMap<(String, i32), i64>,
        /// Messages in the batch (dead-lettered and ignored ones included).
        messages: u64,
        /// Of them, messages of the item-relations topic.
        relation_messages: u64,
        /// When ingest closed the batch.
        closed: Instant,
    },
    Idle,
    Reload,
}

/// `w` merged with the batches queued behind it in `rx`, in order, while
/// they hold fewer than `max` messages together; the first work that is no
/// batch (or would pass `max`) is left in `held`.
fn coalesce(w: Work, rx: &mut mpsc::Receiver<Work>, held: &mut Option<Work>, max: usize) -> Work {
    let Work::Batch {
        mut msgs,
        mut offsets,
        mut messages,
        mut relation_messages,
        closed,
    } = w
    else {
        return w;
    };
    while let Ok(next) = rx.try_recv() {
        match next {
            Work::Batch {
                msgs: m,
                offsets: o,
                messages: n,
                relation_messages: nr,
                ..
            } if msgs.len() + m.len() <= max => {
                msgs.extend(m);
                // Offsets only grow within a partition: the later batch's win.
                offsets.extend(o);
                messages += n;
                relation_messages += nr;
            }
            other => {
                *held = Some(other);
                break;
            }
        }
    }
    Work::Batch {
        msgs,
        offsets,
        messages,
        relation_messages,
        closed,
    }
}

/// Splits a batch into its relation events, which can go ahead while the
/// items' texts are embedded (an edge naming an item not described yet gives
/// it a placeholder, as it would had it come first), and the rest (items and
/// interactions: a user's list needs the items described), each with its
/// topics' offsets and message counts: `(to send now, to send once the texts
/// are embedded)`. Without item events the whole batch goes now; without
/// relation messages, the whole batch waits for its texts.
fn split_items(w: Work) -> (Option<Work>, Option<Work>) {
    let Work::Batch {
        msgs,
        offsets,
        messages,
        relation_messages,
        closed,
    } = w
    else {
        return (Some(w), None);
    };
    let batch = |msgs, offsets, messages, relation_messages| Work::Batch {
        msgs,
        offsets,
        messages,
        relation_messages,
        closed,
    };
    if !msgs
        .iter()
        .any(|m| matches!(m.event, crate::ingest::Event::Item(_)))
    {
        return (
            Some(batch(msgs, offsets, messages, relation_messages)),
            None,
        );
    }
    if relation_messages == 0 {
        return (None, Some(batch(msgs, offsets, messages, 0)));
    }
    let relations = Topic::ItemRelations.name();
    let (rest, item_msgs): (Vec<Msg>, Vec<Msg>) = msgs
        .into_iter()
        .partition(|m| matches!(m.event, crate::ingest::Event::Relation(_)));
    let (rest_offsets, item_offsets) = offsets.into_iter().partition(|((t, _), _)| t == relations);
    (
        Some(batch(
            rest,
            rest_offsets,
            relation_messages,
            relation_messages,
        )),
        Some(batch(
            item_msgs,
            item_offsets,
            messages - relation_messages,
            0,
        )),
    )
}

struct Out {
    publish: Publish,
    version: String,
    flip: Option<(String, usize, Vec<String>)>,
    offsets: BTreeMap<(String, i32), i64>,
    messages: u64,
    idle: bool,
    /// `(batch closed, core started, core done)`, for the stage timings.
    trace: Option<(Instant, Instant, Instant)>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn model_version(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("model.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("version")?.as_str().map(str::to_string)
}

fn load_model(s: &Settings) -> Result<LoadedModel> {
    LoadedModel::load(
        &s.model.dir,
        &s.model.text_dir,
        s.model.ort_dylib.as_deref(),
    )
}

/// Runs the engine until `stop` turns true (or an unrecoverable error).
pub async fn run(
    settings: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let s = settings.clone();
    let model = tokio::task::spawn_blocking(move || load_model(&s)).await??;
    let adapt = settings.users.adapt_for(&model.card);
    tracing::info!(
        version = %model.card.version,
        relations = ?model.card.relations,
        provider = model.items.provider(),
        "model loaded"
    );
    let mut core = Core::new(
        model,
        adapt,
        settings.users.top_k,
        settings.users.refresh_all_when_idle,
        &settings.graph,
        metrics.clone(),
    )?;
    let mut publisher = Publisher::new(settings.redis.clone(), metrics.clone(), health.clone())?;
    publisher.ping(&stop).await.context("connecting to Redis")?;

    let kafka = &settings.kafka;
    let consumer: Arc<StreamConsumer> = Arc::new(
        kafka
            .client_config(&[
                ("group.id", kafka.group_id.as_str()),
                ("enable.auto.commit", "true"),
                ("enable.auto.offset.store", "false"),
                ("auto.commit.interval.ms", "1000"),
                ("auto.offset.reset", "earliest"),
                // librdkafka's default is 500 ms; a broker that answers a fetch
                // only when this runs out (librdkafka's mock cluster does) would
                // add up to that much to every event's freshness. A real broker
                // answers as soon as data arrives, so this only costs more
                // empty fetches on an idle topic. Override in kafka.properties.
                ("fetch.wait.max.ms", "10"),
            ])
            .create()
            .context("creating the Kafka consumer")?,
    );
    let dlq: FutureProducer = kafka
        .producer_config()
        .create()
        .context("creating the DLQ producer")?;

    // Rebuild the state from the log, up to the committed offsets.
    let t0 = Instant::now();
    let (mut core_back, restored) = {
        let s = settings.clone();
        let c = consumer.clone();
        tokio::task::spawn_blocking(move || -> Result<(Core, u64)> {
            let mut core = core;
            let n = restore(&s, &c, &mut core)?;
            Ok((core, n))
        })
        .await??
    };
    core = {
        core_back.finish_restore()?;
        core_back
    };
    progress.restored.store(restored, Ordering::SeqCst);
    tracing::info!(
        messages = restored,
        seconds = t0.elapsed().as_secs_f64(),
        items = core.described_items(),
        users = core.users(),
        "state restored from the log"
    );
    let version = core.card().version.clone();
    if publisher.active_version(&stop).await?.as_deref() != Some(version.as_str()) {
        let all = core.publish_all()?;
        publisher.publish(&all, &version, &stop).await?;
        publisher
            .set_model(&version, core.card().dim, &core.card().relations, &stop)
            .await?;
        tracing::info!(version = %version, items = all.items.len(), users = all.users.len(), "published model version");
    }

    let topics: Vec<&str> = INPUT_TOPICS.iter().map(|t| t.name()).collect();
    consumer.subscribe(&topics).context("subscribing")?;
    health.ready.store(true, Ordering::SeqCst);

    let (tx_text, mut rx_text) = mpsc::channel::<Work>(settings.ingest.queue);
    let (tx_core, mut rx_core) = mpsc::channel::<Work>(settings.ingest.queue);
    let (tx_pub, mut rx_pub) = mpsc::channel::<Out>(settings.ingest.queue);

    // Text: one blocking thread embeds the batch's item texts while the core
    // works on the batch before (the encoder is the costliest step per item).
    let text = core.text_encoder();
    let text_metrics = metrics.clone();
    let provider = core.provider();
    let text_task = tokio::task::spawn_blocking(move || -> Result<()> {
        while let Some(w) = rx_text.blocking_recv() {
            // Edges go on at once; items and interactions follow once the
            // items' texts are embedded.
            let (now, items) = split_items(w);
            if let Some(now) = now {
                if tx_core.blocking_send(now).is_err() {
                    break;
                }
            }
            let Some(mut items) = items else { continue };
            if let Work::Batch { msgs, .. } = &mut items {
                let t0 = Instant::now();
                let n = state::embed_texts(&text, msgs)?;
                if n > 0 {
                    text_metrics.inference("text_encoder", provider, n, t0.elapsed().as_secs_f64());
                }
            }
            if tx_core.blocking_send(items).is_err() {
                break;
            }
        }
        Ok(())
    });

    // Core: one blocking thread owns the state.
    let model_settings = settings.clone();
    let max_coalesced = settings.ingest.max_batch.max(1);
    let core_task = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut core = core;
        let mut held: Option<Work> = None;
        while let Some(w) = held.take().or_else(|| rx_core.blocking_recv()) {
            // Under load, the batches waiting behind this one are applied
            // with it: one propagation and one publish for all of them.
            let w = coalesce(w, &mut rx_core, &mut held, max_coalesced);
            let version = core.card().version.clone();
            let out = match w {
                Work::Batch {
                    msgs,
                    offsets,
                    messages,
                    closed,
                    ..
                } => {
                    let started = Instant::now();
                    let (publish, _) = core.apply(&msgs, Mode::Live)?;
                    Out {
                        publish,
                        version,
                        flip: None,
                        offsets,
                        messages,
                        idle: false,
                        trace: Some((closed, started, Instant::now())),
                    }
                }
                Work::Idle => Out {
                    publish: core.idle()?,
                    version,
                    flip: None,
                    offsets: BTreeMap::new(),
                    messages: 0,
                    idle: true,
                    trace: None,
                },
                Work::Reload => {
                    let model = match load_model(&model_settings) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "new model not loaded; keeping the running one");
                            continue;
                        }
                    };
                    let v = model.card.version.clone();
                    match core.swap_model(model) {
                        Ok(publish) => {
                            tracing::info!(version = %v, "switching model");
                            Out {
                                publish,
                                version: v.clone(),
                                flip: Some((v, core.card().dim, core.card().relations.clone())),
                                offsets: BTreeMap::new(),
                                messages: 0,
                                idle: false,
                                trace: None,
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "model swap failed; keeping the running one");
                            continue;
                        }
                    }
                }
            };
            if tx_pub.blocking_send(out).is_err() {
                break;
            }
        }
        Ok(())
    });

    // Publish: Redis, then offsets.
    let pub_consumer = consumer.clone();
    let pub_metrics = metrics.clone();
    let pub_progress = progress.clone();
    let pub_stop = stop.clone();
    let pub_task = tokio::spawn(async move {
        while let Some(out) = rx_pub.recv().await {
            publisher
                .publish(&out.publish, &out.version, &pub_stop)
                .await?;
            if let Some((v, dim, rel)) = &out.flip {
                publisher.set_model(v, *dim, rel, &pub_stop).await?;
            }
            if let Some((closed, started, done)) = out.trace {
                tracing::debug!(
                    to_core_ms = (started - closed).as_secs_f64() * 1e3,
                    core_ms = (done - started).as_secs_f64() * 1e3,
                    to_redis_ms = done.elapsed().as_secs_f64() * 1e3,
                    items = out.publish.items.len(),
                    users = out.publish.users.len(),
                    "batch published"
                );
            }
            let now = now_ms();
            for (kind, ms) in &out.publish.sources {
                pub_metrics.freshness(kind, (now - ms).max(0) as f64 / 1000.0);
            }
            let mut stored = 0;
            for ((topic, partition), offset) in &out.offsets {
                match pub_consumer.store_offset(topic, *partition, *offset) {
                    Ok(()) => stored += 1,
                    // After a rebalance took the partition away: the new owner
                    // re-reads from the last commit (at-least-once).
                    Err(e) => {
                        tracing::warn!(topic, partition, offset, error = %e, "offset not stored")
                    }
                }
            }
            pub_metrics.offsets_committed(stored);
            pub_progress
                .messages
                .fetch_add(out.messages, Ordering::SeqCst);
            if out.idle {
                if !out.publish.is_empty() {
                    pub_progress.idle_refreshes.fetch_add(1, Ordering::SeqCst);
                }
                pub_progress.idle_at_messages.store(
                    pub_progress.messages.load(Ordering::SeqCst),
                    Ordering::SeqCst,
                );
            }
        }
        anyhow::Ok(publisher)
    });

    // Lag, every few seconds.
    let lag_consumer = Arc::downgrade(&consumer);
    let lag_metrics = metrics.clone();
    let mut lag_stop = stop.clone();
    let lag_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = lag_stop.changed() => break,
                _ = tick.tick() => {}
            }
            // A weak handle: a report still running at shutdown must not keep
            // the consumer (and its group membership) alive.
            let c = lag_consumer.clone();
            let m = lag_metrics.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(c) = c.upgrade() {
                    report_lag(&c, &m)
                }
            })
            .await;
        }
    });

    // Ingest: this task.
    let limits = settings.ingest.limits.clone();
    let window = Duration::from_millis(settings.ingest.window_ms);
    let idle_after = Duration::from_millis(settings.ingest.idle_ms.max(1));
    let reload_every = settings.model.reload_check_secs;
    let mut last_reload_check = Instant::now();
    let mut running_version = version.clone();
    let mut msgs: Vec<Msg> = Vec::new();
    let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut count: u64 = 0;
    let mut relation_count: u64 = 0;
    // Ingest delay of each message of the open batch, recorded at its close.
    let mut delays: Vec<f64> = Vec::new();
    let mut opened: Option<Instant> = None;
    let mut idle_sent = false;
    let mut result: Result<()> = Ok(());
    loop {
        if *stop.borrow() {
            break;
        }
        let wait = match opened {
            Some(t) => window.saturating_sub(t.elapsed()),
            None => idle_after,
        };
        let msg = tokio::select! {
            _ = stop.changed() => break,
            r = tokio::time::timeout(wait, consumer.recv()) => r,
        };
        let mut close = false;
        match msg {
            Err(_elapsed) => {
                if opened.is_some() {
                    close = true;
                } else {
                    if !idle_sent {
                        if tx_text.send(Work::Idle).await.is_err() {
                            break;
                        }
                        idle_sent = true;
                    }
                    if reload_every > 0
                        && last_reload_check.elapsed() >= Duration::from_secs(reload_every)
                    {
                        last_reload_check = Instant::now();
                        let dir = settings.model.dir.clone();
                        let v = tokio::task::spawn_blocking(move || model_version(&dir)).await?;
                        if let Some(v) = v.filter(|v| *v != running_version) {
                            tracing::info!(version = %v, "new model version found");
                            running_version = v;
                            if tx_text.send(Work::Reload).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Kafka consumer error");
            }
            Ok(Ok(m)) => {
                idle_sent = false;
                opened.get_or_insert_with(Instant::now);
                let topic_name = m.topic().to_string();
                let (partition, offset) = (m.partition(), m.offset());
                count += 1;
                let topic = Topic::from_name(&topic_name);
                if topic == Some(Topic::ItemRelations) {
                    relation_count += 1;
                }
                match topic {
                    Some(topic) => {
                        let payload = m.payload().unwrap_or(&[]);
                        match decode(topic, m.key(), payload, &limits) {
                            Ok(event) => {
                                metrics.event(&topic_name, "applied");
                                let kafka_ms = m.timestamp().to_millis();
                                if let Some(ts) = kafka_ms {
                                    delays.push((now_ms() - ts).max(0) as f64 / 1000.0);
                                }
                                msgs.push(Msg::new(event, kafka_ms));
                            }
                            Err(rejection) => {
                                let dl = DeadLetter::new(
                                    &topic_name,
                                    partition,
                                    offset,
                                    m.key(),
                                    payload,
                                    &rejection,
                                    now_ms() as u64,
                                );
                                if let Err(e) = send_dead_letter(&dlq, m.key(), &dl, &stop).await {
                                    result = Err(e);
                                    break;
                                }
                                metrics.event(&topic_name, "dead_lettered");
                                metrics.dead_letter(rejection.reason_code().as_str());
                                progress.dead_lettered.fetch_add(1, Ordering::SeqCst);
                                tracing::debug!(topic = %topic_name, partition, offset, reason = %dl.reason, "dead-lettered");
                            }
                        }
                    }
                    None => metrics.event(&topic_name, "ignored"),
                }
                offsets.insert((topic_name, partition), offset);
                if msgs.len() >= settings.ingest.max_batch
                    || count >= settings.ingest.max_batch as u64
                {
                    close = true;
                }
            }
        }
        if close {
            metrics.ingest_delays(&delays);
            delays.clear();
            let w = Work::Batch {
                msgs: std::mem::take(&mut msgs),
                offsets: std::mem::take(&mut offsets),
                messages: std::mem::take(&mut count),
                relation_messages: std::mem::take(&mut relation_count),
                closed: Instant::now(),
            };
            opened = None;
            if tx_text.send(w).await.is_err() {
                break;
            }
        }
    }
    // Drain: the open batch, then the stages.
    if !offsets.is_empty() && result.is_ok() {
        let _ = tx_text
            .send(Work::Batch {
                msgs,
                offsets,
                messages: count,
                relation_messages: relation_count,
                closed: Instant::now(),
            })
            .await;
    }
    drop(tx_text);
    health.ready.store(false, Ordering::SeqCst);
    let text_res = text_task.await.map_err(|e| anyhow!("text thread: {e}"))?;
    let core_res = core_task.await.map_err(|e| anyhow!("core thread: {e}"))?;
    let pub_res = pub_task.await.map_err(|e| anyhow!("publisher: {e}"))?;
    lag_task.abort();
    let c = consumer.clone();
    let commit =
        tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await?;
    match commit {
        Ok(()) => tracing::info!("offsets committed; stopped"),
        Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        )) => {
            tracing::info!("offsets already committed; stopped")
        }
        Err(e) => {
            tracing::warn!(error = %e, "final commit failed (the next start re-reads from the last commit)")
        }
    }
    result?;
    text_res?;
    core_res?;
    pub_res?;
    Ok(())
}

async fn send_dead_letter(
    dlq: &FutureProducer,
    key: Option<&[u8]>,
    dl: &DeadLetter,
    stop: &watch::Receiver<bool>,
) -> Result<()> {
    let payload = dl.encode()?;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut rec = FutureRecord::<[u8], [u8]>::to(DLQ_TOPIC).payload(&payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        match dlq.send(rec, Duration::from_secs(10)).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => {
                tracing::warn!(error = %e, "DLQ write failed; retrying");
                if *stop.borrow() {
                    anyhow::bail!("stopping with an undelivered dead letter: {e}");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn report_lag(consumer: &StreamConsumer, metrics: &Metrics) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let Ok(positions) = consumer.position() else {
        return;
    };
    for e in assignment.elements() {
        let Ok((_, high)) =
            consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
        else {
            continue;
        };
        let pos = positions
            .find_partition(e.topic(), e.partition())
            .and_then(|p| match p.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        if let Some(pos) = pos {
            metrics.set_lag(e.topic(), e.partition(), (high - pos).max(0));
        }
    }
}

/// Re-reads every input partition from its beginning up to the group's
/// committed offset and applies it to `core` in restore mode. Returns the
/// number of messages re-read.
fn restore(settings: &Settings, group: &StreamConsumer, core: &mut Core) -> Result<u64> {
    let timeout = Duration::from_secs(30);
    let meta = group
        .fetch_metadata(None, timeout)
        .context("fetching Kafka metadata")?;
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics() {
        if INPUT_TOPICS.iter().any(|x| x.name() == t.name()) {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    if tpl.count() == 0 {
        return Ok(0);
    }
    let committed = group
        .committed_offsets(tpl, timeout)
        .context("reading the group's committed offsets")?;
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut assign = TopicPartitionList::new();
    for e in committed.elements() {
        if let Offset::Offset(c) = e.offset() {
            if c > 0 {
                let (low, _) = group
                    .fetch_watermarks(e.topic(), e.partition(), timeout)
                    .context("reading watermarks")?;
                if low < c {
                    ends.insert((e.topic().to_string(), e.partition()), c);
                    assign.add_partition_offset(e.topic(), e.partition(), Offset::Beginning)?;
                }
            }
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    let reader: BaseConsumer = settings
        .kafka
        .client_config(&[
            ("group.id", &format!("{}-restore", settings.kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
        ])
        .create()
        .context("creating the restore consumer")?;
    reader.assign(&assign)?;
    let limits = &settings.ingest.limits;
    let mut pending = ends.clone();
    let mut msgs = Vec::new();
    let mut n = 0u64;
    let mut quiet = Instant::now();
    while !pending.is_empty() {
        match reader.poll(Duration::from_millis(200)) {
            None => {
                if quiet.elapsed() > Duration::from_secs(60) {
                    anyhow::bail!(
                        "restore stalled: partitions {:?} did not reach their committed offsets",
                        pending.keys().collect::<Vec<_>>()
                    );
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "restore consumer error"),
            Some(Ok(m)) => {
                quiet = Instant::now();
                let key = (m.topic().to_string(), m.partition());
                let Some(&end) = ends.get(&key) else { continue };
                if m.offset() >= end {
                    pending.remove(&key);
                    continue;
                }
                n += 1;
                if let Some(topic) = Topic::from_name(m.topic()) {
                    // Rejected messages were dead-lettered before the restart.
                    if let Ok(event) = decode(topic, m.key(), m.payload().unwrap_or(&[]), limits) {
                        msgs.push(Msg::new(event, None));
                    }
                }
                if m.offset() + 1 >= end {
                    pending.remove(&key);
                }
                if msgs.len() >= 50_000 {
                    core.apply(&std::mem::take(&mut msgs), Mode::Restore)?;
                }
            }
        }
    }
    core.apply(&msgs, Mode::Restore)?;
    Ok(n)
}
