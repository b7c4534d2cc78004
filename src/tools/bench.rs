//! `thaw bench`: a synthetic catalogue shaped like a real one, and the
//! end-to-end load test of the engine against the limits of the machine,
//! each figure a ratio against a baseline measured in the same run.
//!
//! The generator ([`generate`]) is seeded: power-law item popularity (Zipf
//! weights over a random ranking, exponent [`INTERACTION_EXPONENT`] for
//! interactions), three relations with MPKG's densities (`also_bought` 20,
//! `also_viewed` 10, `bought_together` 1 edge per item: 2.0M / 1.0M / 0.1M
//! over 100K items), titles of 4–8 words from a 500-word vocabulary, and an
//! interaction stream in which items and users arrive over time.
//!
//! An edge is drawn as a product page's list is: its source uniformly (every
//! item has its own list), its target by popularity with exponent
//! [`LINK_EXPONENT`] (preferential attachment, degree exponent 1 + 1/0.5 = 3
//! as in Barabási–Albert graphs): on 100K items the most linked item has
//! ~4K neighbours. Drawing both endpoints from the interaction popularity
//! instead (`--link-exponent 0.8 --link-both-ends`) gives a graph whose top
//! item touches most of the catalogue, which no product graph does.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde::Serialize;

use crate::graph::{Pkg, Propagator, PropagatorConfig};
use crate::ingest::{Event, InteractionEvent, ItemEvent, Kind, Op, RelationEvent, Topic};
use crate::kafka::{EmbeddedBroker, KafkaSettings};
use crate::serve::config::Settings;
use crate::serve::metrics::Quantiles;
use crate::serve::{Engine, EngineHandle, Progress};

/// The relations of the synthetic catalogue and their edges per item.
pub const RELATIONS: [(&str, usize); 3] = [
    ("also_bought", 20),
    ("also_viewed", 10),
    ("bought_together", 1),
];

/// Catalogue sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// 10K items, ~0.3M edges.
    Small,
    /// 100K items, ~3M edges.
    Medium,
    /// 1M items, ~30M edges.
    Large,
}

impl Size {
    /// Items of the size.
    pub fn items(self) -> usize {
        match self {
            Size::Small => 10_000,
            Size::Medium => 100_000,
            Size::Large => 1_000_000,
        }
    }
}

/// A synthetic catalogue and its streams.
#[derive(Debug, Clone)]
pub struct Synth {
    /// Item ids, in arrival order.
    pub ids: Vec<String>,
    /// Titles.
    pub titles: Vec<String>,
    /// Edges `(relation, a, b)` over item indexes, `a` and `b` both arrived.
    pub edges: Vec<(usize, u32, u32)>,
    /// Interactions `(user, item)`, in time order.
    pub interactions: Vec<(u32, u32)>,
    /// Items by popularity rank (most popular first).
    pub by_rank: Vec<u32>,
    link: Sampler,
    links: LinkModel,
}

#[derive(Debug, Clone)]
struct Sampler {
    cumulative: Vec<f64>,
}

impl Sampler {
    fn zipf(n: usize, s: f64) -> Self {
        let mut c = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 0..n {
            acc += 1.0 / ((k + 1) as f64).powf(s);
            c.push(acc);
        }
        Self { cumulative: c }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c < x)
            .min(self.cumulative.len() - 1)
    }
}

/// The generator's 500 title words: three syllables each, which the
/// text encoder's tokenizer cuts into 2–3 word pieces, about as many tokens
/// as a real product title's words.
fn vocabulary() -> Vec<String> {
    let syll = ["ka", "lo", "mi", "ra", "ne", "to", "su", "vi", "de", "po"];
    (0..500)
        .map(|k| {
            format!(
                "{}{}{}",
                syll[k % 10],
                syll[(k / 10) % 10],
                syll[(k / 100) % 10]
            )
        })
        .collect()
}

/// A title of 4–8 words of `vocab`.
fn title(vocab: &[String], rng: &mut impl Rng) -> String {
    let w = rng.random_range(4..=8);
    (0..w)
        .map(|_| vocab[rng.random_range(0..vocab.len())].as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Zipf exponent of item popularity in interactions.
pub const INTERACTION_EXPONENT: f64 = 0.8;

/// Zipf exponent of an edge target's popularity.
pub const LINK_EXPONENT: f64 = 0.5;

/// How edges are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Zipf exponent of the target's popularity.
    pub exponent: f64,
    /// Draw the source by popularity too (else uniformly).
    pub both_ends: bool,
}

impl Default for LinkModel {
    fn default() -> Self {
        Self {
            exponent: LINK_EXPONENT,
            both_ends: false,
        }
    }
}

/// Generates a catalogue of `n` items (seeded) with the default
/// [`LinkModel`].
pub fn generate(n: usize, seed: u64) -> Synth {
    generate_with(n, seed, LinkModel::default())
}

/// Generates a catalogue of `n` items (seeded). Item popularity ranks are a
/// random permutation of arrival order, so hubs arrive at any time.
pub fn generate_with(n: usize, seed: u64, links: LinkModel) -> Synth {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let vocab = vocabulary();
    let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    let titles: Vec<String> = (0..n).map(|_| title(&vocab, &mut rng)).collect();
    let mut rank: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        rank.swap(i, j);
    }
    let by_rank: Vec<u32> = {
        let mut v = vec![0u32; n];
        for (item, &r) in rank.iter().enumerate() {
            v[r as usize] = item as u32;
        }
        v
    };
    let zipf = Sampler::zipf(n, INTERACTION_EXPONENT);
    let link = Sampler::zipf(n, links.exponent);
    let mut synth = Synth {
        ids,
        titles,
        edges: Vec::new(),
        interactions: Vec::new(),
        by_rank,
        link,
        links,
    };
    let mut edges = Vec::new();
    for (r, (_, per_item)) in RELATIONS.iter().enumerate() {
        for _ in 0..n * per_item {
            let (a, b) = synth.random_edge(&mut rng);
            if a != b {
                edges.push((r, a, b));
            }
        }
    }
    // Interactions: users arrive over time, each with a few items.
    let mut interactions = Vec::new();
    let users = n / 2;
    for u in 0..users as u32 {
        for _ in 0..rng.random_range(2..=6) {
            interactions.push((u, synth.by_rank[zipf.sample(&mut rng)]));
        }
    }
    synth.edges = edges;
    synth.interactions = interactions;
    synth
}

impl Synth {
    /// An item drawn as an edge's target is (by link popularity).
    pub fn popular_item(&self, rng: &mut impl Rng) -> u32 {
        self.by_rank[self.link.sample(rng)]
    }

    /// An edge drawn as the catalogue's are (see [`LinkModel`]); may be a
    /// self-loop or an existing edge.
    pub fn random_edge(&self, rng: &mut impl Rng) -> (u32, u32) {
        let a = if self.links.both_ends {
            self.popular_item(rng)
        } else {
            rng.random_range(0..self.ids.len() as u32)
        };
        (a, self.popular_item(rng))
    }

    /// A new edge drawn as the catalogue's are, not already in `pkg`.
    pub fn new_edge(&self, pkg: &Pkg, r: usize, rng: &mut impl Rng) -> (u32, u32) {
        loop {
            let (a, b) = self.random_edge(rng);
            if a != b
                && pkg
                    .neighbours(r, a)
                    .is_ok_and(|n| n.binary_search(&b).is_err())
            {
                return (a, b);
            }
        }
    }

    /// The catalogue as events: every item, then every edge, then the
    /// interactions (`ts` in ms from `t0`).
    pub fn events(&self, t0: u64) -> Vec<Event> {
        let mut out =
            Vec::with_capacity(self.ids.len() + self.edges.len() + self.interactions.len());
        for (i, id) in self.ids.iter().enumerate() {
            out.push(Event::Item(ItemEvent {
                item_id: id.clone(),
                title: self.titles[i].clone(),
                description: None,
                categories: Vec::new(),
                features: None,
                ts: t0,
            }));
        }
        for &(r, a, b) in &self.edges {
            out.push(Event::Relation(RelationEvent {
                src: self.ids[a as usize].clone(),
                dst: self.ids[b as usize].clone(),
                relation: RELATIONS[r].0.to_string(),
                op: Op::Add,
                ts: t0,
            }));
        }
        for &(u, i) in &self.interactions {
            out.push(Event::Interaction(InteractionEvent {
                user_id: format!("u{u}"),
                item_id: self.ids[i as usize].clone(),
                kind: Kind::Click,
                value: None,
                ts: t0,
            }));
        }
        out
    }

    /// The graph alone.
    pub fn pkg(&self) -> Result<Pkg> {
        let mut pkg = Pkg::new(RELATIONS.iter().map(|r| r.0))?;
        pkg.reserve(self.ids.len());
        for id in &self.ids {
            pkg.add_item(id);
        }
        for (k, &(r, a, b)) in self.edges.iter().enumerate() {
            pkg.add_edge(r, a, b)?;
            // Windows of edits, as the engine takes them (bounded edit log).
            if k % 65_536 == 0 {
                let _ = pkg.take_changes();
            }
        }
        let _ = pkg.take_changes();
        Ok(pkg)
    }
}

fn rss_bytes() -> u64 {
    crate::serve::memory::resident_bytes().unwrap_or(0)
}

/// Graph figures: memory per item and edge, full vs incremental propagation.
#[derive(Debug, Clone, Serialize)]
pub struct GraphFigures {
    /// Items.
    pub items: usize,
    /// Distinct edges.
    pub edges: usize,
    /// Degree (all relations) of the most linked item.
    pub max_degree: usize,
    /// Median degree (all relations).
    pub median_degree: usize,
    /// 99th-percentile degree (all relations).
    pub p99_degree: usize,
    /// Seconds to build the graph.
    pub build_seconds: f64,
    /// Seconds of one full propagation (every relation, M = 3, d = 64).
    pub full_seconds: f64,
    /// Seconds to apply one added edge.
    pub one_edge_seconds: f64,
    /// Seconds to apply a batch of 1,000 added edges.
    pub batch_1000_seconds: f64,
    /// Full time over one-edge time.
    pub incremental_vs_full_per_edge: f64,
    /// Full time over per-edge time in a batch of 1,000.
    pub incremental_vs_full_per_edge_batch_1000: f64,
    /// The engine's propagation tolerance (`graph.tolerance`) for the
    /// `tolerant_*` figures.
    pub tolerance: f32,
    /// Seconds to apply one added edge with the tolerance.
    pub tolerant_one_edge_seconds: f64,
    /// Seconds to apply 1,000 added edges with the tolerance.
    pub tolerant_batch_1000_seconds: f64,
    /// Full time over one-edge time with the tolerance.
    pub tolerant_incremental_vs_full_per_edge: f64,
    /// Full time over per-edge time in a batch of 1,000, with the tolerance.
    pub tolerant_incremental_vs_full_per_edge_batch_1000: f64,
    /// Largest absolute error of any propagated value against the exact
    /// propagation after the tolerant edges (21 batches).
    pub tolerant_max_abs_error: f64,
    /// Largest absolute propagated value (the scale of that error).
    pub max_abs_value: f64,
    /// RMS of the propagated values (layers 1..M).
    pub rms_value: f64,
    /// Resident bytes per item (graph + propagated layers) .
    pub bytes_per_item: f64,
    /// Resident bytes per edge (adjacency).
    pub bytes_per_edge: f64,
}

/// Builds the graph of `synth`, measures memory and propagation.
pub fn graph_figures(synth: &Synth, seed: u64, tolerance: f32) -> Result<GraphFigures> {
    let d = 64;
    let base = rss_bytes();
    let t0 = Instant::now();
    let mut pkg = Pkg::new(RELATIONS.iter().map(|r| r.0))?;
    pkg.reserve(synth.ids.len());
    for id in &synth.ids {
        pkg.add_item(id);
    }
    let _ = pkg.take_changes();
    let after_items = rss_bytes();
    for (k, &(r, a, b)) in synth.edges.iter().enumerate() {
        pkg.add_edge(r, a, b)?;
        if k % 65_536 == 0 {
            let _ = pkg.take_changes();
        }
    }
    let _ = pkg.take_changes();
    let build_seconds = t0.elapsed().as_secs_f64();
    let after_edges = rss_bytes();
    let edges: usize = pkg.edge_counts().iter().sum();
    let mut degrees: Vec<usize> = (0..pkg.slots() as u32)
        .map(|x| {
            (0..RELATIONS.len())
                .map(|r| pkg.degree(r, x).unwrap_or(0))
                .sum()
        })
        .collect();
    degrees.sort_unstable();
    let at = |p: f64| {
        degrees
            .get(((p * degrees.len() as f64) as usize).min(degrees.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let (max_degree, median_degree, p99_degree) = (at(1.0), at(0.5), at(0.99));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = pkg.slots();
    // Inputs share a common direction, as projected text embeddings do
    // (sentence embeddings of unrelated titles have cosines around 0.5):
    // a shared row plus as much independent noise, so rows have cosine ~0.5.
    let inputs: Vec<Array2<f32>> = (0..RELATIONS.len())
        .map(|_| {
            let common: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            Array2::from_shape_fn((n, d), |(_, j)| common[j] + rng.random_range(-1.0..1.0f32))
        })
        .collect();
    let views: Vec<_> = inputs.iter().map(|a| a.view()).collect();
    let cfg = PropagatorConfig::default();
    let before_prop = rss_bytes();
    let t1 = Instant::now();
    let mut prop = Propagator::full(cfg, &pkg, &views)?;
    let full_seconds = t1.elapsed().as_secs_f64();
    let after_prop = rss_bytes();
    let mut tolerant = Propagator::full(
        PropagatorConfig {
            tolerance,
            ..Default::default()
        },
        &pkg,
        &views,
    )?;
    drop(inputs);
    // One new edge (median of 20), then 1,000 in one batch, drawn as the
    // catalogue's edges are (by popularity, so most touch a hub); the same
    // batches go through the exact and the tolerant propagator.
    let mut apply = |pkg: &Pkg, batch: &crate::graph::Batch| -> Result<(f64, f64)> {
        let t = Instant::now();
        prop.apply(pkg, batch)?;
        let exact = t.elapsed().as_secs_f64();
        let t = Instant::now();
        tolerant.apply(pkg, batch)?;
        Ok((exact, t.elapsed().as_secs_f64()))
    };
    let mut samples: Vec<(f64, f64)> = Vec::new();
    for _ in 0..20 {
        let (a, b) = synth.new_edge(&pkg, 0, &mut rng);
        pkg.add_edge(0, a, b)?;
        let batch = pkg.take_changes();
        samples.push(apply(&pkg, &batch)?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let one_edge_seconds = median(samples.iter().map(|s| s.0).collect());
    let tolerant_one_edge_seconds = median(samples.iter().map(|s| s.1).collect());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 1);
    for _ in 0..1000 {
        let (a, b) = synth.new_edge(&pkg, 1, &mut rng);
        pkg.add_edge(1, a, b)?;
    }
    let batch = pkg.take_changes();
    let (batch_1000_seconds, tolerant_batch_1000_seconds) = apply(&pkg, &batch)?;
    let (mut err, mut scale, mut sq, mut cells) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for r in 0..RELATIONS.len() {
        for k in 1..=prop.hops() {
            for (a, b) in prop.layer(r, k)?.iter().zip(tolerant.layer(r, k)?.iter()) {
                err = err.max(f64::from((a - b).abs()));
                scale = scale.max(f64::from(a.abs()));
                sq += f64::from(*a) * f64::from(*a);
                cells += 1;
            }
        }
    }
    let items = synth.ids.len();
    let ratio = |secs: f64| full_seconds / secs.max(1e-12);
    Ok(GraphFigures {
        items,
        edges,
        max_degree,
        median_degree,
        p99_degree,
        build_seconds,
        full_seconds,
        one_edge_seconds,
        batch_1000_seconds,
        incremental_vs_full_per_edge: ratio(one_edge_seconds),
        incremental_vs_full_per_edge_batch_1000: ratio(batch_1000_seconds / 1000.0),
        tolerance,
        tolerant_one_edge_seconds,
        tolerant_batch_1000_seconds,
        tolerant_incremental_vs_full_per_edge: ratio(tolerant_one_edge_seconds),
        tolerant_incremental_vs_full_per_edge_batch_1000: ratio(
            tolerant_batch_1000_seconds / 1000.0,
        ),
        tolerant_max_abs_error: err,
        max_abs_value: scale,
        rms_value: (sq / cells.max(1) as f64).sqrt(),
        bytes_per_item: (after_items.saturating_sub(base) + after_prop.saturating_sub(before_prop))
            as f64
            / items as f64,
        bytes_per_edge: after_edges.saturating_sub(after_items) as f64 / edges.max(1) as f64,
    })
}

/// Options of one benchmark run (`thaw bench`).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Catalogue size.
    pub size: Size,
    /// Redis to write to (the engine's keys go under a prefix of the run).
    pub redis_url: String,
    /// The text encoder's folder.
    pub text_dir: std::path::PathBuf,
    /// Offered rate of the freshness phase, events per second.
    pub rate: f64,
    /// Further freshness phases at these rates, after the first.
    pub more_rates: Vec<f64>,
    /// Length of the freshness phase, seconds.
    pub seconds: f64,
    /// Share of the freshness phase's events that are new items with a
    /// title (each followed by two edges to popular items); the rest are
    /// new edges between existing items.
    pub item_share: f64,
    /// Only the graph figures (and, for `large`, the from-scratch build).
    pub graph_only: bool,
    /// `graph.tolerance` of the tolerant figures and of the engine.
    pub tolerance: f32,
    /// How the catalogue's edges are drawn.
    pub links: LinkModel,
    /// Restart the engine from its snapshot and from the log alone after
    /// the run ([`RestartFigures`]).
    pub restart: bool,
}

impl BenchOptions {
    /// Defaults for `size`: 10,000 events/s for 10 s, 2% new items.
    pub fn new(size: Size) -> Self {
        Self {
            size,
            redis_url: "redis://127.0.0.1:6379".into(),
            text_dir: "models/text".into(),
            rate: 10_000.0,
            more_rates: Vec::new(),
            seconds: 10.0,
            item_share: 0.02,
            graph_only: false,
            tolerance: crate::serve::config::GraphSettings::default().tolerance,
            links: LinkModel::default(),
            restart: false,
        }
    }
}

/// Building a catalogue's embeddings from nothing (`large`): the graph, the
/// projection of every item's features, the propagation and the fusion.
#[derive(Debug, Clone, Serialize)]
pub struct ScratchFigures {
    /// Items.
    pub items: usize,
    /// Seconds to build the graph (items and edges).
    pub graph_seconds: f64,
    /// Seconds of `item_projection` over every item (ONNX Runtime), from
    /// features drawn at random in place of text vectors.
    pub projection_seconds: f64,
    /// Seconds of one full propagation (every relation, M hops).
    pub propagation_seconds: f64,
    /// Seconds of `item_fusion` over every item (ONNX Runtime).
    pub fusion_seconds: f64,
    /// Sum of the four: every embedding from scratch, text aside.
    pub total_seconds: f64,
    /// The text encoder's titles per second, measured on a sample.
    pub text_items_per_second: f64,
    /// Titles in that sample.
    pub text_sample: usize,
    /// `items / text_items_per_second`: what encoding every title would
    /// add on this machine (an estimate from the sample, not a run).
    pub text_seconds_estimated: f64,
}

/// One freshness phase.
#[derive(Debug, Clone, Serialize)]
pub struct FreshnessPhase {
    /// Offered rate, events per second.
    pub offered_events_per_second: f64,
    /// Rate the engine applied them at (offered events over the time to the
    /// last one published).
    pub applied_events_per_second: f64,
    /// Freshness quantiles, ms, as [`BenchReport::freshness_ms`].
    pub freshness_ms: BTreeMap<String, Quantiles>,
}

/// The end-to-end report (`--out`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Catalogue size.
    pub size: Size,
    /// The catalogue phase: every item with its title, alone.
    pub items_with_text: ItemsPhase,
    /// The stream phase: every edge and interaction, the catalogue in place.
    pub edges_and_interactions: StreamPhase,
    /// Freshness at the offered rate, ms, by kind (`edge`, `new_item`), and
    /// `ingest_delay`: Kafka time to the engine receiving the message.
    pub freshness_ms: BTreeMap<String, Quantiles>,
    /// Offered rate of the freshness phase.
    pub offered_events_per_second: f64,
    /// Rate the engine applied the freshness phase's events at (offered
    /// events over the time from the first to the last being published).
    pub freshness_phase_events_per_second: f64,
    /// Share of new items in the freshness phase.
    pub item_share: f64,
    /// Every freshness phase (the first is the one above).
    pub freshness_phases: Vec<FreshnessPhase>,
    /// Full propagation time over one edge's incremental time, at the
    /// engine's default tolerance (`graph.incremental_vs_full_per_edge`
    /// is the exact figure).
    pub incremental_vs_full_per_edge: f64,
    /// thaw's Redis commands per second while publishing.
    pub redis_writes_per_second: f64,
    /// `redis-benchmark -P 64 -d 256 -t set`, requests per second.
    pub redis_benchmark_per_second: f64,
    /// thaw / redis-benchmark.
    pub ratio_vs_redis_benchmark: f64,
    /// `redis-benchmark -P 64` of thaw's own item write (HSET of a
    /// 256-byte `emb`, `model`, `ts`), requests per second.
    pub redis_benchmark_hset_per_second: f64,
    /// thaw / that.
    pub ratio_vs_redis_benchmark_hset: f64,
    /// Resident bytes per item.
    pub bytes_per_item: f64,
    /// Resident bytes per edge.
    pub bytes_per_edge: f64,
    /// The graph figures in full.
    pub graph: GraphFigures,
    /// `large` only: every embedding from scratch.
    pub scratch: Option<ScratchFigures>,
    /// With `--restart`: restart times from a snapshot and from the log.
    pub restart: Option<RestartFigures>,
    /// Wall time of the whole benchmark.
    pub seconds: f64,
}

/// Restart figures (`--restart`): after the run the engine stops (its
/// shutdown writes a snapshot), then starts twice on the same log and
/// consumer group, ready when its state is restored and the group joined.
#[derive(Debug, Clone, Serialize)]
pub struct RestartFigures {
    /// Messages in the log up to the committed offsets.
    pub messages_in_log: u64,
    /// Start to ready with `snapshot.dir`, seconds.
    pub with_snapshot_seconds: f64,
    /// Messages re-read after the snapshot.
    pub with_snapshot_messages_reread: u64,
    /// Start to ready from the log alone, seconds.
    pub without_snapshot_seconds: f64,
    /// Messages re-read.
    pub without_snapshot_messages_reread: u64,
    /// Without over with.
    pub speedup: f64,
    /// The snapshot's size, bytes.
    pub snapshot_bytes: u64,
    /// Resident memory of this process after both restarts, bytes (the
    /// engines ran in it).
    pub rss_after_restarts_bytes: u64,
}

/// Starts an engine with `s`, waits until it is ready (restored, joined),
/// stops it; seconds to ready and messages re-read.
async fn restart_once(s: &Settings) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let engine = Engine::start(s.clone()).await?;
    while !engine.health.is_ready() {
        if engine.is_finished() {
            engine.wait().await?;
            bail!("the engine stopped while restoring");
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("not ready after an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = engine
        .progress
        .restored
        .load(std::sync::atomic::Ordering::SeqCst);
    engine.shutdown().await?;
    Ok((secs, n))
}

/// The catalogue phase: new items with a title, against the raw text
/// encoder on the same titles and the same number of sessions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ItemsPhase {
    /// Item events.
    pub items: usize,
    /// thaw's items per second (ingest, text stage, projection,
    /// propagation, fusion, publish), from the first published to the last.
    pub thaw_per_second: f64,
    /// The text stage's sessions.
    pub sessions: usize,
    /// The same sessions called directly on a sample of the same titles, in
    /// batches of 32, side by side ([`crate::infer::stage::TextPool`]): the
    /// limit.
    pub raw_encoder_per_second: f64,
    /// One session alone on the same sample.
    pub raw_one_session_per_second: f64,
    /// thaw / the raw encoder with the same sessions.
    pub ratio_vs_raw_encoder: f64,
}

/// The stream phase: edges and interactions against a bare consumer of the
/// same messages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamPhase {
    /// Messages (edges and interactions).
    pub events: usize,
    /// A bare rdkafka consumer's messages per second on the same topics.
    pub bare_consumer_per_second: f64,
    /// thaw's events per second through ingest, graph, adaptation, publish.
    pub thaw_per_second: f64,
    /// thaw / bare consumer.
    pub ratio_vs_bare_consumer: f64,
}

/// Requests per second of one `redis-benchmark -P 64 -n 500000 -q` run
/// with `args` (the Debian package redis-tools).
fn redis_benchmark(url: &str, args: &[&str]) -> Result<f64> {
    let client = redis::Client::open(url)?;
    let info = client.get_connection_info();
    let (host, port) = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        _ => bail!("redis-benchmark needs a TCP Redis"),
    };
    let port = port.to_string();
    let mut all = vec!["-h", &host, "-p", &port, "-P", "64", "-n", "500000", "-q"];
    all.extend_from_slice(args);
    let out = std::process::Command::new("redis-benchmark")
        .args(&all)
        .output()
        .context("running redis-benchmark (Debian package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "SET: 412371.12 requests per second, p50=..." after \r progress lines.
    let line = text.rsplit('\r').next().unwrap_or(&text);
    let words: Vec<&str> = line.split_whitespace().collect();
    let v = words
        .windows(2)
        .find(|w| w[1] == "requests")
        .and_then(|w| w[0].parse::<f64>().ok())
        .with_context(|| format!("parsing redis-benchmark output {text:?}"))?;
    Ok(v)
}

/// The two Redis baselines: `-d 256 -t set`, and thaw's item write as a
/// custom command; the keys they write are deleted after.
fn redis_baselines(url: &str) -> Result<(f64, f64)> {
    let set = redis_benchmark(url, &["-d", "256", "-t", "set"])?;
    let emb = "x".repeat(256);
    let key = format!("thaw-bench-hset-{}", std::process::id());
    let hset = redis_benchmark(
        url,
        &[
            "HSET",
            &key,
            "emb",
            &emb,
            "model",
            "bench",
            "ts",
            "1700000000000",
        ],
    )?;
    let mut c = redis::Client::open(url)?.get_connection()?;
    redis::cmd("DEL")
        .arg(&key)
        .arg("key:__rand_int__")
        .query::<()>(&mut c)?;
    Ok((set, hset))
}

/// Reads every input message once with a bare consumer; returns the rate and
/// the number of messages the broker holds (the target of both consumers).
async fn bare_consumer(brokers: &str, topics: &[Topic], total: usize) -> Result<(f64, usize)> {
    let c: StreamConsumer = KafkaSettings::with_brokers(brokers)
        .client_config(&[
            ("group.id", &format!("bench-bare-{}", std::process::id())),
            ("auto.offset.reset", "earliest"),
            ("enable.auto.commit", "false"),
            ("fetch.wait.max.ms", "10"),
        ])
        .create()?;
    let topics: Vec<&str> = topics.iter().map(|t| t.name()).collect();
    let mut stored = 0i64;
    for t in &topics {
        let meta = c.fetch_metadata(Some(t), Duration::from_secs(10))?;
        for mt in meta.topics() {
            for p in mt.partitions() {
                let (lo, hi) = c.fetch_watermarks(t, p.id(), Duration::from_secs(10))?;
                stored += hi - lo;
            }
        }
    }
    if stored as usize != total {
        eprintln!("note: the broker holds {stored} messages of the {total} produced and delivered");
    }
    let total = stored as usize;
    c.subscribe(&topics)?;
    // The clock starts at the first message, so the group join is not counted.
    let first = c.recv().await?;
    drop(first);
    let t0 = Instant::now();
    let mut n = 1usize;
    while n < total {
        match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
            Ok(Ok(_)) => n += 1,
            Ok(Err(e)) => bail!("bare consumer: {e}"),
            Err(_) => bail!("bare consumer stalled at {n} of {total}"),
        }
    }
    Ok((n as f64 / t0.elapsed().as_secs_f64(), total))
}

/// MPKG's initial weights over the synthetic relations, written to a
/// temporary folder: speed does not depend on what the weights learned.
fn bench_model(text_dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let model_dir = std::env::temp_dir().join(format!("thaw-bench-model-{}", std::process::id()));
    let mut cfg = crate::train::TrainConfig {
        text_model_dir: text_dir.to_path_buf(),
        kg_dim: 64,
        ..Default::default()
    };
    cfg.mpkg.seed = 1;
    crate::train::write_untrained_model(
        &model_dir,
        RELATIONS.iter().map(|r| r.0.to_string()).collect(),
        384 + cfg.kg_dim,
        &cfg,
        "bench",
    )?;
    Ok(model_dir)
}

/// Every embedding of `synth` from nothing (see [`ScratchFigures`]).
/// Titles per second of the text stage's `sessions` called directly on a
/// sample of 2,000 titles, side by side, and of one session alone.
fn raw_encoder(synth: &Synth, text_dir: &std::path::Path, sessions: usize) -> Result<(f64, f64)> {
    use crate::infer::text::{TextEncoder, TextEncoderConfig};
    let cfg = TextEncoderConfig {
        model_dir: text_dir.to_path_buf(),
        ..Default::default()
    };
    let first = std::sync::Arc::new(TextEncoder::load(&cfg)?);
    let pool = crate::infer::stage::TextPool::new(first.clone(), &cfg, sessions)?;
    let sample: Vec<&str> = synth.titles.iter().take(2000).map(String::as_str).collect();
    // Warm-up: the first runs of a session allocate.
    pool.embed(&sample[..256.min(sample.len())])?;
    let t = Instant::now();
    pool.embed(&sample)?;
    let pooled = sample.len() as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let t = Instant::now();
    first.embed(&sample)?;
    let one = sample.len() as f64 / t.elapsed().as_secs_f64().max(1e-9);
    Ok((pooled, one))
}

fn scratch_figures(
    synth: &Synth,
    model_dir: &std::path::Path,
    text_dir: &std::path::Path,
) -> Result<ScratchFigures> {
    use crate::infer::item::{ItemModels, ItemModelsConfig};
    let n = synth.ids.len();
    let t0 = Instant::now();
    let pkg = synth.pkg()?;
    let graph_seconds = t0.elapsed().as_secs_f64();
    // The text encoder first: it finds ONNX Runtime through its folder.
    let text = crate::infer::text::TextEncoder::load(&crate::infer::text::TextEncoderConfig {
        model_dir: text_dir.to_path_buf(),
        ..Default::default()
    })?;
    let models = ItemModels::load(&ItemModelsConfig {
        model_dir: model_dir.to_path_buf(),
        ..Default::default()
    })?;
    let (r_n, d, d_in) = (models.relations(), models.dim(), models.d_in());
    let mut inputs: Vec<Array2<f32>> = (0..r_n).map(|_| Array2::zeros((n, d))).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let chunk = 8192;
    let t1 = Instant::now();
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let x = Array2::from_shape_fn((rows, d_in), |_| rng.random_range(-0.1f32..0.1));
        let p = models.project(x.view())?;
        for (r, input) in inputs.iter_mut().enumerate() {
            input
                .slice_mut(ndarray::s![start..start + rows, ..])
                .assign(&p.slice(ndarray::s![.., r, ..]));
        }
    }
    let projection_seconds = t1.elapsed().as_secs_f64();
    let views: Vec<_> = inputs.iter().map(|a| a.view()).collect();
    let t2 = Instant::now();
    let prop = Propagator::full(PropagatorConfig::default(), &pkg, &views)?;
    let propagation_seconds = t2.elapsed().as_secs_f64();
    drop(views);
    drop(inputs);
    let t3 = Instant::now();
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let mut e = ndarray::Array3::<f32>::zeros((rows, r_n, d));
        for r in 0..r_n {
            e.slice_mut(ndarray::s![.., r, ..]).assign(
                &prop
                    .layer(r, prop.hops())?
                    .slice(ndarray::s![start..start + rows, ..]),
            );
        }
        std::hint::black_box(models.fuse(e.view())?);
    }
    let fusion_seconds = t3.elapsed().as_secs_f64();
    drop(prop);
    let sample = 2000.min(n);
    let titles: Vec<&str> = synth.titles[..sample].iter().map(String::as_str).collect();
    let t4 = Instant::now();
    std::hint::black_box(text.embed(&titles)?);
    let text_items_per_second = sample as f64 / t4.elapsed().as_secs_f64().max(1e-9);
    Ok(ScratchFigures {
        items: n,
        graph_seconds,
        projection_seconds,
        propagation_seconds,
        fusion_seconds,
        total_seconds: graph_seconds + projection_seconds + propagation_seconds + fusion_seconds,
        text_items_per_second,
        text_sample: sample,
        text_seconds_estimated: n as f64 / text_items_per_second,
    })
}

/// The freshness phase's events (see [`BenchOptions::item_share`]).
fn live_events(synth: &Synth, o: &BenchOptions, rate: f64, phase: usize, ts: u64) -> Vec<Event> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9 + phase as u64);
    let vocab = vocabulary();
    let total = (rate * o.seconds) as usize;
    let mut out = Vec::with_capacity(total);
    let mut items = 0usize;
    let edge = |a: &str, b: &str, r: usize| {
        Event::Relation(RelationEvent {
            src: a.to_string(),
            dst: b.to_string(),
            relation: RELATIONS[r].0.into(),
            op: Op::Add,
            ts,
        })
    };
    while out.len() < total {
        let k = out.len();
        if ((k + 1) as f64 * o.item_share).floor() > (k as f64 * o.item_share).floor() {
            let id = format!("new{phase}-{items}");
            items += 1;
            out.push(Event::Item(ItemEvent {
                item_id: id.clone(),
                title: title(&vocab, &mut rng),
                description: None,
                categories: Vec::new(),
                features: None,
                ts,
            }));
            for r in 0..2 {
                let b = synth.popular_item(&mut rng);
                out.push(edge(&id, &synth.ids[b as usize], r));
            }
        } else {
            let (a, b) = synth.random_edge(&mut rng);
            if a != b {
                let r = rng.random_range(0..RELATIONS.len());
                out.push(edge(&synth.ids[a as usize], &synth.ids[b as usize], r));
            }
        }
    }
    out.truncate(total);
    out
}

/// Waits (up to 300 s) until the engine has gone idle with `target`
/// messages applied; an error naming `what` if it stops or does not.
/// Returns the time it took.
async fn wait_idle(
    progress: &Progress,
    engine: &EngineHandle,
    target: usize,
    what: &str,
) -> Result<Duration> {
    let t_idle = Instant::now();
    while (progress.idle_at_messages.load(Ordering::SeqCst) as usize) < target {
        if engine.is_finished() || t_idle.elapsed() > Duration::from_secs(300) {
            bail!("the engine did not go idle {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(t_idle.elapsed())
}

/// Waits until the engine has published `target` messages; `None` if it
/// stopped first. Returns the time ingest received the first new message
/// (so a group join is not counted, as for the bare consumer).
async fn wait_published(
    progress: &Progress,
    engine: &EngineHandle,
    target: usize,
    limit: Duration,
) -> Result<Option<Instant>> {
    let start = progress.received.load(Ordering::SeqCst) as usize;
    let t_wait = Instant::now();
    let mut first = None;
    loop {
        if engine.is_finished() {
            return Ok(None);
        }
        let m = progress.messages.load(Ordering::SeqCst) as usize;
        let r = progress.received.load(Ordering::SeqCst) as usize;
        if r > start && first.is_none() {
            first = Some(Instant::now());
        }
        if m >= target {
            return Ok(Some(first.unwrap_or_else(Instant::now)));
        }
        if t_wait.elapsed() > limit {
            bail!("the engine published {m} of {target} messages in {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Produces `events` on a task of its own.
fn produce_in_background(
    events: Vec<Event>,
    kafka: &KafkaSettings,
) -> tokio::task::JoinHandle<Result<()>> {
    let kafka = kafka.clone();
    tokio::spawn(async move {
        crate::tools::replay::produce(&events, &kafka, None).await?;
        Ok(())
    })
}

/// Partitions per topic so that every topic's messages in `events` fit the
/// mock broker's per-partition log (it drops the oldest beyond it), with
/// room for the freshness phase and the record overhead.
fn mock_partitions(events: &[Event]) -> BTreeMap<String, i32> {
    let mut bytes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for e in events {
        let b = e.encode().map_or(0, |b| b.len()) + e.key().len() + 64;
        *bytes.entry(e.topic().name()).or_default() += b;
    }
    bytes
        .into_iter()
        .map(|(t, b)| {
            (
                t.to_string(),
                (2 * b).div_ceil(crate::kafka::MOCK_PARTITION_BYTES) as i32,
            )
        })
        .collect()
}

/// Runs the end-to-end benchmark.
pub async fn run(o: &BenchOptions) -> Result<BenchReport> {
    let t_all = Instant::now();
    let n = o.size.items();
    eprintln!("generating {n} items");
    let synth = generate_with(n, 42, o.links);
    let graph = tokio::task::block_in_place(|| graph_figures(&synth, 7, o.tolerance))?;
    eprintln!(
        "graph: {} items, {} edges (degree median {}, p99 {}, max {}) built in {:.1} s; full propagation {:.3} s; exact: one edge {:.6} s ({:.0}x), 1,000 edges {:.3} s; tolerance {:e}: one edge {:.6} s ({:.0}x), 1,000 edges {:.3} s, max error {:.2e} (values up to {:.2}, RMS {:.3})",
        graph.items, graph.edges, graph.median_degree, graph.p99_degree, graph.max_degree, graph.build_seconds, graph.full_seconds, graph.one_edge_seconds, graph.incremental_vs_full_per_edge, graph.batch_1000_seconds,
        graph.tolerance, graph.tolerant_one_edge_seconds, graph.tolerant_incremental_vs_full_per_edge, graph.tolerant_batch_1000_seconds, graph.tolerant_max_abs_error, graph.max_abs_value, graph.rms_value
    );
    let model_dir = bench_model(&o.text_dir)?;
    let mut report = BenchReport {
        size: o.size,
        items_with_text: ItemsPhase::default(),
        edges_and_interactions: StreamPhase::default(),
        freshness_ms: BTreeMap::new(),
        offered_events_per_second: 0.0,
        freshness_phase_events_per_second: 0.0,
        item_share: o.item_share,
        freshness_phases: Vec::new(),
        incremental_vs_full_per_edge: graph.tolerant_incremental_vs_full_per_edge,
        redis_writes_per_second: 0.0,
        redis_benchmark_per_second: 0.0,
        ratio_vs_redis_benchmark: 0.0,
        redis_benchmark_hset_per_second: 0.0,
        ratio_vs_redis_benchmark_hset: 0.0,
        bytes_per_item: graph.bytes_per_item,
        bytes_per_edge: graph.bytes_per_edge,
        graph,
        scratch: None,
        restart: None,
        seconds: 0.0,
    };
    if o.size == Size::Large {
        let scratch =
            tokio::task::block_in_place(|| scratch_figures(&synth, &model_dir, &o.text_dir))?;
        eprintln!(
            "from scratch: graph {:.1} s, projection {:.1} s, propagation {:.1} s, fusion {:.1} s: {:.1} s; text encoder {:.0} titles/s (estimated {:.0} s for every title)",
            scratch.graph_seconds, scratch.projection_seconds, scratch.propagation_seconds, scratch.fusion_seconds, scratch.total_seconds, scratch.text_items_per_second, scratch.text_seconds_estimated
        );
        report.scratch = Some(scratch);
    }
    if o.size == Size::Large || o.graph_only {
        let _ = std::fs::remove_dir_all(&model_dir);
        report.seconds = t_all.elapsed().as_secs_f64();
        return Ok(report);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let events = synth.events(now_ms);
    let total = events.len();
    let partitions = mock_partitions(&events);
    let (items, stream): (Vec<Event>, Vec<Event>) = events
        .into_iter()
        .partition(|e| matches!(e, Event::Item(_)));
    let broker = EmbeddedBroker::start_with_partitions(None, &partitions).await?;
    let brokers = broker.bootstrap_servers().to_string();
    let kafka = KafkaSettings::with_brokers(&brokers);

    let mut s = Settings {
        kafka: kafka.clone(),
        ..Default::default()
    };
    s.kafka.group_id = format!("bench-thaw-{}", std::process::id());
    s.redis.url = o.redis_url.clone();
    s.redis.prefix = format!("thaw-bench-{}", std::process::id());
    s.model.dir = model_dir.clone();
    s.model.text_dir = o.text_dir.clone();
    s.model.reload_check_secs = 0;
    s.ingest.idle_ms = 500;
    s.graph.tolerance = o.tolerance;
    s.users.refresh_all_when_idle = false;
    s.users.top_k = 20;
    s.http.listen = "127.0.0.1:0".into();
    let snapshots =
        std::env::temp_dir().join(format!("thaw-bench-snapshots-{}", std::process::id()));
    if o.restart {
        // Only the snapshot the shutdown writes: none mid-run.
        s.snapshot.dir = Some(snapshots.clone());
        s.snapshot.every_secs = 1 << 40;
    }

    // The limit of the catalogue phase, measured first on an idle machine:
    // the text stage's sessions called directly on a sample of the titles.
    let sessions = s.model.text_threads();
    let (raw_pool, raw_one) =
        tokio::task::block_in_place(|| raw_encoder(&synth, &o.text_dir, sessions))?;
    eprintln!(
        "raw text encoder: {raw_pool:.0} titles/s with {sessions} sessions side by side, {raw_one:.0} with one"
    );

    let engine = Engine::start(s.clone()).await?;
    let (metrics, progress) = (engine.metrics.clone(), engine.progress.clone());
    // Phase 1, the catalogue: every item with its title, alone.
    let n_items = items.len();
    eprintln!("catalogue phase: {n_items} items with a title");
    // Produced while the engine reads: the clock starts at its first publish.
    let producing = produce_in_background(items, &kafka);
    let limit = Duration::from_secs(3600);
    let Some(start) = wait_published(&progress, &engine, n_items, limit).await? else {
        engine.wait().await?;
        bail!("the engine stopped");
    };
    let items_rate = n_items as f64 / start.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "thaw: {items_rate:.0} items/s (raw encoder {raw_pool:.0}: {:.2}x)",
        items_rate / raw_pool
    );
    wait_idle(&progress, &engine, n_items, "after the catalogue").await?;
    // Phase 2, the stream: every edge and interaction.
    let n_stream = stream.len();
    eprintln!("stream phase: {n_stream} edges and interactions");
    producing.await??;
    let producing = produce_in_background(stream, &kafka);
    let Some(start) = wait_published(&progress, &engine, total, limit).await? else {
        engine.wait().await?;
        bail!("the engine stopped");
    };
    let stream_rate = n_stream as f64 / start.elapsed().as_secs_f64().max(1e-9);
    producing.await??;
    let (commands, seconds) = metrics.redis_totals();
    // The engine goes idle after the load: it reconciles the propagation
    // and publishes what that moved. The freshness phase starts after, as
    // steady traffic would find it.
    let idle = wait_idle(&progress, &engine, total, "after the load").await?;
    eprintln!("idle after the load: {:.1} s", idle.as_secs_f64());
    eprintln!("bare consumer on the same edges and interactions");
    let stream_topics = [Topic::ItemRelations, Topic::Interactions];
    let (bare, n_bare) = bare_consumer(&brokers, &stream_topics, n_stream).await?;
    eprintln!(
        "thaw: {stream_rate:.0} events/s (bare consumer {bare:.0} over {n_bare}: {:.3}x)",
        stream_rate / bare
    );
    report.items_with_text = ItemsPhase {
        items: n_items,
        thaw_per_second: items_rate,
        sessions,
        raw_encoder_per_second: raw_pool,
        raw_one_session_per_second: raw_one,
        ratio_vs_raw_encoder: items_rate / raw_pool,
    };
    report.edges_and_interactions = StreamPhase {
        events: n_stream,
        bare_consumer_per_second: bare,
        thaw_per_second: stream_rate,
        ratio_vs_bare_consumer: stream_rate / bare,
    };
    // Freshness at each offered rate, one phase after the other, each
    // started once the engine is idle again.
    let mut published = total;
    let mut phases = Vec::new();
    for (phase, &rate) in std::iter::once(&o.rate).chain(&o.more_rates).enumerate() {
        metrics.reset_freshness();
        let live = live_events(&synth, o, rate, phase, now_ms + 1);
        let live_n = live.len();
        eprintln!(
            "freshness phase: {live_n} events at {rate} events/s, {:.0}% new items",
            o.item_share * 100.0
        );
        let t_live = Instant::now();
        crate::tools::replay::produce(&live, &kafka, Some(rate)).await?;
        published += live_n;
        if wait_published(&progress, &engine, published, Duration::from_secs(600))
            .await?
            .is_none()
        {
            engine.wait().await?;
            bail!("the engine stopped");
        }
        let applied = live_n as f64 / t_live.elapsed().as_secs_f64().max(1e-9);
        let mut freshness = BTreeMap::new();
        if let Some(q) = metrics.freshness_summary(Some("edge")) {
            freshness.insert("edge".to_string(), q);
        }
        if let Some(q) = metrics.freshness_summary(Some("item")) {
            freshness.insert("new_item".to_string(), q);
        }
        // The broker's and client's share: Kafka time to ingest receiving it.
        if let Some(q) = metrics.ingest_delay_summary() {
            freshness.insert("ingest_delay".to_string(), q);
        }
        eprintln!(
            "  applied at {applied:.0} events/s; edge p50 {:?} ms p99 {:?} ms; new item p50 {:?} ms p99 {:?} ms",
            freshness.get("edge").map(|q| q.p50),
            freshness.get("edge").map(|q| q.p99),
            freshness.get("new_item").map(|q| q.p50),
            freshness.get("new_item").map(|q| q.p99)
        );
        phases.push(FreshnessPhase {
            offered_events_per_second: rate,
            applied_events_per_second: applied,
            freshness_ms: freshness,
        });
        wait_idle(&progress, &engine, published, "after a freshness phase").await?;
    }
    engine.shutdown().await?;
    if o.restart {
        eprintln!("restart from the snapshot");
        let (with, with_n) = restart_once(&s).await?;
        let snapshot_bytes = crate::serve::snapshot::list(&snapshots)
            .first()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        let mut bare = s.clone();
        bare.snapshot.dir = None;
        eprintln!("restart from the log alone");
        let (without, without_n) = restart_once(&bare).await?;
        eprintln!(
            "restart: {with:.1} s from the snapshot ({with_n} messages re-read, {snapshot_bytes} bytes), {without:.1} s from the log ({without_n} messages): {:.1}x",
            without / with.max(1e-9)
        );
        report.restart = Some(RestartFigures {
            messages_in_log: without_n,
            with_snapshot_seconds: with,
            with_snapshot_messages_reread: with_n,
            without_snapshot_seconds: without,
            without_snapshot_messages_reread: without_n,
            speedup: without / with.max(1e-9),
            snapshot_bytes,
            rss_after_restarts_bytes: rss_bytes(),
        });
        let _ = std::fs::remove_dir_all(&snapshots);
    }
    // Clean up Redis keys of the run.
    if let Ok(mut c) = redis::Client::open(o.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
    {
        let _ = crate::publish::clear_prefix(&mut c, &s.redis.prefix).await;
    }
    let _ = std::fs::remove_dir_all(&model_dir);
    eprintln!("redis-benchmark");
    let (rb, rb_hset) = redis_baselines(&o.redis_url)?;
    let writes = commands as f64 / seconds.max(1e-9);
    report.freshness_ms = phases[0].freshness_ms.clone();
    report.offered_events_per_second = o.rate;
    report.freshness_phase_events_per_second = phases[0].applied_events_per_second;
    report.freshness_phases = phases;
    report.redis_writes_per_second = writes;
    report.redis_benchmark_per_second = rb;
    report.ratio_vs_redis_benchmark = writes / rb;
    report.redis_benchmark_hset_per_second = rb_hset;
    report.ratio_vs_redis_benchmark_hset = writes / rb_hset;
    report.seconds = t_all.elapsed().as_secs_f64();
    Ok(report)
}

/// `thaw bench --replicas N`: N replicas against one instance on the same
/// stream ([`crate::serve::replica`]).
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaFigures {
    /// Catalogue size.
    pub size: Size,
    /// Replicas of the scaled-out run.
    pub replicas: usize,
    /// Items and edges, loaded before the clock starts.
    pub catalogue_events: usize,
    /// Interactions, timed.
    pub interactions: usize,
    /// Distinct users among them.
    pub users: usize,
    /// One instance: first interaction produced to idle after the last, s.
    pub one_seconds: f64,
    /// N replicas: the same, to every replica idle, s.
    pub replicas_seconds: f64,
    /// `one_seconds / replicas_seconds`: above 1, the replicas were faster.
    pub speedup: f64,
    /// User lists written to Redis by the one instance.
    pub one_user_writes: u64,
    /// By all replicas together (each user by the one that owns it).
    pub replicas_user_writes: u64,
    /// Per replica.
    pub user_writes_per_replica: Vec<u64>,
    /// Cores this machine has (the replicas share them: on one machine they
    /// cannot be faster than its cores allow).
    pub cores: usize,
}

/// One setup of [`replicas`]: `n` engines (`n` = 1: one instance, no
/// replica id) on a broker of its own; loads `catalogue` untimed, then
/// times `interactions` to every engine idle. Returns the seconds and the
/// user writes per engine.
async fn timed_setup(
    base: &Settings,
    n: usize,
    catalogue: &[Event],
    interactions: &[Event],
    partitions: &BTreeMap<String, i32>,
) -> Result<(f64, Vec<u64>)> {
    let broker = EmbeddedBroker::start_with_partitions(None, partitions).await?;
    let kafka = KafkaSettings {
        group_id: format!("{}-{n}", base.kafka.group_id),
        ..KafkaSettings::with_brokers(broker.bootstrap_servers())
    };
    crate::tools::replay::produce(catalogue, &kafka, None).await?;
    let mut engines = Vec::new();
    for k in 0..n {
        let mut s = base.clone();
        s.kafka = kafka.clone();
        s.redis.prefix = format!("{}-{n}", base.redis.prefix);
        if n > 1 {
            s.kafka.replica_id = format!("r{k}");
        }
        engines.push(Engine::start(s).await?);
    }
    for e in &engines {
        wait_idle(&e.progress, e, catalogue.len(), "after the catalogue").await?;
    }
    if n > 1 {
        // Every share assigned and written: the marker flipped.
        let mut c = redis::Client::open(base.redis.url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let prefix = format!("{}-{n}", base.redis.prefix);
        let t0 = Instant::now();
        while crate::publish::resolve(&mut c, &prefix).await?.is_none() {
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("the replicas did not flip the model marker in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let writes0: Vec<u64> = engines
        .iter()
        .map(|e| e.metrics.published_total("user"))
        .collect();
    let total = catalogue.len() + interactions.len();
    let t0 = Instant::now();
    crate::tools::replay::produce(interactions, &kafka, None).await?;
    for e in &engines {
        wait_published(&e.progress, e, total, Duration::from_secs(1800)).await?;
        wait_idle(&e.progress, e, total, "after the interactions").await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let writes: Vec<u64> = engines
        .iter()
        .zip(writes0)
        .map(|(e, w0)| e.metrics.published_total("user") - w0)
        .collect();
    for e in engines {
        e.shutdown().await?;
    }
    if let Ok(mut c) = redis::Client::open(base.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await
    {
        let _ = crate::publish::clear_prefix(&mut c, &format!("{}-{n}", base.redis.prefix)).await;
    }
    Ok((secs, writes))
}

/// `thaw bench --replicas N`: the same catalogue and interactions through
/// one instance, then through `n` replicas, each setup on a broker of its
/// own; the interactions are timed from their first produced to every
/// engine idle after the last. Reported as a ratio from the same run.
pub async fn replicas(o: &BenchOptions, n: usize) -> Result<ReplicaFigures> {
    let synth = generate_with(o.size.items(), 42, o.links);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let events = synth.events(now_ms);
    let partitions = mock_partitions(&events);
    let (interactions, catalogue): (Vec<Event>, Vec<Event>) = events
        .into_iter()
        .partition(|e| matches!(e, Event::Interaction(_)));
    let users: std::collections::BTreeSet<&str> = interactions
        .iter()
        .filter_map(|e| match e {
            Event::Interaction(x) => Some(x.user_id.as_str()),
            _ => None,
        })
        .collect();
    let model_dir = bench_model(&o.text_dir)?;
    let mut s = Settings::default();
    s.kafka.group_id = format!("bench-replicas-{}", std::process::id());
    s.redis.url = o.redis_url.clone();
    s.redis.prefix = format!("thaw-bench-replicas-{}", std::process::id());
    s.model.dir = model_dir.clone();
    s.model.text_dir = o.text_dir.clone();
    s.model.reload_check_secs = 0;
    s.ingest.idle_ms = 500;
    s.graph.tolerance = o.tolerance;
    s.users.top_k = 20;
    s.http.listen = "127.0.0.1:0".into();
    // A replica leaving (the shutdown) hands its share on at once; a dead
    // one within seconds.
    s.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    eprintln!(
        "replicas: {} catalogue events (untimed), {} interactions of {} users (timed); one instance",
        catalogue.len(),
        interactions.len(),
        users.len()
    );
    let (one, one_writes) = timed_setup(&s, 1, &catalogue, &interactions, &partitions).await?;
    eprintln!("one instance: {one:.1} s; {n} replicas");
    let (many, writes) = timed_setup(&s, n, &catalogue, &interactions, &partitions).await?;
    let _ = std::fs::remove_dir_all(&model_dir);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    eprintln!(
        "{n} replicas: {many:.1} s against one instance's {one:.1} s: {:.2}x on {cores} cores; user writes {} against {}",
        one / many.max(1e-9),
        writes.iter().sum::<u64>(),
        one_writes[0]
    );
    Ok(ReplicaFigures {
        size: o.size,
        replicas: n,
        catalogue_events: catalogue.len(),
        interactions: interactions.len(),
        users: users.len(),
        one_seconds: one,
        replicas_seconds: many,
        speedup: one / many.max(1e-9),
        one_user_writes: one_writes[0],
        replicas_user_writes: writes.iter().sum(),
        user_writes_per_replica: writes,
        cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_seeded_and_shaped() {
        let a = generate(2000, 3);
        let b = generate(2000, 3);
        assert_eq!(a.edges, b.edges);
        assert_eq!(a.titles, b.titles);
        // Densities: about 20 / 10 / 1 edges per item (self-loops dropped).
        let per = |r: usize| a.edges.iter().filter(|e| e.0 == r).count() as f64 / 2000.0;
        assert!(
            (per(0) - 20.0).abs() < 0.5
                && (per(1) - 10.0).abs() < 0.5
                && (per(2) - 1.0).abs() < 0.2
        );
        // Power law: the most linked item has far more edges than the median.
        let pkg = a.pkg().unwrap();
        let mut deg: Vec<usize> = (0..2000u32).map(|i| pkg.degree(0, i).unwrap()).collect();
        deg.sort_unstable();
        assert!(
            deg[1999] > 10 * deg[1000].max(1),
            "max {} median {}",
            deg[1999],
            deg[1000]
        );
        assert!(a
            .events(0)
            .iter()
            .all(|e| e.validate(&crate::ingest::Limits::default()).is_ok()));
    }
}
