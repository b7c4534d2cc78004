//! Prometheus metrics (`/metrics`, OpenMetrics text) and the health
//! endpoints (`/healthz`, `/readyz`).
//!
//! Histogram buckets: seconds from 100 µs to ~100 s for work (one batch of
//! propagation or inference is sub-millisecond for one item, seconds for a
//! full recomputation), 1 ms to ~10 min for freshness (a live stream is
//! milliseconds behind; a replay of a backlog, minutes).
//!
//! Freshness is also kept as raw samples (at most [`MAX_SAMPLES`] per kind;
//! past that every second sample is dropped and only every second new one
//! kept, a deterministic thinning), for exact quantiles in reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Raw freshness samples kept per kind.
pub const MAX_SAMPLES: usize = 1_000_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicOutcome {
    topic: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageKind {
    stage: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Relation {
    relation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelProvider {
    model: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicPartition {
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: String,
}

fn work_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 21))
}

/// Exact quantiles of samples, ms (nearest rank: the value at position
/// `ceil(p × n)` of the sorted samples).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Quantiles {
    /// Quantiles of `samples` (ms); `None` when empty.
    pub fn of(mut samples: Vec<f64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let at = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Self {
            count: n,
            p50: at(0.5),
            p99: at(0.99),
            max: samples[n - 1],
        })
    }
}

#[derive(Default)]
struct Samples {
    by_kind: BTreeMap<String, (Vec<f64>, u64)>,
    /// Ingest delays, ms.
    ingest: (Vec<f64>, u64),
}

/// Adds `ms` to `(samples, seen)`, thinning deterministically past
/// [`MAX_SAMPLES`].
fn keep_sample((v, seen): &mut (Vec<f64>, u64), ms: f64) {
    *seen += 1;
    if v.len() >= MAX_SAMPLES {
        let mut keep = false;
        v.retain(|_| {
            keep = !keep;
            keep
        });
    }
    // Once thinned, keep every 2^k-th new sample to match.
    let stride = ((*seen as usize).div_ceil(MAX_SAMPLES)).next_power_of_two() as u64;
    if (*seen - 1) % stride == 0 {
        v.push(ms);
    }
}

/// Prequential quality: each interaction scored against the list the user
/// had just before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Prequential {
    /// Interactions with an item new to a user who had a list.
    pub interactions: u64,
    /// Of them, with the item in the list.
    pub hits: u64,
    /// `hits / interactions`: HitRate@K.
    pub hit_rate: f64,
    /// Mean reciprocal rank (0 when absent): MRR@K.
    pub mrr: f64,
}

impl Prequential {
    /// The figures of the interactions since `before` (an earlier summary).
    pub fn since(&self, before: &Prequential) -> Prequential {
        let n = self.interactions - before.interactions;
        let d = n.max(1) as f64;
        let hits = self.hits - before.hits;
        let rr = |p: &Prequential| p.mrr * p.interactions as f64;
        Prequential {
            interactions: n,
            hits,
            hit_rate: hits as f64 / d,
            mrr: (rr(self) - rr(before)) / d,
        }
    }
}

/// The engine's metrics.
pub struct Metrics {
    registry: Registry,
    events: Family<TopicOutcome, Counter>,
    dlq: Family<Reason, Counter>,
    unknown_relations: Counter,
    future_ts: Counter,
    users: Gauge,
    users_evicted: Counter,
    placeholders: Gauge,
    placeholders_expired: Counter,
    replica_partitions: Gauge,
    replica_leader: Gauge,
    replica_rebalances: Counter,
    memory_resident: Gauge,
    memory_budget: Gauge,
    memory_pressure: Gauge,
    memory_pressure_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    memory_trims: Counter,
    /// Unknown relation names logged so far (at most 100).
    unknown_seen: Mutex<std::collections::BTreeSet<String>>,
    graph_items: Gauge,
    graph_edges: Family<Relation, Gauge>,
    propagation_edits: Histogram,
    propagation_seconds: Histogram,
    inference_seconds: Family<ModelProvider, Histogram>,
    inference_rows: Family<ModelLabel, Histogram>,
    provider: Family<ProviderLabel, Gauge>,
    redis_seconds: Histogram,
    redis_errors: Counter,
    repairs: Counter,
    snapshot_writes: Counter,
    snapshot_failures: Counter,
    snapshot_bytes: Gauge,
    snapshot_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    restore_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    restore_messages: Gauge,
    redis_writes: Counter,
    adaptation_seconds: Histogram,
    users_adapted: Counter,
    freshness: Family<KindLabel, Histogram>,
    ingest_delay: Histogram,
    lag: Family<TopicPartition, Gauge>,
    model: Family<Version, Gauge>,
    published: Family<KindLabel, Counter>,
    offsets: Counter,
    errors: Family<StageKind, Counter>,
    quality_interactions: Counter,
    quality_hits: Counter,
    quality_rr: Counter<f64, std::sync::atomic::AtomicU64>,
    quality_rank: Histogram,
    samples: Mutex<Samples>,
    version: Mutex<String>,
    provider_name: Mutex<String>,
    redis_totals: Mutex<(u64, f64)>,
    /// Rows and seconds per inference model, for reports.
    inference_totals: Mutex<BTreeMap<String, (u64, f64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the prefix `thaw`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("thaw");
        let events = Family::<TopicOutcome, Counter>::default();
        registry.register(
            "ingest_events",
            "Input messages by topic and outcome (applied, dead_lettered, ignored)",
            events.clone(),
        );
        let dlq = Family::<Reason, Counter>::default();
        registry.register(
            "ingest_dead_letters",
            "Messages dead-lettered, by reason",
            dlq.clone(),
        );
        let unknown_relations = Counter::default();
        registry.register(
            "core_unknown_relations",
            "Relation events ignored because the model does not know the relation (each new name is logged once, up to 100)",
            unknown_relations.clone(),
        );
        let future_ts = Counter::default();
        registry.register(
            "ingest_future_timestamps_capped",
            "Events whose ts was ahead of their Kafka timestamp by more than ingest.max_future_ms, capped to it",
            future_ts.clone(),
        );
        let users = Gauge::default();
        registry.register("core_users", "Users kept in memory", users.clone());
        let users_evicted = Counter::default();
        registry.register(
            "core_users_evicted",
            "Users evicted by users.max_users or users.ttl_secs (their Redis keys deleted)",
            users_evicted.clone(),
        );
        let snapshot_writes = Counter::default();
        registry.register(
            "core_snapshot_writes",
            "State snapshots written (snapshot.dir)",
            snapshot_writes.clone(),
        );
        let snapshot_failures = Counter::default();
        registry.register(
            "core_snapshot_failures",
            "State snapshots that failed to write (the previous ones are kept)",
            snapshot_failures.clone(),
        );
        let snapshot_bytes = Gauge::default();
        registry.register(
            "core_snapshot_last_size_bytes",
            "Size of the last snapshot written",
            snapshot_bytes.clone(),
        );
        let snapshot_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "core_snapshot_last_write_seconds",
            "Time to serialise and write the last snapshot (off the core thread)",
            snapshot_seconds.clone(),
        );
        let restore_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "serve_restore_duration_seconds",
            "Time the start-up restore took (snapshot load plus the log after it)",
            restore_seconds.clone(),
        );
        let restore_messages = Gauge::default();
        registry.register(
            "serve_restore_messages",
            "Messages re-read from the log at start-up",
            restore_messages.clone(),
        );
        let placeholders = Gauge::default();
        registry.register(
            "graph_placeholders",
            "Item slots for ids seen only in relations or interactions (no item event yet)",
            placeholders.clone(),
        );
        let placeholders_expired = Counter::default();
        registry.register(
            "graph_placeholders_expired",
            "Placeholder slots removed by graph.placeholder_ttl_secs or graph.max_placeholders",
            placeholders_expired.clone(),
        );
        let replica_partitions = Gauge::default();
        registry.register(
            "serve_replica_partitions",
            "interactions partitions whose users this replica publishes (kafka.replica_id; all when unset)",
            replica_partitions.clone(),
        );
        let replica_leader = Gauge::default();
        registry.register(
            "serve_replica_leader",
            "1 while this replica publishes the items and the model marker (it owns interactions partition 0, or runs alone)",
            replica_leader.clone(),
        );
        let replica_rebalances = Counter::default();
        registry.register(
            "serve_replica_rebalances",
            "Changes of this replica's interactions partitions",
            replica_rebalances.clone(),
        );
        let memory_resident = Gauge::default();
        registry.register(
            "memory_resident_bytes",
            "Resident set of the engine process",
            memory_resident.clone(),
        );
        let memory_budget = Gauge::default();
        registry.register(
            "memory_budget_bytes",
            "memory.budget_mb (0: none)",
            memory_budget.clone(),
        );
        let memory_pressure = Gauge::default();
        registry.register(
            "memory_pressure",
            "1 while the resident set is above 80% of the budget (ingest holds back)",
            memory_pressure.clone(),
        );
        let memory_pressure_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "memory_pressure_seconds",
            "Time spent above 80% of the memory budget",
            memory_pressure_seconds.clone(),
        );
        let memory_trims = Counter::default();
        registry.register(
            "memory_trims",
            "Times freed heap memory was handed back to the operating system",
            memory_trims.clone(),
        );
        let graph_items = Gauge::default();
        registry.register(
            "graph_items",
            "Items in the product knowledge graph",
            graph_items.clone(),
        );
        let graph_edges = Family::<Relation, Gauge>::default();
        registry.register("graph_edges", "Edges per relation", graph_edges.clone());
        let propagation_edits = Histogram::new(exponential_buckets(1.0, 4.0, 11));
        registry.register(
            "graph_propagation_edits",
            "Graph edits and input rows per propagation batch",
            propagation_edits.clone(),
        );
        let propagation_seconds = work_histogram();
        registry.register(
            "graph_propagation_seconds",
            "Incremental propagation time per batch",
            propagation_seconds.clone(),
        );
        let inference_seconds = Family::<ModelProvider, Histogram>::new_with_constructor(
            work_histogram as fn() -> Histogram,
        );
        registry.register(
            "infer_batch_seconds",
            "ONNX Runtime time per batch, by model and execution provider",
            inference_seconds.clone(),
        );
        let inference_rows = Family::<ModelLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1.0, 4.0, 10))) as fn() -> Histogram,
        );
        registry.register(
            "infer_batch_rows",
            "Rows per inference batch",
            inference_rows.clone(),
        );
        let provider = Family::<ProviderLabel, Gauge>::default();
        registry.register(
            "infer_provider_info",
            "The ONNX Runtime execution provider in use (1)",
            provider.clone(),
        );
        let redis_seconds = work_histogram();
        registry.register(
            "publish_pipeline_seconds",
            "Time per Redis pipeline",
            redis_seconds.clone(),
        );
        let repairs = Counter::default();
        registry.register(
            "publish_repairs",
            "Times Redis was found without the model marker (lost data) and everything was published again",
            repairs.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "publish_redis_errors",
            "Failed Redis writes (each retried)",
            redis_errors.clone(),
        );
        let redis_writes = Counter::default();
        registry.register(
            "publish_redis_commands",
            "Redis commands written",
            redis_writes.clone(),
        );
        let adaptation_seconds = work_histogram();
        registry.register(
            "adapt_batch_seconds",
            "Adaptation and top-K time of the users of one batch",
            adaptation_seconds.clone(),
        );
        let users_adapted = Counter::default();
        registry.register("adapt_users", "Users adapted", users_adapted.clone());
        let freshness = Family::<KindLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1e-3, 2.0, 20))) as fn() -> Histogram,
        );
        registry.register(
            "publish_freshness_seconds",
            "Publish time minus the event's Kafka time, by kind (item, edge, user)",
            freshness.clone(),
        );
        let ingest_delay = Histogram::new(exponential_buckets(1e-3, 2.0, 20));
        registry.register(
            "ingest_delay_seconds",
            "Time ingest received a message minus its Kafka time",
            ingest_delay.clone(),
        );
        let lag = Family::<TopicPartition, Gauge>::default();
        registry.register(
            "ingest_consumer_lag_messages",
            "Messages behind the end of each assigned partition",
            lag.clone(),
        );
        let model = Family::<Version, Gauge>::default();
        registry.register(
            "serve_model_info",
            "The model version served (1)",
            model.clone(),
        );
        let published = Family::<KindLabel, Counter>::default();
        registry.register(
            "publish_keys",
            "Keys published, by kind (item, user, recs)",
            published.clone(),
        );
        let offsets = Counter::default();
        registry.register(
            "publish_offsets_stored",
            "Partition offsets stored for commit after publishing",
            offsets.clone(),
        );
        let errors = Family::<StageKind, Counter>::default();
        registry.register(
            "serve_errors",
            "Runtime errors by stage (start, ingest, text, core, publish) and kind (retryable, fatal)",
            errors.clone(),
        );
        let quality_interactions = Counter::default();
        registry.register(
            "quality_interactions",
            "Interactions with an item new to a user who had a published list (prequential evaluation)",
            quality_interactions.clone(),
        );
        let quality_hits = Counter::default();
        registry.register(
            "quality_hits",
            "Of them, interactions whose item was in the user's last published list (hit rate = hits / interactions)",
            quality_hits.clone(),
        );
        let quality_rr = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "quality_reciprocal_rank",
            "Sum of 1/rank of the item in the user's last published list, 0 when absent (MRR = this / interactions)",
            quality_rr.clone(),
        );
        let quality_rank = Histogram::new([1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        registry.register(
            "quality_hit_rank",
            "Rank of a hit in the user's last published list",
            quality_rank.clone(),
        );
        Self {
            registry,
            errors,
            quality_interactions,
            quality_hits,
            quality_rr,
            quality_rank,
            events,
            dlq,
            unknown_relations,
            future_ts,
            users,
            users_evicted,
            placeholders,
            placeholders_expired,
            replica_partitions,
            replica_leader,
            replica_rebalances,
            memory_resident,
            memory_budget,
            memory_pressure,
            memory_pressure_seconds,
            memory_trims,
            unknown_seen: Mutex::new(Default::default()),
            graph_items,
            graph_edges,
            propagation_edits,
            propagation_seconds,
            inference_seconds,
            inference_rows,
            provider,
            redis_seconds,
            redis_errors,
            repairs,
            snapshot_writes,
            snapshot_failures,
            snapshot_bytes,
            snapshot_seconds,
            restore_seconds,
            restore_messages,
            redis_writes,
            adaptation_seconds,
            users_adapted,
            freshness,
            ingest_delay,
            lag,
            model,
            published,
            offsets,
            samples: Mutex::new(Samples::default()),
            version: Mutex::new(String::new()),
            provider_name: Mutex::new(String::new()),
            redis_totals: Mutex::new((0, 0.0)),
            inference_totals: Mutex::new(BTreeMap::new()),
        }
    }

    /// One input message of `topic` with `outcome`.
    pub fn event(&self, topic: &str, outcome: &str) {
        self.events(topic, outcome, 1);
    }

    /// `n` input messages of `topic` with `outcome`.
    pub fn events(&self, topic: &str, outcome: &str, n: u64) {
        self.events
            .get_or_create(&TopicOutcome {
                topic: topic.into(),
                outcome: outcome.into(),
            })
            .inc_by(n);
    }

    /// A dead letter with `reason` (its reason code).
    pub fn dead_letter(&self, reason: &str) {
        self.dlq
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// An event whose time was capped ([`crate::ingest::batch::cap_future`]).
    pub fn future_ts_capped(&self) {
        self.future_ts.inc();
    }

    /// A relation event the model does not know.
    pub fn unknown_relation(&self, relation: &str) {
        self.unknown_relations.inc();
        // The name comes from input data: a counter label would be unbounded,
        // so it goes to the log, once per name, for the first 100 names.
        let mut seen = self
            .unknown_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.len() < 100 && seen.insert(relation.to_string()) {
            tracing::warn!(relation = %relation.chars().take(64).collect::<String>(), "relation unknown to the model: its events are ignored");
        }
    }

    /// One runtime error of `stage` (see `crate::serve::error`).
    pub fn error(&self, stage: &str, kind: &str) {
        self.errors
            .get_or_create(&StageKind {
                stage: stage.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// One interaction of a user with an item new to them, the user having a
    /// published list: the item's 0-based position in that list, if there.
    pub fn prequential(&self, rank: Option<usize>) {
        self.quality_interactions.inc();
        if let Some(r) = rank {
            self.quality_hits.inc();
            self.quality_rr.inc_by(1.0 / (r + 1) as f64);
            self.quality_rank.observe((r + 1) as f64);
        }
    }

    /// The prequential quality so far.
    pub fn prequential_summary(&self) -> Prequential {
        let n = self.quality_interactions.get();
        let d = n.max(1) as f64;
        Prequential {
            interactions: n,
            hits: self.quality_hits.get(),
            hit_rate: self.quality_hits.get() as f64 / d,
            mrr: self.quality_rr.get() / d,
        }
    }

    /// Graph size.
    pub fn set_graph(&self, items: usize, edges: &[(String, usize)]) {
        self.graph_items.set(items as i64);
        for (r, n) in edges {
            self.graph_edges
                .get_or_create(&Relation {
                    relation: r.clone(),
                })
                .set(*n as i64);
        }
    }

    /// One propagation batch.
    pub fn propagation(&self, edits: usize, seconds: f64) {
        self.propagation_edits.observe(edits as f64);
        self.propagation_seconds.observe(seconds);
    }

    /// One inference batch.
    pub fn inference(&self, model: &str, provider: &str, rows: usize, seconds: f64) {
        self.inference_seconds
            .get_or_create(&ModelProvider {
                model: model.into(),
                provider: provider.into(),
            })
            .observe(seconds);
        self.inference_rows
            .get_or_create(&ModelLabel {
                model: model.into(),
            })
            .observe(rows as f64);
        let mut t = self
            .inference_totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let e = t.entry(model.to_string()).or_default();
        e.0 += rows as u64;
        e.1 += seconds;
    }

    /// Rows run through `model` and seconds spent, in total.
    pub fn inference_totals(&self, model: &str) -> (u64, f64) {
        self.inference_totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .copied()
            .unwrap_or_default()
    }

    /// The execution provider in use.
    pub fn set_provider(&self, provider: &str) {
        self.provider.clear();
        self.provider
            .get_or_create(&ProviderLabel {
                provider: provider.into(),
            })
            .set(1);
        *self
            .provider_name
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = provider.into();
    }

    /// The execution provider in use.
    pub fn provider_name(&self) -> String {
        self.provider_name
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// One Redis pipeline of `commands`.
    pub fn redis_write(&self, commands: usize, seconds: f64) {
        self.redis_writes.inc_by(commands as u64);
        self.redis_seconds.observe(seconds);
        let mut t = self
            .redis_totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.0 += commands as u64;
        t.1 += seconds;
    }

    /// Redis commands written and seconds spent writing them, in total.
    pub fn redis_totals(&self) -> (u64, f64) {
        *self
            .redis_totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Users kept in memory.
    pub fn set_users(&self, n: usize) {
        self.users.set(n as i64);
    }

    /// `n` users evicted.
    pub fn users_evicted(&self, n: u64) {
        self.users_evicted.inc_by(n);
    }

    /// Placeholder slots kept.
    pub fn set_placeholders(&self, n: usize) {
        self.placeholders.set(n as i64);
    }

    /// `n` placeholder slots expired.
    pub fn placeholders_expired(&self, n: u64) {
        self.placeholders_expired.inc_by(n);
    }

    /// This replica's share after a rebalance: `partitions` owned, leading.
    pub fn set_replica(&self, partitions: usize, leader: bool) {
        self.replica_partitions.set(partitions as i64);
        self.replica_leader.set(leader as i64);
        self.replica_rebalances.inc();
    }

    /// One instance, not scaled out: it leads.
    pub fn set_alone(&self) {
        self.replica_leader.set(1);
    }

    /// A reading of the resident set against the budget (bytes; 0: none).
    pub fn set_memory(&self, resident: u64, budget: u64) {
        self.memory_resident.set(resident as i64);
        self.memory_budget.set(budget as i64);
    }

    /// Under pressure or not; `secs` more spent under it.
    pub fn memory_pressure(&self, on: bool, secs: f64) {
        self.memory_pressure.set(on as i64);
        if secs > 0.0 {
            self.memory_pressure_seconds.inc_by(secs);
        }
    }

    /// Freed heap memory handed back.
    pub fn memory_trim(&self) {
        self.memory_trims.inc();
    }

    /// A repair of lost Redis data started.
    pub fn repair(&self) {
        self.repairs.inc();
    }

    /// A snapshot written (`Some((bytes, seconds))`) or failed (`None`).
    pub fn snapshot(&self, written: Option<(u64, f64)>) {
        match written {
            Some((bytes, seconds)) => {
                self.snapshot_writes.inc();
                self.snapshot_bytes.set(bytes as i64);
                self.snapshot_seconds.set(seconds);
            }
            None => {
                self.snapshot_failures.inc();
            }
        }
    }

    /// The start-up restore: messages re-read and its duration.
    pub fn restored(&self, messages: u64, seconds: f64) {
        self.restore_messages.set(messages as i64);
        self.restore_seconds.set(seconds);
    }

    /// A failed Redis write.
    pub fn redis_error(&self) {
        self.redis_errors.inc();
    }

    /// `users` users adapted and ranked in `seconds` (one batch).
    pub fn adaptation(&self, users: usize, seconds: f64) {
        self.adaptation_seconds.observe(seconds);
        self.users_adapted.inc_by(users as u64);
    }

    /// Freshness of one published effect of `kind`.
    pub fn freshness(&self, kind: &str, seconds: f64) {
        self.freshness
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(seconds);
        let mut s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        keep_sample(
            s.by_kind.entry(kind.to_string()).or_default(),
            seconds * 1000.0,
        );
    }

    /// Delays of the messages of one ingest batch: when ingest received each
    /// one minus its Kafka time (the broker's and the client's share of
    /// freshness, before the engine's work).
    pub fn ingest_delays(&self, seconds: &[f64]) {
        let mut s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        for &x in seconds {
            self.ingest_delay.observe(x);
            keep_sample(&mut s.ingest, x * 1000.0);
        }
    }

    /// Exact quantiles (ms) of the ingest delays.
    pub fn ingest_delay_summary(&self) -> Option<Quantiles> {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        Quantiles::of(s.ingest.0.clone())
    }

    /// Forgets the raw freshness samples (the histograms keep counting).
    pub fn reset_freshness(&self) {
        let mut s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        s.by_kind.clear();
        s.ingest = Default::default();
    }

    /// Exact freshness quantiles (ms) of `kind`, or of all kinds.
    pub fn freshness_summary(&self, kind: Option<&str>) -> Option<Quantiles> {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let v: Vec<f64> = match kind {
            Some(k) => s.by_kind.get(k).map(|x| x.0.clone()).unwrap_or_default(),
            None => s
                .by_kind
                .values()
                .flat_map(|x| x.0.iter().copied())
                .collect(),
        };
        Quantiles::of(v)
    }

    /// Consumer lag of one partition.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag
            .get_or_create(&TopicPartition {
                topic: topic.into(),
                partition,
            })
            .set(lag);
    }

    /// The model version served.
    pub fn set_model(&self, version: &str) {
        self.model.clear();
        self.model
            .get_or_create(&Version {
                version: version.into(),
            })
            .set(1);
        *self.version.lock().unwrap_or_else(PoisonError::into_inner) = version.into();
    }

    /// Keys published.
    pub fn published(&self, kind: &str, n: u64) {
        self.published
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(n);
    }

    /// Everything of `kind` published so far.
    pub fn published_total(&self, kind: &str) -> u64 {
        self.published
            .get_or_create(&KindLabel { kind: kind.into() })
            .get()
    }

    /// Offsets stored for commit.
    pub fn offsets_committed(&self, n: u64) {
        self.offsets.inc_by(n);
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Liveness and readiness.
#[derive(Debug)]
pub struct Health {
    /// The process runs.
    pub live: AtomicBool,
    /// The state is restored and the consumer subscribed.
    pub ready: AtomicBool,
    /// The last Redis write succeeded.
    pub redis_ok: AtomicBool,
    /// The last round of dead letters was delivered.
    pub dlq_ok: AtomicBool,
    /// Redis lost what was published (its `{prefix}:model` marker is gone):
    /// ingest asks the core to publish everything again.
    pub redis_lost: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            live: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            redis_ok: AtomicBool::new(false),
            dlq_ok: AtomicBool::new(true),
            redis_lost: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Ready to serve: restored, subscribed, Redis answering, dead letters
    /// delivered.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_none()
    }

    /// Why the engine is not ready (`None`: ready).
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::SeqCst) {
            Some("restoring")
        } else if !self.redis_ok.load(Ordering::SeqCst) {
            Some("redis unavailable")
        } else if !self.dlq_ok.load(Ordering::SeqCst) {
            Some("dead-letter topic unavailable")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_appear_with_labels() {
        let m = Metrics::new();
        m.event("items", "applied");
        m.dead_letter("json");
        m.inference("item_fusion", "cpu", 10, 0.002);
        m.set_model("v1");
        m.set_model("v2");
        for n in 0..300 {
            m.unknown_relation(&format!("made-up-{n}"));
        }
        let t = m.encode();
        assert!(
            t.contains("thaw_ingest_events_total{topic=\"items\",outcome=\"applied\"} 1"),
            "{t}"
        );
        assert!(t.contains("thaw_ingest_dead_letters_total{reason=\"json\"} 1"));
        assert!(t.contains("model=\"item_fusion\",provider=\"cpu\""));
        assert!(t.contains("thaw_serve_model_info{version=\"v2\"} 1"));
        assert!(!t.contains("version=\"v1\""));
        assert!(t.contains("thaw_core_unknown_relations_total 300"));
        assert!(!t.contains("made-up"), "no label from input data");
        m.prequential(Some(0));
        m.prequential(Some(3));
        m.prequential(None);
        m.prequential(None);
        let q = m.prequential_summary();
        assert_eq!((q.interactions, q.hits), (4, 2));
        assert!((q.hit_rate - 0.5).abs() < 1e-12);
        assert!((q.mrr - (1.0 + 0.25) / 4.0).abs() < 1e-12);
        assert!(m.encode().contains("thaw_quality_hits_total 2"));
        m.prequential(Some(1));
        let later = m.prequential_summary().since(&q);
        assert_eq!((later.interactions, later.hits), (1, 1));
        assert!((later.mrr - 0.5).abs() < 1e-12);
        assert_eq!(
            m.unknown_seen.lock().unwrap().len(),
            100,
            "names logged are capped"
        );
    }

    /// Every family is named `thaw_<stage>_<what>[_<unit>]`, the stage one of
    /// the engine's.
    #[test]
    fn names_follow_the_stage_convention() {
        let t = Metrics::new().encode();
        let stages = [
            "ingest", "infer", "graph", "core", "adapt", "publish", "serve", "quality", "memory",
        ];
        for line in t.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap();
            let stage = name
                .strip_prefix("thaw_")
                .unwrap()
                .split('_')
                .next()
                .unwrap();
            assert!(stages.contains(&stage), "{name}: stage {stage:?}");
        }
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let m = Metrics::new();
        for ms in 1..=100 {
            m.freshness("item", ms as f64 / 1000.0);
        }
        let q = m.freshness_summary(Some("item")).unwrap();
        assert_eq!((q.count, q.p50, q.p99, q.max), (100, 50.0, 99.0, 100.0));
        assert!(m.freshness_summary(Some("user")).is_none());
        m.freshness("user", 0.5);
        assert_eq!(m.freshness_summary(None).unwrap().count, 101);
    }
}
