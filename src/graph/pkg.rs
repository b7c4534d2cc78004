//! The product knowledge graph: items, relations, and one undirected simple
//! graph per relation (MPKG §4.1), with the normalised adjacency of eq. 1.
//!
//! Adjacency is a sorted `Vec<u32>` per item and relation. Against a hash set
//! it costs `O(degree)` per edit (a binary search and a `memmove`, fast even for
//! hubs of tens of thousands of neighbours), and it wins where time is spent:
//! propagation iterates neighbours in a fixed order over contiguous memory, and
//! that fixed order is what makes full and incremental propagation bitwise equal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{Array2, ArrayViewMut1};

use super::batch::{Batch, Origin};
use super::{Error, Result};

/// Source of graph identities, so that a [`super::Propagator`] can refuse a
/// batch or graph that is not the one it was computed from.
static NEXT_GRAPH_ID: AtomicU64 = AtomicU64::new(1);

/// `1 / sqrt(degree + 1)`: the symmetric normalisation of `S_r` for an item
/// with `degree` neighbours plus its self-loop (eq. 1).
///
/// One function serves [`Pkg::normalized_adjacency`] and both propagation
/// paths so that every caller gets the same bits.
#[inline]
pub fn inv_sqrt_degree(degree: usize) -> f32 {
    1.0 / ((degree + 1) as f32).sqrt()
}

/// A product knowledge graph: items under dense `u32` slot indexes, a fixed
/// list of relations, and per relation an undirected simple graph.
///
/// Self-loops are never stored; they are implicit in `S_r = D^-1/2 (A_r + I)
/// D^-1/2`, so every live item, even an isolated one, propagates to itself.
///
/// Every edit is recorded as a set of touched slots per relation (bounded by
/// the number of slots, never by the number of edits) until
/// [`Pkg::take_changes`] closes the window and returns them as a [`Batch`].
///
/// Cloning keeps the graph identity: a clone and its original are the same
/// graph as far as a [`super::Propagator`] is concerned.
#[derive(Debug, Clone)]
pub struct Pkg {
    id: u64,
    relations: Vec<String>,
    relation_index: HashMap<String, usize>,
    /// External id per slot; `None` for a free slot.
    ext: Vec<Option<Box<str>>>,
    index: HashMap<Box<str>, u32>,
    /// Free slots, reusable now; kept sorted descending so `pop` gives the lowest.
    free: Vec<u32>,
    /// Slots freed in the current window, reusable after [`Pkg::take_changes`].
    pending_free: Vec<u32>,
    /// `adj[r][x]`: sorted neighbours of slot `x` under relation `r`.
    pub(super) adj: Vec<Vec<Vec<u32>>>,
    edges: Vec<usize>,
    /// Effective edits so far (those that changed the graph).
    edits: u64,
    /// `edits` when the open window began.
    window_start: u64,
    changes: Changes,
}

/// A [`Pkg`] as plain data ([`Pkg::to_parts`], [`Pkg::from_parts`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PkgParts {
    /// Relation names, in index order.
    pub relations: Vec<String>,
    /// External id per slot; `None` for a free slot.
    pub ext: Vec<Option<String>>,
    /// Free slots, sorted descending.
    pub free: Vec<u32>,
    /// `adj[r][x]`: sorted neighbours of slot `x` under relation `r`.
    pub adj: Vec<Vec<Vec<u32>>>,
}

/// Most edge edits one window logs ([`EdgeEdit`]); past this the window's
/// log is dropped and a tolerant propagator recomputes the relations in full
/// (24 bytes an entry: 48 MiB at most). The engine's windows hold a few
/// thousand events; only bulk loads (building a graph before
/// [`super::Propagator::full`]) pass it, and they need no log.
pub const MAX_LOGGED_EDITS: usize = 1 << 21;

/// One effective edge edit, as logged for the tolerant propagator: edge
/// `u — v` added or removed by the graph's edit number `seq` (an item
/// removal logs each of its edges under its own number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeEdit {
    /// Edit number ([`Pkg::edits`] before the edit).
    pub seq: u64,
    /// One endpoint.
    pub u: u32,
    /// The other endpoint.
    pub v: u32,
    /// Added (true) or removed.
    pub add: bool,
}

/// Slots touched in the open window, deduplicated by marks, and the window's
/// edge edits in order (unless more than [`MAX_LOGGED_EDITS`]).
#[derive(Debug, Clone, Default)]
struct Changes {
    touched: Vec<Vec<u32>>,
    touched_mark: Vec<Vec<bool>>,
    items: Vec<u32>,
    item_mark: Vec<bool>,
    log: Vec<Vec<EdgeEdit>>,
    logged: usize,
    log_overflow: bool,
}

impl Changes {
    fn touch(&mut self, r: usize, x: u32) {
        let mark = &mut self.touched_mark[r][x as usize];
        if !*mark {
            *mark = true;
            self.touched[r].push(x);
        }
    }

    fn log(&mut self, r: usize, edit: EdgeEdit) {
        if self.log_overflow {
            return;
        }
        if self.logged >= MAX_LOGGED_EDITS {
            self.log_overflow = true;
            self.log.iter_mut().for_each(|l| *l = Vec::new());
            return;
        }
        self.logged += 1;
        self.log[r].push(edit);
    }

    fn item(&mut self, x: u32) {
        let mark = &mut self.item_mark[x as usize];
        if !*mark {
            *mark = true;
            self.items.push(x);
        }
    }
}

impl Pkg {
    /// An empty graph with the given relation names, indexed `0..n` in order.
    ///
    /// Fails on a duplicate name.
    pub fn new<I, S>(relations: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let relations: Vec<String> = relations.into_iter().map(Into::into).collect();
        let mut relation_index = HashMap::with_capacity(relations.len());
        for (r, name) in relations.iter().enumerate() {
            if relation_index.insert(name.clone(), r).is_some() {
                return Err(Error::DuplicateRelation(name.clone()));
            }
        }
        let n = relations.len();
        Ok(Self {
            id: NEXT_GRAPH_ID.fetch_add(1, Ordering::Relaxed),
            relations,
            relation_index,
            ext: Vec::new(),
            index: HashMap::new(),
            free: Vec::new(),
            pending_free: Vec::new(),
            adj: vec![Vec::new(); n],
            edges: vec![0; n],
            edits: 0,
            window_start: 0,
            changes: Changes {
                touched: vec![Vec::new(); n],
                touched_mark: vec![Vec::new(); n],
                items: Vec::new(),
                item_mark: Vec::new(),
                log: vec![Vec::new(); n],
                logged: 0,
                log_overflow: false,
            },
        })
    }

    /// The relation names, in index order.
    pub fn relations(&self) -> &[String] {
        &self.relations
    }

    /// Number of relations `R`.
    pub fn num_relations(&self) -> usize {
        self.relations.len()
    }

    /// Index of a relation by name.
    pub fn relation_index(&self, name: &str) -> Option<usize> {
        self.relation_index.get(name).copied()
    }

    /// Number of live items.
    pub fn num_items(&self) -> usize {
        self.index.len()
    }

    /// Number of slots: one past the largest slot index ever handed out. Row
    /// counts of propagation inputs and outputs.
    pub fn slots(&self) -> usize {
        self.ext.len()
    }

    /// Reserves room for `additional` more slots.
    pub fn reserve(&mut self, additional: usize) {
        self.ext.reserve(additional);
        for adj in &mut self.adj {
            adj.reserve(additional);
        }
    }

    /// Adds an item, or returns the slot of the item already under `ext_id`.
    ///
    /// Reuses the lowest slot freed in an earlier window (see
    /// [`Pkg::take_changes`]), else appends one.
    ///
    /// # Panics
    ///
    /// If more than 2^32 slots would be needed, which memory rules out
    /// long before (each slot costs `R × (M + 1) × d` floats of propagation).
    pub fn add_item(&mut self, ext_id: &str) -> u32 {
        if let Some(&x) = self.index.get(ext_id) {
            return x;
        }
        let key: Box<str> = ext_id.into();
        let x = match self.free.pop() {
            Some(x) => {
                self.ext[x as usize] = Some(key.clone());
                x
            }
            None => {
                let Ok(x) = u32::try_from(self.ext.len()) else {
                    panic!("the graph is limited to 2^32 item slots");
                };
                self.ext.push(Some(key.clone()));
                for adj in &mut self.adj {
                    adj.push(Vec::new());
                }
                for mark in &mut self.changes.touched_mark {
                    mark.push(false);
                }
                self.changes.item_mark.push(false);
                x
            }
        };
        self.index.insert(key, x);
        self.edits += 1;
        self.changes.item(x);
        for r in 0..self.relations.len() {
            self.changes.touch(r, x);
        }
        x
    }

    /// Removes the item under `ext_id` with all its edges; returns its freed
    /// slot, or `None` if there is no such item.
    pub fn remove_item(&mut self, ext_id: &str) -> Option<u32> {
        let x = *self.index.get(ext_id)?;
        self.remove_item_at(x).then_some(x)
    }

    /// Removes the item in slot `item` with all its edges; `false` if the slot
    /// holds no item.
    pub fn remove_item_at(&mut self, item: u32) -> bool {
        let Some(key) = self.ext.get_mut(item as usize).and_then(Option::take) else {
            return false;
        };
        self.index.remove(&key);
        let x = item as usize;
        for r in 0..self.relations.len() {
            let neighbours = std::mem::take(&mut self.adj[r][x]);
            self.edges[r] -= neighbours.len();
            for &y in &neighbours {
                let list = &mut self.adj[r][y as usize];
                if let Ok(p) = list.binary_search(&item) {
                    list.remove(p);
                }
                self.changes.touch(r, y);
                self.changes.log(
                    r,
                    EdgeEdit {
                        seq: self.edits,
                        u: item,
                        v: y,
                        add: false,
                    },
                );
            }
            self.changes.touch(r, item);
        }
        self.edits += 1;
        self.changes.item(item);
        self.pending_free.push(item);
        true
    }

    /// Whether slot `item` holds a live item.
    pub fn contains_item(&self, item: u32) -> bool {
        matches!(self.ext.get(item as usize), Some(Some(_)))
    }

    /// Slot of the item under `ext_id`.
    pub fn item_index(&self, ext_id: &str) -> Option<u32> {
        self.index.get(ext_id).copied()
    }

    /// External id of the item in slot `item`.
    pub fn ext_id(&self, item: u32) -> Option<&str> {
        self.ext.get(item as usize)?.as_deref()
    }

    /// Live items as `(slot, external id)`, in slot order.
    pub fn items(&self) -> impl Iterator<Item = (u32, &str)> + '_ {
        self.ext
            .iter()
            .enumerate()
            .filter_map(|(x, e)| Some((x as u32, e.as_deref()?)))
    }

    fn check_relation(&self, r: usize) -> Result<()> {
        if r < self.relations.len() {
            Ok(())
        } else {
            Err(Error::UnknownRelation(r))
        }
    }

    fn check_item(&self, x: u32) -> Result<()> {
        if self.contains_item(x) {
            Ok(())
        } else {
            Err(Error::UnknownItem(x))
        }
    }

    fn check_edge(&self, r: usize, u: u32, v: u32) -> Result<()> {
        self.check_relation(r)?;
        self.check_item(u)?;
        self.check_item(v)?;
        if u == v {
            return Err(Error::SelfLoop(u));
        }
        Ok(())
    }

    /// Adds the undirected edge `u — v` under relation `r`; `Ok(false)` if it
    /// was already there. Errors on an unknown relation or item or a self-loop.
    pub fn add_edge(&mut self, r: usize, u: u32, v: u32) -> Result<bool> {
        self.check_edge(r, u, v)?;
        let adj = &mut self.adj[r];
        let Err(p) = adj[u as usize].binary_search(&v) else {
            return Ok(false);
        };
        adj[u as usize].insert(p, v);
        if let Err(q) = adj[v as usize].binary_search(&u) {
            adj[v as usize].insert(q, u);
        }
        self.changes.log(
            r,
            EdgeEdit {
                seq: self.edits,
                u,
                v,
                add: true,
            },
        );
        self.edges[r] += 1;
        self.edits += 1;
        self.changes.touch(r, u);
        self.changes.touch(r, v);
        Ok(true)
    }

    /// Removes the edge `u — v` under relation `r`; `Ok(false)` if it was not
    /// there. Errors on an unknown relation or item or a self-loop.
    pub fn remove_edge(&mut self, r: usize, u: u32, v: u32) -> Result<bool> {
        self.check_edge(r, u, v)?;
        let adj = &mut self.adj[r];
        let Ok(p) = adj[u as usize].binary_search(&v) else {
            return Ok(false);
        };
        adj[u as usize].remove(p);
        if let Ok(q) = adj[v as usize].binary_search(&u) {
            adj[v as usize].remove(q);
        }
        self.changes.log(
            r,
            EdgeEdit {
                seq: self.edits,
                u,
                v,
                add: false,
            },
        );
        self.edges[r] -= 1;
        self.edits += 1;
        self.changes.touch(r, u);
        self.changes.touch(r, v);
        Ok(true)
    }

    /// Whether the edge `u — v` exists under relation `r`.
    pub fn has_edge(&self, r: usize, u: u32, v: u32) -> Result<bool> {
        Ok(self.neighbours(r, u)?.binary_search(&v).is_ok())
    }

    /// Number of neighbours of `item` under relation `r` (the self-loop not
    /// counted; `S_r` uses `degree + 1`).
    pub fn degree(&self, r: usize, item: u32) -> Result<usize> {
        Ok(self.neighbours(r, item)?.len())
    }

    /// Neighbours of `item` under relation `r`, sorted ascending.
    pub fn neighbours(&self, r: usize, item: u32) -> Result<&[u32]> {
        self.check_relation(r)?;
        self.check_item(item)?;
        Ok(&self.adj[r][item as usize])
    }

    /// Adds the graph-neighbour score of a user with `items` (slots) to
    /// `scores` (one entry per slot): `Σ_r w_r · |{j ∈ items : i ∈ N_r(j)}| / |items|`,
    /// the share of the user's items that are `r`-neighbours of slot `i`,
    /// weighted per relation (`weights[r]`; missing or zero weights skip the
    /// relation). `thaw eval` and the engine score with this one function.
    /// Items that are not in the graph are skipped.
    pub fn add_neighbour_scores(
        &self,
        weights: &[f32],
        items: &[u32],
        mut scores: ArrayViewMut1<'_, f32>,
    ) {
        if items.is_empty() {
            return;
        }
        let share = 1.0 / items.len() as f32;
        for (r, &w) in weights.iter().enumerate().take(self.adj.len()) {
            if w == 0.0 {
                continue;
            }
            let add = w * share;
            for &j in items {
                let Some(nbrs) = self.adj[r].get(j as usize) else {
                    continue;
                };
                for &n in nbrs {
                    if let Some(s) = scores.get_mut(n as usize) {
                        *s += add;
                    }
                }
            }
        }
    }

    /// Number of undirected edges under relation `r`.
    pub fn edge_count(&self, r: usize) -> Result<usize> {
        self.check_relation(r)?;
        Ok(self.edges[r])
    }

    /// Number of undirected edges per relation, in relation order.
    pub fn edge_counts(&self) -> &[usize] {
        &self.edges
    }

    /// Edges of relation `r` as `(u, v)` with `u < v`, in order.
    pub fn edges(&self, r: usize) -> Result<impl Iterator<Item = (u32, u32)> + '_> {
        self.check_relation(r)?;
        Ok(self.adj[r].iter().enumerate().flat_map(|(u, ns)| {
            let u = u as u32;
            ns.iter().filter(move |&&v| u < v).map(move |&v| (u, v))
        }))
    }

    /// `S_r = D^-1/2 (A_r + I) D^-1/2` in CSR form over all slots, `D` the
    /// degree including the self-loop. Every live item's row holds its
    /// self-loop; a free slot's row is empty.
    pub fn normalized_adjacency(&self, r: usize) -> Result<NormalizedAdjacency> {
        self.check_relation(r)?;
        let adj = &self.adj[r];
        let n = adj.len();
        let inv: Vec<f32> = adj.iter().map(|ns| inv_sqrt_degree(ns.len())).collect();
        let nnz = 2 * self.edges[r] + self.num_items();
        let mut indptr = Vec::with_capacity(n + 1);
        let mut indices = Vec::with_capacity(nnz);
        let mut values = Vec::with_capacity(nnz);
        indptr.push(0);
        for (x, ns) in adj.iter().enumerate() {
            let live = self.ext[x].is_some();
            let split = ns.partition_point(|&y| (y as usize) < x);
            for &y in &ns[..split] {
                indices.push(y);
                values.push(inv[x] * inv[y as usize]);
            }
            if live {
                indices.push(x as u32);
                values.push(inv[x] * inv[x]);
            }
            for &y in &ns[split..] {
                indices.push(y);
                values.push(inv[x] * inv[y as usize]);
            }
            indptr.push(indices.len());
        }
        Ok(NormalizedAdjacency {
            n,
            indptr,
            indices,
            values,
        })
    }

    /// Closes the current window: returns the slots its edits touched as a
    /// [`Batch`] for [`super::Propagator::apply`], and makes the slots freed
    /// in it reusable.
    ///
    /// Batches must be applied in the order they were taken, none skipped;
    /// the propagator checks this.
    pub fn take_changes(&mut self) -> Batch {
        let changes = &mut self.changes;
        for (r, touched) in changes.touched.iter().enumerate() {
            for &x in touched {
                changes.touched_mark[r][x as usize] = false;
            }
        }
        for &x in &changes.items {
            changes.item_mark[x as usize] = false;
        }
        let touched = changes
            .touched
            .iter_mut()
            .map(std::mem::take)
            .collect::<Vec<_>>();
        let items = std::mem::take(&mut changes.items);
        let log = if changes.log_overflow {
            None
        } else {
            Some(changes.log.iter_mut().map(std::mem::take).collect())
        };
        changes.logged = 0;
        changes.log_overflow = false;
        if !self.pending_free.is_empty() {
            self.free.append(&mut self.pending_free);
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
        let origin = Origin {
            graph: self.id,
            edits: self.window_start..self.edits,
        };
        self.window_start = self.edits;
        Batch::from_changes(origin, touched, items, log)
    }

    /// The graph as plain data, for a snapshot: relation names, the external
    /// id of each slot (`None`: free), the free slots, and each slot's
    /// neighbours per relation. Edits of the open window are included (the
    /// window itself is not: [`Pkg::from_parts`] starts with a closed one).
    pub fn to_parts(&self) -> PkgParts {
        let mut free: Vec<u32> = self
            .free
            .iter()
            .chain(&self.pending_free)
            .copied()
            .collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        PkgParts {
            relations: self.relations.clone(),
            ext: self
                .ext
                .iter()
                .map(|e| e.as_deref().map(String::from))
                .collect(),
            free,
            adj: self.adj.clone(),
        }
    }

    /// The graph of [`Pkg::to_parts`] (a new graph identity, no open
    /// changes: a propagator is built over it in full). Checks that the
    /// parts are consistent: every neighbour list sorted, symmetric, within
    /// the slots and between live items, and ids unique.
    pub fn from_parts(parts: PkgParts) -> Result<Self> {
        let PkgParts {
            relations,
            ext,
            free,
            adj,
        } = parts;
        let mut g = Self::new(relations)?;
        let n = ext.len();
        let bad = |why: String| Error::InvalidParts(why);
        if adj.len() != g.relations.len() {
            return Err(bad(format!(
                "{} adjacency lists for {} relations",
                adj.len(),
                g.relations.len()
            )));
        }
        let mut index = HashMap::with_capacity(n);
        for (x, e) in ext.iter().enumerate() {
            if let Some(id) = e {
                if index
                    .insert(Box::<str>::from(id.as_str()), x as u32)
                    .is_some()
                {
                    return Err(bad(format!("item {id} in two slots")));
                }
            }
        }
        for &f in &free {
            if ext.get(f as usize).is_none_or(Option::is_some) {
                return Err(bad(format!(
                    "free slot {f} holds an item or is out of range"
                )));
            }
        }
        let mut edges = vec![0; adj.len()];
        for (r, rel) in adj.iter().enumerate() {
            if rel.len() != n {
                return Err(bad(format!(
                    "relation {r}: {} rows for {n} slots",
                    rel.len()
                )));
            }
            for (x, list) in rel.iter().enumerate() {
                if !list.is_empty() && ext[x].is_none() {
                    return Err(bad(format!("free slot {x} has edges")));
                }
                if !list.windows(2).all(|w| w[0] < w[1]) {
                    return Err(bad(format!(
                        "relation {r}, slot {x}: neighbours not sorted"
                    )));
                }
                for &y in list {
                    let ok = y as usize != x
                        && rel
                            .get(y as usize)
                            .is_some_and(|l| l.binary_search(&(x as u32)).is_ok());
                    if !ok {
                        return Err(bad(format!(
                            "relation {r}: edge {x} - {y} is not symmetric"
                        )));
                    }
                }
                edges[r] += list.len();
            }
            edges[r] /= 2;
        }
        g.ext = ext
            .into_iter()
            .map(|e| e.map(String::into_boxed_str))
            .collect();
        g.index = index;
        g.free = free;
        g.adj = adj;
        g.edges = edges;
        for mark in &mut g.changes.touched_mark {
            mark.resize(n, false);
        }
        g.changes.item_mark.resize(n, false);
        Ok(g)
    }

    /// Whether edits were made since the last [`Pkg::take_changes`].
    pub fn has_pending_changes(&self) -> bool {
        !self.changes.items.is_empty() || self.changes.touched.iter().any(|t| !t.is_empty())
    }

    /// Number of edits that changed the graph so far (added or removed items
    /// and edges); a batch covers a range of them.
    pub fn edits(&self) -> u64 {
        self.edits
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }
}

/// A relation's `S_r` in compressed sparse row form (square, one row per slot,
/// column indexes sorted within a row).
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizedAdjacency {
    /// Number of rows and columns (the graph's slots).
    pub n: usize,
    /// Row `x` spans `indices[indptr[x]..indptr[x + 1]]`; `n + 1` entries.
    pub indptr: Vec<usize>,
    /// Column of each stored entry.
    pub indices: Vec<u32>,
    /// Value of each stored entry: `1 / sqrt((deg(x) + 1)(deg(y) + 1))`.
    pub values: Vec<f32>,
}

impl NormalizedAdjacency {
    /// Number of stored entries (twice the edges plus one per live item).
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// The dense `n × n` matrix (for tests and small graphs).
    pub fn to_dense(&self) -> Array2<f32> {
        let mut dense = Array2::zeros((self.n, self.n));
        for x in 0..self.n {
            for p in self.indptr[x]..self.indptr[x + 1] {
                dense[[x, self.indices[p] as usize]] = self.values[p];
            }
        }
        dense
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_are_checked() {
        let mut g = path3();
        let w = g.add_item("w");
        g.add_edge(1, w, 0).unwrap();
        g.remove_item("y").unwrap();
        let parts = g.to_parts();
        assert_eq!(parts.free, vec![1], "y's slot, freed in the open window");
        let h = Pkg::from_parts(parts.clone()).unwrap();
        assert_eq!(h.to_parts(), parts);
        assert_eq!(h.edge_counts(), g.edge_counts());
        assert_eq!(h.item_index("w"), Some(w));
        assert!(!h.has_pending_changes());
        // The freed slot is reused, new items and edges work.
        let mut h = h;
        assert_eq!(h.add_item("v"), 1);
        h.add_edge(0, 1, w).unwrap();

        let mut bad = parts.clone();
        bad.adj[0][0].push(3); // 0 - 3 listed one way only
        assert!(matches!(Pkg::from_parts(bad), Err(Error::InvalidParts(_))));
        let mut bad = parts.clone();
        bad.ext[2] = Some("x".into());
        assert!(Pkg::from_parts(bad).is_err(), "an id in two slots");
        let mut bad = parts;
        bad.free = vec![0];
        assert!(Pkg::from_parts(bad).is_err(), "a live slot listed free");
    }

    fn path3() -> Pkg {
        let mut g = Pkg::new(["a", "b"]).unwrap();
        let x = g.add_item("x");
        let y = g.add_item("y");
        let z = g.add_item("z");
        assert!(g.add_edge(0, x, y).unwrap());
        assert!(g.add_edge(0, y, z).unwrap());
        g
    }

    #[test]
    fn items_and_edges() {
        let mut g = path3();
        assert_eq!(g.num_items(), 3);
        assert_eq!(g.add_item("y"), 1, "adding an existing id returns its slot");
        assert_eq!(g.item_index("z"), Some(2));
        assert_eq!(g.ext_id(2), Some("z"));
        assert_eq!(g.neighbours(0, 1).unwrap(), &[0, 2]);
        assert_eq!(g.degree(1, 1).unwrap(), 0);
        assert!(
            !g.add_edge(0, 1, 0).unwrap(),
            "edges are undirected and idempotent"
        );
        assert_eq!(g.edge_counts(), &[2, 0]);
        assert_eq!(
            g.edges(0).unwrap().collect::<Vec<_>>(),
            vec![(0, 1), (1, 2)]
        );
        assert!(g.remove_edge(0, 2, 1).unwrap());
        assert!(!g.remove_edge(0, 2, 1).unwrap());
        assert_eq!(g.edge_count(0).unwrap(), 1);
        assert!(!g.has_edge(0, 1, 2).unwrap());
    }

    #[test]
    fn neighbour_scores_are_the_weighted_share_of_adjacent_items() {
        let mut g = path3();
        g.add_edge(1, 0, 2).unwrap();
        // User with x and z: y neighbours both under "a" (share 1), x and z
        // neighbour each other under "b" (share 1/2 each).
        let mut s = vec![0.0f32; 3];
        g.add_neighbour_scores(&[2.0, 10.0], &[0, 2], ArrayViewMut1::from(s.as_mut_slice()));
        assert_eq!(s, vec![5.0, 2.0, 5.0]);
        let mut s = vec![1.0f32; 3];
        g.add_neighbour_scores(&[0.0, 0.0], &[0, 2], ArrayViewMut1::from(s.as_mut_slice()));
        assert_eq!(s, vec![1.0; 3], "zero weights change nothing");
        g.add_neighbour_scores(&[1.0], &[], ArrayViewMut1::from(s.as_mut_slice()));
        assert_eq!(s, vec![1.0; 3], "no items, no term");
        g.add_neighbour_scores(&[1.0], &[1, 99], ArrayViewMut1::from(s.as_mut_slice()));
        assert_eq!(
            s,
            vec![1.5, 1.0, 1.5],
            "unknown slots count in the share only"
        );
    }

    #[test]
    fn removing_an_item_drops_its_edges_and_frees_its_slot_after_the_window() {
        let mut g = path3();
        assert_eq!(g.remove_item("y"), Some(1));
        assert_eq!(g.remove_item("y"), None);
        assert!(!g.remove_item_at(1));
        assert_eq!(g.edge_count(0).unwrap(), 0);
        assert_eq!(g.neighbours(0, 0).unwrap(), &[] as &[u32]);
        assert_eq!(g.num_items(), 2);
        assert_eq!(
            g.add_item("w"),
            3,
            "no reuse inside the window that freed the slot"
        );
        let batch = g.take_changes();
        assert!(batch.items().contains(&1) && batch.items().contains(&3));
        assert_eq!(
            g.add_item("v"),
            1,
            "the freed slot is reused after the window"
        );
        assert_eq!(g.slots(), 4);
    }

    #[test]
    fn errors_not_panics_on_unknown_things() {
        let mut g = path3();
        assert_eq!(g.add_edge(2, 0, 1), Err(Error::UnknownRelation(2)));
        assert_eq!(g.add_edge(0, 0, 9), Err(Error::UnknownItem(9)));
        assert_eq!(g.remove_edge(0, 7, 9), Err(Error::UnknownItem(7)));
        assert_eq!(g.add_edge(0, 1, 1), Err(Error::SelfLoop(1)));
        assert_eq!(
            g.remove_edge(0, u32::MAX, 0),
            Err(Error::UnknownItem(u32::MAX))
        );
        assert_eq!(g.degree(0, 5), Err(Error::UnknownItem(5)));
        assert_eq!(
            g.neighbours(usize::MAX, 0),
            Err(Error::UnknownRelation(usize::MAX))
        );
        assert!(g.normalized_adjacency(3).is_err());
        assert!(!g.remove_item_at(u32::MAX));
        assert_eq!(g.remove_item("nope"), None);
        g.remove_item("x");
        assert_eq!(
            g.add_edge(0, 0, 1),
            Err(Error::UnknownItem(0)),
            "a removed item is unknown"
        );
        assert!(matches!(
            Pkg::new(["r", "r"]),
            Err(Error::DuplicateRelation(_))
        ));
    }

    #[test]
    fn normalized_adjacency_of_a_path() {
        let mut g = path3();
        g.add_item("isolated");
        let s = g.normalized_adjacency(0).unwrap().to_dense();
        // Degrees with self-loops: 2, 3, 2, 1.
        let w = |a: f32, b: f32| 1.0 / (a * b).sqrt();
        let want = ndarray::arr2(&[
            [w(2., 2.), w(2., 3.), 0., 0.],
            [w(3., 2.), w(3., 3.), w(3., 2.), 0.],
            [0., w(2., 3.), w(2., 2.), 0.],
            [0., 0., 0., 1.],
        ]);
        assert!((&s - &want).iter().all(|d| d.abs() < 1e-7), "{s}");
        assert_eq!(
            g.normalized_adjacency(1).unwrap().nnz(),
            4,
            "self-loops only"
        );
    }

    #[test]
    fn changes_are_deduplicated_and_reset_by_take() {
        let mut g = path3();
        g.take_changes();
        assert!(!g.has_pending_changes());
        for _ in 0..5 {
            g.add_edge(0, 0, 2).unwrap();
            g.remove_edge(0, 0, 2).unwrap();
        }
        let b = g.take_changes();
        assert_eq!(b.touched(0), &[0, 2]);
        assert!(b.touched(1).is_empty() && b.items().is_empty());
        assert_eq!(
            b.edits(),
            Some(5..15),
            "3 items and 2 edges, then 10 edge edits"
        );
        assert!(g.take_changes().is_empty());
    }
}
