//! The product knowledge graph (PKG) and its per-relation SGC propagation,
//! updated incrementally.
//!
//! Paper: MPKG, pre-training on a product knowledge graph for zero-shot item
//! recommendation (`../shared/papers/mpkg-pretraining-product-knowledge-graph.txt`),
//! §4.1 (PKG construction) and §4.2, eq. 1 (SGC-style encoder per relation r):
//!
//! ```text
//! E_r = (D^-1/2 Ã_r D^-1/2)^M X W_r        Ã_r = A_r + I,  D = diag(Ã_r 1)
//! ```
//!
//! Eq. 1 is linear, so thaw projects first (`X W_r`, the `item_projection`
//! model, elsewhere) and propagates d-dimensional rows here: `E_r = S_r^M (X W_r)`.
//!
//! - [`Pkg`] holds the items (a dense `u32` slot index per external id), a fixed
//!   list of relations, and one undirected simple graph per relation. It also
//!   records which slots each edit touched, so that the streaming engine can edit
//!   it freely for a short window and then hand the accumulated changes to the
//!   propagator in one [`Batch`] ([`Pkg::take_changes`]).
//! - [`Propagator`] keeps every layer `H_0 = X W_r, H_1, ..., H_M` of every
//!   relation and, given a [`Batch`], recomputes only the rows within `k` hops of
//!   a touched slot at layer `k`. Full and incremental paths run the same row
//!   kernel in the same order, so their results are bitwise equal.
//!
//! Slot policy: a removed item's slot keeps no edges and all its propagated
//! rows are zero; the slot becomes reusable by a later [`Pkg::add_item`] only
//! after the window that removed it has been closed by [`Pkg::take_changes`],
//! so one batch never sees two different items under the same index.
//!
//! A streaming window, end to end:
//!
//! ```
//! use ndarray::Array2;
//! use thaw::graph::{Pkg, Propagator, PropagatorConfig};
//!
//! # fn main() -> thaw::graph::Result<()> {
//! let mut pkg = Pkg::new(["also_bought", "also_viewed"])?;
//! let a = pkg.add_item("a");
//! let b = pkg.add_item("b");
//! pkg.add_edge(0, a, b)?;
//! let inputs = vec![Array2::<f32>::ones((pkg.slots(), 4)); 2];
//! let views: Vec<_> = inputs.iter().map(|x| x.view()).collect();
//! let mut prop = Propagator::full(PropagatorConfig::default(), &pkg, &views)?;
//! pkg.take_changes(); // everything so far is in the full computation
//!
//! // One window: a new item arrives with its projected rows and an edge.
//! let c = pkg.add_item("c");
//! pkg.add_edge(1, c, a)?;
//! let mut batch = pkg.take_changes();
//! batch.set_inputs(c, Array2::<f32>::zeros((2, 4)).view());
//! let stats = prop.apply(&pkg, &batch)?;
//! assert_eq!(stats.rows_at_hop(0), 2); // c's input row, once per relation
//! let e_c = prop.row(1, c)?; // c's embedding under relation 1 (E_r row)
//! assert_eq!(e_c.len(), 4);
//! # Ok(())
//! # }
//! ```

mod batch;
pub mod co;
mod pkg;
mod propagate;

pub use batch::Batch;
pub use pkg::{inv_sqrt_degree, NormalizedAdjacency, Pkg, PkgParts};
pub use propagate::{ApplyStats, Propagator, PropagatorConfig, MAX_HOPS};

/// Errors of the graph layer: bad indexes, shapes and batches. None of them
/// leaves a [`Pkg`] or a [`Propagator`] half-updated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A relation index out of range.
    #[error("unknown relation index {0}")]
    UnknownRelation(usize),
    /// Two relations with the same name at construction.
    #[error("duplicate relation name {0:?}")]
    DuplicateRelation(String),
    /// An item index that is out of range or whose item was removed.
    #[error("unknown item index {0}")]
    UnknownItem(u32),
    /// Parts of a graph ([`PkgParts`]) that do not fit together.
    #[error("inconsistent graph parts: {0}")]
    InvalidParts(String),
    /// An edge from an item to itself: the self-loop is implicit in `S_r`.
    #[error("self-loop on item {0}: self-loops are implicit in S_r and never stored")]
    SelfLoop(u32),
    /// A layer index greater than the number of hops.
    #[error("unknown layer {layer}: the propagator keeps layers 0..={hops}")]
    UnknownLayer {
        /// The layer asked for.
        layer: usize,
        /// The number of hops M.
        hops: usize,
    },
    /// An input or graph whose size does not match.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        /// What was measured.
        what: &'static str,
        /// The size required.
        expected: usize,
        /// The size given.
        got: usize,
    },
    /// An item added in this batch has no input row for a relation.
    #[error("item {item} was added but the batch has no input row for relation {relation}")]
    MissingInput {
        /// The item's slot.
        item: u32,
        /// The relation whose row is missing.
        relation: usize,
    },
    /// A batch taken from a different graph than the propagator's.
    #[error("the batch or graph does not belong to this propagator's graph")]
    ForeignGraph,
    /// A batch applied out of order: it would skip edits the propagator has
    /// not seen, or the graph has edits the batch does not carry (an older
    /// batch, or edits made after it was taken).
    #[error(
        "batch covers graph edits {start}..{end}, but the propagator holds edits ..{synced} \
         and the graph is at {graph}"
    )]
    OutOfOrder {
        /// Edits reflected in the propagator: all those numbered below this.
        synced: u64,
        /// The graph's edit count ([`Pkg::edits`]).
        graph: u64,
        /// First edit of the batch.
        start: u64,
        /// One past the last edit of the batch.
        end: u64,
    },
    /// An invalid [`PropagatorConfig`].
    #[error("invalid propagator config: {0}")]
    Config(String),
}

/// Result of the graph layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
