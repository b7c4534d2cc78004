//! Native adaptation of a user from their interactions, and top-K scoring.
//!
//! A user starts as the mean of their items' embeddings (MPKG eq. 15), then
//! takes a few gradient steps of BPR (eq. 16) on their items against sampled
//! negatives, as MetaKG's local update (eq. 21) adapts a user from a support
//! set. The negatives are drawn without a random generator: the
//! [`AdaptConfig::negatives`] active items with the smallest
//! `mix(key(item id) ^ key(user id))`, a hash of the external ids. So the
//! draw does not depend on the order items were assigned slots in, and two
//! engines that saw the same events in a different order land on the same
//! user (to float rounding), which is what makes a replay after a crash
//! converge to the state of an uninterrupted run. Above
//! [`AdaptConfig::max_positives`] only the most recent items count. The work
//! per user is one pass over the catalogue's keys for the draw, then
//! `steps × (positives + negatives) × d`.
//!
//! Score of item `i` for user `u`: `u · e_i + b_i`, the bias `b` learned from
//! observable popularity (see `crate::train::bias_features`). [`rank_users`]
//! scores a block of users with one matrix product over the catalogue.

use std::collections::BinaryHeap;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, Axis};
use serde::{Deserialize, Serialize};

/// Settings of the per-user adaptation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptConfig {
    /// Gradient steps after the mean (0: the mean of eq. 15 alone).
    pub steps: usize,
    /// Learning rate of each step.
    pub lr: f32,
    /// L2 pull towards the starting mean (keeps a user with one item near it).
    pub l2: f32,
    /// Most recent items used as positives (and in the mean).
    pub max_positives: usize,
    /// Negatives per user. Default 256: the BPR gradient over 256 negatives
    /// is within a few per cent of the one over a whole catalogue, at a fixed
    /// cost whatever the catalogue's size.
    pub negatives: usize,
    /// Size of the negatives' pool ([`negative_pool`]): a user's negatives
    /// are drawn among these many active items, picked once per batch of
    /// users, rather than by a pass over the whole catalogue per user.
    /// Default 4096; 0: no pool.
    pub negative_pool: usize,
    /// Run the model's meta-learned adaptation ([`MetaAdapt`], the model
    /// folder's `meta_adapt.json`) when it has one: its starting point, step
    /// count and per-dimension learning rates replace `steps`, `lr` and `l2`.
    pub meta_learned: bool,
    /// The meta-learned adaptation in use: attached from the model folder
    /// (never read from settings; see [`AdaptConfig::with_meta`]).
    #[serde(skip)]
    pub meta: Option<std::sync::Arc<MetaAdapt>>,
}

/// A meta-learned adaptation (Meta-SGD over the item embeddings, trained by
/// `crate::train::meta_adapt`): the user starts at
/// `init_scale ⊙ mean + init_shift`, then takes `lr.len()` BPR steps, step
/// `t` moving dimension `k` by `lr[t][k]` times the gradient, with an L2 pull
/// of weight `l2` towards the start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaAdapt {
    /// Per-dimension scale of the mean of the user's items.
    pub init_scale: Vec<f32>,
    /// Per-dimension shift added to the scaled mean.
    pub init_shift: Vec<f32>,
    /// Per step, per-dimension learning rates.
    pub lr: Vec<Vec<f32>>,
    /// L2 pull towards the starting point.
    pub l2: f32,
}

impl MetaAdapt {
    /// The plain adaptation as a `MetaAdapt` of dimension `d`: start at the
    /// mean, `steps` steps at learning rate `lr` in every dimension.
    pub fn plain(d: usize, steps: usize, lr: f32, l2: f32) -> Self {
        Self {
            init_scale: vec![1.0; d],
            init_shift: vec![0.0; d],
            lr: vec![vec![lr; d]; steps],
            l2,
        }
    }

    /// Embedding size.
    pub fn dim(&self) -> usize {
        self.init_scale.len()
    }

    /// An error when the vectors' sizes disagree with each other or with `d`.
    pub fn check(&self, d: usize) -> Result<(), String> {
        let bad = self.init_scale.len() != d
            || self.init_shift.len() != d
            || self.lr.iter().any(|r| r.len() != d);
        let finite = self
            .init_scale
            .iter()
            .chain(&self.init_shift)
            .chain(self.lr.iter().flatten())
            .chain(std::iter::once(&self.l2))
            .all(|x| x.is_finite());
        match (bad, finite) {
            (true, _) => Err(format!(
                "meta-learned adaptation: vectors of sizes {}/{}/{:?}, the model's embeddings have {d}",
                self.init_scale.len(),
                self.init_shift.len(),
                self.lr.iter().map(Vec::len).collect::<Vec<_>>()
            )),
            (false, false) => Err("meta-learned adaptation: a value is not finite".into()),
            _ => Ok(()),
        }
    }
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            steps: 3,
            lr: 0.5,
            l2: 0.1,
            max_positives: 64,
            negatives: 256,
            negative_pool: 4096,
            meta_learned: true,
            meta: None,
        }
    }
}

impl AdaptConfig {
    /// These settings with `meta` (the model's meta-learned adaptation)
    /// attached when [`AdaptConfig::meta_learned`] asks for it.
    pub fn with_meta(mut self, meta: Option<&std::sync::Arc<MetaAdapt>>) -> Self {
        self.meta = if self.meta_learned {
            meta.cloned()
        } else {
            None
        };
        self
    }
}

/// The rankable catalogue: one row of `emb`, `bias`, `active` and `keys` per
/// slot. `active[s]` says whether slot `s` is a rankable item (free slots and
/// items not yet described are not); `keys[s]` is [`key`] of its id.
#[derive(Debug, Clone, Copy)]
pub struct Catalogue<'a> {
    /// Item embeddings.
    pub emb: ArrayView2<'a, f32>,
    /// Item biases.
    pub bias: ArrayView1<'a, f32>,
    /// Rankable slots.
    pub active: &'a [bool],
    /// [`key`] of each slot's external id.
    pub keys: &'a [u64],
    /// The PKG and the model's graph-neighbour weights per relation: ranking
    /// adds [`crate::graph::Pkg::add_neighbour_scores`] of the user's items,
    /// as `thaw eval` does. `None` (or all-zero weights) for no term.
    pub graph: Option<(&'a crate::graph::Pkg, &'a [f32])>,
    /// Fresh popularity per slot and the model's fresh-item weight: ranking
    /// adds [`crate::train::fresh::add_fresh_scores`] of the user's items, as
    /// `thaw eval` does. `None` for no term.
    pub fresh: Option<(ArrayView1<'a, f32>, f32)>,
    /// The stream's co-occurrence counts (`co_interacted`) and the weights
    /// of their item-kNN score over all of the user's items and of the
    /// fresh-item kNN score (fresh candidates only, from the user's fresh
    /// items; needs [`Self::fresh`]): ranking adds
    /// [`crate::graph::co::CoGraph::add_similarity_scores`] of the user's
    /// items, and [`add_fresh_knn_scores`], as `thaw eval` does. `None` (or
    /// zero weights) for no term.
    pub knn: Option<(&'a crate::graph::co::CoGraph, KnnWeights)>,
    /// The slots negatives are drawn among ([`negative_pool`]); `None`: every
    /// active slot.
    pub pool: Option<&'a [u32]>,
}

impl Catalogue<'_> {
    fn is_active(&self, s: usize) -> bool {
        self.active.get(s).copied().unwrap_or(false)
    }

    /// The score terms that depend on the user's items (graph neighbours,
    /// fresh items), added to one user's row of `u · e + b`.
    fn add_user_terms(&self, items: &[u32], mut scores: ArrayViewMut1<'_, f32>) {
        if let Some((pkg, w)) = self.graph {
            pkg.add_neighbour_scores(w, items, scores.view_mut());
        }
        if let Some((co, w)) = self.knn {
            co.add_similarity_scores(w.all, items, scores.view_mut());
            if let Some((pop, _)) = self.fresh {
                add_fresh_knn_scores(co, w.fresh, pop, items, scores.view_mut());
            }
        }
        if let Some((pop, w)) = self.fresh {
            crate::train::fresh::add_fresh_scores(w, pop, items, scores);
        }
    }
}

/// Weights of the two item-kNN terms over the stream's co-occurrence counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KnnWeights {
    /// Item-kNN over all of the user's items, for every candidate.
    pub all: f32,
    /// Item-kNN over the user's fresh items, for fresh candidates only
    /// ([`add_fresh_knn_scores`]).
    pub fresh: f32,
}

/// Adds, to every fresh candidate (`pop[i] > 0`), `weight` × the sum over
/// the user's fresh items `j` of the cosine of `i` and `j`, divided by the
/// number of the user's items: the new items that co-occur with the new
/// items the user took up, in proportion to how much of the user's history
/// is new. A user without fresh items, or a weight of 0, adds nothing.
pub fn add_fresh_knn_scores(
    co: &crate::graph::co::CoGraph,
    weight: f32,
    pop: ArrayView1<'_, f32>,
    items: &[u32],
    scores: ArrayViewMut1<'_, f32>,
) {
    let is_fresh = |i: u32| pop.get(i as usize).is_some_and(|&p| p > 0.0);
    let fresh: Vec<u32> = items.iter().copied().filter(|&j| is_fresh(j)).collect();
    if weight == 0.0 || fresh.is_empty() {
        return;
    }
    let share = fresh.len() as f32 / items.len() as f32;
    co.add_similarity_scores_to(weight * share, &fresh, scores, is_fresh);
}

/// A 64-bit key of an external id (FNV-1a, then a finaliser): the same id
/// gets the same key in every process.
pub fn key(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The user's positives: their most recent active items, sorted, distinct.
fn positives(cat: &Catalogue<'_>, items: &[u32], cfg: &AdaptConfig) -> Vec<u32> {
    let start = items.len().saturating_sub(cfg.max_positives.max(1));
    let mut pos: Vec<u32> = items[start..]
        .iter()
        .copied()
        .filter(|&i| cat.is_active(i as usize))
        .collect();
    pos.sort_unstable();
    pos.dedup();
    pos
}

/// A salt of the pool's hash, so the pool is not the set of slots every
/// user's draw would favour.
const POOL_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The negatives' pool of a catalogue: the `size` active slots with the
/// smallest `mix(keys[s] ^ POOL_SALT)`, a uniform sample of the active items
/// that depends on their ids only (not on slot order), sorted by slot. All of
/// them when there are fewer. One pass over the catalogue, done once for a
/// batch of users (the engine) or an evaluation, instead of once per user.
pub fn negative_pool(cat: &Catalogue<'_>, size: usize) -> Vec<u32> {
    let all = 0..cat.emb.nrows().min(cat.keys.len()) as u32;
    let mut pool = smallest(cat, all, &[], POOL_SALT, size);
    pool.sort_unstable();
    pool
}

/// The user's negatives: the `n` active slots outside `items` with the
/// smallest `mix(keys[s] ^ user)`, in that order (see the module docs),
/// among the catalogue's [`Catalogue::pool`] when it has one.
pub fn negatives(cat: &Catalogue<'_>, items: &[u32], user: u64, n: usize) -> Vec<u32> {
    match cat.pool {
        Some(pool) => smallest(cat, pool.iter().copied(), items, user, n),
        None => {
            let all = 0..cat.emb.nrows().min(cat.keys.len()) as u32;
            smallest(cat, all, items, user, n)
        }
    }
}

/// The `n` active slots of `candidates` outside `items` with the smallest
/// `(mix(keys[s] ^ salt), keys[s])`, in that order.
fn smallest(
    cat: &Catalogue<'_>,
    candidates: impl Iterator<Item = u32>,
    items: &[u32],
    salt: u64,
    n: usize,
) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let mut sorted: Vec<u32> = items.to_vec();
    sorted.sort_unstable();
    // A max-heap of the n smallest (hash, key) pairs seen so far.
    let mut heap: BinaryHeap<(u64, u64, u32)> = BinaryHeap::with_capacity(n + 1);
    for s in candidates {
        if !cat.is_active(s as usize) {
            continue;
        }
        let Some(&k) = cat.keys.get(s as usize) else {
            continue;
        };
        let h = mix(k ^ salt);
        if heap.len() == n {
            if let Some(&(top, tk, _)) = heap.peek() {
                if (h, k) >= (top, tk) {
                    continue;
                }
            }
        }
        if sorted.binary_search(&s).is_ok() {
            continue;
        }
        heap.push((h, k, s));
        if heap.len() > n {
            heap.pop();
        }
    }
    heap.into_sorted_vec()
        .into_iter()
        .map(|(_, _, s)| s)
        .collect()
}

/// The adapted user vector, from their items (oldest first) and the [`key`]
/// of their id. `None` when the user has no active item.
pub fn adapt_user(
    cat: &Catalogue<'_>,
    items: &[u32],
    user: u64,
    cfg: &AdaptConfig,
) -> Option<Array1<f32>> {
    let pos = positives(cat, items, cfg);
    if pos.is_empty() {
        return None;
    }
    let d = cat.emb.ncols();
    let mut mean = Array1::<f32>::zeros(d);
    for &i in &pos {
        mean += &cat.emb.row(i as usize);
    }
    mean /= pos.len() as f32;
    let plain;
    let meta: &MetaAdapt = match &cfg.meta {
        Some(m) if m.dim() == d => m,
        _ => {
            if cfg.steps == 0 {
                return Some(mean);
            }
            plain = MetaAdapt::plain(d, cfg.steps, cfg.lr, cfg.l2);
            &plain
        }
    };
    let start =
        &mean * &ArrayView1::from(&meta.init_scale[..]) + ArrayView1::from(&meta.init_shift[..]);
    if meta.lr.is_empty() {
        return Some(start);
    }
    let neg = negatives(cat, items, user, cfg.negatives);
    if neg.is_empty() {
        return Some(start);
    }
    let idx = |v: &[u32]| v.iter().map(|&i| i as usize).collect::<Vec<_>>();
    let (neg, pos) = (idx(&neg), idx(&pos));
    let e_neg = cat.emb.select(Axis(0), &neg);
    let b_neg: Array1<f32> = neg.iter().map(|&j| cat.bias[j]).collect();
    let e_pos = cat.emb.select(Axis(0), &pos);
    let b_pos: Array1<f32> = pos.iter().map(|&i| cat.bias[i]).collect();
    Some(adapt_steps(
        meta,
        start,
        (e_pos.view(), b_pos.view()),
        (e_neg.view(), b_neg.view()),
    ))
}

/// The BPR steps of [`adapt_user`] from `start`, over the positives' and
/// negatives' `(embeddings, biases)`: what `crate::train::meta_adapt`
/// differentiates through (its tests check the two agree).
pub fn adapt_steps(
    meta: &MetaAdapt,
    start: Array1<f32>,
    (e_pos, b_pos): (ArrayView2<'_, f32>, ArrayView1<'_, f32>),
    (e_neg, b_neg): (ArrayView2<'_, f32>, ArrayView1<'_, f32>),
) -> Array1<f32> {
    let mut u = start.clone();
    let mut w = Array2::<f32>::zeros((e_pos.nrows(), e_neg.nrows()));
    for lr in &meta.lr {
        let grad = bpr_gradient(u.view(), (e_pos, b_pos), (e_neg, b_neg), &mut w)
            + (&u - &start) * meta.l2;
        u.zip_mut_with(&(grad * ArrayView1::from(&lr[..])), |x, g| *x -= g);
    }
    u
}

/// `∂L/∂u` of the mean BPR loss `L = −mean log σ(s_pos − s_neg)` over every
/// (positive, negative) pair, `s = e · u + b`; `w` is a `[P, K]` buffer.
pub fn bpr_gradient(
    u: ArrayView1<'_, f32>,
    (e_pos, b_pos): (ArrayView2<'_, f32>, ArrayView1<'_, f32>),
    (e_neg, b_neg): (ArrayView2<'_, f32>, ArrayView1<'_, f32>),
    w: &mut Array2<f32>,
) -> Array1<f32> {
    let pairs = (e_pos.nrows() * e_neg.nrows()).max(1) as f32;
    // s_pos: [P], s_neg: [K].
    let s_pos = e_pos.dot(&u) + b_pos;
    let s_neg = e_neg.dot(&u) + b_neg;
    // w[p, j] = σ(s_neg[j] − s_pos[p]) = −∂ log σ(s_pos − s_neg) / ∂ margin.
    for (p, mut row) in w.rows_mut().into_iter().enumerate() {
        let sp = s_pos[p];
        row.iter_mut()
            .zip(s_neg.iter())
            .for_each(|(x, &sn)| *x = sigmoid(sn - sp));
    }
    // Σ_pj w (e_j − e_p) / pairs.
    let toward_neg = w.sum_axis(Axis(0)).dot(&e_neg);
    let away_pos = w.sum_axis(Axis(1)).dot(&e_pos);
    (toward_neg - away_pos) / pairs
}

/// The mean BPR loss of `u` on the user's positives against `negatives`
/// (for tests and diagnostics).
pub fn bpr_loss(
    cat: &Catalogue<'_>,
    items: &[u32],
    negatives: &[u32],
    u: ArrayView1<'_, f32>,
    cfg: &AdaptConfig,
) -> f32 {
    let scores = cat.emb.dot(&u) + cat.bias;
    let (mut sum, mut n) = (0f64, 0usize);
    for &i in &positives(cat, items, cfg) {
        for &j in negatives {
            sum -= f64::from(sigmoid(scores[i as usize] - scores[j as usize])).ln();
            n += 1;
        }
    }
    (sum / n.max(1) as f64) as f32
}

/// Best first; ties go to the lower slot.
fn best_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `k` best of `scores` over active slots, excluding `exclude` (sorted
/// or not), best first. One pass: a candidate is kept only if it beats the
/// `k`-th best score kept so far (a later slot loses a tie anyway), and the
/// kept ones are cut back to `k` whenever they reach `4k`.
fn select(
    cat: &Catalogue<'_>,
    scores: ArrayView1<'_, f32>,
    exclude: &[u32],
    k: usize,
) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut skip: Vec<u32> = exclude.to_vec();
    skip.sort_unstable();
    let cap = 4 * k + 64;
    let mut kept: Vec<(u32, f32)> = Vec::with_capacity(cap);
    let mut floor = f32::NEG_INFINITY;
    for (i, &s) in scores.iter().enumerate() {
        if !(s > floor && s.is_finite() && cat.is_active(i)) {
            continue;
        }
        if skip.binary_search(&(i as u32)).is_ok() {
            continue;
        }
        kept.push((i as u32, s));
        if kept.len() >= cap {
            kept.select_nth_unstable_by(k - 1, best_first);
            kept.truncate(k);
            floor = kept.iter().map(|p| p.1).fold(f32::INFINITY, f32::min);
        }
    }
    if kept.len() > k {
        kept.select_nth_unstable_by(k, best_first);
        kept.truncate(k);
    }
    kept.sort_unstable_by(best_first);
    kept
}

/// The `k` best active slots for `u` by `u · e + b` plus the graph-neighbour
/// score of `items` (the user's items, sorted or not, which are excluded),
/// best first; ties go to the lower slot.
pub fn top_k(
    cat: &Catalogue<'_>,
    u: ArrayView1<'_, f32>,
    items: &[u32],
    k: usize,
) -> Vec<(u32, f32)> {
    let mut scores = cat.emb.dot(&u) + cat.bias;
    cat.add_user_terms(items, scores.view_mut());
    select(cat, scores.view(), items, k)
}

/// Users scored in one matrix product per block.
const BLOCK: usize = 64;

/// [`top_k`] for many users, `(vector, the user's items)` each, with one
/// matrix product over the catalogue per block of users: the catalogue is
/// read once a block rather than once a user.
pub fn rank_users(
    cat: &Catalogue<'_>,
    users: &[(ArrayView1<'_, f32>, &[u32])],
    k: usize,
) -> Vec<Vec<(u32, f32)>> {
    let mut out = Vec::with_capacity(users.len());
    for block in users.chunks(BLOCK) {
        let mut scores = Array2::<f32>::zeros((block.len(), cat.emb.nrows()));
        score_users(cat, block, scores.view_mut());
        for (row, (_, items)) in scores.rows().into_iter().zip(block) {
            out.push(select(cat, row, items, k));
        }
    }
    out
}

/// The score of every slot for each of `users` (`(vector, the user's
/// items)`), one row each of `out` (`users.len()` × slots): `u · e + b` by
/// one matrix product, plus the terms of the user's items (graph neighbours,
/// fresh items). What [`rank_users`] ranks by, and what `thaw eval` scores.
pub fn score_users(
    cat: &Catalogue<'_>,
    users: &[(ArrayView1<'_, f32>, &[u32])],
    mut out: ndarray::ArrayViewMut2<'_, f32>,
) {
    let d = cat.emb.ncols();
    let mut u = Array2::<f32>::zeros((users.len(), d));
    for (mut row, (v, _)) in u.rows_mut().into_iter().zip(users) {
        row.assign(v);
    }
    ndarray::linalg::general_mat_mul(1.0, &u, &cat.emb.t(), 0.0, &mut out);
    out += &cat.bias;
    for (mut row, (_, items)) in out.rows_mut().into_iter().zip(users) {
        cat.add_user_terms(items, row.view_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    struct Owned {
        e: Array2<f32>,
        b: Array1<f32>,
        active: Vec<bool>,
        keys: Vec<u64>,
        graph: Option<(crate::graph::Pkg, Vec<f32>)>,
        fresh: Option<(Array1<f32>, f32)>,
    }

    impl Owned {
        fn cat(&self) -> Catalogue<'_> {
            Catalogue {
                emb: self.e.view(),
                bias: self.b.view(),
                active: &self.active,
                keys: &self.keys,
                graph: self.graph.as_ref().map(|(g, w)| (g, w.as_slice())),
                fresh: self.fresh.as_ref().map(|(p, w)| (p.view(), *w)),
                knn: None,
                pool: None,
            }
        }
    }

    fn random(n: usize, d: usize, seed: u64) -> Owned {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Owned {
            e: Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0f32)),
            b: Array1::from_shape_fn(n, |_| rng.random_range(-0.5..0.5f32)),
            active: vec![true; n],
            keys: (0..n).map(|i| key(&format!("item-{i}"))).collect(),
            graph: None,
            fresh: None,
        }
    }

    /// The fresh-item kNN score reaches fresh candidates only, from the
    /// user's fresh items only, scaled by their share of the user's items.
    #[test]
    fn fresh_knn_scores_come_from_fresh_items_to_fresh_items() {
        use crate::graph::co::{CoConfig, CoGraph};
        let mut co = CoGraph::new(CoConfig {
            neighbours: 10,
            min_co_users: 1,
            window: 100,
        });
        // Users: {0, 1, 3, 4}, {1, 3, 4}, {0, 2}: items 3 and 4 are fresh.
        let users: [&[u32]; 3] = [&[0, 1, 3, 4], &[1, 3, 4], &[0, 2]];
        for its in users {
            for (k, &i) in its.iter().enumerate() {
                co.interact(&its[..k], i);
            }
        }
        let pop = Array1::from(vec![0.0f32, 0.0, 0.0, 1.0, 1.0]);
        let mut got = Array1::<f32>::zeros(5);
        add_fresh_knn_scores(&co, 2.0, pop.view(), &[0, 1, 3], got.view_mut());
        // Only item 4 (fresh) from item 3 (the user's one fresh item of 3):
        // cos(3, 4) = 2 / sqrt(2 · 2) = 1.
        let want = 2.0 * (1.0 / 3.0) * 1.0;
        assert!((got[4] - want).abs() < 1e-6, "{got}");
        assert_eq!(got.iter().filter(|&&x| x != 0.0).count(), 1, "{got}");
        // A user without fresh items, or a zero weight: nothing.
        let mut none = Array1::<f32>::zeros(5);
        add_fresh_knn_scores(&co, 2.0, pop.view(), &[0, 1], none.view_mut());
        add_fresh_knn_scores(&co, 0.0, pop.view(), &[3], none.view_mut());
        assert!(none.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn no_steps_is_the_mean_of_active_items() {
        let mut c = random(10, 4, 1);
        c.active[3] = false;
        let cfg = AdaptConfig {
            steps: 0,
            ..Default::default()
        };
        let u = adapt_user(&c.cat(), &[1, 3, 5], 7, &cfg).unwrap();
        let want = (&c.e.row(1) + &c.e.row(5)) / 2.0;
        assert!(u.iter().zip(want.iter()).all(|(a, b)| (a - b).abs() < 1e-6));
        assert!(adapt_user(&c.cat(), &[3], 7, &cfg).is_none());
    }

    /// `c` with its slots in reverse order (the same ids in other slots).
    fn reversed(c: &Owned) -> Owned {
        let perm: Vec<usize> = (0..c.keys.len()).rev().collect();
        Owned {
            e: c.e.select(Axis(0), &perm),
            b: c.b.select(Axis(0), &perm),
            active: perm.iter().map(|&i| c.active[i]).collect(),
            keys: perm.iter().map(|&i| c.keys[i]).collect(),
            graph: None,
            fresh: None,
        }
    }

    #[test]
    fn negatives_are_a_fixed_draw_of_ids_not_slots() {
        let mut c = random(500, 4, 9);
        c.active[42] = false;
        let items = [3u32, 17, 99];
        let user = key("alice");
        let negs = negatives(&c.cat(), &items, user, 50);
        assert_eq!(negs.len(), 50);
        assert!(negs.iter().all(|j| !items.contains(j) && *j != 42));
        let mut distinct = negs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 50);
        // The same ids in other slots: the same items are drawn.
        let moved = reversed(&c);
        let moved_items: Vec<u32> = items.iter().map(|&i| 499 - i).collect();
        let again = negatives(&moved.cat(), &moved_items, user, 50);
        let back: Vec<u32> = again.iter().map(|&j| 499 - j).collect();
        assert_eq!(back, negs);
        // Another user, another draw; fewer candidates than asked, all of them.
        assert_ne!(negatives(&c.cat(), &items, key("bob"), 50), negs);
        assert_eq!(negatives(&c.cat(), &items, user, 1000).len(), 496);
    }

    #[test]
    fn the_pool_is_a_draw_of_ids_and_negatives_come_from_it() {
        let mut c = random(2000, 4, 5);
        c.active[7] = false;
        let pool = negative_pool(&c.cat(), 300);
        assert_eq!(pool.len(), 300);
        assert!(pool.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
        assert!(!pool.contains(&7), "active slots only");
        // The same ids in other slots: the same items pooled.
        let moved = reversed(&c);
        let mut back: Vec<u32> = negative_pool(&moved.cat(), 300)
            .iter()
            .map(|&j| 1999 - j)
            .collect();
        back.sort_unstable();
        assert_eq!(back, pool);
        // A user's negatives: within the pool, outside their items, the
        // user's own draw among the pooled ones.
        let items = [pool[0], pool[5], 11];
        let cat = Catalogue {
            pool: Some(&pool),
            ..c.cat()
        };
        let negs = negatives(&cat, &items, key("alice"), 50);
        assert_eq!(negs.len(), 50);
        assert!(negs.iter().all(|j| pool.contains(j) && !items.contains(j)));
        assert_ne!(negatives(&cat, &items, key("bob"), 50), negs);
        // Asking for more than the pool holds gives the pool less the items.
        assert_eq!(negatives(&cat, &items, key("alice"), 1000).len(), 298);
        // adapt_user runs with a pool as without: a vector of the right size.
        let cfg = AdaptConfig::default();
        assert_eq!(
            adapt_user(&cat, &items, key("alice"), &cfg).unwrap().len(),
            4
        );
    }

    #[test]
    fn steps_lower_the_bpr_loss() {
        let c = random(200, 8, 2);
        let items = [4u32, 17, 99];
        let user = key("u");
        let zero = AdaptConfig {
            steps: 0,
            ..Default::default()
        };
        let mean = adapt_user(&c.cat(), &items, user, &zero).unwrap();
        let cfg = AdaptConfig {
            steps: 20,
            l2: 0.0,
            negatives: 64,
            ..Default::default()
        };
        let u = adapt_user(&c.cat(), &items, user, &cfg).unwrap();
        let negs = negatives(&c.cat(), &items, user, cfg.negatives);
        let before = bpr_loss(&c.cat(), &items, &negs, mean.view(), &cfg);
        let after = bpr_loss(&c.cat(), &items, &negs, u.view(), &cfg);
        assert!(after < before - 0.05, "{before} -> {after}");
    }

    /// The gradient of the closed form against finite differences of the loss.
    #[test]
    fn one_step_follows_the_loss_gradient() {
        let c = random(30, 5, 3);
        let items = [2u32, 7];
        let user = key("v");
        let zero = AdaptConfig {
            steps: 0,
            ..Default::default()
        };
        let mean = adapt_user(&c.cat(), &items, user, &zero).unwrap();
        let lr = 1e-2;
        let one = AdaptConfig {
            steps: 1,
            lr,
            l2: 0.0,
            max_positives: 64,
            negatives: 12,
            ..Default::default()
        };
        let u = adapt_user(&c.cat(), &items, user, &one).unwrap();
        let negs = negatives(&c.cat(), &items, user, one.negatives);
        for k in 0..5 {
            let h = 1e-3;
            let mut p = mean.clone();
            p[k] += h;
            let mut m = mean.clone();
            m[k] -= h;
            let g = (bpr_loss(&c.cat(), &items, &negs, p.view(), &one)
                - bpr_loss(&c.cat(), &items, &negs, m.view(), &one))
                / (2.0 * h);
            let step = (mean[k] - u[k]) / lr;
            assert!((g - step).abs() < 2e-3, "dim {k}: fd {g} vs {step}");
        }
    }

    #[test]
    fn top_k_excludes_and_orders() {
        let mut c = random(50, 4, 4);
        c.active[10] = false;
        let u = c.e.row(0).to_owned();
        let top = top_k(&c.cat(), u.view(), &[0, 1], 5);
        assert_eq!(top.len(), 5);
        assert!(top.iter().all(|&(i, _)| i != 0 && i != 1 && i != 10));
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        let scores = c.e.dot(&u) + &c.b;
        let best = (2..50)
            .filter(|&i| i != 10)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        assert_eq!(top[0].0 as usize, best);
        assert_eq!(top_k(&c.cat(), u.view(), &[], 100).len(), 49);
    }

    #[test]
    fn ranking_a_block_equals_ranking_each_user() {
        let c = random(300, 6, 5);
        let vs: Vec<Array1<f32>> = (0..150).map(|i| c.e.row(i).to_owned()).collect();
        let excl: Vec<Vec<u32>> = (0..150u32).map(|i| vec![i, (i * 7) % 300]).collect();
        let users: Vec<(ArrayView1<'_, f32>, &[u32])> = vs
            .iter()
            .zip(&excl)
            .map(|(v, e)| (v.view(), e.as_slice()))
            .collect();
        let block = rank_users(&c.cat(), &users, 10);
        assert_eq!(block.len(), 150);
        for ((v, e), got) in users.iter().zip(&block) {
            let want = top_k(&c.cat(), *v, e, 10);
            let ids = |x: &[(u32, f32)]| x.iter().map(|p| p.0).collect::<Vec<_>>();
            assert_eq!(ids(got), ids(&want));
            assert!(got.iter().zip(&want).all(|(a, b)| (a.1 - b.1).abs() < 1e-4));
        }
    }

    #[test]
    fn the_fresh_term_lifts_fresh_items_for_users_of_fresh_items_in_blocks_too() {
        let mut c = random(200, 6, 11);
        // Slots 150.. are fresh, with 1..=50 users each.
        let pop = Array1::from_shape_fn(200, |s| {
            crate::train::fresh::fresh_popularity(s >= 150, (s as f32 - 149.0).max(0.0))
        });
        let plain = |c: &Owned, u: usize| -> Vec<f32> {
            c.e.dot(&c.e.row(u))
                .iter()
                .zip(&c.b)
                .map(|(x, b)| x + b)
                .collect()
        };
        let before = plain(&c, 0);
        c.fresh = Some((pop.clone(), 2.0));
        // Items 10 (stale) and 160 (fresh): share 1/2.
        let items = [10u32, 160];
        for (s, score) in top_k(&c.cat(), c.e.row(0), &items, 200) {
            let want = before[s as usize] + 2.0 * 0.5 * pop[s as usize];
            assert!((score - want).abs() < 1e-4, "slot {s}: {score} vs {want}");
        }
        // A user of stale items only ranks as without the term.
        let stale = [10u32, 20];
        let with = top_k(&c.cat(), c.e.row(0), &stale, 20);
        let fresh = c.fresh.take();
        assert_eq!(with, top_k(&c.cat(), c.e.row(0), &stale, 20));
        c.fresh = fresh;
        let hist: Vec<Vec<u32>> = (0..70u32).map(|i| vec![i, 150 + i % 50]).collect();
        blocks_rank_as_one_user_at_a_time(&c, &hist);
    }

    /// [`rank_users`] over users `0..hist.len()` (vector: their own row of
    /// embeddings, items: `hist`) lists what [`top_k`] lists for each.
    fn blocks_rank_as_one_user_at_a_time(c: &Owned, hist: &[Vec<u32>]) {
        let vs: Vec<Array1<f32>> = (0..hist.len()).map(|i| c.e.row(i).to_owned()).collect();
        let users: Vec<(ArrayView1<'_, f32>, &[u32])> = vs
            .iter()
            .zip(hist)
            .map(|(v, e)| (v.view(), e.as_slice()))
            .collect();
        for ((v, e), got) in users.iter().zip(rank_users(&c.cat(), &users, 10)) {
            let want = top_k(&c.cat(), *v, e, 10);
            assert_eq!(
                got.iter().map(|p| p.0).collect::<Vec<_>>(),
                want.iter().map(|p| p.0).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn the_graph_term_lifts_neighbours_of_the_users_items_in_blocks_too() {
        let mut c = random(300, 6, 8);
        let mut g = crate::graph::Pkg::new(["co_interacted", "other"]).unwrap();
        for i in 0..300 {
            g.add_item(&format!("item-{i}"));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..900 {
            let (a, b) = (rng.random_range(0..300u32), rng.random_range(0..300u32));
            if a != b {
                g.add_edge(rng.random_range(0..2), a, b).unwrap();
            }
        }
        let plain: Vec<f32> =
            c.e.dot(&c.e.row(0))
                .iter()
                .zip(&c.b)
                .map(|(x, b)| x + b)
                .collect();
        c.graph = Some((g, vec![3.0, 0.5]));
        // One user, items 10 and 20: scores are the plain ones plus the
        // weighted share of the two items each slot neighbours.
        let items = [10u32, 20];
        let top = top_k(&c.cat(), c.e.row(0), &items, 300);
        let (g, w) = c.graph.as_ref().unwrap();
        for &(s, score) in &top {
            let mut want = plain[s as usize];
            for (r, wr) in w.iter().enumerate() {
                for j in items {
                    if g.has_edge(r, j, s).unwrap() {
                        want += wr / 2.0;
                    }
                }
            }
            assert!((score - want).abs() < 1e-4, "slot {s}: {score} vs {want}");
        }
        assert_eq!(top.len(), 298, "the user's items are excluded");
        let hist: Vec<Vec<u32>> = (0..100u32).map(|i| vec![i, (i * 13) % 300, 299]).collect();
        blocks_rank_as_one_user_at_a_time(&c, &hist);
    }
}
