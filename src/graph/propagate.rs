//! Per-relation SGC propagation of MPKG eq. 1, `E_r = S_r^M (X W_r)` with
//! `S_r = D^-1/2 (A_r + I) D^-1/2`, kept up to date incrementally.
//!
//! Paper: MPKG (`../shared/papers/mpkg-pretraining-product-knowledge-graph.txt`),
//! §4.2, eq. 1; the projection `X W_r` is computed elsewhere.
//!
//! The [`Propagator`] stores every layer `H_0 = X W_r`, `H_k = S_r H_{k-1}`
//! (k = 1..M) of every relation. Why an edit only changes rows near it:
//! `S_r[x, y] = 1 / sqrt(d_x d_y)` depends on the degrees of `x` and `y`, so an
//! edge edit changes the normalisation of every edge at either endpoint, and an
//! input change changes one row of `H_0`. Call the slots whose degree or input
//! changed `T` (the touched set, which a [`Batch`] carries). Row `x` of `H_1`
//! can change only if `x` is in `T` or adjacent to it, and row `x` of `H_k`
//! only if `x` is within `k` hops of `T`. Old and new graphs give the same
//! balls: every edge present in only one of them has both endpoints in `T`, so
//! a path through it can be cut to a path from `T` in the other graph. The
//! propagator therefore grows the ball in the new graph one hop per layer and
//! recomputes exactly those rows, with the same row kernel and neighbour order
//! as a full computation: results are bitwise equal to recomputing from
//! scratch.

use std::collections::BTreeSet;

use ndarray::{s, Array2, ArrayView1, ArrayView2};
use serde::{Deserialize, Serialize};

use super::pkg::{inv_sqrt_degree, Pkg};
use super::{Batch, Error, Result};

/// Largest accepted [`PropagatorConfig::hops`]: every hop keeps an `N × d`
/// layer per relation, and SGC over-smooths long before this many hops.
pub const MAX_HOPS: usize = 16;

/// Settings of a [`Propagator`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PropagatorConfig {
    /// Number of hops `M` of eq. 1. Default 3, the paper's and DESIGN.md's.
    pub hops: usize,
    /// Threads that compute rows; 0 means `std::thread::available_parallelism`.
    /// Default 0: propagation runs on a dedicated blocking pool, never on async
    /// workers, so it may use the machine.
    pub threads: usize,
    /// A thread is given at least this many rows. Default 2048: spawning a
    /// scoped thread costs tens of microseconds, about what 2048 rows of an
    /// average-degree graph cost at d = 64.
    pub min_rows_per_thread: usize,
    /// When the rows to recompute at some hop exceed this fraction of all
    /// slots, that hop and the later ones are recomputed in full. Default 0.5:
    /// the full path streams through rows in order without a gather list or a
    /// scratch copy, so past about half the rows it is as fast, and it stops
    /// the ball search that would otherwise cover most of the graph. The
    /// result is the same either way.
    pub full_recompute_fraction: f64,
    /// Largest change of a row's outgoing message (per coordinate, relative
    /// to the RMS of the relation's input values `H_0`, so the setting means
    /// the same for any model's scale) that may be held back. Default 0: exact, every change is propagated
    /// by recomputing rows, and the result equals [`Propagator::full`]
    /// bitwise. Above 0, updates are pushed instead of recomputed: each row
    /// `x` of `H_k` (k < M) keeps the message `m̂_k[x]` its neighbours' rows
    /// of `H_{k+1}` were last given (`H_{k+1}[y] = s_y Σ_{x ∈ N(y) ∪ {y}}
    /// m̂_k[x]`, `s = 1/sqrt(deg + 1)`), and when its true message
    /// `s_x H_k[x]` moves more than the tolerance from it, the difference is
    /// added to those rows (cost `deg(x) × d`) . An edge edit changes its two
    /// endpoints' rows in `O(d)` per layer from the edit log, so a new edge
    /// next to a hub does not recompute the hub's row, and a hub's message,
    /// an average over many neighbours, rarely moves past the tolerance.
    /// Every row of `H_k` stays within `max_y s_y (deg_y + 1) · tol` plus `ρ`
    /// times layer `k - 1`'s error of the exact one (`ρ`: the largest row sum
    /// of `S`); [`Propagator::reconcile`] returns to exact.
    pub tolerance: f32,
}

impl Default for PropagatorConfig {
    fn default() -> Self {
        Self {
            hops: 3,
            threads: 0,
            min_rows_per_thread: 2048,
            full_recompute_fraction: 0.5,
            tolerance: 0.0,
        }
    }
}

impl PropagatorConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.hops > MAX_HOPS {
            return Err(Error::Config(format!(
                "hops = {} is more than {MAX_HOPS}",
                self.hops
            )));
        }
        if self.min_rows_per_thread == 0 {
            return Err(Error::Config(
                "min_rows_per_thread must be at least 1".into(),
            ));
        }
        if self.full_recompute_fraction.is_nan() || self.full_recompute_fraction < 0.0 {
            return Err(Error::Config(
                "full_recompute_fraction must be a number >= 0".into(),
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(Error::Config(format!(
                "tolerance = {} must be a finite number >= 0",
                self.tolerance
            )));
        }
        Ok(())
    }

    fn effective_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

/// What one [`Propagator::apply`] recomputed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyStats {
    /// `rows[r][k]`: rows of layer `k` of relation `r` written; at `k = 0`
    /// the input rows set or zeroed, at `k >= 1` the rows recomputed.
    pub rows: Vec<Vec<usize>>,
    /// Layers (over all relations) recomputed in full because their dirty
    /// set passed [`PropagatorConfig::full_recompute_fraction`].
    pub full_layers: usize,
    /// Input rows in the batch ignored because their item was removed in the
    /// same window.
    pub ignored_inputs: usize,
    /// Slots whose output row (`E_r = H_M`) changed in at least one relation,
    /// ascending: the items whose fused embedding must be recomputed.
    pub changed: Vec<u32>,
    /// With a tolerance: messages that moved but stayed within it, so were
    /// not pushed (summed over relations and layers).
    pub held_back: usize,
}

impl ApplyStats {
    /// Rows written at layer `k`, summed over relations.
    pub fn rows_at_hop(&self, k: usize) -> usize {
        self.rows.iter().filter_map(|r| r.get(k)).sum()
    }

    /// Rows recomputed at layers `1..=M`, summed over relations.
    pub fn rows_recomputed(&self) -> usize {
        self.rows
            .iter()
            .map(|r| r.iter().skip(1).sum::<usize>())
            .sum()
    }
}

/// The propagated layers of every relation of one [`Pkg`], updated in place.
///
/// Storage: per relation and layer one contiguous `capacity × d` `f32`
/// [`Array2`]; capacity doubles when the graph outgrows it. A free slot's rows
/// are zero in every layer.
#[derive(Debug, Clone)]
pub struct Propagator {
    cfg: PropagatorConfig,
    threads: usize,
    dim: usize,
    graph: u64,
    /// The graph's edits reflected here: all those numbered below this.
    synced: u64,
    slots: usize,
    capacity: usize,
    /// `layers[r][k]` is `H_k` of relation `r`, `capacity × dim`.
    layers: Vec<Vec<Array2<f32>>>,
    /// `inv_sqrt[r][x] = inv_sqrt_degree(deg_r(x))`, `capacity` entries.
    inv_sqrt: Vec<Vec<f32>>,
    /// Whether slot `x` holds a live item whose input rows are in `H_0`.
    has_input: Vec<bool>,
    /// With a tolerance only (else empty), `capacity × dim` each:
    /// `sent[r][k]` (k < M) are the messages `m̂_k` that rows of `H_{k+1}`
    /// reflect (see [`PropagatorConfig::tolerance`]); `sent[r][M]` is `H_M`
    /// as last reported changed.
    sent: Vec<Vec<Array2<f32>>>,
    /// With a tolerance only (else empty): `bound[r][k][x]` bounds how far
    /// row `x`'s message (k < M) or output row (k = M) may have moved since
    /// it was last checked against `sent` (the sum of what was pushed into
    /// it, scaled); a row is checked only once this passes the tolerance,
    /// so a hub's push does not cost a check of every neighbour.
    bound: Vec<Vec<Vec<f32>>>,
    /// Per relation, the sum of squares of `H_0` (with a tolerance: its RMS
    /// scales the tolerance).
    input_sq: Vec<f64>,
    /// Live items of the graph when last synced.
    live: usize,
    /// The layers may differ from a full computation: changes held back by
    /// the tolerance, or the rounding of pushed updates.
    drift: bool,
    /// Scratch for the ball search: slot visited iff `mark[x] == stamp`.
    mark: Vec<u32>,
    stamp: u32,
}

/// The contiguous data of a layer. Layers are created by `Array2::zeros` and
/// only ever replaced by arrays of the same kind, hence standard layout.
fn flat(a: &Array2<f32>) -> &[f32] {
    a.as_slice()
        .expect("propagation layers are allocated in standard layout")
}

fn flat_mut(a: &mut Array2<f32>) -> &mut [f32] {
    a.as_slice_mut()
        .expect("propagation layers are allocated in standard layout")
}

/// One row of `S_r h`: `out = s_x (s_x h[x] + Σ_{y ∈ N(x)} s_y h[y])` with
/// `s = 1 / sqrt(deg + 1)`. The only kernel, used by the full and the
/// incremental path alike, neighbours in sorted order: the two agree bitwise.
#[inline]
fn propagate_row(x: usize, adj: &[Vec<u32>], inv: &[f32], prev: &[f32], d: usize, out: &mut [f32]) {
    let sx = inv[x];
    for (o, &p) in out.iter_mut().zip(&prev[x * d..(x + 1) * d]) {
        *o = sx * p;
    }
    for &y in &adj[x] {
        let y = y as usize;
        let sy = inv[y];
        for (o, &p) in out.iter_mut().zip(&prev[y * d..(y + 1) * d]) {
            *o += sy * p;
        }
    }
    for o in out.iter_mut() {
        *o *= sx;
    }
}

/// How to compute rows of one relation's `S_r h`: the graph, its
/// normalisation, and the thread budget.
struct Plan<'a> {
    adj: &'a [Vec<u32>],
    inv: &'a [f32],
    d: usize,
    threads: usize,
    min_rows: usize,
}

impl Plan<'_> {
    /// Threads to use for `rows` rows.
    fn workers(&self, rows: usize) -> usize {
        (rows / self.min_rows).clamp(1, self.threads.max(1))
    }

    /// `out[..n d] = S prev` for all `n` rows.
    fn all(&self, n: usize, prev: &[f32], out: &mut [f32]) {
        let d = self.d;
        let out = &mut out[..n * d];
        let workers = self.workers(n);
        let run = |first: usize, chunk: &mut [f32]| {
            for (i, row) in chunk.chunks_exact_mut(d).enumerate() {
                propagate_row(first + i, self.adj, self.inv, prev, d, row);
            }
        };
        if workers == 1 {
            run(0, out);
            return;
        }
        let per = n.div_ceil(workers);
        std::thread::scope(|scope| {
            for (c, chunk) in out.chunks_mut(per * d).enumerate() {
                scope.spawn(move || run(c * per, chunk));
            }
        });
    }

    /// `out[x] = (S prev)[x]` for the listed rows `x`; returns, per listed
    /// row, the largest absolute change of a coordinate.
    fn rows(&self, rows: &[u32], prev: &[f32], out: &mut [f32]) -> Vec<f32> {
        let d = self.d;
        let workers = self.workers(rows.len());
        let mut changes = Vec::with_capacity(rows.len());
        if workers == 1 {
            let mut row = vec![0.0f32; d];
            for &x in rows {
                let x = x as usize;
                propagate_row(x, self.adj, self.inv, prev, d, &mut row);
                let dst = &mut out[x * d..(x + 1) * d];
                changes.push(max_change(dst, &row));
                dst.copy_from_slice(&row);
            }
            return changes;
        }
        // Rows are scattered, so threads fill a dense scratch copied after.
        let mut scratch = vec![0.0f32; rows.len() * d];
        let per = rows.len().div_ceil(workers);
        std::thread::scope(|scope| {
            for (list, chunk) in rows.chunks(per).zip(scratch.chunks_mut(per * d)) {
                scope.spawn(move || {
                    for (&x, row) in list.iter().zip(chunk.chunks_exact_mut(d)) {
                        propagate_row(x as usize, self.adj, self.inv, prev, d, row);
                    }
                });
            }
        });
        for (&x, row) in rows.iter().zip(scratch.chunks_exact(d)) {
            let x = x as usize;
            let dst = &mut out[x * d..(x + 1) * d];
            changes.push(max_change(dst, row));
            dst.copy_from_slice(row);
        }
        changes
    }
}

/// Sum of squares, in f64.
fn sum_sq(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Largest absolute difference of two rows (infinite where one is NaN and
/// the other is not, so a NaN appearing or vanishing counts as a change).
#[inline]
fn max_change(old: &[f32], new: &[f32]) -> f32 {
    old.iter().zip(new).fold(0.0f32, |m, (&a, &b)| {
        if a.to_bits() == b.to_bits() {
            m
        } else {
            let c = (a - b).abs();
            if c.is_nan() {
                f32::INFINITY
            } else {
                m.max(c).max(f32::MIN_POSITIVE)
            }
        }
    })
}

impl Propagator {
    /// Computes every layer of every relation from scratch.
    ///
    /// `inputs[r]` is `H_0` of relation `r` (`X W_r`): `pkg.slots() × d`, one
    /// row per slot; rows of free slots are ignored (stored as zero). The
    /// graph's edits so far are all reflected, so the window open now is the
    /// first one [`Propagator::apply`] expects (close it with
    /// [`Pkg::take_changes`] and either apply or drop that batch).
    pub fn full(cfg: PropagatorConfig, pkg: &Pkg, inputs: &[ArrayView2<'_, f32>]) -> Result<Self> {
        cfg.validate()?;
        let n_rel = pkg.num_relations();
        if inputs.len() != n_rel {
            return Err(Error::Shape {
                what: "input matrices (one per relation)",
                expected: n_rel,
                got: inputs.len(),
            });
        }
        let slots = pkg.slots();
        let dim = inputs.first().map_or(0, |x| x.ncols());
        if dim == 0 {
            return Err(Error::Shape {
                what: "input dimension d (at least 1)",
                expected: 1,
                got: 0,
            });
        }
        for x in inputs {
            if x.nrows() != slots {
                return Err(Error::Shape {
                    what: "input rows (the graph's slots)",
                    expected: slots,
                    got: x.nrows(),
                });
            }
            if x.ncols() != dim {
                return Err(Error::Shape {
                    what: "input columns",
                    expected: dim,
                    got: x.ncols(),
                });
            }
        }
        let has_input: Vec<bool> = (0..slots).map(|x| pkg.contains_item(x as u32)).collect();
        let mut layers = Vec::with_capacity(n_rel);
        for input in inputs {
            let mut h0 = input.to_owned();
            for (x, mut row) in h0.outer_iter_mut().enumerate() {
                if !has_input[x] {
                    row.fill(0.0);
                }
            }
            let mut rel = vec![h0];
            rel.extend((0..cfg.hops).map(|_| Array2::zeros((slots, dim))));
            layers.push(rel);
        }
        let mut prop = Self {
            threads: cfg.effective_threads(),
            cfg,
            dim,
            graph: pkg.id(),
            synced: pkg.edits(),
            slots,
            capacity: slots,
            layers,
            inv_sqrt: pkg
                .adj
                .iter()
                .map(|adj| adj.iter().map(|ns| inv_sqrt_degree(ns.len())).collect())
                .collect(),
            has_input,
            sent: Vec::new(),
            bound: Vec::new(),
            input_sq: vec![0.0; n_rel],
            live: pkg.num_items(),
            drift: false,
            mark: vec![0; slots],
            stamp: 0,
        };
        if prop.cfg.tolerance > 0.0 {
            prop.sent = (0..n_rel)
                .map(|_| {
                    (0..=prop.cfg.hops)
                        .map(|_| Array2::zeros((slots, dim)))
                        .collect()
                })
                .collect();
            prop.bound = vec![vec![vec![0.0; slots]; prop.cfg.hops + 1]; n_rel];
        }
        for r in 0..n_rel {
            prop.input_sq[r] = sum_sq(flat(&prop.layers[r][0]));
            prop.recompute_from(pkg, r, 1, false);
        }
        Ok(prop)
    }

    /// Recomputes layers `from..=M` of relation `r` in full; returns the
    /// slots whose output row changed, ascending, when `track` (else
    /// nothing). With a tolerance, every message `m̂_k` (k < M) is set to
    /// the true one, which the recomputed layers reflect.
    fn recompute_from(&mut self, pkg: &Pkg, r: usize, from: usize, track: bool) -> Vec<u32> {
        let plan = Plan {
            adj: &pkg.adj[r],
            inv: &self.inv_sqrt[r],
            d: self.dim,
            threads: self.threads,
            min_rows: self.cfg.min_rows_per_thread,
        };
        let hops = self.cfg.hops;
        // With a tolerance, what was last reported is what a caller holds.
        let old = track.then(|| match self.sent.get(r) {
            Some(sent) => sent[hops].slice(s![..self.slots, ..]).to_owned(),
            None => self.layers[r][hops].slice(s![..self.slots, ..]).to_owned(),
        });
        let layers = &mut self.layers[r];
        for k in from..layers.len() {
            let (done, rest) = layers.split_at_mut(k);
            plan.all(self.slots, flat(&done[k - 1]), flat_mut(&mut rest[0]));
        }
        if let Some(bound) = self.bound.get_mut(r) {
            bound.iter_mut().for_each(|b| b.fill(0.0));
        }
        if let Some(sent) = self.sent.get_mut(r) {
            let inv = &self.inv_sqrt[r];
            for (k, (h, m)) in self.layers[r].iter().zip(sent.iter_mut()).enumerate() {
                if k == hops {
                    m.assign(h);
                    continue;
                }
                for (x, &s) in inv.iter().enumerate().take(self.slots) {
                    for (o, &v) in m.row_mut(x).iter_mut().zip(h.row(x)) {
                        *o = s * v;
                    }
                }
            }
        }
        let Some(old) = old else {
            return Vec::new();
        };
        let d = self.dim;
        let new = flat(&self.layers[r][hops]);
        let old = old.as_slice().expect("an owned copy is in standard layout");
        (0..self.slots)
            .filter(|&x| max_change(&old[x * d..(x + 1) * d], &new[x * d..(x + 1) * d]) > 0.0)
            .map(|x| x as u32)
            .collect()
    }

    /// Recomputes every layer of every relation in full from the stored
    /// inputs, dropping every held-back change: afterwards the layers equal
    /// [`Propagator::full`] on `pkg` bitwise. Returns the slots whose output
    /// row differs from the one last reported (by an apply's `changed` or a
    /// reconcile), ascending. `pkg` must have no edits since the last apply.
    /// Cheap to call when [`Propagator::is_exact`] (nothing is done).
    pub fn reconcile(&mut self, pkg: &Pkg) -> Result<Vec<u32>> {
        if pkg.id() != self.graph {
            return Err(Error::ForeignGraph);
        }
        if pkg.edits() != self.synced {
            return Err(Error::OutOfOrder {
                synced: self.synced,
                graph: pkg.edits(),
                start: self.synced,
                end: pkg.edits(),
            });
        }
        if !self.drift {
            return Ok(Vec::new());
        }
        let mut changed = BTreeSet::new();
        for r in 0..self.layers.len() {
            changed.extend(self.recompute_from(pkg, r, 1, true));
        }
        self.drift = false;
        Ok(changed.into_iter().collect())
    }

    /// Whether every layer is exact (no change held back by the tolerance).
    pub fn is_exact(&self) -> bool {
        !self.drift
    }

    /// Brings the layers up to date with `pkg` after the edits in `batch`,
    /// recomputing at layer `k` only the rows within `k` hops of a touched
    /// slot. Exact: the result equals [`Propagator::full`] on `pkg` bitwise.
    ///
    /// Batches from [`Pkg::take_changes`] must come in the order they were
    /// taken, none skipped, from the graph this propagator was computed from,
    /// and `pkg` must be that graph with no edits made since the batch was
    /// taken (an input-only [`Batch::new`] needs a graph with no edits since
    /// the last apply or `full`). Applying the same batch twice is harmless.
    /// Every item added in the window and still present needs an input row
    /// for every relation. On error nothing has changed.
    pub fn apply(&mut self, pkg: &Pkg, batch: &Batch) -> Result<ApplyStats> {
        self.validate(pkg, batch)?;
        let slots = pkg.slots();
        self.grow(slots);
        self.slots = slots;
        self.live = pkg.num_items();
        let n_rel = self.layers.len();
        let mut stats = ApplyStats {
            rows: vec![vec![0; self.cfg.hops + 1]; n_rel],
            full_layers: 0,
            ignored_inputs: 0,
            changed: Vec::new(),
            held_back: 0,
        };
        let mut changed = BTreeSet::new();
        for r in 0..n_rel {
            let (rows, full_from, ignored) =
                self.apply_relation(pkg, batch, r, &mut changed, &mut stats.held_back);
            stats.rows[r] = rows;
            stats.ignored_inputs += ignored;
            if let Some(k) = full_from {
                stats.full_layers += self.cfg.hops + 1 - k;
            }
        }
        for &x in &batch.items {
            self.has_input[x as usize] = pkg.contains_item(x);
        }
        if let Some(origin) = &batch.origin {
            self.synced = self.synced.max(origin.edits.end);
        }
        stats.changed = changed.into_iter().collect();
        Ok(stats)
    }

    fn validate(&self, pkg: &Pkg, batch: &Batch) -> Result<()> {
        if pkg.id() != self.graph {
            return Err(Error::ForeignGraph);
        }
        // Edits below `synced` are reflected already, so a batch may start
        // before `synced` (one taken across a `full`), but not after it (edits
        // would be lost), and it must bring the propagator to the graph's
        // current state: the touched sets are only complete for that state, and
        // a slot freed by a batch may be reused only once the batch is applied.
        // An input-only batch carries no edits.
        let edits = match &batch.origin {
            Some(origin) if origin.graph != self.graph => return Err(Error::ForeignGraph),
            Some(origin) => origin.edits.clone(),
            None => self.synced..self.synced,
        };
        if edits.start > self.synced || edits.end != pkg.edits() {
            return Err(Error::OutOfOrder {
                synced: self.synced,
                graph: pkg.edits(),
                start: edits.start,
                end: edits.end,
            });
        }
        let n_rel = self.layers.len();
        if pkg.num_relations() != n_rel {
            return Err(Error::Shape {
                what: "relations",
                expected: n_rel,
                got: pkg.num_relations(),
            });
        }
        let slots = pkg.slots();
        if slots < self.slots {
            return Err(Error::Shape {
                what: "graph slots (never shrink)",
                expected: self.slots,
                got: slots,
            });
        }
        let in_range = |x: u32| {
            if (x as usize) < slots {
                Ok(())
            } else {
                Err(Error::UnknownItem(x))
            }
        };
        if batch.touched.len() > n_rel {
            return Err(Error::UnknownRelation(batch.touched.len() - 1));
        }
        for &x in batch.touched.iter().flatten().chain(&batch.items) {
            in_range(x)?;
        }
        for (&(r, x), row) in &batch.inputs {
            if r >= n_rel {
                return Err(Error::UnknownRelation(r));
            }
            in_range(x)?;
            if row.len() != self.dim {
                return Err(Error::Shape {
                    what: "input row length",
                    expected: self.dim,
                    got: row.len(),
                });
            }
        }
        for &x in &batch.items {
            let had = self.has_input.get(x as usize).copied().unwrap_or(false);
            if pkg.contains_item(x) && !had {
                if let Some(r) = (0..n_rel).find(|&r| !batch.inputs.contains_key(&(r, x))) {
                    return Err(Error::MissingInput {
                        item: x,
                        relation: r,
                    });
                }
            }
        }
        Ok(())
    }

    /// Grows storage to hold `slots` rows, doubling capacity.
    fn grow(&mut self, slots: usize) {
        if slots <= self.capacity {
            return;
        }
        let capacity = slots.max(self.capacity * 2).max(64);
        for rel in &mut self.layers {
            for layer in rel.iter_mut() {
                let mut bigger = Array2::zeros((capacity, self.dim));
                bigger
                    .slice_mut(s![..self.slots, ..])
                    .assign(&layer.slice(s![..self.slots, ..]));
                *layer = bigger;
            }
        }
        for inv in &mut self.inv_sqrt {
            inv.resize(capacity, inv_sqrt_degree(0));
        }
        for b in self.bound.iter_mut().flatten() {
            b.resize(capacity, 0.0);
        }
        for layer in self.sent.iter_mut().flatten() {
            let mut bigger = Array2::zeros((capacity, self.dim));
            bigger
                .slice_mut(s![..self.slots, ..])
                .assign(&layer.slice(s![..self.slots, ..]));
            *layer = bigger;
        }
        self.has_input.resize(capacity, false);
        self.mark.resize(capacity, 0);
        self.capacity = capacity;
    }

    /// The tolerant update of relation `r` (see
    /// [`PropagatorConfig::tolerance`]); returns what
    /// [`Propagator::apply_relation`] does.
    ///
    /// Invariant, before and after: `H_k[y] = s_y Σ_{x ∈ N(y) ∪ {y}}
    /// m̂_{k-1}[x]` for `k >= 1` (to rounding), and `|s_x H_k[x] - m̂_k[x]| <=
    /// tol` per coordinate for every live `x` and `k < M`. An edge edit
    /// `u — v` changes the sums of `u` and `v` by `± m̂[v]`, `± m̂[u]`; a
    /// degree change rescales the row by `s'_x / s_x`; both are applied to
    /// the touched rows from the edit log. Then, layer by layer, every row
    /// whose message may have moved (touched, given a new input, or given a
    /// push) is checked, and one that moved past the tolerance pushes the
    /// difference to its neighbours' rows of the next layer.
    fn push_relation(
        &mut self,
        pkg: &Pkg,
        batch: &Batch,
        r: usize,
        changed: &mut BTreeSet<u32>,
        held_back: &mut usize,
    ) -> (Vec<usize>, Option<usize>, usize) {
        let hops = self.cfg.hops;
        let d = self.dim;
        let adj = &pkg.adj[r];
        let mut rows = vec![0; hops + 1];
        let touched = batch.degree_changed(r);
        let (inputs, ignored) = self.write_inputs(pkg, batch, r);
        let tol = self.tolerance_of(r);
        rows[0] = inputs.len();
        self.drift |= !touched.is_empty() || !inputs.is_empty();
        let old_s: Vec<f32> = touched
            .iter()
            .map(|&x| self.inv_sqrt[r][x as usize])
            .collect();
        for &x in &touched {
            self.inv_sqrt[r][x as usize] = inv_sqrt_degree(adj[x as usize].len());
        }
        let Some(log) = batch.log(r) else {
            // Too many edits to log in this window: recompute the relation.
            changed.extend(self.recompute_from(pkg, r, 1, true));
            for n in &mut rows[1..] {
                *n = self.slots;
            }
            return (rows, Some(1), ignored);
        };

        // Structural change of the touched rows' sums, per layer: from the
        // edits not yet reflected (a batch may overlap a `full`).
        let pos = |x: u32| touched.binary_search(&x).ok();
        let mut sums = vec![vec![0f32; touched.len() * d]; hops];
        for e in log.iter().filter(|e| e.seq >= self.synced) {
            let (Some(iu), Some(iv)) = (pos(e.u), pos(e.v)) else {
                continue; // an edit's endpoints are always touched
            };
            let sign = if e.add { 1.0f32 } else { -1.0 };
            for (k, sum) in sums.iter_mut().enumerate() {
                let m = flat(&self.sent[r][k]);
                for (i, other) in [(iu, e.v), (iv, e.u)] {
                    let src = &m[other as usize * d..(other as usize + 1) * d];
                    for (o, &v) in sum[i * d..(i + 1) * d].iter_mut().zip(src) {
                        *o += sign * v;
                    }
                }
            }
        }
        let layers = &mut self.layers[r];
        let sent = &mut self.sent[r];
        let bound = &mut self.bound[r];
        let inv = &self.inv_sqrt[r];
        for &x in &inputs {
            bound[0][x as usize] = f32::INFINITY;
        }
        for (i, &x) in touched.iter().enumerate() {
            let xi = x as usize;
            let live = pkg.contains_item(x);
            let (s0, s1) = (old_s[i], inv[xi]);
            for b in bound.iter_mut() {
                b[xi] = if live { f32::INFINITY } else { 0.0 };
            }
            for k in 1..=hops {
                let row = &mut flat_mut(&mut layers[k])[xi * d..(xi + 1) * d];
                if live {
                    let ratio = s1 / s0;
                    for (o, &g) in row.iter_mut().zip(&sums[k - 1][i * d..(i + 1) * d]) {
                        *o = *o * ratio + s1 * g;
                    }
                } else {
                    row.fill(0.0);
                }
            }
            if !live {
                for m in sent.iter_mut() {
                    m.row_mut(xi).fill(0.0);
                }
            }
        }

        // Messages, layer by layer.
        let mark = &mut self.mark;
        let mut stamp = self.stamp;
        let mut cand: Vec<u32> = touched.iter().chain(&inputs).copied().collect();
        cand.sort_unstable();
        cand.dedup();
        let mut delta = vec![0f32; d];
        for k in 0..hops {
            stamp = stamp.wrapping_add(1);
            if stamp == 0 {
                mark.fill(0);
                stamp = 1;
            }
            let mut next: Vec<u32> = Vec::new();
            for &x in &touched {
                if pkg.contains_item(x) && mark[x as usize] != stamp {
                    mark[x as usize] = stamp;
                    next.push(x);
                }
            }
            let (lo, hi) = layers.split_at_mut(k + 1);
            let (h, out) = (flat(&lo[k]), flat_mut(&mut hi[0]));
            let m = flat_mut(&mut sent[k]);
            let (bk, bnext) = {
                let (lo, hi) = bound.split_at_mut(k + 1);
                (&mut lo[k], &mut hi[0])
            };
            let gain_sq = k + 1 < hops;
            for &z in &cand {
                let zi = z as usize;
                if !pkg.contains_item(z) || bk[zi] <= tol {
                    continue;
                }
                let sz = inv[zi];
                let mut worst = 0f32;
                for ((o, &hv), &mv) in delta
                    .iter_mut()
                    .zip(&h[zi * d..(zi + 1) * d])
                    .zip(&m[zi * d..(zi + 1) * d])
                {
                    *o = sz * hv - mv;
                    // NaN wins, so a NaN counts as a change and is pushed.
                    let a = o.abs();
                    if a.is_nan() || a > worst {
                        worst = a;
                    }
                }
                if worst <= tol {
                    *held_back += usize::from(worst > 0.0);
                    bk[zi] = worst;
                    continue;
                }
                bk[zi] = 0.0;
                let worst = if worst.is_nan() { f32::INFINITY } else { worst };
                for (o, &dv) in m[zi * d..(zi + 1) * d].iter_mut().zip(&delta) {
                    *o += dv;
                }
                for &y in adj[zi].iter().chain(std::iter::once(&z)) {
                    let yi = y as usize;
                    let sy = inv[yi];
                    for (o, &dv) in out[yi * d..(yi + 1) * d].iter_mut().zip(&delta) {
                        *o += sy * dv;
                    }
                    // The next check's bound: the row moves by s_y δ, its
                    // message by s_y² δ.
                    bnext[yi] += if gain_sq { sy * sy * worst } else { sy * worst };
                    if mark[yi] != stamp {
                        mark[yi] = stamp;
                        next.push(y);
                    }
                }
            }
            rows[k + 1] = next.len();
            // In slot order: the next layer walks its rows front to back.
            next.sort_unstable();
            cand = next;
        }
        self.stamp = stamp;
        // Output rows: reported changed once they moved past the tolerance
        // from what was last reported (so an embedding is not re-fused and
        // republished for every tiny push).
        let (h, shown) = (flat(&layers[hops]), flat_mut(&mut sent[hops]));
        let bm = &mut bound[hops];
        for y in cand {
            let yi = y as usize;
            if pkg.contains_item(y) && bm[yi] <= tol {
                continue;
            }
            let (now, last) = (&h[yi * d..(yi + 1) * d], &mut shown[yi * d..(yi + 1) * d]);
            let moved = now.iter().zip(last.iter()).fold(0f32, |m, (&a, &b)| {
                let c = (a - b).abs();
                if c.is_nan() || c > m {
                    c
                } else {
                    m
                }
            });
            if moved > tol || moved.is_nan() || !pkg.contains_item(y) {
                last.copy_from_slice(now);
                changed.insert(y);
                bm[yi] = 0.0;
            } else {
                *held_back += usize::from(moved > 0.0);
                bm[yi] = moved;
            }
        }
        (rows, None, ignored)
    }

    /// Writes the batch's input rows of relation `r` into `H_0` and zeroes
    /// the rows of removed items; returns the rows written and the number of
    /// input rows ignored (their item was removed in the window).
    fn write_inputs(&mut self, pkg: &Pkg, batch: &Batch, r: usize) -> (Vec<u32>, usize) {
        let mut written = Vec::new();
        let mut ignored = 0;
        let h0 = &mut self.layers[r][0];
        let sq = &mut self.input_sq[r];
        let row_sq =
            |h0: &Array2<f32>, x: u32| sum_sq(h0.row(x as usize).as_slice().unwrap_or(&[]));
        for &x in &batch.items {
            if !pkg.contains_item(x) {
                *sq -= row_sq(h0, x);
                h0.row_mut(x as usize).fill(0.0);
                written.push(x);
            }
        }
        for (&(_, x), new) in batch.inputs.range((r, 0)..=(r, u32::MAX)) {
            if pkg.contains_item(x) {
                *sq += sum_sq(new) - row_sq(h0, x);
                h0.row_mut(x as usize)
                    .assign(&ArrayView1::from(new.as_slice()));
                written.push(x);
            } else {
                ignored += 1;
            }
        }
        *sq = sq.max(0.0);
        (written, ignored)
    }

    /// The absolute tolerance of relation `r`: [`PropagatorConfig::tolerance`]
    /// times the RMS of the live items' input values.
    pub fn tolerance_of(&self, r: usize) -> f32 {
        let cells = (self.live * self.dim).max(1) as f64;
        let rms = (self.input_sq.get(r).copied().unwrap_or(0.0) / cells).sqrt();
        (f64::from(self.cfg.tolerance) * rms) as f32
    }

    /// Incremental update of relation `r`: returns rows written per layer,
    /// the first layer recomputed in full (if any), and ignored input rows;
    /// adds the slots whose output row changed to `changed`.
    ///
    /// Exact (no tolerance): layer `k >= 1` recomputes row `x` when `x`'s
    /// normalisation or a neighbour's changed (`x` in `T ∪ N(T)`, `T` the
    /// slots whose degree changed) or when `x` or a neighbour changed at layer
    /// `k - 1`. Every other row has the same inputs as before.
    fn apply_relation(
        &mut self,
        pkg: &Pkg,
        batch: &Batch,
        r: usize,
        changed: &mut BTreeSet<u32>,
        held_back: &mut usize,
    ) -> (Vec<usize>, Option<usize>, usize) {
        if self.cfg.tolerance > 0.0 {
            return self.push_relation(pkg, batch, r, changed, held_back);
        }
        let hops = self.cfg.hops;
        let d = self.dim;
        let adj = &pkg.adj[r];
        let mut rows = vec![0; hops + 1];
        let mut ignored = 0;

        // Degrees changed only at touched slots; an added or removed item is
        // touched too (its row appears or vanishes).
        let touched = batch.degree_changed(r);
        let inv = &mut self.inv_sqrt[r];
        for &x in &touched {
            inv[x as usize] = inv_sqrt_degree(adj[x as usize].len());
        }
        // `T ∪ N(T)`: rows whose normalisation, or a neighbour's, changed.
        let mut norm: Vec<u32> = touched.clone();
        for &x in &touched {
            norm.extend_from_slice(&adj[x as usize]);
        }
        norm.sort_unstable();
        norm.dedup();

        // H_0: zero removed items, write new input rows; note each change.
        let inputs = batch.inputs.range((r, 0)..=(r, u32::MAX));
        let mut written: Vec<(u32, f32)> = Vec::new();
        let h0 = &mut self.layers[r][0];
        let zero = vec![0.0f32; d];
        for &x in &batch.items {
            if !pkg.contains_item(x) {
                let row = h0
                    .row_mut(x as usize)
                    .into_slice()
                    .expect("standard layout");
                written.push((x, max_change(row, &zero)));
                row.fill(0.0);
                rows[0] += 1;
            }
        }
        for (&(_, x), new) in inputs {
            if pkg.contains_item(x) {
                let row = h0
                    .row_mut(x as usize)
                    .into_slice()
                    .expect("standard layout");
                written.push((x, max_change(row, new)));
                row.copy_from_slice(new);
                rows[0] += 1;
            } else {
                ignored += 1;
            }
        }

        let limit = self.cfg.full_recompute_fraction * self.slots as f64;
        let mut full_from = None;
        for k in 1..=hops {
            // Rows of layer k - 1 that changed.
            let pushed: Vec<u32> = written
                .iter()
                .filter(|(_, c)| *c > 0.0)
                .map(|(x, _)| *x)
                .collect();

            // Rows of layer k to recompute.
            self.stamp = self.stamp.wrapping_add(1);
            if self.stamp == 0 {
                self.mark.fill(0);
                self.stamp = 1;
            }
            let (mark, stamp) = (&mut self.mark, self.stamp);
            let mut dirty: Vec<u32> = Vec::with_capacity(norm.len() + pushed.len());
            let mut visit = |x: u32, dirty: &mut Vec<u32>| {
                let m = &mut mark[x as usize];
                if *m != stamp {
                    *m = stamp;
                    dirty.push(x);
                }
            };
            for &x in &norm {
                visit(x, &mut dirty);
            }
            for &x in &pushed {
                visit(x, &mut dirty);
                for &y in &adj[x as usize] {
                    visit(y, &mut dirty);
                }
            }
            if dirty.len() as f64 > limit {
                full_from = Some(k);
                break;
            }
            dirty.sort_unstable();
            let plan = Plan {
                adj,
                inv: &self.inv_sqrt[r],
                d,
                threads: self.threads,
                min_rows: self.cfg.min_rows_per_thread,
            };
            let (done, rest) = self.layers[r].split_at_mut(k);
            let changes = plan.rows(&dirty, flat(&done[k - 1]), flat_mut(&mut rest[0]));
            rows[k] = dirty.len();
            written = dirty.into_iter().zip(changes).collect();
        }
        match full_from {
            Some(k) => {
                changed.extend(self.recompute_from(pkg, r, k, true));
                for n in &mut rows[k..] {
                    *n = self.slots;
                }
            }
            None => changed.extend(written.iter().filter(|(_, c)| *c > 0.0).map(|(x, _)| *x)),
        }
        (rows, full_from, ignored)
    }

    /// The settings.
    pub fn config(&self) -> &PropagatorConfig {
        &self.cfg
    }

    /// Number of hops `M`.
    pub fn hops(&self) -> usize {
        self.cfg.hops
    }

    /// Row dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of relations.
    pub fn num_relations(&self) -> usize {
        self.layers.len()
    }

    /// Number of slots (rows of every layer view).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Rows allocated per layer (at least [`Propagator::slots`]).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Layer `k` of relation `r`: `H_0 = X W_r` at `k = 0`, `S_r^k H_0`
    /// after; `slots × d`.
    pub fn layer(&self, r: usize, k: usize) -> Result<ArrayView2<'_, f32>> {
        let rel = self.layers.get(r).ok_or(Error::UnknownRelation(r))?;
        let layer = rel.get(k).ok_or(Error::UnknownLayer {
            layer: k,
            hops: self.cfg.hops,
        })?;
        Ok(layer.slice(s![..self.slots, ..]))
    }

    /// `E_r = S_r^M X W_r` (eq. 1): the last layer of relation `r`.
    pub fn output(&self, r: usize) -> Result<ArrayView2<'_, f32>> {
        self.layer(r, self.cfg.hops)
    }

    /// Row of `item` in `E_r`; zero for a free slot.
    pub fn row(&self, r: usize, item: u32) -> Result<ArrayView1<'_, f32>> {
        let rel = self.layers.get(r).ok_or(Error::UnknownRelation(r))?;
        if item as usize >= self.slots {
            return Err(Error::UnknownItem(item));
        }
        Ok(rel[self.cfg.hops].row(item as usize))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use ndarray::Array2;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random_matrix(rng: &mut ChaCha8Rng, rows: usize, d: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, d), |_| rng.random_range(-1.0f32..1.0))
    }

    /// A graph of `n` items and about `edges` random edges per relation.
    fn random_pkg(rng: &mut ChaCha8Rng, n: usize, relations: usize, edges: usize) -> Pkg {
        let mut pkg = Pkg::new((0..relations).map(|r| format!("r{r}"))).unwrap();
        for i in 0..n {
            pkg.add_item(&format!("i{i}"));
        }
        for r in 0..relations {
            for _ in 0..edges {
                let (u, v) = (rng.random_range(0..n as u32), rng.random_range(0..n as u32));
                if u != v {
                    pkg.add_edge(r, u, v).unwrap();
                }
            }
        }
        pkg
    }

    fn views(inputs: &[Array2<f32>]) -> Vec<ArrayView2<'_, f32>> {
        inputs.iter().map(|x| x.view()).collect()
    }

    /// Largest absolute difference over all layers of two propagators.
    fn max_diff(a: &Propagator, b: &Propagator) -> f32 {
        assert_eq!(
            (a.slots(), a.num_relations(), a.hops()),
            (b.slots(), b.num_relations(), b.hops())
        );
        let mut worst = 0.0f32;
        for r in 0..a.num_relations() {
            for k in 0..=a.hops() {
                let (x, y) = (a.layer(r, k).unwrap(), b.layer(r, k).unwrap());
                for (p, q) in x.iter().zip(y.iter()) {
                    worst = worst.max((p - q).abs());
                }
            }
        }
        worst
    }

    /// Closes the graph's window and applies it.
    fn step(prop: &mut Propagator, pkg: &mut Pkg) -> ApplyStats {
        let batch = pkg.take_changes();
        prop.apply(pkg, &batch).unwrap()
    }

    fn snapshot(p: &Propagator) -> Vec<Array2<f32>> {
        (0..p.num_relations())
            .flat_map(|r| (0..=p.hops()).map(move |k| (r, k)))
            .map(|(r, k)| p.layer(r, k).unwrap().to_owned())
            .collect()
    }

    fn edge_lists(pkg: &Pkg) -> Vec<Vec<(u32, u32)>> {
        (0..pkg.num_relations())
            .map(|r| pkg.edges(r).unwrap().collect())
            .collect()
    }

    #[test]
    fn matches_a_dense_matrix_power() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (n, d, hops) = (40, 5, 3);
        let mut pkg = Pkg::new(["a", "b"]).unwrap();
        for i in 0..n {
            pkg.add_item(&format!("i{i}"));
        }
        let mut edges = vec![BTreeSet::new(), BTreeSet::new()];
        for (r, set) in edges.iter_mut().enumerate() {
            for _ in 0..60 * (r + 1) {
                let (u, v) = (rng.random_range(0..n as u32), rng.random_range(0..n as u32));
                if u != v {
                    pkg.add_edge(r, u, v).unwrap();
                    set.insert((u.min(v), u.max(v)));
                }
            }
        }
        // Two removed items leave free slots with zero rows.
        for x in [3u32, 17] {
            pkg.remove_item_at(x);
            for set in &mut edges {
                set.retain(|&(u, v)| u != x && v != x);
            }
        }
        let inputs: Vec<_> = (0..2).map(|_| random_matrix(&mut rng, n, d)).collect();
        let cfg = PropagatorConfig {
            hops,
            ..Default::default()
        };
        let prop = Propagator::full(cfg, &pkg, &views(&inputs)).unwrap();
        for (r, set) in edges.iter().enumerate() {
            // S built independently of the graph type: A + I over live items.
            let live = |x: usize| x != 3 && x != 17;
            let mut a = Array2::<f64>::zeros((n, n));
            for x in (0..n).filter(|&x| live(x)) {
                a[[x, x]] = 1.0;
            }
            for &(u, v) in set {
                a[[u as usize, v as usize]] = 1.0;
                a[[v as usize, u as usize]] = 1.0;
            }
            let deg = a.sum_axis(ndarray::Axis(1));
            let s = Array2::from_shape_fn((n, n), |(i, j)| {
                if a[[i, j]] == 0.0 {
                    0.0
                } else {
                    a[[i, j]] / (deg[i] * deg[j]).sqrt()
                }
            });
            let csr = pkg
                .normalized_adjacency(r)
                .unwrap()
                .to_dense()
                .mapv(f64::from);
            assert!(
                (&csr - &s).iter().all(|e| e.abs() < 1e-6),
                "normalized_adjacency({r})"
            );
            let mut h = inputs[r].mapv(f64::from);
            for x in (0..n).filter(|&x| !live(x)) {
                h.row_mut(x).fill(0.0);
            }
            for k in 0..=hops {
                let got = prop.layer(r, k).unwrap().mapv(f64::from);
                let err = (&got - &h).iter().fold(0.0f64, |m, e| m.max(e.abs()));
                assert!(err <= 1e-5, "relation {r} layer {k}: max abs error {err}");
                h = s.dot(&h);
            }
        }
        assert!(
            prop.row(0, 3).unwrap().iter().all(|&v| v == 0.0),
            "a free slot propagates zeros"
        );
    }

    /// A window of random edits, mirrored into `inputs`.
    fn random_window(
        rng: &mut ChaCha8Rng,
        pkg: &mut Pkg,
        inputs: &mut [Array2<f32>],
        next: &mut usize,
    ) -> Batch {
        let d = inputs[0].ncols();
        let n_rel = pkg.num_relations();
        let live = |pkg: &Pkg| pkg.items().map(|(x, _)| x).collect::<Vec<_>>();
        let mut new_rows: Vec<(u32, Array2<f32>)> = Vec::new();
        let mut changed: Vec<(usize, u32, Vec<f32>)> = Vec::new();
        for _ in 0..rng.random_range(1..25) {
            let items = live(pkg);
            let pick = |rng: &mut ChaCha8Rng| items[rng.random_range(0..items.len())];
            let r = rng.random_range(0..n_rel);
            match rng.random_range(0..10) {
                0..=3 => {
                    let (u, v) = (pick(rng), pick(rng));
                    let _ = pkg.add_edge(r, u, v);
                }
                4..=5 => {
                    let u = pick(rng);
                    let ns = pkg.neighbours(r, u).unwrap().to_vec();
                    if let Some(&v) = ns.get(rng.random_range(0..ns.len().max(1))) {
                        assert!(pkg.remove_edge(r, u, v).unwrap());
                    }
                }
                6 => {
                    let x = pkg.add_item(&format!("new{next}"));
                    *next += 1;
                    new_rows.push((x, random_matrix(rng, n_rel, d)));
                    for _ in 0..rng.random_range(0..4) {
                        let _ = pkg.add_edge(r, x, pick(rng));
                    }
                }
                7 => {
                    if items.len() > 5 {
                        assert!(pkg.remove_item_at(pick(rng)));
                    }
                }
                _ => {
                    let x = pick(rng);
                    changed.push((r, x, random_matrix(rng, 1, d).into_raw_vec_and_offset().0));
                }
            }
        }
        let slots = pkg.slots();
        for input in inputs.iter_mut() {
            if input.nrows() < slots {
                let mut bigger = Array2::zeros((slots, d));
                bigger.slice_mut(s![..input.nrows(), ..]).assign(input);
                *input = bigger;
            }
        }
        let mut batch = pkg.take_changes();
        for (x, rows) in new_rows {
            for (r, input) in inputs.iter_mut().enumerate() {
                input.row_mut(x as usize).assign(&rows.row(r));
            }
            batch.set_inputs(x, rows.view());
        }
        for (r, x, row) in changed {
            inputs[r]
                .row_mut(x as usize)
                .assign(&ArrayView1::from(row.as_slice()));
            batch.set_input(r, x, &row);
        }
        batch
    }

    fn check_random_edits(cfg: PropagatorConfig, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (n, d) = (150, 6);
        let mut pkg = random_pkg(&mut rng, n, 2, 200);
        let mut inputs: Vec<_> = (0..2).map(|_| random_matrix(&mut rng, n, d)).collect();
        let mut prop = Propagator::full(cfg.clone(), &pkg, &views(&inputs)).unwrap();
        pkg.take_changes();
        let mut next = 0;
        let mut recomputed = 0;
        for _ in 0..40 {
            let batch = random_window(&mut rng, &mut pkg, &mut inputs, &mut next);
            let stats = prop.apply(&pkg, &batch).unwrap();
            recomputed += stats.rows_recomputed();
            let full = Propagator::full(cfg.clone(), &pkg, &views(&inputs)).unwrap();
            let err = max_diff(&prop, &full);
            assert!(err <= 1e-5, "max abs difference {err}");
            // Same kernel, same order: not just close, equal.
            assert_eq!(err, 0.0);
        }
        assert_eq!(recomputed > 0, cfg.hops > 0);
    }

    #[test]
    fn random_edits_match_full_recomputation() {
        check_random_edits(PropagatorConfig::default(), 1);
    }

    #[test]
    fn random_edits_match_with_threads_and_without_fallback() {
        let cfg = PropagatorConfig {
            threads: 3,
            min_rows_per_thread: 7,
            full_recompute_fraction: f64::INFINITY,
            ..Default::default()
        };
        check_random_edits(cfg, 2);
    }

    #[test]
    fn random_edits_match_when_always_falling_back_and_with_other_hops() {
        for (hops, fraction) in [(1, 0.0), (0, 0.5), (5, 0.5)] {
            let cfg = PropagatorConfig {
                hops,
                full_recompute_fraction: fraction,
                ..Default::default()
            };
            check_random_edits(cfg, 3 + hops as u64);
        }
    }

    #[test]
    fn one_edit_on_a_sparse_10k_graph_stays_local() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 10_000;
        let mut pkg = random_pkg(&mut rng, n, 1, 15_000);
        let inputs = vec![random_matrix(&mut rng, n, 8)];
        let cfg = PropagatorConfig::default();
        let mut prop = Propagator::full(cfg.clone(), &pkg, &views(&inputs)).unwrap();
        pkg.take_changes();
        let (u, v) = (17, 4242);
        assert!(pkg.add_edge(0, u, v).unwrap());
        let stats = step(&mut prop, &mut pkg);
        let per_hop: Vec<usize> = (1..=3).map(|k| stats.rows_at_hop(k)).collect();
        // Average degree 3: the 3-hop ball of two nodes is a few hundred rows.
        assert!(stats.rows_recomputed() < n / 10, "rows per hop {per_hop:?}");
        assert!(per_hop.windows(2).all(|w| w[0] <= w[1]), "{per_hop:?}");
        assert_eq!(stats.full_layers, 0);
        let full = Propagator::full(cfg, &pkg, &views(&inputs)).unwrap();
        assert_eq!(max_diff(&prop, &full), 0.0);
    }

    /// Largest row sum of `S_r` over relations: `max_x s_x (s_x + Σ_y s_y)`.
    fn max_row_sum(pkg: &Pkg) -> f64 {
        let mut rho = 0.0f64;
        for adj in &pkg.adj {
            let s = |x: usize| f64::from(inv_sqrt_degree(adj[x].len()));
            for (x, ns) in adj.iter().enumerate() {
                let row = s(x) * (s(x) + ns.iter().map(|&y| s(y as usize)).sum::<f64>());
                rho = rho.max(row);
            }
        }
        rho
    }

    /// Largest absolute difference at layer `k`, over relations.
    fn layer_diff(a: &Propagator, b: &Propagator, k: usize) -> f64 {
        let mut worst = 0.0f64;
        for r in 0..a.num_relations() {
            let (x, y) = (a.layer(r, k).unwrap(), b.layer(r, k).unwrap());
            for (p, q) in x.iter().zip(y.iter()) {
                worst = worst.max(f64::from((p - q).abs()));
            }
        }
        worst
    }

    /// `max_y s_y (deg_y + 1)` over relations: the most one layer's held-back
    /// messages (each within the tolerance) can move a row.
    fn max_fan_in(pkg: &Pkg) -> f64 {
        let mut c = 0.0f64;
        for adj in &pkg.adj {
            for ns in adj {
                let s = f64::from(inv_sqrt_degree(ns.len()));
                c = c.max(s * (ns.len() + 1) as f64);
            }
        }
        c
    }

    #[test]
    fn tolerance_keeps_every_layer_within_its_bound_and_reconcile_is_exact() {
        // Row y of H_k is s_y Σ m̂_{k-1}[x] with every message within `tol` of
        // s_x H_{k-1}[x], so layer k stays within
        // e_k = c tol + ρ e_{k-1}, e_0 = 0 (c: `max_fan_in`, ρ: largest row
        // sum of S), plus the rounding of the pushed updates.
        let tol = 1e-3f32;
        let cfg = PropagatorConfig {
            tolerance: tol,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (n, d) = (200, 6);
        let mut pkg = random_pkg(&mut rng, n, 2, 900);
        let mut inputs: Vec<_> = (0..2).map(|_| random_matrix(&mut rng, n, d)).collect();
        let mut prop = Propagator::full(cfg.clone(), &pkg, &views(&inputs)).unwrap();
        pkg.take_changes();
        let mut next = 0;
        let mut held_back = 0;
        for _ in 0..60 {
            let mut batch = random_window(&mut rng, &mut pkg, &mut inputs, &mut next);
            // Small input changes too, which the tolerance may hold back.
            for _ in 0..10 {
                let live: Vec<u32> = pkg.items().map(|(x, _)| x).collect();
                let x = live[rng.random_range(0..live.len())];
                let r = rng.random_range(0..2);
                let mut row = inputs[r].row(x as usize).to_vec();
                for v in &mut row {
                    *v += rng.random_range(-2e-4f32..2e-4);
                }
                inputs[r]
                    .row_mut(x as usize)
                    .assign(&ArrayView1::from(row.as_slice()));
                batch.set_input(r, x, &row);
            }
            held_back += prop.apply(&pkg, &batch).unwrap().held_back;
            assert!(!prop.is_exact());
            let exact =
                Propagator::full(PropagatorConfig::default(), &pkg, &views(&inputs)).unwrap();
            let rho = max_row_sum(&pkg);
            let c = max_fan_in(&pkg);
            let mut bound = 0.0f64;
            assert_eq!(
                layer_diff(&prop, &exact, 0),
                0.0,
                "inputs are stored as given"
            );
            let tol_abs = (0..2).map(|r| prop.tolerance_of(r)).fold(0f32, f32::max);
            for k in 1..=prop.hops() {
                bound = c * f64::from(tol_abs) + rho * bound;
                let err = layer_diff(&prop, &exact, k);
                assert!(
                    err <= bound * 1.001 + 1e-5,
                    "layer {k}: error {err} > bound {bound}"
                );
            }
        }
        assert!(held_back > 0, "the test never held a change back");
        let before = prop.clone();
        let moved = prop.reconcile(&pkg).unwrap();
        assert!(prop.is_exact());
        let exact = Propagator::full(PropagatorConfig::default(), &pkg, &views(&inputs)).unwrap();
        assert_eq!(max_diff(&prop, &exact), 0.0);
        // `moved` is exactly the set of output rows that differ.
        let hops = prop.hops();
        let differ: Vec<u32> = (0..prop.slots() as u32)
            .filter(|&x| {
                (0..prop.num_relations()).any(|r| {
                    before.layer(r, hops).unwrap().row(x as usize)
                        != prop.layer(r, hops).unwrap().row(x as usize)
                })
            })
            .collect();
        assert!(!differ.is_empty());
        assert_eq!(moved, differ);
        assert!(
            prop.reconcile(&pkg).unwrap().is_empty(),
            "nothing left to reconcile"
        );
    }

    #[test]
    fn tolerance_stops_an_edge_on_a_dense_graph_early() {
        // Average degree 40: the exact 3-hop ball of one edge is most of the
        // graph, the tolerant update a small part of it.
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let n = 4000;
        let pkg0 = random_pkg(&mut rng, n, 1, 80_000);
        let inputs = vec![random_matrix(&mut rng, n, 8)];
        let mut rows = Vec::new();
        for tolerance in [0.0f32, 1e-3] {
            let cfg = PropagatorConfig {
                tolerance,
                full_recompute_fraction: f64::INFINITY,
                ..Default::default()
            };
            let mut pkg = pkg0.clone();
            let mut prop = Propagator::full(cfg, &pkg, &views(&inputs)).unwrap();
            pkg.take_changes();
            let (u, v) = (17, 3242);
            assert!(pkg.add_edge(0, u, v).unwrap());
            let before = prop.layer(0, prop.hops()).unwrap().to_owned();
            let stats = step(&mut prop, &mut pkg);
            // Reported: exactly the output rows that moved (past the
            // tolerance, when there is one).
            let after = prop.layer(0, prop.hops()).unwrap();
            for x in 0..n {
                let moved = before
                    .row(x)
                    .iter()
                    .zip(after.row(x))
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert_eq!(
                    stats.changed.contains(&(x as u32)),
                    moved > prop.tolerance_of(0),
                    "row {x} moved {moved}"
                );
            }
            assert!(stats.changed.contains(&u) || tolerance > 0.0);
            rows.push(stats.rows_recomputed());
        }
        assert!(rows[0] > n, "exact: {rows:?}");
        assert!(rows[1] * 10 < rows[0], "tolerant vs exact rows: {rows:?}");
    }

    #[test]
    fn exact_changed_rows_are_the_output_rows_that_differ() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let (n, d) = (120, 4);
        let mut pkg = random_pkg(&mut rng, n, 2, 150);
        let mut inputs: Vec<_> = (0..2).map(|_| random_matrix(&mut rng, n, d)).collect();
        let mut prop =
            Propagator::full(PropagatorConfig::default(), &pkg, &views(&inputs)).unwrap();
        pkg.take_changes();
        let mut next = 0;
        for _ in 0..20 {
            let before = prop.clone();
            let batch = random_window(&mut rng, &mut pkg, &mut inputs, &mut next);
            let stats = prop.apply(&pkg, &batch).unwrap();
            let hops = prop.hops();
            let differ: Vec<u32> = (0..prop.slots() as u32)
                .filter(|&x| {
                    (0..2).any(|r| {
                        let new = prop.layer(r, hops).unwrap();
                        (x as usize) >= before.slots()
                            || before.layer(r, hops).unwrap().row(x as usize) != new.row(x as usize)
                    })
                })
                .collect();
            // Every differing row is reported; a reported row differs (or is new).
            assert!(
                differ.iter().all(|x| stats.changed.contains(x)),
                "{differ:?} vs {:?}",
                stats.changed
            );
            assert!(stats.changed.iter().all(|x| differ.contains(x)));
        }
    }

    #[test]
    fn capacity_grows_geometrically_and_keeps_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut pkg = random_pkg(&mut rng, 10, 1, 10);
        let inputs = vec![random_matrix(&mut rng, 10, 3)];
        let mut prop =
            Propagator::full(PropagatorConfig::default(), &pkg, &views(&inputs)).unwrap();
        pkg.take_changes();
        let before = prop.output(0).unwrap().to_owned();
        let mut capacities = BTreeSet::new();
        for i in 0..1000 {
            let x = pkg.add_item(&format!("n{i}"));
            let mut batch = pkg.take_changes();
            batch.set_input(0, x, &[1.0, 2.0, 3.0]);
            prop.apply(&pkg, &batch).unwrap();
            capacities.insert(prop.capacity());
        }
        assert_eq!(prop.slots(), 1010);
        assert!(capacities.len() <= 6, "{capacities:?}");
        assert_eq!(prop.output(0).unwrap().slice(s![..10, ..]), before);
        assert_eq!(prop.row(0, 1009).unwrap().to_vec(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn bad_batches_are_errors_and_change_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut pkg = random_pkg(&mut rng, 20, 2, 30);
        let inputs: Vec<_> = (0..2).map(|_| random_matrix(&mut rng, 20, 4)).collect();
        let cfg = PropagatorConfig::default();
        let mut prop = Propagator::full(cfg.clone(), &pkg, &views(&inputs)).unwrap();
        let before = snapshot(&prop);

        // The window open at `full` is the first one expected.
        let x = pkg.add_item("fresh");
        pkg.add_edge(1, x, 0).unwrap();
        let mut batch = pkg.take_changes();
        assert_eq!(
            prop.apply(&pkg, &batch),
            Err(Error::MissingInput {
                item: x,
                relation: 0
            })
        );
        batch.set_input(0, x, &[0.0; 4]);
        assert_eq!(
            prop.apply(&pkg, &batch),
            Err(Error::MissingInput {
                item: x,
                relation: 1
            })
        );
        let mut wrong = batch.clone();
        wrong.set_input(1, x, &[0.0; 3]);
        assert!(matches!(prop.apply(&pkg, &wrong), Err(Error::Shape { .. })));
        let mut wrong = batch.clone();
        wrong.set_input(1, x, &[0.0; 4]);
        wrong.set_input(2, x, &[0.0; 4]);
        assert_eq!(prop.apply(&pkg, &wrong), Err(Error::UnknownRelation(2)));
        let mut wrong = batch.clone();
        wrong.set_input(1, x, &[0.0; 4]);
        wrong.set_input(0, 999, &[0.0; 4]);
        assert_eq!(prop.apply(&pkg, &wrong), Err(Error::UnknownItem(999)));
        let later = {
            let mut p = pkg.clone();
            p.take_changes()
        };
        assert!(
            matches!(prop.apply(&pkg, &later), Err(Error::OutOfOrder { .. })),
            "skips a batch"
        );
        let other = Pkg::new(["a", "b"]).unwrap();
        assert_eq!(prop.apply(&other, &Batch::new()), Err(Error::ForeignGraph));
        assert_eq!(
            prop.layer(0, 4),
            Err(Error::UnknownLayer { layer: 4, hops: 3 })
        );
        assert_eq!(prop.row(2, 0), Err(Error::UnknownRelation(2)));
        assert_eq!(prop.row(0, 20), Err(Error::UnknownItem(20)));
        assert_eq!(snapshot(&prop), before, "failed applies change nothing");

        batch.set_input(1, x, &[0.0; 4]);
        prop.apply(&pkg, &batch).unwrap();
        let applied = snapshot(&prop);
        prop.apply(&pkg, &batch).unwrap();
        assert_eq!(
            snapshot(&prop),
            applied,
            "applying a batch twice is harmless"
        );
        pkg.add_edge(0, x, 1).unwrap();
        assert!(
            matches!(prop.apply(&pkg, &batch), Err(Error::OutOfOrder { .. })),
            "the graph has edits the batch does not carry"
        );
        assert!(matches!(
            prop.apply(&pkg, &Batch::new()),
            Err(Error::OutOfOrder { .. })
        ));
        step(&mut prop, &mut pkg);
        // An input-only batch applies at any time; a removed item's rows are ignored.
        let mut only = Batch::new();
        only.set_input(0, 5, &[1.0; 4]);
        pkg.remove_item_at(6);
        only.set_input(0, 6, &[1.0; 4]);
        let stats = step(&mut prop, &mut pkg);
        assert_eq!(stats.ignored_inputs, 0);
        assert_eq!(prop.apply(&pkg, &only).unwrap().ignored_inputs, 1);
        assert!(Propagator::full(cfg.clone(), &pkg, &views(&inputs[..1])).is_err());
        let bad = PropagatorConfig {
            min_rows_per_thread: 0,
            ..cfg
        };
        assert!(matches!(
            Propagator::full(bad, &pkg, &views(&inputs)),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn config_defaults_and_serde() {
        let cfg: PropagatorConfig = serde_json::from_str(r#"{"hops": 2}"#).unwrap();
        assert_eq!(
            cfg,
            PropagatorConfig {
                hops: 2,
                ..Default::default()
            }
        );
        assert_eq!(PropagatorConfig::default().hops, 3);
        assert!(serde_json::from_str::<PropagatorConfig>(r#"{"hop": 2}"#).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn add_then_remove_an_edge_restores_everything(
            n in 3usize..16,
            edges in proptest::collection::vec((0u32..16, 0u32..16, 0usize..2), 0..40),
            (a, b, r) in (0u32..16, 0u32..16, 0usize..2),
            same_window in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut pkg = Pkg::new(["x", "y"]).unwrap();
            for i in 0..n {
                pkg.add_item(&i.to_string());
            }
            for (u, v, q) in edges {
                let _ = pkg.add_edge(q, u % n as u32, v % n as u32);
            }
            let (a, b) = (a % n as u32, b % n as u32);
            prop_assume!(a != b && !pkg.has_edge(r, a, b).unwrap());
            let inputs: Vec<_> = (0..2).map(|_| random_matrix(&mut rng, n, 3)).collect();
            let cfg = PropagatorConfig::default();
            let mut prop = Propagator::full(cfg, &pkg, &views(&inputs)).unwrap();
            pkg.take_changes();
            let (graph, layers) = (edge_lists(&pkg), snapshot(&prop));

            prop_assert!(pkg.add_edge(r, a, b).unwrap());
            if !same_window {
                step(&mut prop, &mut pkg);
                prop_assert_ne!(&snapshot(&prop), &layers);
            }
            prop_assert!(pkg.remove_edge(r, a, b).unwrap());
            step(&mut prop, &mut pkg);
            prop_assert_eq!(edge_lists(&pkg), graph);
            prop_assert_eq!(snapshot(&prop), layers);
        }

        #[test]
        fn add_then_remove_an_item_restores_everything(
            n in 2usize..16,
            edges in proptest::collection::vec((0u32..16, 0u32..16, 0usize..2), 0..40),
            links in proptest::collection::vec((0u32..16, 0usize..2), 0..6),
            seed in any::<u64>(),
        ) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut pkg = Pkg::new(["x", "y"]).unwrap();
            for i in 0..n {
                pkg.add_item(&i.to_string());
            }
            for (u, v, q) in edges {
                let _ = pkg.add_edge(q, u % n as u32, v % n as u32);
            }
            let inputs: Vec<_> = (0..2).map(|_| random_matrix(&mut rng, n, 3)).collect();
            let cfg = PropagatorConfig::default();
            let mut prop = Propagator::full(cfg, &pkg, &views(&inputs)).unwrap();
            pkg.take_changes();
            let (graph, layers) = (edge_lists(&pkg), snapshot(&prop));
            let items: Vec<(u32, String)> = pkg.items().map(|(x, e)| (x, e.to_string())).collect();

            let x = pkg.add_item("newcomer");
            for (u, q) in links {
                pkg.add_edge(q, x, u % n as u32).unwrap();
            }
            let mut batch = pkg.take_changes();
            batch.set_inputs(x, random_matrix(&mut rng, 2, 3).view());
            prop.apply(&pkg, &batch).unwrap();
            prop_assert_eq!(pkg.remove_item("newcomer"), Some(x));
            step(&mut prop, &mut pkg);

            prop_assert_eq!(edge_lists(&pkg), graph);
            let after: Vec<(u32, String)> = pkg.items().map(|(x, e)| (x, e.to_string())).collect();
            prop_assert_eq!(after, items);
            // The freed slot stays (reusable); its rows are zero, the others restored.
            for (now, then) in snapshot(&prop).iter().zip(&layers) {
                prop_assert_eq!(now.slice(s![..n, ..]), then.view());
                prop_assert!(now.row(n).iter().all(|&v| v == 0.0));
            }
        }
    }

    /// `m` distinct random edges over `n` items. With `exponent`, a Chung–Lu
    /// graph: endpoints drawn with weight `(i + 1)^(-1 / (exponent - 1))`, so
    /// expected degrees follow a power law of that exponent; without, uniform.
    fn random_big_pkg(rng: &mut ChaCha8Rng, n: usize, m: usize, exponent: Option<f64>) -> Pkg {
        let mut pkg = Pkg::new(["r"]).unwrap();
        pkg.reserve(n);
        for i in 0..n {
            pkg.add_item(&format!("i{i}"));
        }
        let mut cumulative = Vec::with_capacity(n);
        let mut total = 0.0f64;
        for i in 0..n {
            total += exponent.map_or(1.0, |e| ((i + 1) as f64).powf(-1.0 / (e - 1.0)));
            cumulative.push(total);
        }
        let draw = |rng: &mut ChaCha8Rng| {
            let u = rng.random_range(0.0..total);
            cumulative.partition_point(|&c| c <= u).min(n - 1) as u32
        };
        while pkg.edge_count(0).unwrap() < m {
            let (u, v) = (draw(rng), draw(rng));
            if u != v {
                pkg.add_edge(0, u, v).unwrap();
            }
        }
        pkg
    }

    fn secs(t: Instant) -> f64 {
        t.elapsed().as_secs_f64()
    }

    fn median(mut xs: Vec<f64>) -> f64 {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    }

    /// Times full propagation, single edge edits and a 1,000-edit batch on a
    /// 100K-item, 1M-edge graph (d = 64, M = 3, default config).
    fn time_graph(label: &str, exponent: Option<f64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        let (n, m, d) = (100_000, 1_000_000, 64);
        let mut pkg = random_big_pkg(&mut rng, n, m, exponent);
        let degrees: Vec<usize> = (0..n as u32).map(|x| pkg.degree(0, x).unwrap()).collect();
        let max_degree = degrees.iter().max().copied().unwrap_or(0);
        let inputs = vec![random_matrix(&mut rng, n, d)];
        let cfg = PropagatorConfig::default();
        println!(
            "[{label}] {n} items, {m} edges, max degree {max_degree}, {} threads",
            cfg.effective_threads()
        );

        let mut fulls = Vec::new();
        let mut prop = None;
        for _ in 0..3 {
            let t = Instant::now();
            prop = Some(Propagator::full(cfg.clone(), &pkg, &views(&inputs)).unwrap());
            fulls.push(secs(t));
        }
        let (mut prop, full) = (prop.unwrap(), median(fulls));
        pkg.take_changes();

        // Single edge edits between random items: add one, apply; remove it, apply.
        let (mut single, mut rows, mut fell_back) = (Vec::new(), Vec::new(), 0);
        for _ in 0..20 {
            let (u, v) = loop {
                let (u, v) = (rng.random_range(0..n as u32), rng.random_range(0..n as u32));
                if u != v && !pkg.has_edge(0, u, v).unwrap() {
                    break (u, v);
                }
            };
            for add in [true, false] {
                if add {
                    pkg.add_edge(0, u, v).unwrap();
                } else {
                    pkg.remove_edge(0, u, v).unwrap();
                }
                let batch = pkg.take_changes();
                let t = Instant::now();
                let stats = prop.apply(&pkg, &batch).unwrap();
                single.push(secs(t));
                rows.push(stats.rows_recomputed() as f64);
                fell_back += usize::from(stats.full_layers > 0);
            }
        }
        let one = median(single.clone());

        // A batch of 1,000 edge edits: 500 added, 500 existing removed.
        for _ in 0..500 {
            let (u, v) = (rng.random_range(0..n as u32), rng.random_range(0..n as u32));
            if u != v {
                pkg.add_edge(0, u, v).unwrap();
            }
            let u = rng.random_range(0..n as u32);
            let ns = pkg.neighbours(0, u).unwrap();
            if !ns.is_empty() {
                let v = ns[rng.random_range(0..ns.len())];
                pkg.remove_edge(0, u, v).unwrap();
            }
        }
        let batch = pkg.take_changes();
        let t = Instant::now();
        let stats = prop.apply(&pkg, &batch).unwrap();
        let thousand = secs(t);

        let check = Propagator::full(cfg, &pkg, &views(&inputs)).unwrap();
        assert_eq!(max_diff(&prop, &check), 0.0);
        println!(
            "[{label}] full propagation: {:.1} ms (median of 3)",
            full * 1e3
        );
        println!(
            "[{label}] one edge edit: median {:.2} ms, max {:.2} ms => full / one edit = {:.1}x; \
             rows recomputed (of {}) median {:.0}; {fell_back}/{} hit the full-layer fallback",
            one * 1e3,
            single.iter().copied().fold(0.0, f64::max) * 1e3,
            full / one,
            3 * n,
            median(rows.clone()),
            rows.len()
        );
        println!(
            "[{label}] 1,000 edge edits in one batch ({} slots touched): {:.1} ms => full / batch = {:.2}x; \
             rows per hop {:?}, full layers {}",
            batch.touched(0).len(),
            thousand * 1e3,
            full / thousand,
            stats.rows[0],
            stats.full_layers
        );
    }

    /// The figure for the report: run with
    /// `cargo test --release --lib graph::propagate::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing on 100K-item graphs (about a minute); run in release mode"]
    fn timing_100k_items_1m_edges() {
        time_graph("power law 2.5", Some(2.5));
        time_graph("uniform", None);
    }
}
