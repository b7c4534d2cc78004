//! thaw: a streaming recommender engine for cold start.
//!
//! Module map (one folder per stage, see `../shared/DESIGN.md`):
//!
//! - [`dataset`]: RecBole atomic files (`.inter`, `.item`, `.kg`, `.link`) and the
//!   dense id space every other stage indexes by.
//! - [`eval`]: the cold-start protocol (`thaw split`), split files in MetaKG's
//!   format, ranking metrics with bootstrap intervals, the baselines and the
//!   reports (`thaw eval`).
//! - [`graph`]: the product knowledge graph and its per-relation SGC propagation,
//!   updated incrementally.
//! - [`infer`]: ONNX Runtime sessions (text encoder, item projection, fusion).
//! - [`ingest`]: the event wire format (`streams/`), validation and dead letters.
//! - [`kafka`]: Kafka client settings and the embedded broker (`thaw broker`).
//! - [`replay`]: a dataset as the three event streams (`thaw replay`).
//! - [`serve`]: the streaming engine (`thaw serve`) and the demo (`thaw demo`).
//! - [`bench`]: the synthetic catalogue and the end-to-end benchmark (`thaw bench`).
//! - [`cli`]: the command line; `main.rs` only parses and calls [`cli::run`].

#![deny(missing_docs)]

pub mod bench;
pub mod cli;
pub mod dataset;
pub mod eval;
pub mod graph;
pub mod infer;
pub mod ingest;
pub mod kafka;
pub mod replay;
pub mod serve;
pub mod train;
