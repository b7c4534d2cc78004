//! The streaming engine (`thaw serve`), started by [`Engine::start`] (the
//! command line, the demo, the benchmark and the tests all start it there).
//!
//! Four stages joined by bounded channels (DESIGN.md, "Data flow"), each an
//! object with a `build` and a `run` over its channels:
//!
//! 1. **ingest** ([`crate::ingest::stage::Ingest`], async): one consumer
//!    group on `items`, `item-relations`, `interactions`; messages decoded
//!    and validated, rejected ones to `thaw-dlq` with their reason, the rest
//!    batched over a short window.
//! 2. **text** ([`crate::infer::stage::TextStage`], a thread): item texts
//!    embedded while the core works on the batch before.
//! 3. **core** ([`stage::CoreStage`], a thread owning [`state::Core`]): graph
//!    edits, incremental propagation, ONNX inference, user adaptation.
//! 4. **publish** ([`crate::publish::stage::PublishStage`], async): Redis
//!    writes with retries; only then are the batch's offsets stored for the
//!    next commit (at-least-once). While Redis is down the channels fill and
//!    ingest stops reading: backpressure, nothing dropped, nothing buffered
//!    without bound.
//!
//! On start the engine rebuilds its state by re-reading every partition up to
//! the group's committed offsets (state only, nothing published: it was),
//! then joins the group and continues from there. On stop (SIGTERM in
//! `thaw serve`) it stops reading, drains the stages, publishes, commits and
//! exits. A stage ends when its input channel closes, after passing on
//! everything it received: that is the shutdown order.

pub mod config;
pub mod error;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod replica;
pub mod snapshot;
pub mod stage;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::infer::stage::{TextPool, TextStage};
use crate::ingest::stage::{report_lag_every, Ingest};
use crate::publish::stage::PublishStage;
use crate::publish::Publisher;
use config::Settings;
use error::{EngineError, Stage};
use metrics::{Health, Metrics};
use stage::{load_model, CoreStage};
use state::{Core, Mode};

pub use crate::ingest::stage::INPUT_TOPICS;

/// Counters an embedding process (the demo, tests) can watch.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input messages read by ingest (live, not restored).
    pub received: AtomicU64,
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
    /// An idle refresh was published: the engine caught up with its input
    /// once.
    pub caught_up: std::sync::atomic::AtomicBool,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Per input partition, the offset of the last message whose effects
    /// are published (what the consumer lag is measured from).
    pub published: std::sync::Mutex<crate::ingest::batch::Offsets>,
}

/// The engine.
#[derive(Debug)]
pub struct Engine;

/// A running engine: its metrics, health and progress, and the means to stop
/// it and wait for it.
pub struct EngineHandle {
    /// The engine's metrics (also at `/metrics`).
    pub metrics: Arc<Metrics>,
    /// Liveness and readiness (also at `/healthz`, `/readyz`).
    pub health: Arc<Health>,
    /// Progress counters.
    pub progress: Arc<Progress>,
    addr: SocketAddr,
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<Result<()>>,
    http: JoinHandle<Result<()>>,
}

impl Engine {
    /// Starts the engine with `settings`, and its HTTP endpoints on
    /// `settings.http.listen` (port 0: any free port, see
    /// [`EngineHandle::http_addr`]). Returns once the endpoints listen; the
    /// engine loads its model, restores its state and joins the group in
    /// the background (`/readyz` answers 200 once it reads).
    pub async fn start(settings: Settings) -> Result<EngineHandle> {
        // Before the model and the state are loaded (their arenas).
        if settings.memory.budget_mb > 0 && !memory::tune_allocator() {
            tracing::info!("memory budget: the allocator is not glibc's, left as it is");
        }
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let progress = Arc::new(Progress::default());
        let (stop, stop_rx) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind(&settings.http.listen)
            .await
            .with_context(|| format!("binding {}", settings.http.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(addr = %addr, "metrics and health endpoints");
        let mut s = stop_rx.clone();
        let http = tokio::spawn(http::serve_http(
            listener,
            metrics.clone(),
            health.clone(),
            http::Limits::from_settings(&settings.http),
            async move {
                let _ = s.changed().await;
            },
        ));
        let task = tokio::spawn(run(
            settings,
            metrics.clone(),
            health.clone(),
            progress.clone(),
            stop_rx,
        ));
        Ok(EngineHandle {
            metrics,
            health,
            progress,
            addr,
            stop: Arc::new(stop),
            task,
            http,
        })
    }
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("addr", &self.addr)
            .field("finished", &self.task.is_finished())
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub fn http_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks the engine to stop: stop reading, drain, publish, commit.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// A function that asks the engine to stop, for a signal handler.
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let stop = self.stop.clone();
        move || {
            let _ = stop.send(true);
        }
    }

    /// Whether the engine has stopped (asked to, or on an error).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the engine stops; its error if it stopped on one.
    pub async fn wait(self) -> Result<()> {
        let res = self.task.await.map_err(|e| anyhow!("engine task: {e}"));
        let _ = self.stop.send(true);
        let _ = self.http.await;
        res?
    }

    /// [`EngineHandle::stop`], then [`EngineHandle::wait`].
    pub async fn shutdown(self) -> Result<()> {
        self.stop();
        self.wait().await
    }
}

/// The engine from its settings to its stop: the state restored, the
/// stages run, the offsets committed.
async fn run(
    settings: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let ownership =
        (!settings.kafka.replica_id.is_empty()).then(|| Arc::new(replica::Ownership::default()));
    let (core, covered, publisher, ingest) =
        prepare(&settings, &metrics, &health, &progress, &stop, &ownership)
            .await
            .map_err(|e| fatal(&metrics, Stage::Start, e))?;
    // Scaled out: the share is held from now on (after the restore, so a
    // restoring replica holds no users it cannot publish yet).
    let membership = match &ownership {
        Some(o) => Some(
            replica::Membership::start(
                &settings.kafka,
                o.clone(),
                metrics.clone(),
                progress.clone(),
                stop.clone(),
            )
            .map_err(|e| fatal(&metrics, Stage::Start, e))?,
        ),
        None => {
            metrics.set_alone();
            None
        }
    };
    let ingest = ingest.with_ownership(ownership);
    memory::check_budget(&settings, core.slot_bytes());
    let governor = memory::Governor::build(&settings.memory, metrics.clone(), progress.clone());
    let ingest = ingest.with_pressure(governor.pressure());
    let memory_task = tokio::spawn(governor.run(stop.clone()));
    ingest.subscribe()?;
    health.ready.store(true, Ordering::SeqCst);
    let consumer = ingest.consumer();
    let q = settings.ingest.queue;
    let (tx_text, rx_text) = mpsc::channel(q);
    let (tx_core, rx_core) = mpsc::channel(q);
    let (tx_pub, rx_pub) = mpsc::channel(q);
    let text = text_stage(&settings, &core, &metrics)?;
    let text_task = tokio::task::spawn_blocking(move || text.run(rx_text, tx_core));
    let core = CoreStage::build(
        core,
        settings.ingest.max_batch,
        Duration::from_millis(settings.graph.catch_up_ms),
        settings.model.clone(),
        metrics.clone(),
    )
    .with_snapshots(
        snapshot::Snapshots::build(&settings.snapshot, metrics.clone()),
        covered,
    );
    let core_task = tokio::task::spawn_blocking(move || core.run(rx_core, tx_pub));
    let publish = PublishStage::build(
        publisher,
        consumer.clone(),
        metrics.clone(),
        progress.clone(),
        health.clone(),
    );
    let pub_task = tokio::spawn(publish.run(rx_pub, stop.clone()));
    let lag_task = tokio::spawn(report_lag_every(
        Arc::downgrade(&consumer),
        metrics.clone(),
        progress.clone(),
        Duration::from_secs(5),
        stop.clone(),
    ));

    // Ingest runs here until stopped; its sender's drop starts the drain.
    let result = ingest.run(tx_text, stop).await;
    health.ready.store(false, Ordering::SeqCst);
    let text_res = text_task.await.map_err(|e| anyhow!("text thread: {e}"))?;
    let core_res = core_task.await.map_err(|e| anyhow!("core thread: {e}"))?;
    let (core_res, final_snapshot) = match core_res {
        Ok(f) => (Ok(()), f),
        Err(e) => (Err(e), None),
    };
    let pub_res = pub_task.await.map_err(|e| anyhow!("publisher: {e}"))?;
    lag_task.abort();
    memory_task.abort();
    if let Some(m) = membership {
        let _ = tokio::task::spawn_blocking(move || m.leave()).await;
    }
    commit(consumer).await;
    if let Some(f) = final_snapshot {
        let _ = tokio::task::spawn_blocking(move || f.write()).await;
    }
    // Every stage's error is reported; the first in pipeline order returned.
    let errors: Vec<anyhow::Error> = [
        result.map_err(|e| fatal(&metrics, Stage::Ingest, e)).err(),
        text_res.map_err(|e| fatal(&metrics, Stage::Text, e)).err(),
        core_res.map_err(|e| fatal(&metrics, Stage::Core, e)).err(),
        pub_res
            .map_err(|e| fatal(&metrics, Stage::Publish, e))
            .err(),
    ]
    .into_iter()
    .flatten()
    .collect();
    errors.into_iter().next().map_or(Ok(()), Err)
}

/// `e` reported as a fatal error of `stage`, for returning.
fn fatal(metrics: &Metrics, stage: Stage, e: anyhow::Error) -> anyhow::Error {
    let e = EngineError::fatal(stage, e);
    e.report(metrics);
    e.into()
}

/// The text stage: the core's encoder and more sessions beside it.
fn text_stage(
    settings: &Settings,
    core: &Core,
    metrics: &Arc<Metrics>,
) -> Result<TextStage<TextPool>> {
    let cfg = crate::infer::text::TextEncoderConfig {
        model_dir: settings.model.text_dir.clone(),
        ort_dylib: settings.model.ort_dylib.clone(),
        ..Default::default()
    };
    let pool =
        TextPool::new(core.text_encoder(), &cfg, settings.model.text_threads()).map_err(|e| {
            fatal(
                metrics,
                Stage::Start,
                e.context("loading the text encoders"),
            )
        })?;
    tracing::info!(sessions = pool.threads(), "text stage");
    Ok(TextStage::build(pool, metrics.clone()))
}

/// Everything before the stages run: the model loaded, the core built, Redis
/// reached, the state restored from the log and the model version published
/// if Redis holds another.
async fn prepare(
    settings: &Settings,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    progress: &Arc<Progress>,
    stop: &watch::Receiver<bool>,
    ownership: &Option<Arc<replica::Ownership>>,
) -> Result<(Core, snapshot::Covered, Publisher, Ingest)> {
    let ms = settings.model.clone();
    let model = tokio::task::spawn_blocking(move || load_model(&ms)).await??;
    tracing::info!(
        version = %model.card.version,
        relations = ?model.card.relations,
        provider = model.items.provider(),
        "model loaded"
    );
    let adapt = settings.users.adapt_for(&model.card);
    let version = model.card.version.clone();
    let mut core = Core::new(
        model,
        adapt,
        settings.users.top_k,
        settings.users.refresh_all_when_idle,
        &settings.graph,
        metrics.clone(),
    )?;
    core.set_user_bounds(settings.users.bounds());
    core.set_ownership(ownership.clone());
    let mut redis = settings.redis.clone();
    redis.user_ttl_secs = Some(settings.users.ttl_secs);
    let mut publisher =
        Publisher::new(redis, metrics.clone(), health.clone())?.with_ownership(ownership.clone());
    publisher.ping(stop).await.context("connecting to Redis")?;
    let ingest = Ingest::build(
        settings,
        version.clone(),
        metrics.clone(),
        progress.clone(),
        health.clone(),
    )
    .await?;
    let (mut core, covered) = restore(settings, ingest.consumer(), core, metrics, progress).await?;
    // Scaled out, each replica publishes its share when the group assigns
    // it ([`Work::Owned`](crate::ingest::batch::Work::Owned)), and the last
    // share flips the marker.
    if ownership.is_none()
        && publisher.active_version(stop).await?.as_deref() != Some(version.as_str())
    {
        let all = core.publish_all()?;
        publisher.publish(&all, &version, stop).await?;
        let card = core.card();
        publisher
            .set_model(&version, card.dim, &card.relations, stop)
            .await?;
        tracing::info!(version = %version, items = all.items.len(), users = all.users.len(), "published model version");
    }
    Ok((core, covered, publisher, ingest))
}

/// The state rebuilt up to the committed offsets: the newest snapshot they
/// cover (`snapshot.dir`), then the log after it (all of it without one).
/// Returns the state and the offsets it covers.
async fn restore(
    settings: &Settings,
    consumer: Arc<StreamConsumer>,
    core: Core,
    metrics: &Metrics,
    progress: &Progress,
) -> Result<(Core, snapshot::Covered)> {
    let t0 = Instant::now();
    let s = settings.clone();
    let (core, n, ends, from) = tokio::task::spawn_blocking(
        move || -> Result<(Core, u64, snapshot::Covered, Option<PathBuf>)> {
            let mut core = core;
            let ends = crate::ingest::restore::committed(&consumer)?;
            let mut start = snapshot::Covered::new();
            let mut from = None;
            if let Some(dir) = &s.snapshot.dir {
                let version = core.card().version.clone();
                if let Some((path, state, header)) = snapshot::latest(dir, &version, &ends) {
                    let t = Instant::now();
                    match core.set_state(state) {
                        Ok(()) => {
                            tracing::info!(
                                file = %path.display(),
                                items = header.items,
                                users = header.users,
                                seconds = t.elapsed().as_secs_f64(),
                                "snapshot loaded"
                            );
                            start = header.covered();
                            from = Some(path);
                        }
                        Err(e) => {
                            tracing::warn!(
                                file = %path.display(),
                                error = format!("{e:#}"),
                                "snapshot not loaded (set aside as .bad): restoring from the whole log"
                            );
                            snapshot::set_aside(&path);
                        }
                    }
                }
            }
            let n = crate::ingest::restore::restore(&s, &consumer, &ends, &start, |msgs| {
                core.apply(&msgs, Mode::Restore).map(drop)
            })?;
            Ok((core, n, ends, from))
        },
    )
    .await??;
    let mut core = core;
    core.finish_restore()?;
    progress.restored.store(n, Ordering::SeqCst);
    let seconds = t0.elapsed().as_secs_f64();
    metrics.restored(n, seconds);
    tracing::info!(
        messages = n,
        seconds,
        from_snapshot = from.is_some(),
        snapshot = from.as_ref().map(|p| p.display().to_string()),
        items = core.described_items(),
        users = core.users(),
        "state restored from the log"
    );
    Ok((core, ends))
}

/// The final synchronous commit of the stored offsets.
async fn commit(consumer: Arc<StreamConsumer>) {
    let res =
        tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync)).await;
    match res {
        Ok(Ok(())) => tracing::info!("offsets committed; stopped"),
        Ok(Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        ))) => tracing::info!("offsets already committed; stopped"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "final commit failed (the next start re-reads from the last commit)")
        }
        Err(e) => tracing::warn!(error = %e, "final commit task failed"),
    }
}
