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
//! - [`infer`]: ONNX Runtime sessions (text encoder, item projection, fusion)
//!   from one session builder, and the engine's text stage.
//! - [`ingest`]: the event wire format (`streams/`), validation and dead
//!   letters; the engine's ingest stage and the restore from the log.
//! - [`adapt`]: a user adapted from their interactions, and top-K scoring
//!   (the same functions in `thaw eval` and the engine).
//! - [`publish`]: the Redis layout and the engine's publish stage.
//! - [`kafka`]: Kafka client settings and the embedded broker (`thaw broker`).
//! - [`serve`]: the streaming engine (`thaw serve`): [`serve::Engine::start`],
//!   its settings, state, core stage and metrics.
//! - [`tools`]: what runs the engine from outside: the demo (`thaw demo`),
//!   a dataset replayed as streams (`thaw replay`) and the end-to-end
//!   benchmark (`thaw bench`).
//! - [`cli`]: the command line; `main.rs` only parses and calls [`cli::run`].

#![deny(missing_docs)]

pub mod adapt;
pub mod cli;
pub mod dataset;
pub mod eval;
pub mod graph;
pub mod infer;
pub mod ingest;
pub mod kafka;
pub mod publish;
pub mod redact;
pub mod serve;
pub mod tools;
pub mod train;
