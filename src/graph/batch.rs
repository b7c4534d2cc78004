//! A window of graph edits and input-row updates for the incremental
//! propagation of MPKG eq. 1 ([`super::Propagator::apply`]).

use std::collections::BTreeMap;

use ndarray::ArrayView2;

use super::pkg::EdgeEdit;

/// Which graph a batch came from and which of its edits (numbered in order,
/// see [`super::Pkg::edits`]) the batch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Origin {
    pub(super) graph: u64,
    pub(super) edits: std::ops::Range<u64>,
}

/// What changed during one window: the slots each relation's edits touched
/// (the endpoints of added and removed edges, whose degrees and therefore
/// whose normalisation changed), the slots whose item was added or removed,
/// and new input rows `H_0 = X W_r`.
///
/// Graph changes come only from [`super::Pkg::take_changes`], which keeps them
/// complete: the engine edits the [`super::Pkg`] freely over a short window,
/// takes the batch, adds the input rows of the items added in that window
/// (and of any item whose features changed), and applies it once.
/// [`Batch::new`] makes an input-only batch.
///
/// Memory is bounded by the number of slots, not by the number of edits.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub(super) origin: Option<Origin>,
    pub(super) touched: Vec<Vec<u32>>,
    pub(super) items: Vec<u32>,
    /// `(relation, slot) -> row`; ordered so a relation's rows are one range.
    pub(super) inputs: BTreeMap<(usize, u32), Vec<f32>>,
    /// Per relation, the window's edge edits in order; `None` when the window
    /// logged more than [`super::pkg::MAX_LOGGED_EDITS`].
    pub(super) log: Option<Vec<Vec<EdgeEdit>>>,
}

impl Batch {
    /// An empty, input-only batch (no graph changes), applicable at any time.
    pub fn new() -> Self {
        Self::default()
    }

    pub(super) fn from_changes(
        origin: Origin,
        touched: Vec<Vec<u32>>,
        items: Vec<u32>,
        log: Option<Vec<Vec<EdgeEdit>>>,
    ) -> Self {
        Self {
            origin: Some(origin),
            touched,
            items,
            inputs: BTreeMap::new(),
            log,
        }
    }

    /// The edge edits of relation `relation` in order, `None` when the window
    /// logged too many to keep (an input-only batch has none).
    pub(super) fn log(&self, relation: usize) -> Option<&[EdgeEdit]> {
        match &self.log {
            Some(l) => Some(l.get(relation).map_or(&[], Vec::as_slice)),
            None if self.origin.is_none() => Some(&[]),
            None => None,
        }
    }

    /// Sets the input row `H_0[item]` of relation `relation` (the item's
    /// projection `X W_r`), replacing any row set before. Checked against the
    /// graph and the propagator when applied.
    pub fn set_input(&mut self, relation: usize, item: u32, row: &[f32]) {
        self.inputs.insert((relation, item), row.to_vec());
    }

    /// Sets the input rows of `item` for every relation from an `R × d` view,
    /// row `r` for relation `r` (one item's slice of `item_projection`'s
    /// `[N, R, d]` output).
    pub fn set_inputs(&mut self, item: u32, rows: ArrayView2<'_, f32>) {
        for (r, row) in rows.outer_iter().enumerate() {
            self.inputs.insert((r, item), row.iter().copied().collect());
        }
    }

    /// Slots touched by edits of relation `relation`, in first-touch order.
    pub fn touched(&self, relation: usize) -> &[u32] {
        self.touched.get(relation).map_or(&[], Vec::as_slice)
    }

    /// Slots whose degree under `relation` may have changed: those its edits
    /// touched and the items added or removed (a row appears or vanishes),
    /// sorted, distinct.
    pub(super) fn degree_changed(&self, relation: usize) -> Vec<u32> {
        let mut t: Vec<u32> = self
            .touched(relation)
            .iter()
            .chain(&self.items)
            .copied()
            .collect();
        t.sort_unstable();
        t.dedup();
        t
    }

    /// Slots whose item was added or removed in the window.
    pub fn items(&self) -> &[u32] {
        &self.items
    }

    /// Number of input rows set.
    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    /// The graph's edits this batch covers (see [`super::Pkg::edits`]);
    /// `None` for an input-only batch.
    pub fn edits(&self) -> Option<std::ops::Range<u64>> {
        self.origin.as_ref().map(|o| o.edits.clone())
    }

    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.inputs.is_empty() && self.touched.iter().all(Vec::is_empty)
    }
}
