//! The publish stage: each batch's effects written to Redis, then (and only
//! then) its offsets stored for the next commit: at-least-once. While Redis
//! is down a write is retried, this stage blocks, the channels behind it fill
//! and ingest stops reading: backpressure, nothing dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::{mpsc, watch};

use super::{Publish, Publisher};
use crate::ingest::batch::{now_ms, Offsets};
use crate::ingest::dlq::Delivery;
use crate::serve::metrics::{Health, Metrics};
use crate::serve::Progress;

/// What the core hands the publish stage for one unit of work.
#[derive(Debug, Default)]
pub struct Out {
    /// What to write.
    pub publish: Publish,
    /// The model version it was computed with.
    pub version: String,
    /// After a model swap: `(version, dim, relations)` to record as the
    /// active model once the new embeddings are written.
    pub flip: Option<(String, usize, Vec<String>)>,
    /// Offsets to store once written.
    pub offsets: Offsets,
    /// Dead letters of the same messages: the offsets also wait for them.
    pub deliveries: Vec<Delivery>,
    /// Input messages this completes.
    pub messages: u64,
    /// The output of an idle refresh.
    pub idle: bool,
    /// Scaled out: the shares of the model version this writes
    /// ([`crate::serve::state::Core::share`]); `None`: one instance.
    pub shares: Option<Vec<String>>,
    /// `(batch closed, core started, core done)`, for the stage timings.
    pub trace: Option<(Instant, Instant, Instant)>,
}

/// Where the offsets of published batches go: the Kafka consumer, or a
/// recorder in tests.
pub trait OffsetStore: Send + Sync + 'static {
    /// Stores the offset of the last message published in a partition.
    fn store(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String>;
}

impl OffsetStore for StreamConsumer {
    fn store(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String> {
        self.store_offset(topic, partition, offset)
            .map_err(|e| e.to_string())
    }
}

/// The publish stage.
pub struct PublishStage<S: ?Sized> {
    publisher: Publisher,
    offsets: Arc<S>,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    health: Arc<Health>,
    /// A repair was asked for and is not written yet.
    repairing: bool,
    /// The marker was there once (written here, or found): from then on
    /// its absence means Redis lost its data. Before (replicas still
    /// writing the first shares), it means nothing yet.
    marker_seen: bool,
}

impl<S: OffsetStore + ?Sized> PublishStage<S> {
    /// The stage writing through `publisher` and storing offsets in `offsets`.
    pub fn build(
        publisher: Publisher,
        offsets: Arc<S>,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        health: Arc<Health>,
    ) -> Self {
        // One instance: the start wrote or found the marker.
        let marker_seen = !publisher.scaled_out();
        Self {
            publisher,
            offsets,
            metrics,
            progress,
            health,
            repairing: false,
            marker_seen,
        }
    }

    /// Runs until `rx` closes (the core stopped and drained); a write that
    /// fails while `shutdown` is set ends it with the error. Returns the
    /// publisher for a last write.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Out>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Publisher> {
        let every = self.publisher.repair_check();
        let mut check = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            // Unbiased: under a steady backlog the marker check still runs.
            let mut out = tokio::select! {
                out = rx.recv() => match out {
                    Some(out) => out,
                    None => break,
                },
                _ = check.tick(), if every.is_some() => {
                    self.check_marker().await;
                    continue;
                }
            };
            self.publisher
                .publish(&out.publish, &out.version, &shutdown)
                .await?;
            if let Some((v, dim, rel)) = &out.flip {
                let shares = out.shares.as_deref();
                if self.publisher.flip(v, *dim, rel, shares, &shutdown).await? {
                    self.marker_seen = true;
                    self.repairing = false;
                }
            }
            for d in std::mem::take(&mut out.deliveries) {
                d.wait().await?;
            }
            self.record(&out);
        }
        Ok(self.publisher)
    }

    /// Asks for a repair when Redis lost the model marker (once, until the
    /// repair is written).
    async fn check_marker(&mut self) {
        // Scaled out, every replica checks and republishes its own share;
        // the marker comes back when the last share is written.
        let present = self.publisher.marker_present().await;
        if present == Some(true) {
            // Written (by this replica's repair or another's).
            self.marker_seen = true;
            self.repairing = false;
        }
        if self.repairing || !self.marker_seen || present != Some(false) {
            return;
        }
        tracing::warn!("Redis holds no model marker: it lost its data; asking for a repair");
        self.metrics.repair();
        self.repairing = true;
        self.health.redis_lost.store(true, Ordering::SeqCst);
    }

    /// After `out` is written: timings, freshness, offsets, progress.
    fn record(&self, out: &Out) {
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
            self.metrics
                .freshness(kind, (now - ms).max(0) as f64 / 1000.0);
        }
        let mut stored = 0;
        for ((topic, partition), offset) in &out.offsets {
            match self.offsets.store(topic, *partition, *offset) {
                Ok(()) => stored += 1,
                // After a rebalance took the partition away: the new owner
                // re-reads from the last commit (at-least-once).
                Err(e) => tracing::warn!(topic, partition, offset, error = %e, "offset not stored"),
            }
        }
        self.metrics.offsets_committed(stored);
        if !out.offsets.is_empty() {
            let mut published = self
                .progress
                .published
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            published.extend(out.offsets.iter().map(|(k, v)| (*k, *v)));
        }
        let p = &self.progress;
        p.messages.fetch_add(out.messages, Ordering::SeqCst);
        if out.idle {
            if !out.publish.is_empty() {
                p.idle_refreshes.fetch_add(1, Ordering::SeqCst);
            }
            p.idle_at_messages
                .store(p.messages.load(Ordering::SeqCst), Ordering::SeqCst);
            p.caught_up.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::publish::{read_recs, UserOut};
    use crate::serve::config::RedisSettings;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, i32, i64)>>);

    impl OffsetStore for Recorder {
        fn store(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .push((topic.into(), partition, offset));
            Ok(())
        }
    }

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// Through the channels against the real Redis (`make redis` starts one):
    /// the list lands, then the offsets are stored and the progress counted.
    #[tokio::test]
    async fn writes_then_stores_offsets_and_counts() {
        let prefix = format!("thaw-test-publish-stage-{}", std::process::id());
        let cfg = RedisSettings {
            url: redis_url(),
            prefix: prefix.clone(),
            ..Default::default()
        };
        let (metrics, health) = (Arc::new(Metrics::new()), Arc::new(Health::default()));
        let progress = Arc::new(Progress::default());
        let publisher = Publisher::new(cfg, metrics.clone(), health).unwrap();
        let rec = Arc::new(Recorder::default());
        let stage = PublishStage::build(
            publisher,
            rec.clone(),
            metrics.clone(),
            progress.clone(),
            Arc::new(Health::default()),
        );
        let (tx, rx) = mpsc::channel(4);
        let (_stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(stage.run(rx, stop));
        let mut out = Out {
            version: "v1".into(),
            messages: 3,
            ..Default::default()
        };
        out.publish.users.push(UserOut {
            id: "alice".into(),
            emb: vec![0.5; 4],
            ts: 1,
            recs: vec![("m1".into(), 2.0), ("m2".into(), 1.0)],
        });
        out.publish.sources.push(("user", now_ms()));
        out.offsets.insert(("interactions", 1), 41);
        // Readers resolve the version through the marker.
        out.flip = Some(("v1".into(), 4, Vec::new()));
        tx.send(out).await.unwrap();
        tx.send(Out {
            idle: true,
            ..Default::default()
        })
        .await
        .unwrap();
        drop(tx);
        let publisher = tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .expect("Redis answers (run `make redis`)")
            .unwrap()
            .expect("published");
        drop(publisher);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![("interactions".to_string(), 1, 41)]
        );
        assert_eq!(progress.messages.load(Ordering::SeqCst), 3);
        assert_eq!(progress.idle_at_messages.load(Ordering::SeqCst), 3);
        assert!(metrics.freshness_summary(Some("user")).is_some());
        let client = redis::Client::open(redis_url().as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let recs = read_recs(&mut c, &prefix, "alice", 10).await.unwrap();
        assert_eq!(
            recs.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            ["m1", "m2"]
        );
        crate::publish::clear_prefix(&mut c, &prefix).await.unwrap();
    }
}
