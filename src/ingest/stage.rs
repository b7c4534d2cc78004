//! The ingest stage: one consumer group on the three input topics. Each
//! message is decoded and validated ([`decode`]); a rejected one goes to
//! `thaw-dlq` with its reason and source offset ([`DeadLetters`]: sent with
//! its batch, not awaited here; the batch's offsets wait for it) and the
//! stream goes on. Messages are batched over a short window ([`Batcher`]),
//! which closes on time even while messages keep arriving.
//! When the input goes quiet the stage sends [`Work::Idle`], and, every
//! `reload_check_secs`, [`Work::Reload`] if the model folder holds a new
//! version.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::Offset;
use tokio::sync::{mpsc, watch};

use super::batch::{cap_future, now_ms, Batcher, Closed, Msg, Work};
use super::dlq::DeadLetters;
use super::events::Source;
use super::{decode, Limits, Topic};
use crate::serve::config::Settings;
use crate::serve::error::{EngineError, Stage};
use crate::serve::metrics::{Health, Metrics};
use crate::serve::Progress;

/// The three input topics.
pub const INPUT_TOPICS: [Topic; 3] = [Topic::Items, Topic::ItemRelations, Topic::Interactions];

/// Settings of the ingest stage.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Validation limits of [`decode`].
    pub limits: Limits,
    /// A batch closes this long after its first message.
    pub window: Duration,
    /// ... or when it holds this many messages.
    pub max_batch: usize,
    /// Quiet this long: [`Work::Idle`].
    pub idle_after: Duration,
    /// Every this long while quiet, look for a new model version (`None`:
    /// never).
    pub reload_every: Option<Duration>,
    /// The model folder whose `model.json` names the version.
    pub model_dir: std::path::PathBuf,
    /// Event times are capped at the Kafka timestamp plus this, ms.
    pub max_future_ms: u64,
}

impl IngestConfig {
    /// The ingest settings of the engine's `settings`.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            limits: s.ingest.limits.clone(),
            window: Duration::from_millis(s.ingest.window_ms),
            max_batch: s.ingest.max_batch.max(1),
            idle_after: Duration::from_millis(s.ingest.idle_ms.max(1)),
            reload_every: (s.model.reload_check_secs > 0)
                .then(|| Duration::from_secs(s.model.reload_check_secs)),
            model_dir: s.model.dir.clone(),
            max_future_ms: s.ingest.max_future_ms,
        }
    }
}

/// The model version named in `dir/model.json`.
pub fn model_version(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("model.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("version")?.as_str().map(str::to_string)
}

/// The ingest stage.
pub struct Ingest {
    cfg: IngestConfig,
    consumer: Arc<StreamConsumer>,
    dlq: DeadLetters,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    health: Arc<Health>,
    /// The model version last seen in the model folder.
    version: String,
    /// Memory pressure ([`crate::serve::memory`]): while it is on, batches
    /// are cut at [`Ingest::pressure_batch`] and nothing more is read until
    /// what is in flight is published.
    pressure: Option<Arc<crate::serve::memory::Pressure>>,
    /// Scaled out: this replica's share, and the generation of it last
    /// handed to the core.
    ownership: Option<(Arc<crate::serve::replica::Ownership>, u64)>,
}

impl Ingest {
    /// Creates the group consumer (not subscribed yet: the state is restored
    /// first) and the dead-letter producer. `version` is the model running.
    pub async fn build(
        s: &Settings,
        version: String,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        health: Arc<Health>,
    ) -> Result<Self> {
        let kafka = &s.kafka;
        // With a memory budget, librdkafka's prefetch queue (64 MiB by
        // default) takes at most a 32nd of it.
        let queued_kb = (s.memory.budget_mb > 0).then(|| {
            (s.memory.budget_mb * 1024 / 32)
                .clamp(1024, 65536)
                .to_string()
        });
        let mut consumer_config = kafka.client_config(&[
            ("group.id", kafka.reader_group().as_str()),
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
        ]);
        if let Some(kb) = &queued_kb {
            if !kafka.properties.contains_key("queued.max.messages.kbytes") {
                consumer_config.set("queued.max.messages.kbytes", kb);
            }
        }
        let consumer = consumer_config
            .create()
            .context("creating the Kafka consumer")?;
        let dlq =
            DeadLetters::build(kafka, metrics.clone(), progress.clone(), health.clone()).await?;
        Ok(Self {
            cfg: IngestConfig::from_settings(s),
            consumer: Arc::new(consumer),
            dlq,
            metrics,
            progress,
            health,
            version,
            pressure: None,
            ownership: None,
        })
    }

    /// Honours `pressure` (see the field).
    pub fn with_pressure(mut self, pressure: Arc<crate::serve::memory::Pressure>) -> Self {
        self.pressure = Some(pressure);
        self
    }

    /// Hands changes of `ownership` to the core ([`Work::Owned`]).
    pub fn with_ownership(
        mut self,
        ownership: Option<Arc<crate::serve::replica::Ownership>>,
    ) -> Self {
        self.ownership = ownership.map(|o| (o, 0));
        self
    }

    /// Whether this replica's share changed since it was last handed on.
    fn share_changed(&mut self) -> bool {
        let Some((o, seen)) = self.ownership.as_mut() else {
            return false;
        };
        let g = o.generation();
        std::mem::replace(seen, g) != g
    }

    /// Under pressure, the most messages in flight (read, not yet
    /// published), and so the largest batch: a 20th of `max_batch`, at
    /// least 100.
    fn pressure_batch(&self) -> usize {
        (self.cfg.max_batch / 20).max(100)
    }

    /// The most messages in flight now: unbounded without a budget,
    /// [`Ingest::pressure_batch`] under pressure, the room below the
    /// threshold else ([`crate::serve::memory::allowance`]).
    fn in_flight_limit(&self) -> Option<u64> {
        let p = self.pressure.as_ref()?;
        if p.on() {
            return Some(self.pressure_batch() as u64);
        }
        p.allowance()
    }

    /// As many messages in flight as allowed: read nothing more now.
    fn held_back(&self) -> bool {
        let Some(limit) = self.in_flight_limit() else {
            return false;
        };
        let received = self.progress.received.load(Ordering::Relaxed);
        let published = self.progress.messages.load(Ordering::SeqCst);
        received.saturating_sub(published) >= limit
    }

    /// The batch size in force: `max_batch`, within the in-flight limit.
    fn batch_limit(&self) -> usize {
        match self.in_flight_limit() {
            Some(l) => self.cfg.max_batch.min(l as usize),
            None => self.cfg.max_batch,
        }
    }

    /// The group consumer (for the restore, the offsets and the lag).
    pub fn consumer(&self) -> Arc<StreamConsumer> {
        self.consumer.clone()
    }

    /// Subscribes to the input topics.
    pub fn subscribe(&self) -> Result<()> {
        let topics: Vec<&str> = INPUT_TOPICS.iter().map(|t| t.name()).collect();
        self.consumer.subscribe(&topics).context("subscribing")
    }

    /// Reads until `shutdown` turns true (or `tx` closes), then sends the
    /// open batch. Dead letters undelivered at the stop fail their batch's
    /// [`super::dlq::Delivery`] (the publish stage reports it), not this.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Work>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut batch = Batcher::default();
        let mut idle_sent = false;
        let mut last_reload_check = Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if self.health.redis_lost.swap(false, Ordering::SeqCst) {
                // After what is open, in order: the repair publishes the
                // state with everything before it applied.
                if !self.send(&mut batch, &tx, &shutdown).await
                    || tx.send(Work::Repair).await.is_err()
                {
                    break;
                }
            }
            if self.share_changed() {
                // After what is open, in order: the gained users are
                // published with everything read before applied.
                if !self.send(&mut batch, &tx, &shutdown).await
                    || tx.send(Work::Owned).await.is_err()
                {
                    break;
                }
            }
            if self.held_back() {
                // What is open goes now; the rest waits in Kafka until what
                // is in flight is published (or the pressure is over).
                if batch.opened().is_some() {
                    if !self.send(&mut batch, &tx, &shutdown).await {
                        break;
                    }
                    continue;
                }
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
                continue;
            }
            if batch.is_due(self.cfg.window) {
                // A steady stream never lets the read below time out.
                if !self.send(&mut batch, &tx, &shutdown).await {
                    break;
                }
                continue;
            }
            let wait = match batch.opened() {
                Some(t) => self.cfg.window.saturating_sub(t.elapsed()),
                None => self.cfg.idle_after,
            };
            let msg = tokio::select! {
                _ = shutdown.changed() => break,
                r = tokio::time::timeout(wait, self.consumer.recv()) => r,
            };
            let mut close = false;
            match msg {
                Err(_quiet) if batch.opened().is_some() => close = true,
                Err(_quiet) => {
                    let work = self.quiet(&mut idle_sent, &mut last_reload_check).await;
                    if let Some(w) = work {
                        if tx.send(w).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Err(e)) => {
                    EngineError::retryable(Stage::Ingest, anyhow::anyhow!("Kafka consumer: {e}"))
                        .report(&self.metrics)
                }
                Ok(Ok(m)) => {
                    idle_sent = false;
                    self.take(&m, &mut batch);
                    close = batch.is_full(self.batch_limit());
                }
            }
            if close && !self.send(&mut batch, &tx, &shutdown).await {
                break;
            }
        }
        self.send(&mut batch, &tx, &shutdown).await;
        Ok(())
    }

    /// Closes the open batch, starts its dead letters on their way and sends
    /// it; false when `tx` is closed.
    async fn send(
        &self,
        batch: &mut Batcher,
        tx: &mpsc::Sender<Work>,
        stop: &watch::Receiver<bool>,
    ) -> bool {
        let Some(Closed {
            mut batch,
            delays,
            letters,
        }) = batch.close()
        else {
            return true;
        };
        self.metrics.ingest_delays(&delays);
        if !letters.is_empty() {
            batch
                .deliveries
                .push(self.dlq.deliver(letters, stop.clone()));
        }
        tx.send(Work::Batch(batch)).await.is_ok()
    }

    /// Decodes one message into `batch`, or adds its dead letter to it.
    fn take(&self, m: &BorrowedMessage<'_>, batch: &mut Batcher) {
        let (topic_name, partition, offset) = (m.topic(), m.partition(), m.offset());
        self.progress.received.fetch_add(1, Ordering::Relaxed);
        let Some(topic) = Topic::from_name(topic_name) else {
            self.metrics.event(topic_name, "ignored");
            batch.push(None, partition, offset, None);
            return;
        };
        let payload = m.payload().unwrap_or(&[]);
        match decode(topic, m.key(), payload, &self.cfg.limits) {
            Ok(mut event) => {
                let kafka_ms = m.timestamp().to_millis();
                if cap_future(&mut event, kafka_ms, self.cfg.max_future_ms) {
                    self.metrics.future_ts_capped();
                }
                let delay = kafka_ms.map(|ts| (now_ms() - ts).max(0) as f64 / 1000.0);
                batch.push(
                    Some(topic),
                    partition,
                    offset,
                    Some((Msg::new(event, kafka_ms).at(partition), delay)),
                );
            }
            Err(rejection) => {
                let source = Source {
                    topic: topic_name,
                    partition,
                    offset,
                    key: m.key(),
                    payload,
                };
                batch.push_letter(self.dlq.letter(topic, &source, &rejection));
                batch.push(Some(topic), partition, offset, None);
            }
        }
    }

    /// What to send when the input is quiet and no batch is open: one
    /// [`Work::Idle`] per quiet spell, and [`Work::Reload`] when the model
    /// folder names a new version.
    async fn quiet(&mut self, idle_sent: &mut bool, last_check: &mut Instant) -> Option<Work> {
        if !*idle_sent {
            *idle_sent = true;
            return Some(Work::Idle);
        }
        let every = self.cfg.reload_every?;
        if last_check.elapsed() < every {
            return None;
        }
        *last_check = Instant::now();
        let dir = self.cfg.model_dir.clone();
        let v = tokio::task::spawn_blocking(move || model_version(&dir))
            .await
            .ok()
            .flatten()?;
        if v == self.version {
            return None;
        }
        tracing::info!(version = %v, "new model version found");
        self.version = v;
        Some(Work::Reload)
    }
}

/// Reports the consumer lag per assigned partition every `every` until
/// `stop` turns true. A weak handle: a report still running at shutdown
/// must not keep the consumer (and its group membership) alive.
pub async fn report_lag_every(
    consumer: std::sync::Weak<StreamConsumer>,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let (c, m, p) = (consumer.clone(), metrics.clone(), progress.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(c) = c.upgrade() {
                report_lag(&c, &m, &p)
            }
        })
        .await;
    }
}

/// The lag of a partition: messages up to `high` (the end of the log) not
/// yet published. Measured from the last published offset when there is
/// one, else from the group's committed offset, else from the start of the
/// log (`low`); never from the consumer's read position, which runs ahead
/// of what is published by everything queued between the stages (in a
/// burst it read 0 while 200K messages waited to be published).
pub fn lag(high: i64, low: i64, published: Option<i64>, committed: Option<i64>) -> i64 {
    // After a rebalance the group may have committed past what this
    // replica published: the later of the two.
    let next = match (published.map(|o| o + 1), committed) {
        (Some(p), Some(c)) => p.max(c),
        (p, c) => p.or(c).unwrap_or(low),
    };
    (high - next).max(0)
}

fn report_lag(consumer: &StreamConsumer, metrics: &Metrics, progress: &Progress) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let committed = consumer
        .committed_offsets(assignment.clone(), Duration::from_secs(2))
        .ok();
    let published = progress
        .published
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for e in assignment.elements() {
        let Ok((low, high)) =
            consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
        else {
            continue;
        };
        let done = published
            .iter()
            .find(|((t, p), _)| *t == e.topic() && *p == e.partition())
            .map(|(_, o)| *o);
        let committed = committed
            .as_ref()
            .and_then(|c| c.find_partition(e.topic(), e.partition()))
            .and_then(|p| match p.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        metrics.set_lag(e.topic(), e.partition(), lag(high, low, done, committed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_what_is_published() {
        // 200K in the log, 1,000 published, the consumer read far ahead.
        assert_eq!(lag(200_000, 0, Some(999), Some(500)), 199_000);
        // Another replica committed further (a rebalance): from there.
        assert_eq!(lag(200_000, 0, Some(999), Some(150_000)), 50_000);
        // Nothing published since the start: from the last commit.
        assert_eq!(lag(200_000, 0, None, Some(120_000)), 80_000);
        // Nothing committed either: the whole log (from its start).
        assert_eq!(lag(200_000, 10, None, None), 199_990);
        assert_eq!(lag(5, 0, Some(4), None), 0, "caught up");
    }
}
