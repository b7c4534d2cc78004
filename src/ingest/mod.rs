//! Ingest: Kafka records of `items`, `item-relations` and `interactions` in,
//! typed events out; whatever cannot be accepted goes to `thaw-dlq` with a reason.
//!
//! - [`stage`]: the engine's ingest stage (consumer, batching window, dead
//!   letters, lag), [`batch`]: what it hands the other stages, [`restore`]:
//!   the state re-read from the log at start, [`dlq`]: dead letters sent
//!   without holding the stream back.
//! - [`events`]: the wire format of the three topics and of the dead-letter
//!   record (`streams/schemas/*.json`, described in `streams/README.md`),
//!   [`decode`] with its validation rules, the [`Rejection`] reasons and their
//!   metric labels ([`ReasonCode`]), and [`DeadLetter`].
//!
//! Decoding is a pure function of (topic, key, payload, limits) so that the
//! consumer loop, `thaw replay` and the tests all apply the very same rules: bad
//! input never stops the stream, it becomes one [`DeadLetter`] and one counter
//! increment.

pub mod batch;
pub mod dlq;
pub mod events;
pub mod restore;
pub mod stage;

pub use events::{
    decode, DeadLetter, Event, InteractionEvent, ItemEvent, Kind, Limits, Op, ReasonCode,
    Rejection, RelationEvent, Topic, DLQ_TOPIC,
};
