//! Tools around the engine, outside its core: each starts it with
//! [`crate::serve::Engine::start`] and drives it from outside.
//!
//! - [`demo`]: MovieLens replayed through the engine, compared with `thaw eval`.
//! - [`replay`]: a dataset as the three event streams (`thaw replay`).
//! - [`bench`]: the synthetic catalogue and the end-to-end benchmark.

pub mod bench;
pub mod demo;
pub mod replay;
