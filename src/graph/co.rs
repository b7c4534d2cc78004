//! Behavioural PKG relations (`co_interacted`, `co_liked`) learnt from the
//! interaction stream, one interaction at a time (MPKG §4.1's co-interaction
//! relations, made online).
//!
//! The offline builder (`crate::train::pkg_build`) and the engine both feed
//! [`CoGraph::interact`] the same interactions in the same order (the stream's
//! order), so the graph a model is trained and evaluated on is the graph the
//! engine holds after consuming those interactions: equal, edge for edge.
//!
//! Per interaction of user `u` with an item `i` new to `u`:
//! 1. `i`'s user count goes up, and its co-occurrence count with each item of
//!    `u`'s history window (the `window` most recent distinct items before
//!    `i`) goes up by one;
//! 2. `i`'s neighbour list is re-selected from all its co-occurring items:
//!    the `neighbours` best by cosine `c_ij / sqrt(n_i n_j)` among those with
//!    at least `min_co_users` shared users;
//! 3. each window item `j` re-considers `i` as a candidate for its own list
//!    (insert, or update `i`'s score, or evict its weakest entry); the other
//!    entries of `j`'s list keep the scores they were selected with.
//!
//! An edge `{a, b}` exists while `b` is in `a`'s list or `a` in `b`'s. The edge
//! additions and removals an interaction causes are returned, so the engine
//! applies them to its PKG and they propagate like catalogue edges.
//!
//! Step 3 keeps the other entries' old scores, and which users' interactions
//! came first changes which lists were re-selected when, so the lists depend
//! on how users' streams interleave (the partitions' read order), not only on
//! the interactions. [`CoGraph::settle`] removes that: it re-selects in full,
//! from the current counts, every list that could differ from a full
//! re-selection (the nodes touched since the last settle and their
//! co-occurring nodes). After a settle the graph is a function of the counts,
//! and the counts are a function of each user's own order alone. The engine
//! settles when idle; the offline builder once, at the end; both then hold
//! the same graph, however the partitions were read.
//!
//! Ties between equal scores go to the smaller node key (a hash of the item's
//! external id, so slots and dataset indexes order the same way), then the
//! smaller node. Memory: one count per co-occurring pair within a window, so
//! the window bounds it by `window` new pairs per interaction.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// Settings of one behavioural relation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CoConfig {
    /// Neighbours kept per item.
    pub neighbours: usize,
    /// Least shared users for an edge.
    pub min_co_users: usize,
    /// Most recent distinct items of a user that a new interaction pairs with.
    pub window: usize,
}

/// An edge change caused by an interaction, `a < b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EdgeChange {
    /// The edge appears.
    Add(u32, u32),
    /// The edge disappears.
    Remove(u32, u32),
}

/// One behavioural relation over `u32` nodes (engine slots or dataset items).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoGraph {
    cfg: CoConfig,
    /// Users per node.
    users: Vec<u32>,
    /// Node keys for tie-breaks.
    keys: Vec<u64>,
    /// Co-occurrence counts per node.
    co: Vec<HashMap<u32, u32>>,
    /// Neighbour list per node, `(node, score)`, best first.
    lists: Vec<Vec<(u32, f32)>>,
    /// Nodes whose user count, counts or list changed since the last
    /// [`Self::settle`]. Not in snapshots: a loaded graph settles in full
    /// ([`Self::unsettle_all`]).
    #[serde(skip)]
    dirty: BTreeSet<u32>,
}

impl CoGraph {
    /// An empty relation.
    pub fn new(cfg: CoConfig) -> Self {
        Self {
            cfg,
            users: Vec::new(),
            keys: Vec::new(),
            co: Vec::new(),
            lists: Vec::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> CoConfig {
        self.cfg
    }

    fn grow(&mut self, node: u32) {
        let n = node as usize + 1;
        if self.users.len() < n {
            self.users.resize(n, 0);
            self.keys.resize(n, 0);
            self.co.resize_with(n, HashMap::new);
            self.lists.resize_with(n, Vec::new);
        }
    }

    /// Sets the tie-break key of `node` (a hash of its external id); call it
    /// before the node's first interaction.
    pub fn set_key(&mut self, node: u32, key: u64) {
        self.grow(node);
        self.keys[node as usize] = key;
    }

    /// `node`'s neighbour list, best first.
    pub fn neighbours(&self, node: u32) -> impl Iterator<Item = u32> + '_ {
        self.lists
            .get(node as usize)
            .into_iter()
            .flatten()
            .map(|p| p.0)
    }

    /// Whether the edge `{a, b}` exists.
    pub fn has_edge(&self, a: u32, b: u32) -> bool {
        let listed = |x: u32, y: u32| {
            self.lists
                .get(x as usize)
                .is_some_and(|l| l.iter().any(|p| p.0 == y))
        };
        listed(a, b) || listed(b, a)
    }

    /// Every edge `(a, b)`, `a < b`, in order.
    pub fn edges(&self) -> Vec<(u32, u32)> {
        let mut out = BTreeSet::new();
        for (a, l) in self.lists.iter().enumerate() {
            for &(b, _) in l {
                let a = a as u32;
                out.insert((a.min(b), a.max(b)));
            }
        }
        out.into_iter().collect()
    }

    /// Forgets `node` (an item leaving the graph): its user count, its
    /// co-occurrence counts on both sides, and every edge it is in, which
    /// are returned as removals, sorted. The lists that held it are one
    /// shorter until their node's next interaction re-selects them; the
    /// node can be reused (its key set again) by a new item.
    pub fn remove(&mut self, node: u32) -> Vec<EdgeChange> {
        let x = node as usize;
        if x >= self.users.len() {
            return Vec::new();
        }
        let mut gone: BTreeSet<(u32, u32)> = self.lists[x]
            .iter()
            .map(|&(j, _)| (node.min(j), node.max(j)))
            .collect();
        // Counts are symmetric and lists are drawn from counts: the nodes
        // that list `node` are among its co-occurring ones.
        let partners: Vec<u32> = self.co[x].keys().copied().collect();
        for j in partners {
            let j_ = j as usize;
            self.dirty.insert(j);
            self.co[j_].remove(&node);
            if let Some(p) = self.lists[j_].iter().position(|p| p.0 == node) {
                self.lists[j_].remove(p);
                gone.insert((node.min(j), node.max(j)));
            }
        }
        self.co[x] = HashMap::new();
        self.lists[x] = Vec::new();
        self.users[x] = 0;
        self.keys[x] = 0;
        self.dirty.insert(node);
        gone.into_iter()
            .map(|(a, b)| EdgeChange::Remove(a, b))
            .collect()
    }

    fn score(&self, a: u32, b: u32, c: u32) -> f32 {
        let (na, nb) = (self.users[a as usize], self.users[b as usize]);
        c as f32 / ((na as f32) * (nb as f32)).sqrt()
    }

    /// `x` ranks before `y`: higher score, then smaller key, then smaller node.
    fn before(&self, x: (u32, f32), y: (u32, f32)) -> bool {
        match x.1.total_cmp(&y.1) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                (self.keys[x.0 as usize], x.0) < (self.keys[y.0 as usize], y.0)
            }
        }
    }

    /// [`Self::before`] as an ordering, best first.
    fn order(&self, x: (u32, f32), y: (u32, f32)) -> std::cmp::Ordering {
        if self.before(x, y) {
            std::cmp::Ordering::Less
        } else if self.before(y, x) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }

    fn sort(&self, list: &mut [(u32, f32)]) {
        list.sort_by(|&x, &y| self.order(x, y));
    }

    /// `node`'s list selected in full from the current counts: the
    /// `neighbours` best by (score, key, node) among nodes with at least
    /// `min_co_users` shared users.
    fn select(&self, node: u32) -> Vec<(u32, f32)> {
        let min = self.cfg.min_co_users.max(1) as u32;
        let mut cand: Vec<(u32, f32)> = self.co[node as usize]
            .iter()
            .filter(|&(_, &c)| c >= min)
            .map(|(&j, &c)| (j, self.score(node, j, c)))
            .collect();
        let k = self.cfg.neighbours;
        if cand.len() > k {
            // The order is total (score, key, node): the k best by a partial
            // selection are the k best of a full sort.
            cand.select_nth_unstable_by(k, |&x, &y| self.order(x, y));
            cand.truncate(k);
        }
        self.sort(&mut cand);
        cand
    }

    /// Adds `weight` × the mean, over `items` (a user's items), of each
    /// item's cosine `c_ij / sqrt(n_i n_j)` with every node it co-occurs
    /// with (every count, as the `itemknn` baseline counts; `min_co_users`
    /// bounds the graph's edges, not this): item-kNN over the stream's
    /// counts, for ranking. It reads the counts alone, which are a
    /// function of each user's own order, so it needs no settle and the
    /// engine and `thaw eval` add the same scores. Items and nodes outside
    /// `scores` are passed over.
    pub fn add_similarity_scores(
        &self,
        weight: f32,
        items: &[u32],
        scores: ndarray::ArrayViewMut1<'_, f32>,
    ) {
        self.add_similarity_scores_to(weight, items, scores, |_| true);
    }

    /// [`Self::add_similarity_scores`] for the candidates `accept` takes
    /// only; the others are left as they are.
    pub fn add_similarity_scores_to(
        &self,
        weight: f32,
        items: &[u32],
        mut scores: ndarray::ArrayViewMut1<'_, f32>,
        accept: impl Fn(u32) -> bool,
    ) {
        if items.is_empty() || weight == 0.0 {
            return;
        }
        let share = weight / items.len() as f32;
        for &i in items {
            let Some(co) = self.co.get(i as usize) else {
                continue;
            };
            let ni = self.users[i as usize] as f32;
            for (&j, &c) in co {
                if !accept(j) {
                    continue;
                }
                if let Some(s) = scores.get_mut(j as usize) {
                    *s += share * c as f32 / (ni * self.users[j as usize] as f32).sqrt();
                }
            }
        }
    }

    /// Whether a settle has work: something changed since the last one.
    pub fn is_settled(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Marks every node for the next [`Self::settle`] (after a snapshot is
    /// loaded, whose lists may come from another interleaving).
    pub fn unsettle_all(&mut self) {
        self.dirty = (0..self.users.len() as u32).collect();
    }

    /// Re-selects in full, from the current counts, the list of every node
    /// that changed since the last settle and of every node co-occurring
    /// with one (their scores moved with its user count). Afterwards every
    /// list is what a full re-selection gives, so the graph depends on the
    /// counts alone. Returns the edge changes, sorted.
    pub fn settle(&mut self) -> Vec<EdgeChange> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut nodes: BTreeSet<u32> = BTreeSet::new();
        for &d in &dirty {
            let Some(co) = self.co.get(d as usize) else {
                continue;
            };
            nodes.insert(d);
            nodes.extend(co.keys().copied());
        }
        let fresh: Vec<(u32, Vec<(u32, f32)>)> =
            nodes.iter().map(|&a| (a, self.select(a))).collect();
        let mut affected: BTreeSet<(u32, u32)> = BTreeSet::new();
        for (a, list) in &fresh {
            for &(b, _) in self.lists[*a as usize].iter().chain(list) {
                affected.insert((b.min(*a), b.max(*a)));
            }
        }
        let before: Vec<bool> = affected.iter().map(|&(a, b)| self.has_edge(a, b)).collect();
        for (a, list) in fresh {
            self.lists[a as usize] = list;
        }
        affected
            .into_iter()
            .zip(before)
            .filter_map(|((a, b), was)| match (was, self.has_edge(a, b)) {
                (false, true) => Some(EdgeChange::Add(a, b)),
                (true, false) => Some(EdgeChange::Remove(a, b)),
                _ => None,
            })
            .collect()
    }

    /// Applies one interaction: a user whose history window (most recent
    /// last; only its last `window` entries are used) gains `item`. Returns
    /// the edge changes, sorted.
    pub fn interact(&mut self, history: &[u32], item: u32) -> Vec<EdgeChange> {
        let start = history.len().saturating_sub(self.cfg.window);
        let window: Vec<u32> = history[start..]
            .iter()
            .copied()
            .filter(|&j| j != item)
            .collect();
        self.grow(item);
        for &j in &window {
            self.grow(j);
        }
        self.users[item as usize] += 1;
        self.dirty.insert(item);
        self.dirty.extend(window.iter().copied());
        for &j in &window {
            *self.co[item as usize].entry(j).or_insert(0) += 1;
            *self.co[j as usize].entry(item).or_insert(0) += 1;
        }
        // Pairs whose edge may change: (item, old or new neighbour of item),
        // and (j, dropped entry of j) for each window item j.
        let mut affected: BTreeSet<(u32, u32)> = BTreeSet::new();
        let mut before: Vec<(u32, u32)> = Vec::new();
        let note = |a: u32, b: u32, affected: &mut BTreeSet<(u32, u32)>| {
            affected.insert((a.min(b), a.max(b)));
        };

        // 2. item's list, re-selected in full.
        let min = self.cfg.min_co_users.max(1) as u32;
        let cand = self.select(item);
        for &(j, _) in self.lists[item as usize].iter().chain(&cand) {
            note(item, j, &mut affected);
        }
        // 3. each window item re-considers item.
        let mut updates: Vec<(u32, Vec<(u32, f32)>)> = Vec::new();
        for &j in &window {
            let c = self.co[j as usize][&item];
            if c < min {
                continue;
            }
            let s = self.score(j, item, c);
            let mut list = self.lists[j as usize].clone();
            if let Some(p) = list.iter_mut().find(|p| p.0 == item) {
                p.1 = s;
            } else {
                list.push((item, s));
            }
            self.sort(&mut list);
            if list.len() > self.cfg.neighbours {
                let dropped = list.pop().expect("longer than neighbours");
                note(j, dropped.0, &mut affected);
            }
            note(j, item, &mut affected);
            updates.push((j, list));
        }
        for &(a, b) in &affected {
            if self.has_edge(a, b) {
                before.push((a, b));
            }
        }
        self.lists[item as usize] = cand;
        for (j, list) in updates {
            self.lists[j as usize] = list;
        }
        let mut out = Vec::new();
        for &(a, b) in &affected {
            let was = before.binary_search(&(a, b)).is_ok();
            let is = self.has_edge(a, b);
            match (was, is) {
                (false, true) => out.push(EdgeChange::Add(a, b)),
                (true, false) => out.push(EdgeChange::Remove(a, b)),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(neighbours: usize, min_co_users: usize, window: usize) -> CoConfig {
        CoConfig {
            neighbours,
            min_co_users,
            window,
        }
    }

    /// The item-kNN scores are the mean over the user's items of the
    /// cosine over users, computed here from the users' item sets directly
    /// (every user within the window), whatever order the users came in.
    #[test]
    fn similarity_scores_are_item_knn_cosines() {
        let users: [&[u32]; 5] = [&[0, 1, 2], &[1, 2], &[0, 3], &[2, 3, 4], &[1, 4]];
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for (u, its) in users.iter().enumerate().rev() {
            pairs.extend(its.iter().map(|&i| (u as u32, i)));
        }
        let mut g = CoGraph::new(cfg(1, 2, 100));
        replay(&mut g, &pairs);
        let n = |i: u32| users.iter().filter(|s| s.contains(&i)).count() as f32;
        let c = |i: u32, j: u32| {
            users
                .iter()
                .filter(|s| s.contains(&i) && s.contains(&j))
                .count() as f32
        };
        let mine = [0u32, 2];
        let mut got = ndarray::Array1::<f32>::zeros(6);
        g.add_similarity_scores(3.0, &mine, got.view_mut());
        for j in 0..6u32 {
            let want: f32 = mine
                .iter()
                .filter(|&&i| i != j && j < 5)
                .map(|&i| c(i, j) / (n(i) * n(j)).sqrt())
                .sum::<f32>()
                * 3.0
                / mine.len() as f32;
            assert!(
                (got[j as usize] - want).abs() < 1e-6,
                "{j}: {} vs {want}",
                got[j as usize]
            );
        }
        // Pairs seen by one user only count too (item 4 with 3, via user 3).
        assert!(got[4] > 0.0);
        // No items or a zero weight add nothing.
        let mut none = ndarray::Array1::<f32>::zeros(6);
        g.add_similarity_scores(3.0, &[], none.view_mut());
        g.add_similarity_scores(0.0, &mine, none.view_mut());
        assert!(none.iter().all(|&x| x == 0.0));
    }

    /// Replays `(user, item)` pairs through a graph, applying its changes to
    /// an explicit edge set.
    fn replay(g: &mut CoGraph, pairs: &[(u32, u32)]) -> BTreeSet<(u32, u32)> {
        let mut hist: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut edges = BTreeSet::new();
        for &(u, i) in pairs {
            let h = hist.entry(u).or_default();
            if h.contains(&i) {
                continue;
            }
            for ch in g.interact(h, i) {
                match ch {
                    EdgeChange::Add(a, b) => assert!(edges.insert((a, b)), "added twice"),
                    EdgeChange::Remove(a, b) => assert!(edges.remove(&(a, b)), "absent removed"),
                }
            }
            h.push(i);
        }
        edges
    }

    /// Replays `all[range]`, each user's history taken from the pairs
    /// before it; returns the changes.
    fn replay_range(
        g: &mut CoGraph,
        all: &[(u32, u32)],
        range: std::ops::Range<usize>,
    ) -> Vec<EdgeChange> {
        let mut hist: HashMap<u32, Vec<u32>> = HashMap::new();
        for &(u, i) in &all[..range.start] {
            let h = hist.entry(u).or_default();
            if !h.contains(&i) {
                h.push(i);
            }
        }
        let mut out = Vec::new();
        for &(u, i) in &all[range] {
            let h = hist.entry(u).or_default();
            if h.contains(&i) {
                continue;
            }
            out.extend(g.interact(h, i));
            h.push(i);
        }
        out
    }

    #[test]
    fn co_interactions_link_items_with_enough_shared_users() {
        let mut g = CoGraph::new(cfg(10, 2, 50));
        // Users 0 and 1 both have items 1 and 2; item 3 shares one user.
        let edges = replay(&mut g, &[(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]);
        assert_eq!(edges.into_iter().collect::<Vec<_>>(), vec![(1, 2)]);
        let mut g = CoGraph::new(cfg(10, 1, 50));
        let edges = replay(&mut g, &[(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]);
        assert_eq!(
            edges.into_iter().collect::<Vec<_>>(),
            vec![(1, 2), (1, 3), (2, 3)]
        );
        // cos(1, 2) = 2 / sqrt(2 * 2) = 1 ranks before cos(1, 3) = 1 / sqrt(2).
        assert_eq!(g.neighbours(1).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn the_window_bounds_the_pairs_and_lists_the_neighbours() {
        let mut g = CoGraph::new(cfg(1, 1, 2));
        // One user: 1, 2, 3, 4; item 4 pairs with 2 and 3 only (window 2).
        let edges = replay(&mut g, &[(0, 1), (0, 2), (0, 3), (0, 4)]);
        assert!(!g.has_edge(1, 4));
        // One neighbour each: every list holds one entry, ties to the smaller node.
        for n in 1..=4 {
            assert!(g.neighbours(n).count() <= 1);
        }
        assert_eq!(edges.into_iter().collect::<Vec<_>>(), g.edges());
    }

    #[test]
    fn a_removed_node_leaves_no_edge_or_count_behind() {
        let mut g = CoGraph::new(cfg(10, 1, 50));
        let before = replay(&mut g, &[(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
        assert!(before.contains(&(1, 2)) && before.contains(&(2, 3)));
        let removed = g.remove(2);
        assert_eq!(
            removed,
            vec![EdgeChange::Remove(1, 2), EdgeChange::Remove(2, 3)]
        );
        assert_eq!(g.edges(), vec![(1, 3)]);
        assert!(g.co.iter().all(|c| !c.contains_key(&2)));
        assert_eq!(g.users[2], 0);
        // Reused by a new item: it starts from nothing.
        g.set_key(2, 99);
        let mut edges: BTreeSet<(u32, u32)> = g.edges().into_iter().collect();
        for ch in g.interact(&[1], 2) {
            match ch {
                EdgeChange::Add(a, b) => assert!(edges.insert((a, b))),
                EdgeChange::Remove(a, b) => assert!(edges.remove(&(a, b))),
            }
        }
        assert_eq!(edges.into_iter().collect::<Vec<_>>(), g.edges());
        assert_eq!(g.users[2], 1);
        assert!(g.remove(1000).is_empty(), "an unknown node is a no-op");
    }

    proptest! {
        /// The returned changes always describe the graph's edge set, and the
        /// same pairs give the same graph (determinism).
        #[test]
        fn changes_track_the_edge_set(
            pairs in prop::collection::vec((0u32..12, 0u32..30), 0..300),
            k in 1usize..5, min in 1usize..3, window in 1usize..8,
        ) {
            let mut g = CoGraph::new(cfg(k, min, window));
            for n in 0..30 {
                g.set_key(n, (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
            let edges = replay(&mut g, &pairs);
            prop_assert_eq!(edges.into_iter().collect::<Vec<_>>(), g.edges());
            let mut h = CoGraph::new(cfg(k, min, window));
            for n in 0..30 {
                h.set_key(n, (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
            replay(&mut h, &pairs);
            prop_assert_eq!(g.edges(), h.edges());
            for n in 0..30 {
                prop_assert!(g.neighbours(n).count() <= k);
            }
        }

        /// After a settle the graph depends on each user's own order alone:
        /// the same pairs read user by user (another interleaving of the
        /// users' streams, as partitions read in another order give), with
        /// settles at arbitrary points in one of the runs, end in the same
        /// edges; the settles' changes track the edge set, and every list
        /// is its full re-selection.
        #[test]
        fn settled_graphs_do_not_depend_on_the_interleaving(
            pairs in prop::collection::vec((0u32..12, 0u32..30), 0..300),
            settle_every in 1usize..40,
            k in 1usize..5, min in 1usize..3, window in 1usize..8,
        ) {
            let new = || {
                let mut g = CoGraph::new(cfg(k, min, window));
                for n in 0..30 {
                    g.set_key(n, (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                }
                g
            };
            let track = |edges: &mut BTreeSet<(u32, u32)>, changes: Vec<EdgeChange>| {
                for ch in changes {
                    match ch {
                        EdgeChange::Add(a, b) => assert!(edges.insert((a, b)), "added twice"),
                        EdgeChange::Remove(a, b) => assert!(edges.remove(&(a, b)), "absent removed"),
                    }
                }
            };
            // Interleaved as given, settling every few pairs.
            let mut g = new();
            let mut edges = BTreeSet::new();
            for lo in (0..pairs.len()).step_by(settle_every) {
                let hi = (lo + settle_every).min(pairs.len());
                track(&mut edges, replay_range(&mut g, &pairs, lo..hi));
                track(&mut edges, g.settle());
            }
            prop_assert!(g.is_settled());
            prop_assert_eq!(edges.iter().copied().collect::<Vec<_>>(), g.edges());
            for n in 0..30 {
                prop_assert_eq!(&g.lists[n as usize], &g.select(n));
            }
            // User by user, one settle at the end.
            let mut by_user = pairs.clone();
            by_user.sort_by_key(|p| p.0);
            let mut h = new();
            let mut edges = replay(&mut h, &by_user);
            track(&mut edges, h.settle());
            prop_assert_eq!(edges.into_iter().collect::<Vec<_>>(), h.edges());
            prop_assert_eq!(g.edges(), h.edges());
        }

        /// With nodes removed among the interactions (and dropped from the
        /// users' histories, as the engine does), the changes still describe
        /// the edge set, and no count is left on a removed node.
        #[test]
        fn removals_track_the_edge_set(
            ops in prop::collection::vec((0u32..12, 0u32..30, prop::bool::weighted(0.1)), 0..300),
            k in 1usize..5, min in 1usize..3, window in 1usize..8,
        ) {
            let key = |n: u32| (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut g = CoGraph::new(cfg(k, min, window));
            for n in 0..30 {
                g.set_key(n, key(n));
            }
            let mut hist: HashMap<u32, Vec<u32>> = HashMap::new();
            let mut edges = BTreeSet::new();
            for (u, i, remove) in ops {
                let changes = if remove {
                    for h in hist.values_mut() {
                        h.retain(|&x| x != i);
                    }
                    let ch = g.remove(i);
                    prop_assert!(g.co.iter().all(|c| !c.contains_key(&i)));
                    g.set_key(i, key(i));
                    ch
                } else {
                    let h = hist.entry(u).or_default();
                    if h.contains(&i) {
                        continue;
                    }
                    let ch = g.interact(h, i);
                    h.push(i);
                    ch
                };
                for ch in changes {
                    match ch {
                        EdgeChange::Add(a, b) => prop_assert!(edges.insert((a, b)), "added twice"),
                        EdgeChange::Remove(a, b) => prop_assert!(edges.remove(&(a, b)), "absent removed"),
                    }
                }
            }
            prop_assert_eq!(edges.into_iter().collect::<Vec<_>>(), g.edges());
        }
    }
}
