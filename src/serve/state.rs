//! The engine's state and the work of one batch: graph edits, text encoding,
//! projection, incremental propagation, fusion, user adaptation.
//!
//! [`Core`] is owned by one blocking thread (it does CPU work only); the
//! async stages hand it batches of decoded events and take back what to
//! publish ([`Publish`]). Everything it publishes is a function of the events
//! applied so far, not of how they were batched: an item is republished
//! whenever its embedding may have changed (the M-hop ball of every edit, per
//! relation), and an idle engine refreshes every user against the current
//! catalogue. That is what lets a restarted engine, which rebuilds its state
//! by re-reading the log up to the committed offsets ([`Mode::Restore`]),
//! converge to the Redis state of an engine that never stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array2, Array3, ArrayView2};
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use crate::adapt::{adapt_user, key, rank_users, AdaptConfig, Catalogue};
use crate::graph::co::{CoGraph, EdgeChange};
use crate::graph::{ApplyStats, Batch, Pkg, PkgParts, Propagator, PropagatorConfig};
use crate::infer::item::{ItemModels, ItemModelsConfig};
use crate::infer::stage::embed_texts;
use crate::infer::text::{TextEncoder, TextEncoderConfig};
use crate::ingest::batch::Msg;
use crate::ingest::Event;
use crate::publish::{ItemOut, Publish, UserOut};
use crate::train::features::category_bag;
use crate::train::mpkg::BIAS_FEATURES;
use crate::train::ModelCard;

/// Whether a batch is live (its effects are published) or re-read from the
/// log after a restart (state only: its effects were published before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Publish what changed (and whatever earlier [`Mode::CatchUp`] batches
    /// held back).
    Live,
    /// Rebuild state only.
    Restore,
    /// The engine is behind its input: apply the graph edits and the users'
    /// interactions, and hold back propagation, fusion, adaptation and
    /// publishing until the next [`Mode::Live`] batch, which does them once
    /// for all the batches held back.
    CatchUp,
}

/// What applied events leave to propagate and publish: one batch's, plus
/// what [`Mode::CatchUp`] batches held back for the next live batch.
#[derive(Debug, Default)]
struct Pending {
    /// Slots needing a new input row (new placeholders: zeros; described
    /// items: their projected features).
    inputs: BTreeSet<u32>,
    /// Freshness sources `(slot or user, Kafka time ms)` of item events,
    /// edges that changed the graph, and interactions.
    items: Vec<(u32, i64)>,
    edges: Vec<(u32, i64)>,
    users: Vec<(String, i64)>,
    /// Batches held back.
    batches: usize,
}

/// Outcome counts of one batch, per topic name.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Events applied.
    pub applied: BTreeMap<&'static str, u64>,
    /// Events ignored (relations the model does not know).
    pub ignored: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ItemSlot {
    /// An item event was seen (else the slot is a placeholder for an id that
    /// only appeared in relations or interactions: in the graph, not ranked).
    described: bool,
    /// Latest item event time.
    ts: u64,
    /// Distinct users who interacted.
    count: u32,
    /// First interaction time, ms (u64::MAX: none).
    first_ms: u64,
    /// Universal features X (empty for placeholders).
    x: Vec<f32>,
    /// Latest time of an event naming the item, ms (a placeholder expires
    /// by it).
    touched_ms: u64,
}

impl Default for ItemSlot {
    fn default() -> Self {
        Self {
            described: false,
            ts: 0,
            count: 0,
            first_ms: u64::MAX,
            x: Vec::new(),
            touched_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct UserState {
    /// Distinct items, in the order the user reached them.
    items: Vec<u32>,
    /// Distinct items rated at least the like threshold, in order (only
    /// kept when the model has a `co_liked` relation).
    liked: Vec<u32>,
    ts: u64,
    /// The slots of the user's last published list, best first: where the
    /// next item they reach is looked up (prequential quality).
    last: Vec<u32>,
    /// The `interactions` partition of the user's latest interaction (-1:
    /// not read from Kafka): which replica publishes the user.
    partition: i32,
}

/// The PKG's behavioural relations, learnt from the interactions as they are
/// consumed ([`crate::graph::co`]), with the code and settings that built
/// them for training and evaluation.
struct Behavioural {
    /// `co_interacted`: its relation index and builder.
    co: Option<(usize, CoGraph)>,
    /// `co_liked`: its relation index and builder.
    liked: Option<(usize, CoGraph)>,
    /// Ratings at or above it are likes.
    like_threshold: f32,
}

impl Behavioural {
    fn new(pkg: &Pkg, card: &ModelCard) -> Self {
        let cfg = card.config.pkg.co();
        let rel = |name: &str| pkg.relation_index(name).map(|r| (r, CoGraph::new(cfg)));
        Self {
            co: rel("co_interacted"),
            liked: rel("co_liked"),
            like_threshold: card.config.pkg.like_threshold,
        }
    }

    /// Whether `relation` is derived here (its events from the
    /// `item-relations` topic are ignored).
    fn derives(&self, r: usize) -> bool {
        self.co.as_ref().is_some_and(|c| c.0 == r) || self.liked.as_ref().is_some_and(|c| c.0 == r)
    }
}

impl Behavioural {
    /// Settles both relations ([`CoGraph::settle`]) and applies their edge
    /// changes to the PKG; whether any edge changed.
    fn settle(&mut self, pkg: &mut Pkg) -> Result<bool> {
        let mut any = false;
        for (r, g) in [&mut self.co, &mut self.liked].into_iter().flatten() {
            for change in g.settle() {
                any |= match change {
                    EdgeChange::Add(a, b) => pkg.add_edge(*r, a, b)?,
                    EdgeChange::Remove(a, b) => pkg.remove_edge(*r, a, b)?,
                };
            }
        }
        Ok(any)
    }
}

/// Applies one interaction (`history` before `item`, keyed `key`) to a
/// behavioural relation and its edge changes to the PKG.
fn learn(
    rel: &mut Option<(usize, CoGraph)>,
    pkg: &mut Pkg,
    history: &[u32],
    item: u32,
    key: u64,
) -> Result<()> {
    let Some((r, g)) = rel.as_mut() else {
        return Ok(());
    };
    g.set_key(item, key);
    for change in g.interact(history, item) {
        match change {
            EdgeChange::Add(a, b) => pkg.add_edge(*r, a, b)?,
            EdgeChange::Remove(a, b) => pkg.remove_edge(*r, a, b)?,
        };
    }
    Ok(())
}

/// The loaded model: its card and ONNX Runtime sessions.
pub struct LoadedModel {
    /// `model.json`.
    pub card: ModelCard,
    /// Projection and fusion graphs.
    pub items: ItemModels,
    /// Text encoder (shared with the text stage).
    pub text: Arc<TextEncoder>,
    /// External ids of the items the model was trained with interactions
    /// (`trained_items.txt`); every other item is fresh
    /// ([`crate::train::fresh`]). Empty when the folder has no list, in
    /// which case the fresh-item score is off.
    pub trained_items: std::collections::HashSet<String>,
}

impl LoadedModel {
    /// Loads `model_dir` (from `thaw train`) and the text encoder; checks that
    /// they fit together.
    pub fn load(
        model_dir: &std::path::Path,
        text_dir: &std::path::Path,
        ort_dylib: Option<&std::path::Path>,
    ) -> Result<Self> {
        let p = model_dir.join("model.json");
        let card: ModelCard =
            serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| {
                format!("reading {} (train one with `thaw train`)", p.display())
            })?)
            .with_context(|| format!("parsing {}", p.display()))?;
        let text = TextEncoder::load(&TextEncoderConfig {
            model_dir: text_dir.to_path_buf(),
            ort_dylib: ort_dylib.map(|p| p.to_path_buf()),
            ..Default::default()
        })
        .with_context(|| format!("loading the text encoder from {}", text_dir.display()))?;
        let items = ItemModels::load(&ItemModelsConfig {
            model_dir: model_dir.to_path_buf(),
            ort_dylib: ort_dylib.map(|p| p.to_path_buf()),
            ..Default::default()
        })
        .with_context(|| format!("loading the item model from {}", model_dir.display()))?;
        if items.d_in() != text.dim() + card.config.kg_dim {
            bail!(
                "the item model takes {} features, but text ({}) + KG bag ({}) give {}",
                items.d_in(),
                text.dim(),
                card.config.kg_dim,
                text.dim() + card.config.kg_dim
            );
        }
        if items.relations() != card.relations.len() || items.dim() != card.dim {
            bail!(
                "{}: ONNX graphs and model.json disagree on relations or dim",
                model_dir.display()
            );
        }
        let trained_items = match crate::train::read_trained_items(model_dir)? {
            Some(t) => t,
            None => {
                if card.fresh_weight != 0.0 {
                    tracing::warn!(
                        model_dir = %model_dir.display(),
                        "no {}: the fresh-item score is off",
                        crate::train::fresh::TRAINED_ITEMS_FILE
                    );
                }
                Default::default()
            }
        };
        Ok(Self {
            card,
            items,
            text: Arc::new(text),
            trained_items,
        })
    }
}

/// Slots waiting to be re-fused and published, first in first out, each
/// once (bounded by the slots).
#[derive(Debug, Default)]
struct Ripple {
    queue: std::collections::VecDeque<u32>,
    queued: Vec<bool>,
}

impl Ripple {
    fn insert(&mut self, s: u32) {
        let i = s as usize;
        if self.queued.len() <= i {
            self.queued.resize(i + 1, false);
        }
        if !self.queued[i] {
            self.queued[i] = true;
            self.queue.push_back(s);
        }
    }

    /// Forgets `s` (published by other means); its queue entry is skipped.
    fn remove(&mut self, s: u32) {
        if let Some(q) = self.queued.get_mut(s as usize) {
            *q = false;
        }
    }

    /// Every slot still queued, oldest first; the queue is left empty.
    fn take(&mut self) -> Vec<u32> {
        let queued = &mut self.queued;
        self.queue
            .drain(..)
            .filter(|&s| std::mem::replace(&mut queued[s as usize], false))
            .collect()
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.queued.iter_mut().for_each(|q| *q = false);
    }
}

/// The engine state as plain data, for a snapshot
/// ([`crate::serve::snapshot`]): what the events applied so far left (the
/// graph, the items' features and counts, the users, the behavioural
/// relations, the clock), not what is recomputed from it (propagation,
/// fusion, lists). [`Core::state`] takes it, [`Core::set_state`] puts it
/// back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoreState {
    /// The model version the state was built with.
    pub version: String,
    pkg: PkgParts,
    co: Option<CoGraph>,
    liked: Option<CoGraph>,
    slots: Vec<ItemSlot>,
    /// By id.
    users: Vec<(String, UserState)>,
    now_ms: u64,
    last_sweep_ms: u64,
    last_placeholder_sweep_ms: u64,
    /// Evicted users whose keys were perhaps not deleted yet.
    evicted: Vec<String>,
}

/// The event-derived parts of a [`Core`], exchanged whole by
/// [`Core::set_state`] so that a failure can put the old ones back.
struct Swap {
    pkg: Pkg,
    slots: Vec<ItemSlot>,
    keys: Vec<u64>,
    co: Option<CoGraph>,
    liked: Option<CoGraph>,
    users: HashMap<String, UserState>,
    now_ms: u64,
    last_sweep_ms: u64,
    last_placeholder_sweep_ms: u64,
    evicted: Vec<String>,
    fused: Array2<f32>,
}

impl CoreState {
    /// Described items.
    pub fn items(&self) -> usize {
        self.slots.iter().filter(|s| s.described).count()
    }

    /// Users kept.
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

/// The engine state.
pub struct Core {
    model: LoadedModel,
    pkg: Pkg,
    behavioural: Behavioural,
    prop: Propagator,
    slots: Vec<ItemSlot>,
    /// `adapt::key` of each slot's item id (for the negatives' draw).
    keys: Vec<u64>,
    /// Fused embeddings, one row per slot (capacity rows).
    fused: Array2<f32>,
    users: HashMap<String, UserState>,
    now_ms: u64,
    adapt: AdaptConfig,
    top_k: usize,
    refresh_all: bool,
    /// Users with interactions since the last refresh of all users.
    dirty_users: BTreeSet<String>,
    /// What catch-up batches held back.
    pending: Pending,
    /// Something changed since the last idle refresh.
    changed_since_idle: bool,
    /// `graph::PropagatorConfig::tolerance`.
    tolerance: f32,
    /// Slots whose propagated rows changed by propagation alone, not yet
    /// re-fused and published (bounded by the slots).
    ripple: Ripple,
    /// `graph.ripple_ms`.
    ripple_ms: u64,
    /// When the ripple was last drained from.
    last_ripple: Instant,
    /// How many users are kept, and for how long.
    bounds: UserBounds,
    /// Event time of the last TTL sweep, ms.
    last_sweep_ms: u64,
    /// Users evicted since the last publish (their keys are deleted).
    evicted: Vec<String>,
    /// How many placeholders are kept, and for how long.
    placeholder_bounds: PlaceholderBounds,
    /// Placeholders in the graph (slots of ids without an item event).
    placeholders: usize,
    /// The users who reached each placeholder (its expiry drops it from
    /// their histories); an entry goes when the item is described. Ids of
    /// users evicted since may linger until then.
    placeholder_users: HashMap<u32, Vec<String>>,
    /// Event time of the last placeholder TTL sweep, ms.
    last_placeholder_sweep_ms: u64,
    /// Scaled out: the partitions whose users this replica publishes
    /// ([`crate::serve::replica`]), and those it published last
    /// ([`Core::publish_gained`]). `None`: every user.
    ownership: Option<(Arc<crate::serve::replica::Ownership>, BTreeSet<i32>)>,
    metrics: Arc<Metrics>,
}

/// How many placeholder slots the engine keeps, and for how long
/// (`graph.max_placeholders`, `graph.placeholder_ttl_secs`). Checked as
/// [`UserBounds`] are: the TTL when event time crosses a multiple of
/// `ttl/16`, the count when a new placeholder passes it.
#[derive(Debug, Clone, Copy)]
pub struct PlaceholderBounds {
    /// Most placeholders kept; above it the least recently named (ties by
    /// slot) are removed down to 90% of it.
    pub max: usize,
    /// A placeholder not named by an event for this long (event time, ms)
    /// is removed; 0: never.
    pub ttl_ms: u64,
}

impl PlaceholderBounds {
    /// The bounds of `graph`'s settings.
    pub fn of(graph: &crate::serve::config::GraphSettings) -> Self {
        Self {
            max: graph.max_placeholders.max(1),
            ttl_ms: graph.placeholder_ttl_secs.saturating_mul(1000),
        }
    }
}

/// How many users the engine keeps, and for how long (`users.max_users`,
/// `users.ttl_secs`). Checked at each interaction, never at batch edges: the
/// TTL sweeps when event time crosses a multiple of `ttl/16`, the count
/// when a new user passes it. Within a partition (a user's interactions)
/// that is a function of the log; across partitions the read interleaving
/// can differ after a restart, so a user right at the LRU edge may be
/// evicted in one run and not the other (a returning user starts afresh,
/// their behavioural-edge window too).
#[derive(Debug, Clone, Copy)]
pub struct UserBounds {
    /// Most users kept; above it, the least recently active (by their
    /// latest interaction time, ties by id) are evicted down to 90% of it.
    pub max_users: usize,
    /// A user without an interaction for this long (event time, ms) is
    /// evicted; 0: never.
    pub ttl_ms: u64,
}

impl Default for UserBounds {
    fn default() -> Self {
        Self {
            max_users: usize::MAX,
            ttl_ms: 0,
        }
    }
}

impl Core {
    /// An empty engine state for `model`.
    pub fn new(
        model: LoadedModel,
        adapt: AdaptConfig,
        top_k: usize,
        refresh_all: bool,
        graph: &crate::serve::config::GraphSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let tolerance = graph.tolerance;
        let pkg = Pkg::new(model.card.relations.iter().map(String::as_str))?;
        let prop = Propagator::full(
            PropagatorConfig {
                hops: model.card.hops,
                tolerance,
                ..Default::default()
            },
            &pkg,
            &vec![Array2::<f32>::zeros((0, model.card.dim)).view(); model.card.relations.len()],
        )?;
        metrics.set_provider(model.items.provider());
        metrics.set_model(&model.card.version);
        let d = model.card.dim;
        Ok(Self {
            behavioural: Behavioural::new(&pkg, &model.card),
            model,
            pkg,
            prop,
            slots: Vec::new(),
            keys: Vec::new(),
            fused: Array2::zeros((0, d)),
            users: HashMap::new(),
            now_ms: 0,
            adapt,
            top_k,
            refresh_all,
            dirty_users: BTreeSet::new(),
            pending: Pending::default(),
            changed_since_idle: false,
            tolerance: graph.tolerance,
            ripple: Ripple::default(),
            ripple_ms: graph.ripple_ms,
            last_ripple: Instant::now(),
            bounds: UserBounds::default(),
            last_sweep_ms: 0,
            evicted: Vec::new(),
            placeholder_bounds: PlaceholderBounds::of(graph),
            placeholders: 0,
            placeholder_users: HashMap::new(),
            last_placeholder_sweep_ms: 0,
            ownership: None,
            metrics,
        })
    }

    /// The state as plain data (a copy; [`CoreState`]).
    pub fn state(&self) -> CoreState {
        let mut users: Vec<(String, UserState)> = self
            .users
            .iter()
            .map(|(id, u)| (id.clone(), u.clone()))
            .collect();
        users.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        CoreState {
            version: self.model.card.version.clone(),
            pkg: self.pkg.to_parts(),
            co: self.behavioural.co.as_ref().map(|c| c.1.clone()),
            liked: self.behavioural.liked.as_ref().map(|c| c.1.clone()),
            slots: self.slots.clone(),
            users,
            now_ms: self.now_ms,
            last_sweep_ms: self.last_sweep_ms,
            last_placeholder_sweep_ms: self.last_placeholder_sweep_ms,
            evicted: self.evicted.clone(),
        }
    }

    /// Replaces the state with `st` (from [`Core::state`], perhaps of another
    /// process) and rebuilds the propagation from it; the items are fused by
    /// [`Core::finish_restore`]. Fails, leaving the state as it was, when
    /// `st` was built with another model version, does not fit together, or
    /// cannot be propagated.
    pub fn set_state(&mut self, st: CoreState) -> Result<()> {
        let card = &self.model.card;
        if st.version != card.version {
            bail!(
                "the snapshot is of model {}, the engine runs {}",
                st.version,
                card.version
            );
        }
        if st.pkg.relations != card.relations {
            bail!(
                "the snapshot has relations {:?}, the model {:?}",
                st.pkg.relations,
                card.relations
            );
        }
        let pkg = Pkg::from_parts(st.pkg).context("the snapshot's graph")?;
        let n = pkg.slots();
        if st.slots.len() != n {
            bail!(
                "the snapshot has {} item slots for {n} graph slots",
                st.slots.len()
            );
        }
        let d_in = self.model.items.d_in();
        if let Some(s) = st
            .slots
            .iter()
            .position(|s| !s.x.is_empty() && s.x.len() != d_in)
        {
            bail!("the snapshot's item slot {s} has features of another size than {d_in}");
        }
        if st.co.is_some() != self.behavioural.co.is_some()
            || st.liked.is_some() != self.behavioural.liked.is_some()
        {
            bail!("the snapshot's behavioural relations are not the model's");
        }
        let known = |s: &u32| pkg.contains_item(*s);
        if let Some((id, _)) = st
            .users
            .iter()
            .find(|(_, u)| !u.items.iter().chain(&u.liked).all(known))
        {
            bail!("the snapshot's user {id} has items that are not in the graph");
        }
        let keys = (0..n as u32)
            .map(|s| pkg.ext_id(s).map_or(0, key))
            .collect();
        let cap = n.next_power_of_two().max(1024);
        let mut new = Swap {
            pkg,
            slots: st.slots,
            keys,
            co: st.co,
            liked: st.liked,
            users: st.users.into_iter().collect(),
            now_ms: st.now_ms,
            last_sweep_ms: st.last_sweep_ms,
            last_placeholder_sweep_ms: st.last_placeholder_sweep_ms,
            evicted: st.evicted,
            fused: Array2::zeros((cap, self.model.card.dim)),
        };
        self.swap(&mut new);
        if let Err(e) = self.rebuild_propagation() {
            // Back to the state before, propagation included.
            self.swap(&mut new);
            self.rebuild_propagation()
                .context("rebuilding the propagation of the state before the snapshot")?;
            return Err(e.context("propagating the snapshot's state"));
        }
        self.dirty_users.clear();
        self.pending = Pending::default();
        self.ripple.clear();
        // The snapshot does not say which lists were unsettled when it was
        // written: the next idle settles them all.
        for (_, g) in [&mut self.behavioural.co, &mut self.behavioural.liked]
            .into_iter()
            .flatten()
        {
            g.unsettle_all();
        }
        self.placeholders = self.count_placeholders();
        self.placeholder_users = HashMap::new();
        for (id, u) in &self.users {
            for &s in &u.items {
                if !self.slots[s as usize].described {
                    self.placeholder_users
                        .entry(s)
                        .or_default()
                        .push(id.clone());
                }
            }
        }
        self.metrics.set_users(self.users.len());
        self.metrics.set_placeholders(self.placeholders);
        self.report_graph();
        Ok(())
    }

    /// Exchanges the event-derived state with `other` ([`Core::set_state`]).
    fn swap(&mut self, other: &mut Swap) {
        std::mem::swap(&mut self.pkg, &mut other.pkg);
        std::mem::swap(&mut self.slots, &mut other.slots);
        std::mem::swap(&mut self.keys, &mut other.keys);
        if let (Some(c), Some(g)) = (self.behavioural.co.as_mut(), other.co.as_mut()) {
            std::mem::swap(&mut c.1, g);
        }
        if let (Some(c), Some(g)) = (self.behavioural.liked.as_mut(), other.liked.as_mut()) {
            std::mem::swap(&mut c.1, g);
        }
        std::mem::swap(&mut self.users, &mut other.users);
        std::mem::swap(&mut self.now_ms, &mut other.now_ms);
        std::mem::swap(&mut self.last_sweep_ms, &mut other.last_sweep_ms);
        std::mem::swap(
            &mut self.last_placeholder_sweep_ms,
            &mut other.last_placeholder_sweep_ms,
        );
        std::mem::swap(&mut self.evicted, &mut other.evicted);
        std::mem::swap(&mut self.fused, &mut other.fused);
    }

    /// Publishes only the users of `ownership`'s partitions (a replica of
    /// several, [`crate::serve::replica`]); the state still holds every user.
    pub fn set_ownership(&mut self, ownership: Option<Arc<crate::serve::replica::Ownership>>) {
        self.ownership = ownership.map(|o| (o, BTreeSet::new()));
    }

    /// Whether this replica publishes the users of `partition` (-1: none
    /// known; the leader publishes those, so that none is left out). By the
    /// core's own view of the share, which changes only when it publishes
    /// what it gained ([`Core::publish_gained`]): a rebalance that revokes
    /// and gives back the same partitions between two of its batches loses
    /// nothing.
    fn owns_partition(&self, partition: i32) -> bool {
        match &self.ownership {
            None => true,
            Some((_, view)) => view.contains(&partition.max(0)),
        }
    }

    fn owns(&self, user: &UserState) -> bool {
        self.owns_partition(user.partition)
    }

    /// Scaled out: keeps the items of `p` only when this replica leads, and
    /// returns the shares `p` writes (`p{n}` per partition of the view,
    /// `items` when leading), for the model flip. `None`: one instance.
    pub fn share(&self, p: &mut Publish) -> Option<Vec<String>> {
        let (_, view) = self.ownership.as_ref()?;
        let mut shares: Vec<String> = view.iter().map(|n| format!("p{n}")).collect();
        if view.contains(&0) {
            shares.push("items".into());
        } else {
            p.items.clear();
        }
        Some(shares)
    }

    /// After this replica's share changed: every user of the partitions it
    /// gained (and every item, when it gained the lead), from the state it
    /// holds, which is complete (it reads every partition).
    pub fn publish_gained(&mut self) -> Result<Publish> {
        let Some((o, before)) = self.ownership.as_mut() else {
            return Ok(Publish::default());
        };
        let now = o.owned();
        let gained: BTreeSet<i32> = now.difference(before).copied().collect();
        let lead = now.contains(&0) && !before.contains(&0);
        *before = now;
        let mut users: Vec<String> = self
            .users
            .iter()
            .filter(|(_, u)| gained.contains(&u.partition) || (lead && u.partition < 0))
            .map(|(id, _)| id.clone())
            .collect();
        users.sort();
        let items: Vec<ItemOut> = if lead {
            (0..self.slots.len() as u32)
                .filter(|&s| self.slots[s as usize].described && self.pkg.contains_item(s))
                .map(|s| self.item_out(s))
                .collect()
        } else {
            Vec::new()
        };
        tracing::info!(
            partitions = ?gained,
            users = users.len(),
            items = items.len(),
            "publishing the users of the partitions gained"
        );
        Ok(Publish {
            items,
            users: self.publish_users(&users),
            ..Default::default()
        })
    }

    /// Bounds the users kept (unbounded until called).
    pub fn set_user_bounds(&mut self, bounds: UserBounds) {
        self.bounds = bounds;
    }

    /// Evicts the users past the TTL, then, above `max_users`, the least
    /// recently active down to 90% of it. A user who comes back starts
    /// afresh (their lists and behavioural-edge window too).
    fn bound_users(&mut self) {
        let mut gone = Vec::new();
        let ttl = self.bounds.ttl_ms;
        let step = (ttl / 16).max(1);
        if ttl > 0 && self.now_ms / step > self.last_sweep_ms / step {
            // A sweep each time event time enters a new sixteenth of the
            // TTL: at most 1/16 late, at the same events in every run.
            self.last_sweep_ms = self.now_ms;
            let cutoff = self.now_ms.saturating_sub(ttl);
            self.users.retain(|id, u| {
                let keep = u.ts >= cutoff;
                if !keep {
                    gone.push((id.clone(), u.partition));
                }
                keep
            });
        }
        let max = self.bounds.max_users.max(1);
        if self.users.len() > max {
            let target = max - max / 10;
            let mut order: Vec<(u64, &String)> =
                self.users.iter().map(|(id, u)| (u.ts, id)).collect();
            order.sort_unstable();
            let out: Vec<String> = order[..self.users.len() - target]
                .iter()
                .map(|(_, id)| (*id).clone())
                .collect();
            for id in out {
                if let Some(u) = self.users.remove(&id) {
                    gone.push((id, u.partition));
                }
            }
        }
        if gone.is_empty() {
            return;
        }
        for (id, _) in &gone {
            self.dirty_users.remove(id);
        }
        self.metrics.users_evicted(gone.len() as u64);
        // Scaled out, only the owner deletes a user's keys: another replica
        // may evict at another point of its read order.
        let owned: Vec<String> = gone
            .into_iter()
            .filter(|(_, p)| self.owns_partition(*p))
            .map(|(id, _)| id)
            .collect();
        self.evicted.extend(owned);
    }

    /// The evicted users whose keys are to be deleted: those not back
    /// since (a user evicted by one batch held back in catch-up may return
    /// in the next), once each.
    fn take_evicted(&mut self) -> Vec<String> {
        let mut out = std::mem::take(&mut self.evicted);
        out.retain(|id| !self.users.contains_key(id));
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes the placeholders past the TTL, then, above the most kept,
    /// the least recently named down to 90% of it ([`PlaceholderBounds`]).
    fn bound_placeholders(&mut self, work: &mut Pending) {
        let b = self.placeholder_bounds;
        let mut gone = Vec::new();
        let step = (b.ttl_ms / 16).max(1);
        if b.ttl_ms > 0 && self.now_ms / step > self.last_placeholder_sweep_ms / step {
            self.last_placeholder_sweep_ms = self.now_ms;
            let cutoff = self.now_ms.saturating_sub(b.ttl_ms);
            gone.extend(
                self.placeholder_slots()
                    .filter(|&(t, _)| t < cutoff)
                    .map(|(_, s)| s),
            );
        }
        if self.placeholders - gone.len() > b.max {
            let swept: std::collections::HashSet<u32> = gone.iter().copied().collect();
            // Least recently named first, ties by id (never by slot: which
            // slot an id gets depends on when freed slots became reusable).
            let mut order: Vec<(u64, &str, u32)> = self
                .placeholder_slots()
                .filter(|p| !swept.contains(&p.1))
                .map(|(t, s)| (t, self.pkg.ext_id(s).unwrap_or_default(), s))
                .collect();
            order.sort_unstable();
            let target = b.max - b.max / 10;
            let n = order.len() - target;
            let out: Vec<u32> = order[..n].iter().map(|p| p.2).collect();
            gone.extend(out);
        }
        if !gone.is_empty() {
            self.expire(&gone, work);
        }
    }

    /// `(last named, slot)` of every placeholder, in slot order.
    fn placeholder_slots(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|&(s, x)| !x.described && self.pkg.contains_item(s as u32))
            .map(|(s, x)| (x.touched_ms, s as u32))
    }

    fn count_placeholders(&self) -> usize {
        self.placeholder_slots().count()
    }

    /// Removes the placeholders `gone` from the graph (their edges go, and
    /// their neighbours are propagated and republished with the batch),
    /// from the behavioural relations and from the users' histories; their
    /// slots are free for new items from the next propagation on.
    fn expire(&mut self, gone: &[u32], work: &mut Pending) {
        for &s in gone {
            for rel in [&mut self.behavioural.co, &mut self.behavioural.liked] {
                if let Some((_, g)) = rel.as_mut() {
                    g.remove(s);
                }
            }
            self.pkg.remove_item_at(s);
            self.slots[s as usize] = ItemSlot::default();
            self.keys[s as usize] = 0;
            work.inputs.remove(&s);
            self.ripple.remove(s);
        }
        // Only the users who reached them (published lists never hold a
        // placeholder).
        for &s in gone {
            for id in self.placeholder_users.remove(&s).unwrap_or_default() {
                if let Some(u) = self.users.get_mut(&id) {
                    u.items.retain(|&x| x != s);
                    u.liked.retain(|&x| x != s);
                }
            }
        }
        self.placeholders -= gone.len();
        self.metrics.placeholders_expired(gone.len() as u64);
        tracing::debug!(n = gone.len(), "placeholders expired");
    }

    /// The text encoder, for the text stage.
    pub fn text_encoder(&self) -> Arc<TextEncoder> {
        self.model.text.clone()
    }

    /// The execution provider of the item models (`cpu`, `cuda`).
    pub fn provider(&self) -> &'static str {
        self.model.items.provider()
    }

    /// Catch-up batches held back, not yet published.
    pub fn pending_batches(&self) -> usize {
        self.pending.batches
    }

    /// The model's card.
    pub fn card(&self) -> &ModelCard {
        &self.model.card
    }

    /// What one item slot costs in memory, bytes, about: its propagation
    /// rows (inputs and every hop's output, per relation), its fused row and
    /// its features.
    pub fn slot_bytes(&self) -> u64 {
        let c = &self.model.card;
        let (r, m, d) = (c.relations.len() as u64, c.hops as u64, c.dim as u64);
        4 * (r * (m + 2) * d + d + self.model.items.d_in() as u64)
    }

    /// Items with an item event (ranked and published).
    pub fn described_items(&self) -> usize {
        self.slots.iter().filter(|s| s.described).count()
    }

    /// The product knowledge graph as it stands (catalogue relations from
    /// the `item-relations` topic, behavioural ones learnt from the
    /// interactions).
    pub fn graph(&self) -> &Pkg {
        &self.pkg
    }

    /// Users seen.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// The slot of item `id`, named by an event at `ts` (ms); a new one is
    /// a placeholder until its item event comes. True when new.
    fn slot(&mut self, id: &str, ts: u64) -> (u32, bool) {
        if let Some(s) = self.pkg.item_index(id) {
            let slot = &mut self.slots[s as usize];
            slot.touched_ms = slot.touched_ms.max(ts);
            return (s, false);
        }
        let s = self.pkg.add_item(id);
        let n = s as usize + 1;
        if self.slots.len() < n {
            self.slots.resize_with(n, ItemSlot::default);
            self.keys.resize(n, 0);
        } else {
            self.slots[s as usize] = ItemSlot::default();
        }
        self.keys[s as usize] = key(id);
        self.slots[s as usize].touched_ms = ts;
        self.placeholders += 1;
        if self.fused.nrows() < n {
            let cap = n.next_power_of_two().max(1024);
            let mut f = Array2::zeros((cap, self.model.card.dim));
            f.slice_mut(ndarray::s![..self.fused.nrows(), ..])
                .assign(&self.fused);
            self.fused = f;
        }
        (s, true)
    }

    /// Applies a batch of events. In [`Mode::Live`] returns what to publish;
    /// in [`Mode::Restore`] only the state changes (call [`Core::finish_restore`]
    /// after the last restored batch); in [`Mode::CatchUp`] the state changes
    /// and the rest waits for the next live batch (an empty one flushes).
    pub fn apply(&mut self, msgs: &[Msg], mode: Mode) -> Result<(Publish, Applied)> {
        let t_batch = Instant::now();
        // What catch-up batches held back comes first.
        let mut work = std::mem::take(&mut self.pending);
        let had_pending = work.batches > 0;
        let mut counts = Applied::default();
        // The latest item event of each slot in the batch (its text wins).
        let mut texts: BTreeMap<u32, usize> = BTreeMap::new();
        for (k, m) in msgs.iter().enumerate() {
            let topic = m.event.topic().name();
            self.now_ms = self.now_ms.max(m.event.ts());
            let applied = match &m.event {
                Event::Item(e) => {
                    let s = self.apply_item(e, m.kafka_ms, &mut work);
                    texts.insert(s, k);
                    true
                }
                Event::Relation(e) => self.apply_relation(e, m.kafka_ms, &mut work)?,
                Event::Interaction(e) => {
                    self.apply_interaction(e, m.kafka_ms, m.partition, mode, &mut work)?;
                    self.bound_users();
                    true
                }
            };
            let outcome = if applied {
                &mut counts.applied
            } else {
                &mut counts.ignored
            };
            *outcome.entry(topic).or_default() += 1;
        }
        if !msgs.is_empty() {
            // After the whole batch: an id named by a relation before its
            // item event in the same batch (a catalogue loaded in bulk) is
            // described by now, whatever order the topics were read in.
            self.bound_placeholders(&mut work);
            self.metrics.set_users(self.users.len());
            self.metrics.set_placeholders(self.placeholders);
        }
        if msgs.is_empty() && !had_pending {
            return Ok((Publish::default(), counts));
        }
        self.changed_since_idle = true;
        self.set_features(msgs, &texts, &mut work.inputs)?;
        if mode == Mode::CatchUp {
            work.batches += 1;
            self.pending = work;
            return Ok((Publish::default(), counts));
        }
        let (batch, stats) = self.propagate(&work.inputs)?;
        if mode == Mode::Restore {
            // Users evicted while restoring stay listed: their keys are
            // deleted with the first live publish (a repeated DEL is
            // harmless), in case the crash came before it.
            return Ok((Publish::default(), counts));
        }
        let out = self.publish_changes(work, &batch, &stats)?;
        tracing::debug!(
            events = msgs.len(),
            items = out.items.len(),
            users = out.users.len(),
            total_ms = t_batch.elapsed().as_secs_f64() * 1e3,
            "batch applied"
        );
        Ok((out, counts))
    }

    /// An item event: its slot (a new one needs an input row), described
    /// from now on. Returns the slot.
    fn apply_item(
        &mut self,
        e: &crate::ingest::ItemEvent,
        kafka_ms: Option<i64>,
        work: &mut Pending,
    ) -> u32 {
        let (s, new) = self.slot(&e.item_id, e.ts);
        if new {
            work.inputs.insert(s);
        }
        let slot = &mut self.slots[s as usize];
        if !slot.described {
            self.placeholders -= 1;
            self.placeholder_users.remove(&s);
        }
        slot.described = true;
        slot.ts = slot.ts.max(e.ts);
        if let Some(k) = kafka_ms {
            work.items.push((s, k));
        }
        s
    }

    /// A relation event: the edge added or removed. False when ignored (a
    /// relation the model does not know, or one learnt from interactions).
    fn apply_relation(
        &mut self,
        e: &crate::ingest::RelationEvent,
        kafka_ms: Option<i64>,
        work: &mut Pending,
    ) -> Result<bool> {
        let Some(r) = self.pkg.relation_index(&e.relation) else {
            self.metrics.unknown_relation(&e.relation);
            return Ok(false);
        };
        if self.behavioural.derives(r) {
            // Learnt from the interactions here, never taken precomputed
            // (DESIGN.md, "Events").
            return Ok(false);
        }
        let (u, nu) = self.slot(&e.src, e.ts);
        let (v, nv) = self.slot(&e.dst, e.ts);
        for (s, new) in [(u, nu), (v, nv)] {
            if new {
                work.inputs.insert(s);
            }
        }
        let changed = match e.op {
            crate::ingest::Op::Add => self.pkg.add_edge(r, u, v)?,
            crate::ingest::Op::Remove => self.pkg.remove_edge(r, u, v)?,
        };
        if let (true, Some(k)) = (changed, kafka_ms) {
            work.edges.push((u, k));
        }
        Ok(true)
    }

    /// An interaction: the user's items, the item's counts, the behavioural
    /// relations learnt from it, and (live) its prequential score against
    /// the user's last published list.
    fn apply_interaction(
        &mut self,
        e: &crate::ingest::InteractionEvent,
        kafka_ms: Option<i64>,
        partition: Option<i32>,
        mode: Mode,
        work: &mut Pending,
    ) -> Result<()> {
        let (s, new) = self.slot(&e.item_id, e.ts);
        if new {
            work.inputs.insert(s);
        }
        let user = self
            .users
            .entry(e.user_id.clone())
            .or_insert_with(|| UserState {
                partition: -1,
                ..Default::default()
            });
        user.ts = user.ts.max(e.ts);
        if let Some(p) = partition {
            user.partition = p;
        }
        let key = self.keys[s as usize];
        if !user.items.contains(&s) {
            if mode != Mode::Restore && !user.last.is_empty() {
                let rank = user.last.iter().position(|&x| x == s);
                self.metrics.prequential(rank);
            }
            learn(&mut self.behavioural.co, &mut self.pkg, &user.items, s, key)?;
            user.items.push(s);
            if !self.slots[s as usize].described {
                self.placeholder_users
                    .entry(s)
                    .or_default()
                    .push(e.user_id.clone());
            }
            let slot = &mut self.slots[s as usize];
            slot.count += 1;
            slot.first_ms = slot.first_ms.min(e.ts);
        }
        let liked = e.kind == crate::ingest::Kind::Rating
            && e.value
                .is_some_and(|v| v >= self.behavioural.like_threshold);
        if liked && self.behavioural.liked.is_some() && !user.liked.contains(&s) {
            learn(
                &mut self.behavioural.liked,
                &mut self.pkg,
                &user.liked,
                s,
                key,
            )?;
            user.liked.push(s);
        }
        self.dirty_users.insert(e.user_id.clone());
        if let Some(k) = kafka_ms {
            work.users.push((e.user_id.clone(), k));
        }
        Ok(())
    }

    /// Features of the described items of `texts` (slot → message index):
    /// text embedding (from the text stage, or computed here) ⊕ hashed
    /// categories; each needs a new input row.
    fn set_features(
        &mut self,
        msgs: &[Msg],
        texts: &BTreeMap<u32, usize>,
        inputs: &mut BTreeSet<u32>,
    ) -> Result<()> {
        if texts.is_empty() {
            return Ok(());
        }
        let mut own: Vec<Msg> = texts
            .values()
            .filter(|&&k| msgs[k].text.is_none())
            .map(|&k| msgs[k].clone())
            .collect();
        if !own.is_empty() {
            let t0 = Instant::now();
            let n = embed_texts(&self.model.text, &mut own)?;
            let provider = self.model.text.provider();
            self.metrics
                .inference("text_encoder", provider, n, t0.elapsed().as_secs_f64());
        }
        let mut own = own.into_iter();
        let kg = self.model.card.config.kg_dim;
        for (&s, &k) in texts {
            let m = &msgs[k];
            let text = match &m.text {
                Some(t) => t.clone(),
                None => own.next().and_then(|o| o.text).unwrap_or_default(),
            };
            let Event::Item(e) = &m.event else { continue };
            let mut x = text;
            x.extend(category_bag(&e.categories, kg));
            self.slots[s as usize].x = x;
            inputs.insert(s);
        }
        Ok(())
    }

    /// The graph's edits since the last propagation and the input rows
    /// `H_0 = X W_r` of `inputs` (zeros for placeholders), propagated.
    fn propagate(&mut self, inputs: &BTreeSet<u32>) -> Result<(Batch, ApplyStats)> {
        let mut batch: Batch = self.pkg.take_changes();
        let (r_n, d) = (self.model.card.relations.len(), self.model.card.dim);
        let described: Vec<u32> = inputs
            .iter()
            .copied()
            .filter(|&s| !self.slots[s as usize].x.is_empty())
            .collect();
        let zero = Array2::<f32>::zeros((r_n, d));
        for &s in inputs {
            if self.slots[s as usize].x.is_empty() && self.pkg.contains_item(s) {
                batch.set_inputs(s, zero.view());
            }
        }
        if !described.is_empty() {
            let projected = self.project(&described)?;
            for (k, &s) in described.iter().enumerate() {
                batch.set_inputs(s, projected.index_axis(ndarray::Axis(0), k));
            }
        }
        let t0 = Instant::now();
        let edits = batch.edits().map_or(0, |r| (r.end - r.start) as usize) + batch.num_inputs();
        let stats = self.prop.apply(&self.pkg, &batch)?;
        self.metrics.propagation(edits, t0.elapsed().as_secs_f64());
        self.report_graph();
        Ok((batch, stats))
    }

    /// What a propagated batch publishes: the items whose rows changed (the
    /// batch's own slots now, the ripple every `graph.ripple_ms`), the users
    /// with new interactions, and the freshness sources of `work`.
    fn publish_changes(
        &mut self,
        work: Pending,
        batch: &Batch,
        stats: &ApplyStats,
    ) -> Result<Publish> {
        let mut out = Publish {
            evicted: self.take_evicted(),
            ..Default::default()
        };
        // Rows whose output changed in some relation (exact, or beyond the
        // tolerance's held-back changes): the batch's own slots (edge
        // endpoints, new or changed items) are re-fused and published now;
        // the ripple through the graph (rows changed by propagation alone)
        // waits for the next flush, every `graph.ripple_ms` and when idle, so
        // a stream of edges at a hub does not republish the hub's whole
        // neighbourhood with every batch.
        let own: BTreeSet<u32> = (0..self.pkg.num_relations())
            .flat_map(|r| batch.touched(r).iter().copied())
            .chain(batch.items().iter().copied())
            .collect();
        let mut changed: BTreeSet<u32> = work.inputs;
        for &s in &stats.changed {
            if own.contains(&s) {
                changed.insert(s);
            } else {
                self.ripple.insert(s);
            }
        }
        // The whole queue every `ripple_ms`: a row rippled by many batches
        // in between is published once.
        if self.last_ripple.elapsed().as_millis() as u64 >= self.ripple_ms {
            changed.extend(self.ripple.take());
            self.last_ripple = Instant::now();
        } else {
            for &s in &changed {
                self.ripple.remove(s);
            }
        }
        let to_fuse: Vec<u32> = changed
            .into_iter()
            .filter(|&s| {
                self.pkg.contains_item(s) && self.slots.get(s as usize).is_some_and(|x| x.described)
            })
            .collect();
        self.fuse(&to_fuse)?;
        out.items = to_fuse.iter().map(|&s| self.item_out(s)).collect();
        for (s, k) in work.items {
            if self.slots[s as usize].described {
                out.sources.push(("item", k));
            }
        }
        out.sources
            .extend(work.edges.into_iter().map(|(_, k)| ("edge", k)));
        // Users with new interactions.
        let dirty: Vec<String> = std::mem::take(&mut self.dirty_users).into_iter().collect();
        out.users = self.publish_users(&dirty);
        let published: BTreeSet<&str> = out.users.iter().map(|u| u.id.as_str()).collect();
        for (u, k) in work.users {
            if published.contains(u.as_str()) {
                out.sources.push(("user", k));
            }
        }
        Ok(out)
    }

    /// After the last restored batch: fuses every item, queues every item
    /// for the next ripple flush, and marks every user for the next idle
    /// refresh. The items go out once more because the engine before the
    /// restart may have died with some in its ripple queue (changed by
    /// propagation alone, their batch's offsets committed, not yet
    /// republished): nothing else would publish them.
    pub fn finish_restore(&mut self) -> Result<()> {
        let all: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&s| self.slots[s as usize].described && self.pkg.contains_item(s))
            .collect();
        self.fuse(&all)?;
        for &s in &all {
            self.ripple.insert(s);
        }
        self.dirty_users.clear();
        self.changed_since_idle = true;
        Ok(())
    }

    /// Everything there is to publish: every described item and every user
    /// (after a model change, or when Redis holds another version).
    pub fn publish_all(&mut self) -> Result<Publish> {
        let items: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&s| self.slots[s as usize].described && self.pkg.contains_item(s))
            .collect();
        let users: Vec<String> = self.users.keys().cloned().collect();
        let mut users = users;
        users.sort();
        Ok(Publish {
            items: items.iter().map(|&s| self.item_out(s)).collect(),
            users: self.publish_users(&users),
            sources: Vec::new(),
            evicted: self.take_evicted(),
        })
    }

    /// Called when the stream has been idle: if anything changed since the
    /// last call, refreshes every user (or those with new interactions, per
    /// settings) against the current catalogue.
    ///
    /// First republishes the ripple waiting for its flush and, if the
    /// tolerance held changes back, recomputes the propagation exactly and
    /// republishes the items it moved: an idle engine is exact.
    pub fn idle(&mut self) -> Result<Publish> {
        let mut moved: BTreeSet<u32> = self.ripple.take().into_iter().collect();
        if self.behavioural.settle(&mut self.pkg)? {
            let (_, stats) = self.propagate(&BTreeSet::new())?;
            moved.extend(stats.changed);
            self.changed_since_idle = true;
        }
        if !self.prop.is_exact() {
            let t0 = Instant::now();
            moved.extend(self.prop.reconcile(&self.pkg)?);
            self.metrics.propagation(0, t0.elapsed().as_secs_f64());
        }
        self.last_ripple = Instant::now();
        let to_fuse: Vec<u32> = moved
            .into_iter()
            .filter(|&s| {
                self.pkg.contains_item(s) && self.slots.get(s as usize).is_some_and(|x| x.described)
            })
            .collect();
        self.fuse(&to_fuse)?;
        if !to_fuse.is_empty() {
            tracing::debug!(
                items = to_fuse.len(),
                "ripple published, propagation reconciled"
            );
        }
        let items: Vec<ItemOut> = to_fuse.iter().map(|&s| self.item_out(s)).collect();
        self.changed_since_idle |= !items.is_empty();
        if !self.changed_since_idle {
            return Ok(Publish {
                items,
                evicted: self.take_evicted(),
                ..Default::default()
            });
        }
        self.changed_since_idle = false;
        let mut users: Vec<String> = if self.refresh_all {
            self.users.keys().cloned().collect()
        } else {
            std::mem::take(&mut self.dirty_users).into_iter().collect()
        };
        users.sort();
        Ok(Publish {
            items,
            users: self.publish_users(&users),
            sources: Vec::new(),
            evicted: self.take_evicted(),
        })
    }

    /// Swaps in a new model: every item is projected, propagated and fused
    /// again from its stored features; returns everything to publish under
    /// the new version.
    pub fn swap_model(&mut self, model: LoadedModel) -> Result<Publish> {
        if model.card.relations != self.model.card.relations {
            bail!(
                "model {} has relations {:?}, the running graph {:?}: restart the engine to change relations",
                model.card.version,
                model.card.relations,
                self.model.card.relations
            );
        }
        let old = std::mem::replace(&mut self.model, model);
        let res = self.recompute_all();
        // Every item is republished under the new version.
        self.ripple.clear();
        if let Err(e) = res {
            self.model = old;
            self.recompute_all()?;
            return Err(e);
        }
        self.metrics.set_model(&self.model.card.version);
        self.publish_all()
    }

    fn recompute_all(&mut self) -> Result<()> {
        let described = self.rebuild_propagation()?;
        let d = self.model.card.dim;
        if self.fused.ncols() != d {
            self.fused = Array2::zeros((self.fused.nrows(), d));
        }
        self.fuse(&described)
    }

    /// Every item projected again from its stored features and the
    /// propagation computed in full; returns the described items.
    fn rebuild_propagation(&mut self) -> Result<Vec<u32>> {
        let (r_n, d) = (self.model.card.relations.len(), self.model.card.dim);
        let n = self.pkg.slots();
        let mut inputs = vec![Array2::<f32>::zeros((n, d)); r_n];
        let described: Vec<u32> = (0..n as u32)
            .filter(|&s| self.pkg.contains_item(s) && !self.slots[s as usize].x.is_empty())
            .collect();
        for chunk in described.chunks(4096) {
            let p = self.project(chunk)?;
            for (k, &s) in chunk.iter().enumerate() {
                for (r, input) in inputs.iter_mut().enumerate() {
                    input
                        .row_mut(s as usize)
                        .assign(&p.slice(ndarray::s![k, r, ..]));
                }
            }
        }
        let _ = self.pkg.take_changes();
        let views: Vec<ArrayView2<'_, f32>> = inputs.iter().map(|a| a.view()).collect();
        self.prop = Propagator::full(
            PropagatorConfig {
                hops: self.model.card.hops,
                tolerance: self.tolerance,
                ..Default::default()
            },
            &self.pkg,
            &views,
        )?;
        Ok(described)
    }

    fn project(&self, slots: &[u32]) -> Result<Array3<f32>> {
        let d_in = self.model.items.d_in();
        let mut x = Array2::<f32>::zeros((slots.len(), d_in));
        for (k, &s) in slots.iter().enumerate() {
            let row = &self.slots[s as usize].x;
            x.row_mut(k).assign(&ndarray::ArrayView1::from(&row[..]));
        }
        let t0 = Instant::now();
        let p = self.model.items.project(x.view())?;
        self.metrics.inference(
            "item_projection",
            self.model.items.provider(),
            slots.len(),
            t0.elapsed().as_secs_f64(),
        );
        Ok(p)
    }

    fn fuse(&mut self, slots: &[u32]) -> Result<()> {
        let (r_n, d) = (self.model.card.relations.len(), self.model.card.dim);
        for chunk in slots.chunks(4096) {
            let mut e = Array3::<f32>::zeros((chunk.len(), r_n, d));
            for (k, &s) in chunk.iter().enumerate() {
                for r in 0..r_n {
                    e.slice_mut(ndarray::s![k, r, ..])
                        .assign(&self.prop.row(r, s)?);
                }
            }
            let t0 = Instant::now();
            let (fused, _) = self.model.items.fuse(e.view())?;
            self.metrics.inference(
                "item_fusion",
                self.model.items.provider(),
                chunk.len(),
                t0.elapsed().as_secs_f64(),
            );
            for (k, &s) in chunk.iter().enumerate() {
                self.fused.row_mut(s as usize).assign(&fused.row(k));
            }
        }
        Ok(())
    }

    fn item_out(&self, s: u32) -> ItemOut {
        ItemOut {
            id: self.pkg.ext_id(s).unwrap_or_default().to_string(),
            emb: self.fused.row(s as usize).to_vec(),
            ts: self.slots[s as usize].ts,
        }
    }

    /// Item biases from observable popularity (as `train::bias_features` in
    /// the blind mode: no scenario counts), relative to the latest event time.
    fn bias(&self) -> Array1<f32> {
        let w = &self.model.card.bias_weights;
        let mut b = Array1::<f32>::zeros(self.fused.nrows());
        if w.len() != BIAS_FEATURES {
            return b;
        }
        for (s, slot) in self.slots.iter().enumerate() {
            let count = slot.count as f64;
            let days = if slot.first_ms != u64::MAX {
                ((self.now_ms.saturating_sub(slot.first_ms)) as f64 / 86_400_000.0).max(1.0)
            } else {
                1.0
            };
            b[s] = w[0] * (count as f32).ln_1p() + w[1] * ((count / days) as f32).ln_1p();
        }
        b
    }

    /// Fresh popularity per slot ([`crate::train::fresh`]): items outside
    /// the model's trained items, by the users who interacted since they
    /// arrived. `None` when the model's fresh-item weight is 0 or it lists no
    /// trained items.
    fn fresh_popularity(&self) -> Option<Array1<f32>> {
        let trained = &self.model.trained_items;
        let card = &self.model.card;
        if (card.fresh_weight == 0.0 && card.fresh_knn_weight == 0.0) || trained.is_empty() {
            return None;
        }
        let mut p = Array1::<f32>::zeros(self.fused.nrows());
        for (s, slot) in self.slots.iter().enumerate() {
            let fresh = self
                .pkg
                .ext_id(s as u32)
                .is_some_and(|id| !trained.contains(id));
            p[s] = crate::train::fresh::fresh_popularity(fresh, slot.count as f32);
        }
        Some(p)
    }

    fn active(&self) -> Vec<bool> {
        let mut a = vec![false; self.fused.nrows()];
        for (s, slot) in self.slots.iter().enumerate() {
            a[s] = slot.described && self.pkg.contains_item(s as u32);
        }
        a
    }

    /// The users' embeddings and lists, and each list's slots.
    fn user_outs(&self, users: &[String]) -> (Vec<UserOut>, Vec<Vec<u32>>) {
        if users.is_empty() {
            return Default::default();
        }
        let t0 = Instant::now();
        let bias = self.bias();
        let fresh = self.fresh_popularity();
        let active = self.active();
        let mut keys = self.keys.clone();
        keys.resize(self.fused.nrows(), 0);
        let cat = Catalogue {
            emb: self.fused.view(),
            bias: bias.view(),
            active: &active,
            keys: &keys,
            graph: Some((&self.pkg, &self.model.card.neighbour_weights)),
            fresh: fresh
                .as_ref()
                .map(|p| (p.view(), self.model.card.fresh_weight)),
            knn: self.behavioural.co.as_ref().map(|c| {
                let w = crate::adapt::KnnWeights {
                    all: self.model.card.knn_weight,
                    fresh: self.model.card.fresh_knn_weight,
                };
                (&c.1, w)
            }),
            pool: None,
        };
        // The negatives' pool, once for the whole batch of users.
        let pool = (self.adapt.negative_pool > 0)
            .then(|| crate::adapt::negative_pool(&cat, self.adapt.negative_pool));
        let cat = Catalogue {
            pool: pool.as_deref(),
            ..cat
        };
        let mut adapted: Vec<(&String, &UserState, Array1<f32>)> = Vec::with_capacity(users.len());
        for id in users {
            let Some(u) = self.users.get(id) else {
                continue;
            };
            if let Some(v) = adapt_user(&cat, &u.items, key(id), &self.adapt) {
                adapted.push((id, u, v));
            }
        }
        let queries: Vec<(ndarray::ArrayView1<'_, f32>, &[u32])> = adapted
            .iter()
            .map(|(_, u, v)| (v.view(), u.items.as_slice()))
            .collect();
        let lists = rank_users(&cat, &queries, self.top_k);
        let slots = lists
            .iter()
            .map(|l| l.iter().map(|&(s, _)| s).collect())
            .collect();
        let out: Vec<UserOut> = adapted
            .iter()
            .zip(lists)
            .map(|((id, u, v), recs)| UserOut {
                id: (*id).clone(),
                emb: v.to_vec(),
                ts: u.ts,
                recs: recs
                    .into_iter()
                    .map(|(s, score)| (self.pkg.ext_id(s).unwrap_or_default().to_string(), score))
                    .collect(),
            })
            .collect();
        self.metrics
            .adaptation(out.len(), t0.elapsed().as_secs_f64());
        (out, slots)
    }

    /// [`Core::user_outs`], each user's list kept as their last published
    /// one (for the prequential quality of their next interaction).
    fn publish_users(&mut self, users: &[String]) -> Vec<UserOut> {
        let owned: Vec<String>;
        let users = if self.ownership.is_some() {
            owned = users
                .iter()
                .filter(|id| self.users.get(*id).is_some_and(|u| self.owns(u)))
                .cloned()
                .collect();
            &owned[..]
        } else {
            users
        };
        let (out, slots) = self.user_outs(users);
        for (o, list) in out.iter().zip(slots) {
            if let Some(u) = self.users.get_mut(&o.id) {
                u.last = list;
            }
        }
        out
    }

    fn report_graph(&self) {
        let edges: Vec<(String, usize)> = self
            .pkg
            .relations()
            .iter()
            .cloned()
            .zip(self.pkg.edge_counts().iter().copied())
            .collect();
        self.metrics.set_graph(self.pkg.num_items(), &edges);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::co::CoConfig;

    /// A state with every field set (one entry per map: postcard writes a
    /// `HashMap` in its iteration order).
    fn sample() -> CoreState {
        let mut pkg = Pkg::new(["co_interacted", "also_bought"]).unwrap();
        let a = pkg.add_item("a");
        let b = pkg.add_item("b");
        pkg.add_edge(1, a, b).unwrap();
        let mut co = CoGraph::new(CoConfig {
            neighbours: 4,
            min_co_users: 1,
            window: 8,
        });
        co.set_key(a, 1);
        co.set_key(b, 2);
        co.interact(&[a], b);
        CoreState {
            version: "v".into(),
            pkg: pkg.to_parts(),
            co: Some(co),
            liked: None,
            slots: vec![
                ItemSlot {
                    described: true,
                    ts: 1,
                    count: 2,
                    first_ms: 3,
                    x: vec![0.5],
                    touched_ms: 4,
                },
                ItemSlot::default(),
            ],
            users: vec![(
                "u".into(),
                UserState {
                    items: vec![0, 1],
                    liked: vec![0],
                    ts: 5,
                    last: vec![1],
                    partition: 9,
                },
            )],
            now_ms: 6,
            last_sweep_ms: 7,
            last_placeholder_sweep_ms: 8,
            evicted: vec!["x".into()],
        }
    }

    /// postcard writes no schema: a snapshot of another layout would be
    /// misread, not refused, unless `snapshot::FORMAT` changes with it.
    #[test]
    fn the_snapshot_layout_is_the_recorded_one() {
        let bytes = postcard::to_allocvec(&sample()).unwrap();
        let digest = crate::ingest::events::sha256_hex(&bytes);
        assert_eq!(
            (crate::serve::snapshot::FORMAT, digest.as_str()),
            (3, "5e5ad5e70e1f7bd55ef34fd54ea5dc3f3ecdd9f632a32b174c3b7576043141b8"),
            "the layout of CoreState changed: bump snapshot::FORMAT and record the new digest here, so that a start passes an older snapshot over instead of misreading it"
        );
    }
}
