//! Building the product knowledge graph of a dataset (MPKG §4.1).
//!
//! Relations:
//! - `co_interacted`: behavioural, learnt from the interactions in the order a
//!   stream sees them ([`stream_order`]) by [`crate::graph::co::CoGraph`],
//!   the code the engine runs on its `interactions` topic: each item linked
//!   to its `neighbours` most similar items by cosine over shared users (at
//!   least `min_co_users`), co-occurrences counted within each user's
//!   `window` most recent items;
//! - `co_liked`: the same over interactions rated at least `like_threshold`
//!   (when the dataset has a `rating` column: weights and play counts are
//!   not ratings);
//! - `kg:<relation>` for the `kg_relations` most frequent KG relations: two
//!   items are linked when their entities share a tail through that relation;
//!   tails shared by more than `max_tail_items` items are skipped as
//!   uninformative (a genre or a country links half the catalogue).
//!
//! Behavioural relations are never sent as `item-relations` events: the
//! engine derives them itself as it consumes each interaction.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::graph::co::{CoConfig, CoGraph};
use crate::graph::Pkg;

/// Settings of the PKG construction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PkgConfig {
    /// Co-interaction neighbours kept per item (10: sparse enough that three
    /// hops stay local, dense enough to reach beyond direct neighbours).
    pub neighbours: usize,
    /// Least shared users for a co-interaction edge (2: one shared user is noise).
    pub min_co_users: usize,
    /// Rating at or above which an interaction counts as a like (4 of 5).
    pub like_threshold: f32,
    /// Most frequent KG relations turned into item-item relations (4).
    pub kg_relations: usize,
    /// Tails shared by more items than this are skipped (50).
    pub max_tail_items: usize,
    /// Most recent distinct items of a user that a new interaction is paired
    /// with in the behavioural relations (200: bounds the engine's
    /// co-occurrence counts per interaction; most users of both reference
    /// datasets have fewer items, so it rarely cuts).
    #[serde(default = "default_window")]
    pub window: usize,
}

fn default_window() -> usize {
    200
}

/// The behavioural relations, derived from interactions by the engine and
/// never sent as `item-relations` events.
pub const BEHAVIOURAL: [&str; 2] = ["co_interacted", "co_liked"];

impl PkgConfig {
    /// The online builder's settings for a behavioural relation.
    pub fn co(&self) -> CoConfig {
        CoConfig {
            neighbours: self.neighbours,
            min_co_users: self.min_co_users,
            window: self.window,
        }
    }
}

impl Default for PkgConfig {
    fn default() -> Self {
        Self {
            neighbours: 10,
            min_co_users: 2,
            like_threshold: 4.0,
            kg_relations: 4,
            max_tail_items: 50,
            window: default_window(),
        }
    }
}

/// The relation names a dataset gives under `cfg` (fixed at training time).
pub fn relation_names(ds: &Dataset, cfg: &PkgConfig) -> Vec<String> {
    let mut names = vec!["co_interacted".to_string()];
    if ds.rated && ds.interactions.iter().any(|i| i.value.is_some()) {
        names.push("co_liked".into());
    }
    names.extend(
        top_kg_relations(ds, cfg)
            .into_iter()
            .map(|r| format!("kg:{}", ds.relations.id(r))),
    );
    names
}

fn top_kg_relations(ds: &Dataset, cfg: &PkgConfig) -> Vec<u32> {
    let mut count: HashMap<u32, usize> = HashMap::new();
    let linked: std::collections::HashSet<u32> = ds.item_entity.iter().flatten().copied().collect();
    for t in &ds.triples {
        if linked.contains(&t.head) {
            *count.entry(t.relation).or_default() += 1;
        }
    }
    let mut v: Vec<(u32, usize)> = count.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter()
        .take(cfg.kg_relations)
        .map(|(r, _)| r)
        .collect()
}

/// Event time of every interaction of `ds` in ms, as the replay stamps it:
/// its timestamp when every interaction has one, else its index as seconds
/// (file order). `None` for a time the streams cannot carry (negative, not
/// finite, past `2^53 - 1` ms): such interactions are never replayed.
pub fn interaction_ms(ds: &Dataset) -> Vec<Option<u64>> {
    const MAX_TS_MS: f64 = ((1u64 << 53) - 1) as f64;
    let timed = ds.has_timestamps();
    ds.interactions
        .iter()
        .enumerate()
        .map(|(k, x)| {
            let seconds = match x.ts {
                Some(t) if timed => t,
                _ => k as f64,
            };
            let ms = (seconds * 1000.0).round();
            (0.0..=MAX_TS_MS).contains(&ms).then_some(ms as u64)
        })
        .collect()
}

/// When the stream delivers each of a dataset's (user, item) pairs and items
/// (the replay's clock): a pair at the time of its first occurrence in the
/// dataset ([`interaction_ms`]), a pair the dataset lacks and an item at the
/// item's first time, an item nobody interacted with at the data's latest.
pub struct PairTimes {
    ms: Vec<Option<u64>>,
    first: HashMap<(u32, u32), usize>,
    item_ts: Vec<u64>,
}

impl PairTimes {
    /// The times of `ds`.
    pub fn new(ds: &Dataset) -> Self {
        let ms = interaction_ms(ds);
        let mut first: HashMap<(u32, u32), usize> = HashMap::with_capacity(ds.interactions.len());
        let mut item_first: Vec<Option<u64>> = vec![None; ds.n_items()];
        for (k, x) in ds.interactions.iter().enumerate() {
            first.entry((x.user, x.item)).or_insert(k);
            if let Some(t) = ms[k] {
                let f = &mut item_first[x.item as usize];
                *f = Some(f.map_or(t, |f| f.min(t)));
            }
        }
        let latest = ms.iter().flatten().copied().max().unwrap_or(0);
        let item_ts = item_first.iter().map(|t| t.unwrap_or(latest)).collect();
        Self { ms, first, item_ts }
    }

    /// The dataset row of the pair's first occurrence, if any.
    pub fn first(&self, user: u32, item: u32) -> Option<usize> {
        self.first.get(&(user, item)).copied()
    }

    /// The pair's event time in ms; `None` when the streams cannot carry it.
    pub fn time(&self, user: u32, item: u32) -> Option<u64> {
        match self.first(user, item) {
            Some(k) => self.ms[k],
            None => Some(self.item(item)),
        }
    }

    /// The item's event time in ms.
    pub fn item(&self, item: u32) -> u64 {
        self.item_ts[item as usize]
    }
}

/// Training interactions in the order a stream sees them: phase by phase
/// (e.g. meta-training, then the scenarios' support sets), each phase's
/// distinct (user, item) pairs not in an earlier phase by (event time of the
/// pair's first occurrence in `ds`, user, item). A pair `ds` lacks takes its
/// item's first time (or the data's latest); a pair whose time the streams
/// cannot carry is left out, as the replay leaves it out.
pub fn stream_order(ds: &Dataset, phases: &[&[Vec<u32>]]) -> Vec<(u32, u32)> {
    let times = PairTimes::new(ds);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for phase in phases {
        let mut keyed: Vec<(u64, u32, u32)> = Vec::new();
        for (u, its) in phase.iter().enumerate() {
            for &i in its {
                let u = u as u32;
                if seen.insert((u, i)) {
                    if let Some(t) = times.time(u, i) {
                        keyed.push((t, u, i));
                    }
                }
            }
        }
        keyed.sort_unstable();
        out.extend(keyed.into_iter().map(|(_, u, i)| (u, i)));
    }
    out
}

/// A split's training interactions in stream order: meta-training, then the
/// scenarios' support sets (the replay's two phases).
pub fn split_stream(ds: &Dataset, split: &crate::eval::split::Split) -> Vec<(u32, u32)> {
    let train = crate::eval::TrainSet::from_split(split, ds.users.len(), ds.n_items());
    let (meta, _) = crate::train::meta_training(ds, split);
    stream_order(ds, &[&meta, &train.user_items])
}

/// The rating of the first occurrence of every (user, item) pair of `ds`
/// (the value the replay sends), when the dataset has ratings.
fn first_ratings(ds: &Dataset) -> HashMap<(u32, u32), f32> {
    let mut out = HashMap::new();
    if ds.rated {
        for x in &ds.interactions {
            if let Some(v) = x.value {
                out.entry((x.user, x.item)).or_insert(v);
            }
        }
    }
    out
}

/// The behavioural relations learnt from `stream` (ordered (user, item)
/// pairs, [`stream_order`]): `co_interacted` from every pair, `co_liked`
/// (when `liked` is given) from the pairs it accepts. Each pair is one
/// interaction of the engine: a user's repeated item is skipped.
pub fn behavioural(
    cfg: &PkgConfig,
    stream: &[(u32, u32)],
    key: impl Fn(u32) -> u64,
    liked: Option<&dyn Fn(u32, u32) -> bool>,
) -> (CoGraph, Option<CoGraph>) {
    let mut co = CoGraph::new(cfg.co());
    let mut like = liked.map(|_| CoGraph::new(cfg.co()));
    let mut hist: HashMap<u32, (Vec<u32>, Vec<u32>)> = HashMap::new();
    let mut keyed = std::collections::HashSet::new();
    for &(u, i) in stream {
        if keyed.insert(i) {
            co.set_key(i, key(i));
            if let Some(l) = like.as_mut() {
                l.set_key(i, key(i));
            }
        }
        let (all, good) = hist.entry(u).or_default();
        if all.contains(&i) {
            continue;
        }
        co.interact(all, i);
        all.push(i);
        if let (Some(l), Some(f)) = (like.as_mut(), liked) {
            if f(u, i) && !good.contains(&i) {
                l.interact(good, i);
                good.push(i);
            }
        }
    }
    // As the engine settles when idle: the graph of the interactions, not of
    // their interleaving across users.
    co.settle();
    if let Some(l) = like.as_mut() {
        l.settle();
    }
    (co, like)
}

/// Builds the PKG over `items` (dense dataset indexes present in the graph;
/// every other item is absent, e.g. zero-shot items during training), with
/// behavioural relations from `stream` (training interactions in stream
/// order, [`stream_order`]; pairs naming absent items are skipped, as the
/// engine never sees them).
///
/// Graph slot `k` holds dataset item `items[k]`; the returned map gives the
/// slot of a dataset item.
pub fn build_pkg(
    ds: &Dataset,
    cfg: &PkgConfig,
    items: &[u32],
    stream: &[(u32, u32)],
) -> crate::graph::Result<(Pkg, HashMap<u32, u32>)> {
    let names = relation_names(ds, cfg);
    let mut pkg = Pkg::new(names.iter().map(String::as_str))?;
    pkg.reserve(items.len());
    let mut slot = HashMap::with_capacity(items.len());
    for &i in items {
        slot.insert(i, pkg.add_item(ds.items.id(i)));
    }
    let stream: Vec<(u32, u32)> = stream
        .iter()
        .copied()
        .filter(|(_, i)| slot.contains_key(i))
        .collect();
    let rating = first_ratings(ds);
    let with_likes = names.get(1).is_some_and(|n| n == "co_liked");
    let like_threshold = cfg.like_threshold;
    let is_liked = |u: u32, i: u32| rating.get(&(u, i)).is_some_and(|&v| v >= like_threshold);
    let (co, liked) = behavioural(
        cfg,
        &stream,
        |i| crate::adapt::key(ds.items.id(i)),
        with_likes.then_some(&is_liked as &dyn Fn(u32, u32) -> bool),
    );
    for (r, g) in std::iter::once(&co).chain(liked.as_ref()).enumerate() {
        for (a, b) in g.edges() {
            pkg.add_edge(r, slot[&a], slot[&b])?;
        }
    }
    let r = 1 + liked.is_some() as usize;
    // KG relations: items sharing a tail entity through the relation.
    let mut entity_slots: HashMap<u32, Vec<u32>> = HashMap::new();
    for &i in items {
        if let Some(e) = ds.item_entity[i as usize] {
            entity_slots.entry(e).or_default().push(slot[&i]);
        }
    }
    for (k, rel) in top_kg_relations(ds, cfg).into_iter().enumerate() {
        let mut by_tail: HashMap<u32, Vec<u32>> = HashMap::new();
        for t in ds.triples.iter().filter(|t| t.relation == rel) {
            if let Some(slots) = entity_slots.get(&t.head) {
                by_tail.entry(t.tail).or_default().extend_from_slice(slots);
            }
        }
        let mut tails: Vec<_> = by_tail.into_iter().collect();
        tails.sort_by_key(|(t, _)| *t);
        for (_, mut group) in tails {
            group.sort_unstable();
            group.dedup();
            if group.len() < 2 || group.len() > cfg.max_tail_items {
                continue;
            }
            for (x, &a) in group.iter().enumerate() {
                for &b in &group[x + 1..] {
                    pkg.add_edge(r + k, a, b)?;
                }
            }
        }
    }
    Ok((pkg, slot))
}
