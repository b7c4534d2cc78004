//! The events of `streams/`: their serde types, the validating [`decode`], and the
//! dead-letter record.
//!
//! One Kafka message carries one JSON object (DESIGN.md, "Events"):
//!
//! | topic | Kafka key | body |
//! |---|---|---|
//! | `items` (compacted) | item id | [`ItemEvent`] |
//! | `item-relations` (compacted) | `src\|relation\|dst` | [`RelationEvent`] |
//! | `interactions` | user id | [`InteractionEvent`] |
//! | `thaw-dlq` | original key | [`DeadLetter`] |
//!
//! [`decode`] enforces the rules of `streams/schemas/*.json` and those a JSON
//! Schema cannot state: string limits in UTF-8 bytes (a schema's `maxLength`
//! counts characters), `src != dst`, and a Kafka key equal to the event's id.
//! Checks run in a fixed order, so a message has one reason:
//! size → JSON syntax → shape (fields present, types, enum values) → values →
//! key. Unknown fields are ignored (forward compatibility), and `null` in an
//! optional field reads as absent.
//!
//! The serde derives give the wire encoding (`serde_json::to_vec`); deserializing
//! with them bypasses validation, so input goes through [`decode`].

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Name of the dead-letter topic.
pub const DLQ_TOPIC: &str = "thaw-dlq";

/// Largest accepted `ts` (ms since the epoch): 2^53 − 1, the largest integer a
/// JSON number keeps exactly in every language (year 287396).
pub const MAX_TS: u64 = (1 << 53) - 1;

/// A dead letter keeps at most this many bytes of the original payload (1 MiB,
/// the source topics' `max.message.bytes`); [`DeadLetter::within`] cuts it
/// further so that the whole DLQ record fits the producer's and the DLQ
/// topic's record limit, so a dead letter can never stall the stream.
pub const DLQ_MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// A dead letter keeps at most this many bytes of the original key, in its body
/// and as the DLQ record's own Kafka key.
pub const DLQ_MAX_KEY_BYTES: usize = 4096;

/// What a Kafka record adds to its key and value (record and batch headers,
/// the producer's own accounting): [`DeadLetter::within`] leaves this much of
/// the record limit free. librdkafka counts about 100 bytes; 1 KiB is ample.
pub const DLQ_RECORD_OVERHEAD: usize = 1024;

/// Separates the parts of an `item-relations` key; forbidden in item ids and
/// relation names so that the key is unambiguous.
const KEY_SEPARATOR: char = '|';

/// Input-derived text quoted in a reason is cut to this many characters.
const QUOTE_CHARS: usize = 64;

/// Largest magnitude of a finite f32, as the f64 a JSON number parses to.
const F32_MAX: f64 = f32::MAX as f64;

/// The three input topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Topic {
    /// `items`: item created or changed; key = item id; compacted.
    #[serde(rename = "items")]
    Items,
    /// `item-relations`: edge added or removed; key = `src|relation|dst`; compacted.
    #[serde(rename = "item-relations")]
    ItemRelations,
    /// `interactions`: a user interacted with an item; key = user id.
    #[serde(rename = "interactions")]
    Interactions,
}

impl Topic {
    /// Every input topic, in the order of the design's table.
    pub const ALL: [Topic; 3] = [Topic::Items, Topic::ItemRelations, Topic::Interactions];

    /// The Kafka topic name.
    pub fn name(self) -> &'static str {
        match self {
            Topic::Items => "items",
            Topic::ItemRelations => "item-relations",
            Topic::Interactions => "interactions",
        }
    }

    /// The topic of a Kafka topic name; `None` for any other name (the DLQ included).
    pub fn from_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Size limits of [`decode`]. The defaults are those of `streams/schemas/`;
/// a test keeps the two in step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest payload (Kafka value) in bytes; default 65536: an item with a long
    /// description fits, and a poison message costs a bounded parse. The topics
    /// accept up to 1 MiB, so bigger messages reach thaw and are dead-lettered
    /// as `oversized` instead of being refused to their producer.
    pub max_message_bytes: usize,
    /// Largest item id, user id or relation name in UTF-8 bytes; default 256.
    pub max_id_bytes: usize,
    /// Largest `title` in bytes; default 4096 (a title, not a document).
    pub max_title_bytes: usize,
    /// Largest `description` in bytes; default 65536 (the message limit binds first).
    pub max_description_bytes: usize,
    /// Most `categories` of an item; default 256.
    pub max_categories: usize,
    /// Largest category label in bytes; default 256.
    pub max_category_bytes: usize,
    /// Most `features` of an item; default 4096 (room for any dense side
    /// vector, yet a bounded decode per message).
    pub max_features: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65536,
            max_id_bytes: 256,
            max_title_bytes: 4096,
            max_description_bytes: 65536,
            max_categories: 256,
            max_category_bytes: 256,
            max_features: 4096,
        }
    }
}

/// An item was created or changed (topic `items`). The latest event of an item
/// id is the item's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemEvent {
    /// Item id: 1 to 256 bytes, no `|`; also the Kafka key.
    pub item_id: String,
    /// Title, possibly empty; the text encoder embeds `title + description`.
    pub title: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Category labels (absent on the wire when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// Dense side features, finite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<f32>>,
    /// Event time, ms since the Unix epoch.
    pub ts: u64,
}

impl ItemEvent {
    /// The Kafka key of this event: the item id.
    pub fn key(&self) -> &str {
        &self.item_id
    }

    /// Checks the value rules (everything [`decode`] checks after the shape,
    /// but the key).
    pub fn validate(&self, limits: &Limits) -> Result<(), Rejection> {
        check_id("item_id", &self.item_id, limits, true)?;
        check_len("title", &self.title, limits.max_title_bytes)?;
        if let Some(description) = &self.description {
            check_len("description", description, limits.max_description_bytes)?;
        }
        check_count("categories", self.categories.len(), limits.max_categories)?;
        for (i, category) in self.categories.iter().enumerate() {
            if category.is_empty() {
                return Err(Rejection::Empty(format!("categories[{i}]")));
            }
            check_len(
                &format!("categories[{i}]"),
                category,
                limits.max_category_bytes,
            )?;
        }
        if let Some(features) = &self.features {
            check_count("features", features.len(), limits.max_features)?;
            if let Some(i) = features.iter().position(|x| !x.is_finite()) {
                return Err(Rejection::NonFiniteFeature(i));
            }
        }
        check_ts(self.ts)
    }
}

/// Whether a relation event adds or removes its edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The edge exists (adding an existing edge changes nothing).
    Add,
    /// The edge does not exist (removing an absent edge changes nothing).
    Remove,
}

impl Op {
    /// The wire name: `add` or `remove`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
        }
    }

    /// The op of a wire name.
    pub fn from_name(name: &str) -> Option<Op> {
        [Op::Add, Op::Remove]
            .into_iter()
            .find(|op| op.as_str() == name)
    }
}

/// An edge of the product knowledge graph was added or removed (topic
/// `item-relations`). The latest event of an edge is the edge's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationEvent {
    /// Source item id (1 to 256 bytes, no `|`).
    pub src: String,
    /// Destination item id (1 to 256 bytes, no `|`), different from `src`.
    pub dst: String,
    /// Relation name, open-ended (`also_bought`, `film.film.actor`, ...): 1 to
    /// 256 bytes, no `|`.
    pub relation: String,
    /// Add or remove.
    pub op: Op,
    /// Event time, ms since the Unix epoch.
    pub ts: u64,
}

impl RelationEvent {
    /// The Kafka key of this event: `src|relation|dst`, one key per edge, so
    /// compaction keeps each edge's latest op.
    pub fn key(&self) -> String {
        format!("{}|{}|{}", self.src, self.relation, self.dst)
    }

    /// Checks the value rules (everything [`decode`] checks after the shape,
    /// but the key).
    pub fn validate(&self, limits: &Limits) -> Result<(), Rejection> {
        check_id("src", &self.src, limits, true)?;
        check_id("dst", &self.dst, limits, true)?;
        check_id("relation", &self.relation, limits, true)?;
        if self.src == self.dst {
            return Err(Rejection::SelfRelation);
        }
        check_ts(self.ts)
    }
}

/// What a user did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Saw the item.
    View,
    /// Clicked it.
    Click,
    /// Bought it.
    Purchase,
    /// Rated it; the event's `value` is the rating.
    Rating,
}

impl Kind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Click => "click",
            Kind::Purchase => "purchase",
            Kind::Rating => "rating",
        }
    }

    /// The kind of a wire name.
    pub fn from_name(name: &str) -> Option<Kind> {
        [Kind::View, Kind::Click, Kind::Purchase, Kind::Rating]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

/// A user interacted with an item (topic `interactions`). Its effect is adding
/// the item to the user's item set, so a replay is idempotent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InteractionEvent {
    /// User id: 1 to 256 bytes, any characters; also the Kafka key.
    pub user_id: String,
    /// Item id (1 to 256 bytes, no `|`).
    pub item_id: String,
    /// What happened.
    pub kind: Kind,
    /// A finite number: the rating when `kind` is `rating` (required there),
    /// free for the other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f32>,
    /// Event time, ms since the Unix epoch.
    pub ts: u64,
}

impl InteractionEvent {
    /// The Kafka key of this event: the user id, so that one user's interactions
    /// stay in order on one partition.
    pub fn key(&self) -> &str {
        &self.user_id
    }

    /// Checks the value rules (everything [`decode`] checks after the shape,
    /// but the key).
    pub fn validate(&self, limits: &Limits) -> Result<(), Rejection> {
        check_id("user_id", &self.user_id, limits, false)?;
        if self.user_id.starts_with('}') {
            return Err(Rejection::UserIdBrace);
        }
        check_id("item_id", &self.item_id, limits, true)?;
        match self.value {
            Some(value) if !value.is_finite() => return Err(Rejection::NonFiniteValue),
            None if self.kind == Kind::Rating => return Err(Rejection::RatingWithoutValue),
            _ => {}
        }
        check_ts(self.ts)
    }
}

/// A decoded, valid event of one of the three input topics.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// From `items`.
    Item(ItemEvent),
    /// From `item-relations`.
    Relation(RelationEvent),
    /// From `interactions`.
    Interaction(InteractionEvent),
}

impl Event {
    /// The topic this event belongs to.
    pub fn topic(&self) -> Topic {
        match self {
            Event::Item(_) => Topic::Items,
            Event::Relation(_) => Topic::ItemRelations,
            Event::Interaction(_) => Topic::Interactions,
        }
    }

    /// The Kafka key this event is produced under.
    pub fn key(&self) -> String {
        match self {
            Event::Item(e) => e.key().to_owned(),
            Event::Relation(e) => e.key(),
            Event::Interaction(e) => e.key().to_owned(),
        }
    }

    /// Event time, ms since the Unix epoch.
    pub fn ts(&self) -> u64 {
        match self {
            Event::Item(e) => e.ts,
            Event::Relation(e) => e.ts,
            Event::Interaction(e) => e.ts,
        }
    }

    /// Caps the event time at `max` ms; whether it was above.
    pub fn cap_ts(&mut self, max: u64) -> bool {
        let ts = match self {
            Event::Item(e) => &mut e.ts,
            Event::Relation(e) => &mut e.ts,
            Event::Interaction(e) => &mut e.ts,
        };
        let above = *ts > max;
        *ts = (*ts).min(max);
        above
    }

    /// Checks the value rules of the event (see each type's `validate`).
    pub fn validate(&self, limits: &Limits) -> Result<(), Rejection> {
        match self {
            Event::Item(e) => e.validate(limits),
            Event::Relation(e) => e.validate(limits),
            Event::Interaction(e) => e.validate(limits),
        }
    }

    /// The event's Kafka payload: its JSON object.
    pub fn encode(&self) -> serde_json::Result<Vec<u8>> {
        match self {
            Event::Item(e) => serde_json::to_vec(e),
            Event::Relation(e) => serde_json::to_vec(e),
            Event::Interaction(e) => serde_json::to_vec(e),
        }
    }
}

/// Metric label of a [`Rejection`]: a small fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasonCode {
    /// The payload is larger than [`Limits::max_message_bytes`].
    Oversized,
    /// The payload is empty or not JSON.
    Json,
    /// JSON of the wrong shape: a required field missing, a wrong type, an
    /// unknown enum value, not an object.
    Schema,
    /// Right shape, but a value breaks a rule: an empty or too long string, a
    /// separator in an id, too many items, a non-finite number, a rating without
    /// value, a self relation, `ts` out of range.
    Semantic,
    /// The Kafka key is not the event's id, or not UTF-8.
    Key,
}

impl ReasonCode {
    /// Every code, for pre-registering metric series.
    pub const ALL: [ReasonCode; 5] = [
        ReasonCode::Oversized,
        ReasonCode::Json,
        ReasonCode::Schema,
        ReasonCode::Semantic,
        ReasonCode::Key,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Oversized => "oversized",
            ReasonCode::Json => "json",
            ReasonCode::Schema => "schema",
            ReasonCode::Semantic => "semantic",
            ReasonCode::Key => "key",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message was not accepted. `Display` is a short stable reason (it goes
/// into [`DeadLetter::reason`]); text quoted from the input is cut to 64
/// characters with control characters escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The payload is larger than the limit.
    #[error("oversized: {bytes} bytes > {limit}")]
    Oversized {
        /// Payload size.
        bytes: usize,
        /// [`Limits::max_message_bytes`].
        limit: usize,
    },
    /// The payload is empty or only whitespace (a Kafka tombstone included).
    #[error("empty payload")]
    EmptyPayload,
    /// The payload is not one JSON document (serde_json's message).
    #[error("invalid json: {0}")]
    Json(String),
    /// A required field is absent.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field (or the event itself) has the wrong JSON type; `null` in a
    /// required field included.
    #[error("wrong type: {field} must be {expected}")]
    WrongType {
        /// The field, e.g. `ts` or `features[3]`; `event` for the whole message.
        field: String,
        /// What it must be, e.g. `a string`.
        expected: &'static str,
    },
    /// A string outside an enum (`op`, `kind`).
    #[error("unknown {field} '{value}'")]
    UnknownVariant {
        /// The field.
        field: &'static str,
        /// The value given (quoted, cut).
        value: String,
    },
    /// An empty id, relation name or category.
    #[error("empty {0}")]
    Empty(String),
    /// A string longer than its limit, in UTF-8 bytes.
    #[error("too long: {field} is {bytes} bytes > {limit}")]
    TooLong {
        /// The field.
        field: String,
        /// Its length in bytes.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// An array with more entries than its limit.
    #[error("too many {field}: {count} > {limit}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// Its number of entries.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A `|` in an item id or relation name (it separates relation key parts).
    #[error("'|' in {0}")]
    Separator(&'static str),
    /// A user id that begins with `}`: in the Redis keys `…:user:{id}` and
    /// `…:recs:{id}` the hash tag would be empty, so Redis Cluster would
    /// put a user's two keys in different slots.
    #[error("user_id begins with '}}'")]
    UserIdBrace,
    /// A feature that is not a finite f32 (beyond ±`f32::MAX`).
    #[error("non-finite feature at {0}")]
    NonFiniteFeature(usize),
    /// An interaction value that is not a finite f32.
    #[error("non-finite value")]
    NonFiniteValue,
    /// An interaction of kind `rating` without a value.
    #[error("rating without value")]
    RatingWithoutValue,
    /// A relation from an item to itself.
    #[error("self relation")]
    SelfRelation,
    /// A `ts` above [`MAX_TS`].
    #[error("ts out of range: {0} > {MAX_TS}")]
    TsOutOfRange(u64),
    /// The Kafka key differs from the id the topic is keyed by.
    #[error("key mismatch: key '{key}' but {field} '{id}'")]
    KeyMismatch {
        /// The Kafka key (quoted, cut).
        key: String,
        /// What the key must equal: `item_id`, `src|relation|dst` or `user_id`.
        field: &'static str,
        /// Its value in the event (quoted, cut).
        id: String,
    },
    /// The Kafka key is not UTF-8 (ids are strings).
    #[error("key is not utf-8")]
    KeyNotUtf8,
}

impl Rejection {
    /// The metric label of this rejection.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Rejection::Oversized { .. } => ReasonCode::Oversized,
            Rejection::EmptyPayload | Rejection::Json(_) => ReasonCode::Json,
            Rejection::MissingField(_)
            | Rejection::WrongType { .. }
            | Rejection::UnknownVariant { .. } => ReasonCode::Schema,
            Rejection::Empty(_)
            | Rejection::TooLong { .. }
            | Rejection::TooMany { .. }
            | Rejection::Separator(_)
            | Rejection::UserIdBrace
            | Rejection::NonFiniteFeature(_)
            | Rejection::NonFiniteValue
            | Rejection::RatingWithoutValue
            | Rejection::SelfRelation
            | Rejection::TsOutOfRange(_) => ReasonCode::Semantic,
            Rejection::KeyMismatch { .. } | Rejection::KeyNotUtf8 => ReasonCode::Key,
        }
    }
}

/// Decodes and validates one Kafka message of `topic`. `key` is the Kafka key
/// (`None` when the message has none: then it is not checked); `payload` the
/// Kafka value (a tombstone is passed as empty and rejected).
///
/// Never panics, whatever the bytes; every rule of `streams/schemas/` and of the
/// module documentation is checked, in the order size → JSON → shape → values →
/// key.
pub fn decode(
    topic: Topic,
    key: Option<&[u8]>,
    payload: &[u8],
    limits: &Limits,
) -> Result<Event, Rejection> {
    if payload.len() > limits.max_message_bytes {
        return Err(Rejection::Oversized {
            bytes: payload.len(),
            limit: limits.max_message_bytes,
        });
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection::EmptyPayload);
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| Rejection::Json(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(wrong_type("event", "an object"));
    };
    let mut fields = Fields(map);
    let event = match topic {
        Topic::Items => Event::Item(fields.item()?),
        Topic::ItemRelations => Event::Relation(fields.relation()?),
        Topic::Interactions => Event::Interaction(fields.interaction()?),
    };
    event.validate(limits)?;
    if let Some(key) = key {
        check_key(&event, key)?;
    }
    Ok(event)
}

/// The fields of one JSON object, taken out one by one (no copies). Only the
/// shape is checked here; values are checked by the events' `validate`.
struct Fields(Map<String, Value>);

impl Fields {
    fn item(&mut self) -> Result<ItemEvent, Rejection> {
        Ok(ItemEvent {
            item_id: self.string("item_id")?,
            title: self.string("title")?,
            description: self.optional_string("description")?,
            categories: self.optional_strings("categories")?,
            features: self.optional_f32s("features")?,
            ts: self.ts()?,
        })
    }

    fn relation(&mut self) -> Result<RelationEvent, Rejection> {
        Ok(RelationEvent {
            src: self.string("src")?,
            dst: self.string("dst")?,
            relation: self.string("relation")?,
            op: self.variant("op", Op::from_name)?,
            ts: self.ts()?,
        })
    }

    fn interaction(&mut self) -> Result<InteractionEvent, Rejection> {
        Ok(InteractionEvent {
            user_id: self.string("user_id")?,
            item_id: self.string("item_id")?,
            kind: self.variant("kind", Kind::from_name)?,
            value: self.optional_f32("value")?,
            ts: self.ts()?,
        })
    }

    /// A required field; present but `null` is a wrong type, not a missing field.
    fn required(&mut self, name: &'static str) -> Result<Value, Rejection> {
        self.0.remove(name).ok_or(Rejection::MissingField(name))
    }

    /// An optional field: absent and `null` both read as `None`.
    fn optional(&mut self, name: &'static str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &'static str) -> Result<String, Rejection> {
        into_string(self.required(name)?, name)
    }

    fn optional_string(&mut self, name: &'static str) -> Result<Option<String>, Rejection> {
        self.optional(name)
            .map(|v| into_string(v, name))
            .transpose()
    }

    fn optional_strings(&mut self, name: &'static str) -> Result<Vec<String>, Rejection> {
        let Some(value) = self.optional(name) else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = value else {
            return Err(wrong_type(name, "an array"));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                _ => Err(wrong_type(&format!("{name}[{i}]"), "a string")),
            })
            .collect()
    }

    fn optional_f32s(&mut self, name: &'static str) -> Result<Option<Vec<f32>>, Rejection> {
        let Some(value) = self.optional(name) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(wrong_type(name, "an array"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .map(to_f32)
                    .ok_or_else(|| wrong_type(&format!("{name}[{i}]"), "a number"))
            })
            .collect::<Result<Vec<f32>, Rejection>>()
            .map(Some)
    }

    fn optional_f32(&mut self, name: &'static str) -> Result<Option<f32>, Rejection> {
        self.optional(name)
            .map(|v| {
                v.as_f64()
                    .map(to_f32)
                    .ok_or_else(|| wrong_type(name, "a number"))
            })
            .transpose()
    }

    fn ts(&mut self) -> Result<u64, Rejection> {
        // `as_u64` is `None` for negatives, fractions and anything written with
        // an exponent or a decimal point: `ts` must be an integer literal.
        self.required("ts")?
            .as_u64()
            .ok_or_else(|| wrong_type("ts", "a non-negative integer"))
    }

    fn variant<T>(
        &mut self,
        name: &'static str,
        from_name: fn(&str) -> Option<T>,
    ) -> Result<T, Rejection> {
        let value = self.required(name)?;
        let Value::String(s) = value else {
            return Err(wrong_type(name, "a string"));
        };
        from_name(&s).ok_or_else(|| Rejection::UnknownVariant {
            field: name,
            value: quote(&s),
        })
    }
}

fn into_string(value: Value, field: &str) -> Result<String, Rejection> {
    match value {
        Value::String(s) => Ok(s),
        _ => Err(wrong_type(field, "a string")),
    }
}

fn wrong_type(field: &str, expected: &'static str) -> Rejection {
    Rejection::WrongType {
        field: field.to_owned(),
        expected,
    }
}

/// A JSON number as an f32; one beyond ±`f32::MAX` becomes ±infinity (rather
/// than rounding to `f32::MAX`), so that "finite f32" means `|x| <= f32::MAX`
/// exactly as the schemas say.
fn to_f32(x: f64) -> f32 {
    if x.abs() <= F32_MAX {
        x as f32
    } else {
        f32::INFINITY.copysign(x as f32)
    }
}

/// An id: non-empty, at most `max_id_bytes`, and (`item_like`) no separator.
fn check_id(
    field: &'static str,
    id: &str,
    limits: &Limits,
    item_like: bool,
) -> Result<(), Rejection> {
    if id.is_empty() {
        return Err(Rejection::Empty(field.to_owned()));
    }
    check_len(field, id, limits.max_id_bytes)?;
    if item_like && id.contains(KEY_SEPARATOR) {
        return Err(Rejection::Separator(field));
    }
    Ok(())
}

fn check_len(field: &str, text: &str, limit: usize) -> Result<(), Rejection> {
    if text.len() > limit {
        return Err(Rejection::TooLong {
            field: field.to_owned(),
            bytes: text.len(),
            limit,
        });
    }
    Ok(())
}

fn check_count(field: &'static str, count: usize, limit: usize) -> Result<(), Rejection> {
    if count > limit {
        return Err(Rejection::TooMany {
            field,
            count,
            limit,
        });
    }
    Ok(())
}

fn check_ts(ts: u64) -> Result<(), Rejection> {
    if ts > MAX_TS {
        return Err(Rejection::TsOutOfRange(ts));
    }
    Ok(())
}

/// The key must equal the id its topic is keyed by (DESIGN.md's table).
fn check_key(event: &Event, key: &[u8]) -> Result<(), Rejection> {
    let key = std::str::from_utf8(key).map_err(|_| Rejection::KeyNotUtf8)?;
    let expected = event.key();
    if key == expected {
        return Ok(());
    }
    let field = match event {
        Event::Item(_) => "item_id",
        Event::Relation(_) => "src|relation|dst",
        Event::Interaction(_) => "user_id",
    };
    Err(Rejection::KeyMismatch {
        key: quote(key),
        field,
        id: quote(&expected),
    })
}

/// Input text for a reason: at most [`QUOTE_CHARS`] characters (then `…`),
/// control characters and `'` escaped, so a reason stays one short line.
fn quote(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == QUOTE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() || c == '\'' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A message thaw could not accept, as written to [`DLQ_TOPIC`]
/// (`streams/schemas/dlq.json`). The DLQ record's Kafka key is the original key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Source topic name.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The original key, base64 (first [`DLQ_MAX_KEY_BYTES`] bytes); `None`
    /// (JSON `null`) when the message had no key.
    pub key_base64: Option<String>,
    /// Length of the original key; `None` when it had none.
    pub key_bytes: Option<usize>,
    /// The original payload, base64 (first [`DLQ_MAX_PAYLOAD_BYTES`] bytes).
    pub payload_base64: String,
    /// Length of the original payload.
    pub payload_bytes: usize,
    /// Whether the key or the payload was cut.
    pub truncated: bool,
    /// The rejection's `Display`.
    pub reason: String,
    /// The rejection's metric label.
    pub reason_code: ReasonCode,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub dead_lettered_at_ms: u64,
    /// SHA-256 of the whole original payload (hex), so a cut payload can
    /// still be matched to its source record.
    #[serde(default)]
    pub payload_sha256: String,
}

impl DeadLetter {
    /// The dead letter of a message of `topic` at `partition`/`offset` that
    /// `rejection` refused, dead-lettered at `now_ms`, keeping up to
    /// [`DLQ_MAX_KEY_BYTES`] of the key and [`DLQ_MAX_PAYLOAD_BYTES`] of the
    /// payload.
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
        rejection: &Rejection,
        now_ms: u64,
    ) -> DeadLetter {
        let source = Source {
            topic,
            partition,
            offset,
            key,
            payload,
        };
        Self::within(&source, rejection, now_ms, usize::MAX)
    }

    /// [`DeadLetter::new`], with the payload cut further so that the DLQ
    /// record, its body ([`DeadLetter::encode`]) and its Kafka key
    /// ([`DeadLetter::record_key`]), is at most `max_record_bytes` with
    /// [`DLQ_RECORD_OVERHEAD`] to spare. Base64 grows a payload by a third:
    /// a 1 MiB source record would otherwise not fit a 1 MB record limit.
    pub fn within(
        source: &Source<'_>,
        rejection: &Rejection,
        now_ms: u64,
        max_record_bytes: usize,
    ) -> DeadLetter {
        let Source {
            topic,
            partition,
            offset,
            key,
            payload,
        } = *source;
        let kept_key = Self::record_key(key);
        let mut letter = DeadLetter {
            topic: topic.to_owned(),
            partition,
            offset,
            key_base64: kept_key.map(base64_encode),
            key_bytes: key.map(<[u8]>::len),
            payload_base64: String::new(),
            payload_bytes: payload.len(),
            truncated: false,
            reason: rejection.to_string(),
            reason_code: rejection.reason_code(),
            dead_lettered_at_ms: now_ms,
            payload_sha256: sha256_hex(payload),
        };
        // Everything but the payload, measured as written ("truncated":
        // false and true have the same length give or take one byte).
        let fixed = letter.encode().map_or(usize::MAX, |b| b.len())
            + kept_key.map_or(0, <[u8]>::len)
            + DLQ_RECORD_OVERHEAD
            + 1;
        let room = max_record_bytes.saturating_sub(fixed);
        let keep = payload.len().min(DLQ_MAX_PAYLOAD_BYTES).min(room / 4 * 3);
        letter.payload_base64 = base64_encode(&payload[..keep]);
        letter.truncated = key.is_some_and(|k| k.len() > DLQ_MAX_KEY_BYTES) || keep < payload.len();
        letter
    }

    /// The DLQ record's Kafka key: the original key's first
    /// [`DLQ_MAX_KEY_BYTES`] (`None` when it had none).
    pub fn record_key(key: Option<&[u8]>) -> Option<&[u8]> {
        key.map(|k| &k[..k.len().min(DLQ_MAX_KEY_BYTES)])
    }

    /// The DLQ record's payload: its JSON object.
    pub fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    /// The kept original key bytes: `Ok(None)` when there was no key, `Err` when
    /// `key_base64` is not valid base64.
    pub fn original_key(&self) -> Result<Option<Vec<u8>>, InvalidBase64> {
        self.key_base64.as_deref().map(base64_decode).transpose()
    }

    /// The kept original payload bytes; `Err` when `payload_base64` is not valid
    /// base64.
    pub fn original_payload(&self) -> Result<Vec<u8>, InvalidBase64> {
        base64_decode(&self.payload_base64)
    }
}

/// Where a dead-lettered message came from, for [`DeadLetter::within`].
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Source topic name.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The original key.
    pub key: Option<&'a [u8]>,
    /// The original payload.
    pub payload: &'a [u8],
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A base64 field of a [`DeadLetter`] that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid base64")]
pub struct InvalidBase64;

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 of RFC 4648 §4 (standard alphabet, `=` padding).
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(chunk[0]) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(BASE64_ALPHABET[(n >> shift) as usize & 63]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// Inverse of [`base64_encode`]; padding is required, whitespace is not allowed.
fn base64_decode(text: &str) -> Result<Vec<u8>, InvalidBase64> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return Err(InvalidBase64);
    }
    let quads = bytes.len() / 4;
    let mut out = Vec::with_capacity(quads * 3);
    for (i, quad) in bytes.chunks_exact(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != quads) {
            return Err(InvalidBase64);
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let sextet = BASE64_ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or(InvalidBase64)?;
            n = (n << 6) | sextet as u32;
        }
        n <<= 6 * pad as u32;
        let [_, b0, b1, b2] = n.to_be_bytes();
        out.push(b0);
        if pad < 2 {
            out.push(b1);
        }
        if pad < 1 {
            out.push(b2);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;
    use proptest::test_runner::RngSeed;
    use serde_json::json;

    fn streams_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("streams")
    }

    fn read_text(relative: &str) -> String {
        let path = streams_dir().join(relative);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn read_json(relative: &str) -> Value {
        serde_json::from_str(&read_text(relative))
            .unwrap_or_else(|e| panic!("{relative} is not JSON: {e}"))
    }

    fn schema_path(topic: Topic) -> &'static str {
        match topic {
            Topic::Items => "schemas/item.json",
            Topic::ItemRelations => "schemas/item-relation.json",
            Topic::Interactions => "schemas/interaction.json",
        }
    }

    fn schema(topic: Topic) -> Value {
        read_json(schema_path(topic))
    }

    fn has_type(v: &Value, ty: &str) -> bool {
        match ty {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            "number" => v.is_number(),
            // Draft 2020-12: a number whose fractional part is zero.
            "integer" => v.is_u64() || v.is_i64() || v.as_f64().is_some_and(|x| x.fract() == 0.0),
            other => panic!("unknown JSON Schema type {other}"),
        }
    }

    /// A JSON Schema (draft 2020-12) validator for the keywords `streams/schemas`
    /// use. It panics on any other keyword, so a schema constraint is never
    /// silently skipped.
    fn schema_accepts(root: &Value, schema: &Value, v: &Value) -> bool {
        let Value::Object(keywords) = schema else {
            panic!("a schema must be an object: {schema}");
        };
        let number = |arg: &Value| arg.as_f64().expect("numeric keyword");
        let count = |arg: &Value| arg.as_u64().expect("count keyword") as usize;
        keywords
            .iter()
            .all(|(keyword, arg)| match keyword.as_str() {
                "$schema" | "$id" | "$comment" | "title" | "description" | "$defs"
                | "contentEncoding" => true,
                "$ref" => {
                    let name = arg
                        .as_str()
                        .and_then(|r| r.strip_prefix("#/$defs/"))
                        .expect("only #/$defs/ references");
                    schema_accepts(root, &root["$defs"][name], v)
                }
                "type" => match arg {
                    Value::String(ty) => has_type(v, ty),
                    Value::Array(tys) => {
                        tys.iter().any(|ty| has_type(v, ty.as_str().expect("type")))
                    }
                    _ => panic!("bad type keyword {arg}"),
                },
                "required" => v.as_object().is_none_or(|o| {
                    arg.as_array()
                        .expect("required list")
                        .iter()
                        .all(|f| o.contains_key(f.as_str().expect("field name")))
                }),
                "properties" => v.as_object().is_none_or(|o| {
                    arg.as_object()
                        .expect("properties map")
                        .iter()
                        .all(|(name, sub)| o.get(name).is_none_or(|x| schema_accepts(root, sub, x)))
                }),
                "additionalProperties" => {
                    assert_eq!(arg, &Value::Bool(true), "unknown fields must stay allowed");
                    true
                }
                "items" => v
                    .as_array()
                    .is_none_or(|a| a.iter().all(|x| schema_accepts(root, arg, x))),
                "maxItems" => v.as_array().is_none_or(|a| a.len() <= count(arg)),
                "minLength" => v.as_str().is_none_or(|s| s.chars().count() >= count(arg)),
                "maxLength" => v.as_str().is_none_or(|s| s.chars().count() <= count(arg)),
                "pattern" => match arg.as_str() {
                    Some("^[^|]*$") => v.as_str().is_none_or(|s| !s.contains('|')),
                    Some("^[^}]") => v
                        .as_str()
                        .is_none_or(|s| !s.is_empty() && !s.starts_with('}')),
                    Some("^[0-9a-f]{64}$") => v.as_str().is_none_or(|s| {
                        s.len() == 64
                            && s.bytes()
                                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    }),
                    other => panic!("a pattern this validator does not know: {other:?}"),
                },
                "minimum" => v.as_f64().is_none_or(|x| x >= number(arg)),
                "maximum" => v.as_f64().is_none_or(|x| x <= number(arg)),
                "enum" => arg.as_array().expect("enum list").contains(v),
                "const" => arg == v,
                "allOf" => arg
                    .as_array()
                    .expect("allOf list")
                    .iter()
                    .all(|sub| schema_accepts(root, sub, v)),
                "if" => {
                    let branch = if schema_accepts(root, arg, v) {
                        keywords.get("then")
                    } else {
                        keywords.get("else")
                    };
                    branch.is_none_or(|sub| schema_accepts(root, sub, v))
                }
                "then" | "else" => true, // applied by "if"
                other => panic!("keyword {other} is not supported by the test validator"),
            })
    }

    fn accepts(topic: Topic, v: &Value) -> bool {
        let root = schema(topic);
        schema_accepts(&root, &root, v)
    }

    fn valid_lines(topic: Topic) -> Vec<String> {
        read_text(&format!("examples/{}.valid.jsonl", topic.name()))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn sorted_strings(v: &Value) -> Vec<String> {
        let mut out: Vec<String> = v
            .as_array()
            .expect("a list")
            .iter()
            .map(|s| s.as_str().expect("a string").to_owned())
            .collect();
        out.sort();
        out
    }

    fn sorted_keys(v: &Value) -> Vec<String> {
        v.as_object().expect("an object").keys().cloned().collect() // BTreeMap: sorted
    }

    fn to_value<T: Serialize>(t: &T) -> Value {
        serde_json::to_value(t).expect("serializable")
    }

    #[test]
    fn valid_examples_decode_with_and_without_key_and_pass_the_schema() {
        let limits = Limits::default();
        for topic in Topic::ALL {
            let lines = valid_lines(topic);
            assert!(lines.len() >= 3, "{topic}: too few examples");
            for line in lines {
                let event = decode(topic, None, line.as_bytes(), &limits)
                    .unwrap_or_else(|r| panic!("{topic}: {line}: {r}"));
                assert_eq!(event.topic(), topic);
                let key = event.key();
                let keyed = decode(topic, Some(key.as_bytes()), line.as_bytes(), &limits);
                assert_eq!(keyed.as_ref(), Ok(&event), "{line}");
                let value: Value = serde_json::from_str(&line).expect("json");
                assert!(accepts(topic, &value), "schema rejects {line}");
            }
        }
    }

    #[test]
    fn valid_examples_read_as_expected() {
        let limits = Limits::default();
        let items = valid_lines(Topic::Items);
        let Ok(Event::Item(first)) = decode(Topic::Items, None, items[0].as_bytes(), &limits)
        else {
            panic!("first item")
        };
        assert_eq!(first.item_id, "i1");
        assert_eq!(first.categories, ["Animation", "Children's", "Comedy"]);
        assert_eq!(first.features, None);
        let Ok(Event::Item(second)) = decode(Topic::Items, None, items[1].as_bytes(), &limits)
        else {
            panic!("second item")
        };
        assert_eq!(second.features, Some(vec![0.12, -0.5, 3.0, 1e-7]));
        assert_eq!(second.ts, 1_700_000_000_100);
        let relations = valid_lines(Topic::ItemRelations);
        let last = relations.last().expect("a relation");
        let Ok(Event::Relation(remove)) =
            decode(Topic::ItemRelations, None, last.as_bytes(), &limits)
        else {
            panic!("relation")
        };
        assert_eq!(remove.op, Op::Remove);
        assert_eq!(remove.key(), "i1|also_bought|i2");
        let interactions = valid_lines(Topic::Interactions);
        let Ok(Event::Interaction(rating)) = decode(
            Topic::Interactions,
            None,
            interactions[3].as_bytes(),
            &limits,
        ) else {
            panic!("interaction")
        };
        assert_eq!((rating.kind, rating.value), (Kind::Rating, Some(4.0)));
    }

    #[test]
    fn invalid_examples_are_rejected_with_the_reason_they_name() {
        let limits = Limits::default();
        let mut codes = BTreeSet::new();
        let mut topics = BTreeSet::new();
        let text = read_text("examples/invalid.jsonl");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let case: Value = serde_json::from_str(line).expect("envelope is JSON");
            let topic =
                Topic::from_name(case["topic"].as_str().expect("topic")).expect("known topic");
            let reason = case["reason"].as_str().expect("reason");
            let code = case["code"].as_str().expect("code");
            let key = case["key"].as_str().map(str::as_bytes);
            let mut payload = match (&case["raw"], &case["event"]) {
                (Value::String(raw), Value::Null) => raw.as_bytes().to_vec(),
                (Value::Null, event) => serde_json::to_vec(event).expect("event"),
                _ => panic!("a case has either raw or event: {line}"),
            };
            if let Some(size) = case["pad_to_bytes"].as_u64() {
                payload.resize(size as usize, b' ');
            }
            let rejection = match decode(topic, key, &payload, &limits) {
                Ok(event) => panic!("accepted {line} as {event:?}"),
                Err(r) => r,
            };
            assert!(
                rejection.to_string().starts_with(reason),
                "{line}: got '{rejection}'"
            );
            assert_eq!(rejection.reason_code().as_str(), code, "{line}");
            // The schemas agree: shape and value errors are schema errors, except
            // the self relation, which a JSON Schema cannot state; the body of a
            // key mismatch or an oversized message is itself valid.
            if !case["event"].is_null() {
                let schema_rejects =
                    matches!(code, "schema" | "semantic") && reason != "self relation";
                assert_eq!(
                    !accepts(topic, &case["event"]),
                    schema_rejects,
                    "schema on {line}"
                );
            }
            codes.insert(code.to_owned());
            topics.insert(topic.name());
        }
        let all: BTreeSet<String> = ReasonCode::ALL
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        assert_eq!(codes, all, "every reason code has an example");
        assert_eq!(topics.len(), 3, "every topic has an invalid example");
    }

    #[test]
    fn required_fields_and_properties_match_the_schemas() {
        let item = ItemEvent {
            item_id: "i".into(),
            title: "t".into(),
            description: None,
            categories: vec![],
            features: None,
            ts: 0,
        };
        let full_item = ItemEvent {
            description: Some("d".into()),
            categories: vec!["c".into()],
            features: Some(vec![1.0]),
            ..item.clone()
        };
        let relation = RelationEvent {
            src: "a".into(),
            dst: "b".into(),
            relation: "r".into(),
            op: Op::Add,
            ts: 0,
        };
        let interaction = InteractionEvent {
            user_id: "u".into(),
            item_id: "i".into(),
            kind: Kind::View,
            value: None,
            ts: 0,
        };
        let full_interaction = InteractionEvent {
            value: Some(1.0),
            ..interaction.clone()
        };
        let cases = [
            (
                Topic::Items,
                to_value(&item),
                to_value(&full_item),
                vec!["item_id", "title", "ts"],
            ),
            (
                Topic::ItemRelations,
                to_value(&relation),
                to_value(&relation),
                vec!["dst", "op", "relation", "src", "ts"],
            ),
            (
                Topic::Interactions,
                to_value(&interaction),
                to_value(&full_interaction),
                vec!["item_id", "kind", "ts", "user_id"],
            ),
        ];
        let limits = Limits::default();
        for (topic, minimal, full, listed) in cases {
            let schema = schema(topic);
            let required = sorted_strings(&schema["required"]);
            assert_eq!(required, listed, "{topic}: the schema's required list");
            assert_eq!(
                sorted_keys(&minimal),
                required,
                "{topic}: required fields of the type"
            );
            assert_eq!(
                sorted_keys(&full),
                sorted_keys(&schema["properties"]),
                "{topic}: all fields"
            );
            // The decoder agrees: dropping any required field of a valid example
            // is reported as that missing field.
            for line in valid_lines(topic) {
                for field in &required {
                    let mut value: Value = serde_json::from_str(&line).expect("json");
                    value.as_object_mut().expect("object").remove(field);
                    let payload = serde_json::to_vec(&value).expect("json");
                    let got = decode(topic, None, &payload, &limits).map_err(|r| r.to_string());
                    assert_eq!(got, Err(format!("missing field {field}")), "{line}");
                }
            }
        }
        let dlq_schema = read_json("schemas/dlq.json");
        let letter = DeadLetter::new("items", 0, 0, None, b"x", &Rejection::SelfRelation, 0);
        let letter = to_value(&letter);
        assert_eq!(
            sorted_keys(&letter),
            sorted_strings(&dlq_schema["required"])
        );
        assert_eq!(sorted_keys(&letter), sorted_keys(&dlq_schema["properties"]));
        let codes: Vec<Value> = ReasonCode::ALL.iter().map(to_value).collect();
        assert_eq!(
            dlq_schema["properties"]["reason_code"]["enum"],
            Value::Array(codes)
        );
    }

    #[test]
    fn limits_match_the_schemas() {
        let limits = Limits::default();
        let item = schema(Topic::Items);
        let relation = schema(Topic::ItemRelations);
        let interaction = schema(Topic::Interactions);
        let n = |v: &Value| v.as_u64().map(|x| x as usize);
        let id = Some(limits.max_id_bytes);
        assert_eq!(n(&item["$defs"]["item_id"]["maxLength"]), id);
        assert_eq!(n(&relation["$defs"]["item_id"]["maxLength"]), id);
        assert_eq!(n(&relation["properties"]["relation"]["maxLength"]), id);
        assert_eq!(n(&interaction["properties"]["user_id"]["maxLength"]), id);
        assert_eq!(n(&interaction["properties"]["item_id"]["maxLength"]), id);
        let props = &item["properties"];
        assert_eq!(
            n(&props["title"]["maxLength"]),
            Some(limits.max_title_bytes)
        );
        assert_eq!(
            n(&props["description"]["maxLength"]),
            Some(limits.max_description_bytes)
        );
        assert_eq!(
            n(&props["categories"]["maxItems"]),
            Some(limits.max_categories)
        );
        assert_eq!(
            n(&props["categories"]["items"]["maxLength"]),
            Some(limits.max_category_bytes)
        );
        assert_eq!(n(&props["features"]["maxItems"]), Some(limits.max_features));
        let f32_max = Some(F32_MAX);
        assert_eq!(item["$defs"]["f32"]["maximum"].as_f64(), f32_max);
        assert_eq!(
            interaction["properties"]["value"]["maximum"].as_f64(),
            f32_max
        );
        for schema in [
            &item["$defs"]["ts"],
            &relation["$defs"]["ts"],
            &interaction["properties"]["ts"],
        ] {
            assert_eq!(schema["maximum"].as_u64(), Some(MAX_TS));
        }
    }

    #[test]
    fn topics_file_matches_the_code() {
        let topics = read_json("topics.json");
        let topics = topics["topics"].as_array().expect("topics list");
        let names: BTreeSet<&str> = topics.iter().filter_map(|t| t["name"].as_str()).collect();
        let expected: BTreeSet<&str> = Topic::ALL
            .iter()
            .map(|t| t.name())
            .chain([DLQ_TOPIC])
            .collect();
        assert_eq!(names, expected);
        let bytes = |t: &Value| -> usize {
            t["config"]["max.message.bytes"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("max.message.bytes")
        };
        let mut source_max = 0;
        let mut dlq_max = 0;
        for t in topics {
            let name = t["name"].as_str().expect("name");
            assert!(t["partitions"].as_u64().is_some_and(|p| p > 0), "{name}");
            let schema = t["schema"].as_str().expect("schema");
            read_json(schema);
            let policy = t["config"]["cleanup.policy"].as_str();
            match Topic::from_name(name) {
                Some(topic) => {
                    assert_eq!(schema, schema_path(topic));
                    let compacted = matches!(topic, Topic::Items | Topic::ItemRelations);
                    assert_eq!(
                        policy,
                        Some(if compacted { "compact" } else { "delete" }),
                        "{name}"
                    );
                    source_max = source_max.max(bytes(t));
                }
                None => {
                    assert_eq!(policy, Some("delete"));
                    dlq_max = bytes(t);
                }
            }
            if policy == Some("delete") {
                assert!(
                    t["config"]["retention.ms"].as_str().is_some(),
                    "{name}: retention"
                );
            }
        }
        // Oversized messages reach thaw (and the DLQ) instead of being refused.
        assert!(source_max > Limits::default().max_message_bytes);
        assert_eq!(
            source_max, DLQ_MAX_PAYLOAD_BYTES,
            "a dead letter keeps any source payload"
        );
        // The largest dead letter fits the DLQ: its Kafka key is the whole original
        // key (at most a source message) and its body is measured here; 1 KiB
        // more covers the longest reason.
        let big = vec![b'k'; DLQ_MAX_PAYLOAD_BYTES + 1];
        let letter = DeadLetter::new("items", 0, 0, Some(&big), &big, &Rejection::KeyNotUtf8, 0);
        let body = letter.encode().expect("json").len();
        assert!(
            source_max + body + 1024 <= dlq_max,
            "{source_max} + {body} > {dlq_max}"
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let limits = Limits::default();
        for topic in Topic::ALL {
            for line in valid_lines(topic) {
                let plain = decode(topic, None, line.as_bytes(), &limits).expect("valid");
                let mut value: Value = serde_json::from_str(&line).expect("json");
                let object = value.as_object_mut().expect("object");
                object.insert("schema_version".into(), json!(2));
                object.insert("zz_future".into(), json!({"nested": [1, "x", null]}));
                object.insert("_trace".into(), Value::Null);
                let payload = serde_json::to_vec(&value).expect("json");
                assert_eq!(decode(topic, None, &payload, &limits), Ok(plain), "{line}");
            }
        }
    }

    fn item_json(extra: Value) -> Vec<u8> {
        let mut v = json!({"item_id": "i1", "title": "t", "ts": 1});
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        serde_json::to_vec(&v).expect("json")
    }

    fn reason(topic: Topic, key: Option<&[u8]>, payload: &[u8], limits: &Limits) -> String {
        match decode(topic, key, payload, limits) {
            Ok(e) => panic!("accepted {e:?}"),
            Err(r) => r.to_string(),
        }
    }

    #[test]
    fn size_limits_are_utf8_bytes() {
        let limits = Limits::default();
        // 4095 ASCII characters and one two-byte character: 4096 characters, so
        // the schema's maxLength passes, but 4097 bytes, so the decoder refuses.
        let title = format!("{}é", "t".repeat(4095));
        let payload = item_json(json!({ "title": title }));
        assert_eq!(
            reason(Topic::Items, None, &payload, &limits),
            "too long: title is 4097 bytes > 4096"
        );
        let value: Value = serde_json::from_slice(&payload).expect("json");
        assert!(accepts(Topic::Items, &value), "maxLength counts characters");
        let features = vec![0.0; 4097];
        assert_eq!(
            reason(
                Topic::Items,
                None,
                &item_json(json!({ "features": features })),
                &limits
            ),
            "too many features: 4097 > 4096"
        );
        let categories = vec!["c"; 257];
        assert_eq!(
            reason(
                Topic::Items,
                None,
                &item_json(json!({ "categories": categories })),
                &limits
            ),
            "too many categories: 257 > 256"
        );
        let long = "c".repeat(257);
        assert_eq!(
            reason(
                Topic::Items,
                None,
                &item_json(json!({ "categories": ["a", long] })),
                &limits
            ),
            "too long: categories[1] is 257 bytes > 256"
        );
        // Exactly at the limits is fine.
        let at = item_json(json!({
            "item_id": "i".repeat(256),
            "title": "t".repeat(4096),
            "features": vec![-1.5f32; 4096],
            "categories": vec!["c".repeat(256); 4],
        }));
        let at_len = at.len();
        assert!(at_len < 65536, "{at_len}");
        assert_eq!(decode(Topic::Items, None, &at, &limits).err(), None);
        // The message limit counts the payload bytes, whitespace included.
        let mut padded = item_json(json!({}));
        padded.resize(65536, b' ');
        assert!(decode(Topic::Items, None, &padded, &limits).is_ok());
        padded.push(b' ');
        assert_eq!(
            reason(Topic::Items, None, &padded, &limits),
            "oversized: 65537 bytes > 65536"
        );
        // Custom limits apply.
        let tight = Limits {
            max_id_bytes: 2,
            ..Limits::default()
        };
        assert_eq!(
            reason(
                Topic::Items,
                None,
                &item_json(json!({ "item_id": "abc" })),
                &tight
            ),
            "too long: item_id is 3 bytes > 2"
        );
    }

    #[test]
    fn numbers_follow_f32_and_ts_rules() {
        let limits = Limits::default();
        let max = item_json(json!({ "features": [F32_MAX, -F32_MAX, 1e-45, 0] }));
        let Ok(Event::Item(item)) = decode(Topic::Items, None, &max, &limits) else {
            panic!("f32::MAX is finite")
        };
        assert_eq!(item.features, Some(vec![f32::MAX, -f32::MAX, 1e-45, 0.0]));
        // Just past f32::MAX: `as f32` would round it back to f32::MAX; the
        // decoder (and the schema's maximum) refuses it.
        let past = F32_MAX * (1.0 + 1e-15);
        assert!(past > F32_MAX && (past as f32).is_finite());
        let payload = item_json(json!({ "features": [1, past] }));
        assert_eq!(
            reason(Topic::Items, None, &payload, &limits),
            "non-finite feature at 1"
        );
        let ts = |ts: Value| item_json(json!({ "ts": ts }));
        assert!(decode(Topic::Items, None, &ts(json!(MAX_TS)), &limits).is_ok());
        assert!(decode(Topic::Items, None, &ts(json!(0)), &limits).is_ok());
        for bad in [json!(-1), json!(1.0), json!(1e12), json!("1"), Value::Null] {
            assert_eq!(
                reason(Topic::Items, None, &ts(bad), &limits),
                "wrong type: ts must be a non-negative integer"
            );
        }
        let interaction = |value: Value, kind: &str| {
            serde_json::to_vec(
                &json!({"user_id": "u", "item_id": "i", "kind": kind, "value": value, "ts": 1}),
            )
            .expect("json")
        };
        let Ok(Event::Interaction(e)) = decode(
            Topic::Interactions,
            None,
            &interaction(json!(5), "rating"),
            &limits,
        ) else {
            panic!("rating 5")
        };
        assert_eq!(e.value, Some(5.0));
        let Ok(Event::Interaction(e)) = decode(
            Topic::Interactions,
            None,
            &interaction(Value::Null, "view"),
            &limits,
        ) else {
            panic!("a view needs no value")
        };
        assert_eq!(e.value, None);
        assert_eq!(
            reason(
                Topic::Interactions,
                None,
                &interaction(json!(1e39), "click"),
                &limits
            ),
            "non-finite value"
        );
    }

    #[test]
    fn keys_are_checked_when_present() {
        let limits = Limits::default();
        let item = item_json(json!({}));
        assert!(decode(Topic::Items, Some(b"i1"), &item, &limits).is_ok());
        assert_eq!(
            reason(Topic::Items, Some(&[0xff, 0xfe]), &item, &limits),
            "key is not utf-8"
        );
        let relation = br#"{"src":"a","dst":"b","relation":"r","op":"add","ts":1}"#;
        assert!(decode(Topic::ItemRelations, Some(b"a|r|b"), relation, &limits).is_ok());
        assert_eq!(
            reason(Topic::ItemRelations, Some(b"b|r|a"), relation, &limits),
            "key mismatch: key 'b|r|a' but src|relation|dst 'a|r|b'"
        );
        // A user id may contain '|' (only item-side ids are parts of a relation key).
        let interaction = br#"{"user_id":"u|1","item_id":"i","kind":"view","ts":1}"#;
        assert!(decode(Topic::Interactions, Some(b"u|1"), interaction, &limits).is_ok());
        // Quoted input is cut and escaped, so a reason stays one short line.
        let long_key = format!("{}\n'{}", "k".repeat(10), "x".repeat(100));
        let got = reason(Topic::Items, Some(long_key.as_bytes()), &item, &limits);
        assert_eq!(
            got,
            format!(
                "key mismatch: key '{}\\n\\'{}…' but item_id 'i1'",
                "k".repeat(10),
                "x".repeat(52)
            )
        );
        // The topic decides the type: an item body on the interactions topic is
        // missing the interaction's fields.
        assert_eq!(
            reason(Topic::Interactions, None, &item, &limits),
            "missing field user_id"
        );
    }

    #[test]
    fn empty_payloads_and_tombstones_are_rejected() {
        let limits = Limits::default();
        for payload in [&b""[..], b"   \n\t", b"null"] {
            let r = decode(Topic::Items, Some(b"i1"), payload, &limits).expect_err("rejected");
            let expected = if payload == b"null" {
                ReasonCode::Schema
            } else {
                ReasonCode::Json
            };
            assert_eq!(r.reason_code(), expected, "{r}");
        }
    }

    #[test]
    fn topics_and_codes_name_themselves() {
        for topic in Topic::ALL {
            assert_eq!(Topic::from_name(topic.name()), Some(topic));
            assert_eq!(to_value(&topic), json!(topic.name()));
        }
        assert_eq!(Topic::from_name(DLQ_TOPIC), None);
        assert_eq!(Topic::from_name("Items"), None);
        for code in ReasonCode::ALL {
            assert_eq!(to_value(&code), json!(code.as_str()));
        }
        for kind in [Kind::View, Kind::Click, Kind::Purchase, Kind::Rating] {
            assert_eq!(Kind::from_name(kind.as_str()), Some(kind));
            assert_eq!(to_value(&kind), json!(kind.as_str()));
        }
        for op in [Op::Add, Op::Remove] {
            assert_eq!(Op::from_name(op.as_str()), Some(op));
            assert_eq!(to_value(&op), json!(op.as_str()));
        }
    }

    #[test]
    fn limits_read_from_config_with_defaults() {
        let limits: Limits =
            serde_json::from_str(r#"{"max_message_bytes": 1024}"#).expect("limits");
        assert_eq!(limits.max_message_bytes, 1024);
        assert_eq!(limits.max_id_bytes, Limits::default().max_id_bytes);
        assert!(
            serde_json::from_str::<Limits>(r#"{"max_mesage_bytes": 1}"#).is_err(),
            "typo"
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Ok(plain));
        }
        // Every alphabet position and the high bit.
        assert_eq!(base64_encode(&[0x00, 0x10, 0x83, 0xff]), "ABCD/w==");
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)), Ok(all));
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "Zm 9", "=Zg="] {
            assert_eq!(base64_decode(bad), Err(InvalidBase64), "{bad}");
        }
    }

    #[test]
    fn dead_letter_keeps_the_message_and_matches_dlq_json() {
        let payload = br#"{"src":"a","dst":"a","relation":"r","op":"add","ts":1}"#;
        let rejection = decode(
            Topic::ItemRelations,
            Some(b"a|r|a"),
            payload,
            &Limits::default(),
        )
        .expect_err("self relation");
        let letter = DeadLetter::new(
            "item-relations",
            4,
            1234,
            Some(b"a|r|a"),
            payload,
            &rejection,
            1_700_000_000_000,
        );
        let json = letter.encode().expect("json");
        let value: Value = serde_json::from_slice(&json).expect("json");
        let dlq = read_json("schemas/dlq.json");
        assert!(schema_accepts(&dlq, &dlq, &value), "{value}");
        assert_eq!(value["reason"], "self relation");
        assert_eq!(value["reason_code"], "semantic");
        assert_eq!(value["topic"], "item-relations");
        assert_eq!(
            (value["partition"].as_u64(), value["offset"].as_u64()),
            (Some(4), Some(1234))
        );
        assert_eq!(value["key_base64"], "YXxyfGE=");
        // The record streams/README.md shows.
        assert_eq!(
            value["payload_base64"],
            "eyJzcmMiOiJhIiwiZHN0IjoiYSIsInJlbGF0aW9uIjoiciIsIm9wIjoiYWRkIiwidHMiOjF9"
        );
        assert_eq!(value["payload_bytes"].as_u64(), Some(54));
        assert_eq!(value["truncated"], false);
        assert_eq!(
            value["dead_lettered_at_ms"].as_u64(),
            Some(1_700_000_000_000)
        );
        let back: DeadLetter = serde_json::from_slice(&json).expect("read back");
        assert_eq!(back, letter);
        assert_eq!(back.original_payload().as_deref(), Ok(&payload[..]));
        assert_eq!(back.original_key(), Ok(Some(b"a|r|a".to_vec())));
        // No key: null, and still schema-valid.
        let keyless = to_value(&DeadLetter::new(
            "items",
            0,
            0,
            None,
            b"",
            &Rejection::EmptyPayload,
            0,
        ));
        assert_eq!(
            (&keyless["key_base64"], &keyless["key_bytes"]),
            (&Value::Null, &Value::Null)
        );
        assert!(schema_accepts(&dlq, &dlq, &keyless));
        // Too big: cut, flagged, original lengths kept.
        let big = vec![7u8; DLQ_MAX_PAYLOAD_BYTES + 5];
        let key = vec![b'k'; DLQ_MAX_KEY_BYTES + 1];
        let oversized = Rejection::Oversized {
            bytes: big.len(),
            limit: 65536,
        };
        let cut = DeadLetter::new("items", 1, 2, Some(&key), &big, &oversized, 3);
        assert!(cut.truncated);
        assert_eq!(cut.payload_bytes, big.len());
        assert_eq!(cut.key_bytes, Some(key.len()));
        assert_eq!(
            cut.original_payload().map(|p| p.len()),
            Ok(DLQ_MAX_PAYLOAD_BYTES)
        );
        assert_eq!(
            cut.original_key().map(|k| k.map(|k| k.len())),
            Ok(Some(DLQ_MAX_KEY_BYTES))
        );
        assert_eq!(
            cut.reason,
            format!("oversized: {} bytes > 65536", big.len())
        );
        assert_eq!(cut.reason_code, ReasonCode::Oversized);
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            rng_seed: RngSeed::Fixed(0x7468_6177),
            // Never write regression files into the source tree.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn topic() -> impl Strategy<Value = Topic> {
        prop::sample::select(Topic::ALL.to_vec())
    }

    fn finite_f32() -> impl Strategy<Value = f32> {
        any::<f32>().prop_filter("finite", |x| x.is_finite())
    }

    fn item_id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._:é😀-]{1,24}"
    }

    fn ts() -> impl Strategy<Value = u64> {
        0..=MAX_TS
    }

    fn item_event() -> impl Strategy<Value = ItemEvent> {
        (
            item_id(),
            "(?s).{0,40}",
            prop::option::of("(?s).{0,80}"),
            prop::collection::vec("[a-zA-Z' &]{1,16}", 0..4),
            prop::option::of(prop::collection::vec(finite_f32(), 0..8)),
            ts(),
        )
            .prop_map(|(item_id, title, description, categories, features, ts)| {
                ItemEvent {
                    item_id,
                    title,
                    description,
                    categories,
                    features,
                    ts,
                }
            })
    }

    fn relation_event() -> impl Strategy<Value = RelationEvent> {
        (item_id(), item_id(), "[a-z_.]{1,20}", prop::bool::ANY, ts())
            .prop_filter("no self relation", |(src, dst, ..)| src != dst)
            .prop_map(|(src, dst, relation, add, ts)| RelationEvent {
                src,
                dst,
                relation,
                op: if add { Op::Add } else { Op::Remove },
                ts,
            })
    }

    fn interaction_event() -> impl Strategy<Value = InteractionEvent> {
        let kind =
            prop::sample::select(vec![Kind::View, Kind::Click, Kind::Purchase, Kind::Rating]);
        (
            "(?s).{1,20}",
            item_id(),
            kind,
            prop::option::of(finite_f32()),
            finite_f32(),
            ts(),
        )
            .prop_map(
                |(user_id, item_id, kind, value, rating, ts)| InteractionEvent {
                    user_id,
                    item_id,
                    kind,
                    value: if kind == Kind::Rating {
                        Some(rating)
                    } else {
                        value
                    },
                    ts,
                },
            )
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            item_event().prop_map(Event::Item),
            relation_event().prop_map(Event::Relation),
            interaction_event().prop_map(Event::Interaction),
        ]
    }

    /// JSON values near the events: their field names, enum words, ids with and
    /// without separators, numbers around every limit; nested a little.
    fn near_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            // Fractional, or far beyond f32 (JSON Schema calls 3.0 an integer,
            // serde reads it as a float: the generator avoids that documented gap).
            1 => (-1e6f64..1e6).prop_map(|x| json!(x.trunc() + 0.25)),
            1 => prop::sample::select(vec![1e39, -1e39, F32_MAX, MAX_TS as f64 + 2.0])
                .prop_map(|x| json!(x)),
            1 => Just(json!(MAX_TS)),
            1 => Just(json!(MAX_TS + 1)),
            // Strings are what ids, titles and enums are made of: weigh them up.
            6 => "[a-c|]{0,4}".prop_map(Value::from),
            3 => prop::sample::select(vec![
                "add", "remove", "view", "click", "purchase", "rating", "like"
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELD_NAMES: [&str; 14] = [
        "item_id",
        "title",
        "description",
        "categories",
        "features",
        "ts",
        "src",
        "dst",
        "relation",
        "op",
        "user_id",
        "kind",
        "value",
        "extra",
    ];

    /// A topic and a JSON value near its events: either an object of random
    /// fields, or a valid event with up to three fields replaced or removed.
    fn near_case() -> impl Strategy<Value = (Topic, Value)> {
        let random = (
            topic(),
            prop::collection::btree_map(
                prop::sample::select(FIELD_NAMES.to_vec()),
                near_value(),
                0..9,
            ),
        )
            .prop_map(|(topic, fields)| {
                let object = fields.into_iter().map(|(k, v)| (k.to_owned(), v));
                (topic, Value::Object(object.collect()))
            });
        let edits = prop::collection::vec(
            (
                prop::sample::select(FIELD_NAMES.to_vec()),
                prop::option::of(near_value()),
            ),
            0..4,
        );
        let mutated = (event(), edits).prop_map(|(event, edits)| {
            let mut value: Value =
                serde_json::from_slice(&event.encode().expect("json")).expect("json");
            if let Some(object) = value.as_object_mut() {
                for (name, edit) in edits {
                    match edit {
                        Some(v) => object.insert(name.to_owned(), v),
                        None => object.remove(name),
                    };
                }
            }
            (event.topic(), value)
        });
        prop_oneof![random, mutated]
    }

    /// The agreement property is only as good as its cases: check that they
    /// reach both verdicts often.
    #[test]
    fn near_cases_reach_both_verdicts() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::new(config());
        let strategy = near_case();
        let (mut accepted, cases) = (0, 512);
        for _ in 0..cases {
            let (topic, value) = strategy.new_tree(&mut runner).expect("case").current();
            let payload = serde_json::to_vec(&value).expect("json");
            accepted += usize::from(decode(topic, None, &payload, &Limits::default()).is_ok());
        }
        eprintln!("near cases accepted: {accepted} of {cases}");
        assert!(
            accepted > cases / 5 && accepted < cases * 4 / 5,
            "{accepted} of {cases}"
        );
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            topic in topic(),
            key in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
            payload in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let limits = Limits::default();
            let decoded = decode(topic, key.as_deref(), &payload, &limits);
            // Whatever is accepted re-encodes to itself.
            if let Ok(event) = decoded {
                let again = event.encode().expect("json");
                prop_assert_eq!(decode(topic, None, &again, &limits), Ok(event));
            }
        }

        #[test]
        fn decode_never_panics_on_mutated_examples(
            topic in topic(),
            line in 0usize..5,
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), any::<u8>(), 0u8..3),
                1..6,
            ),
        ) {
            let lines = valid_lines(topic);
            let mut payload = lines[line % lines.len()].clone().into_bytes();
            for (at, byte, what) in edits {
                let i = at.index(payload.len() + 1);
                match what {
                    0 => payload.insert(i, byte),
                    1 if i < payload.len() => { payload.remove(i); }
                    _ if i < payload.len() => payload[i] = byte,
                    _ => payload.push(byte),
                }
            }
            let limits = Limits::default();
            if let Ok(event) = decode(topic, None, &payload, &limits) {
                prop_assert_eq!(event.topic(), topic);
                prop_assert_eq!(event.validate(&limits), Ok(()));
            }
        }

        #[test]
        fn events_round_trip(event in event()) {
            let limits = Limits::default();
            let payload = event.encode().expect("json");
            let key = event.key();
            let decoded = decode(event.topic(), Some(key.as_bytes()), &payload, &limits);
            prop_assert_eq!(decoded, Ok(event.clone()));
            // The typed serde derive reads the same JSON back to the same value.
            let via_serde = match &event {
                Event::Item(_) => serde_json::from_slice(&payload).map(Event::Item),
                Event::Relation(_) => serde_json::from_slice(&payload).map(Event::Relation),
                Event::Interaction(_) => serde_json::from_slice(&payload).map(Event::Interaction),
            };
            prop_assert_eq!(via_serde.ok(), Some(event));
        }

        #[test]
        fn base64_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let encoded = base64_encode(&bytes);
            prop_assert_eq!(encoded.len(), bytes.len().div_ceil(3) * 4);
            prop_assert_eq!(base64_decode(&encoded), Ok(bytes));
        }
    }

    proptest! {
        // Cheap cases, and the property that keeps schemas and decoder in step:
        // more of them.
        #![proptest_config(ProptestConfig { cases: 2048, ..config() })]

        #[test]
        fn decoder_and_schema_agree_on_near_events((topic, value) in near_case()) {
            let payload = serde_json::to_vec(&value).expect("json");
            let decoded = decode(topic, None, &payload, &Limits::default());
            // A JSON Schema cannot say src != dst: the one documented difference
            // (strings here are too short for bytes and characters to disagree).
            let self_relation = topic == Topic::ItemRelations
                && value["src"].is_string()
                && value["src"] == value["dst"];
            let expected = accepts(topic, &value) && !self_relation;
            prop_assert_eq!(decoded.is_ok(), expected, "{} {}: {:?}", topic, value, decoded);
        }
    }
}
