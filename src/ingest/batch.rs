//! What flows between the engine's stages: decoded messages ([`Msg`]) in
//! batches ([`Batch`]) with the offsets they complete, and the other work
//! ingest sends down the same ordered channel ([`Work`]).
//!
//! [`Batcher`] is the ingest stage's open batch: messages are added as the
//! consumer hands them over and the batch closes on its window or its size.
//! [`coalesce`] is the core stage's side: under load, the batches queued
//! behind the one it takes are applied with it.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::sync::mpsc;

use super::dlq::{Delivery, Letter};
use super::{Event, Topic};

/// A decoded event and when it entered Kafka (the message timestamp, ms),
/// from which freshness is measured.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The event.
    pub event: Event,
    /// Kafka message timestamp, ms since the epoch.
    pub kafka_ms: Option<i64>,
    /// For an item event, its text's embedding when the text stage computed
    /// it already; else the core computes it.
    pub text: Option<Vec<f32>>,
    /// The Kafka partition it was read from (an interaction's tells which
    /// replica owns its user, [`crate::serve::replica`]).
    pub partition: Option<i32>,
}

impl Msg {
    /// A message whose text is not embedded yet.
    pub fn new(event: Event, kafka_ms: Option<i64>) -> Self {
        Self {
            event,
            kafka_ms,
            text: None,
            partition: None,
        }
    }

    /// The same, read from `partition`.
    pub fn at(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// Wall-clock time in ms since the epoch, the clock of Kafka timestamps
/// (ingest delays, freshness, dead letters).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Caps `event`'s time at its Kafka timestamp plus `tolerance_ms`; whether
/// it was capped. Event time drives the engine's clock, which only moves
/// forward, and the popularity bias: one event from the far future would
/// otherwise change every ranking for good. The reference is the message's
/// own timestamp, so a restore re-reading it later caps it the same way; a
/// message without one (pre-0.10 formats) is not capped. The timestamp is
/// the broker's with `message.timestamp.type=LogAppendTime` on the input
/// topics (recommended: a producer's CreateTime can lie too).
pub fn cap_future(event: &mut Event, kafka_ms: Option<i64>, tolerance_ms: u64) -> bool {
    let Some(k) = kafka_ms else {
        return false;
    };
    event.cap_ts((k.max(0) as u64).saturating_add(tolerance_ms))
}

/// Offset of the last message read, per (topic, partition): storing it
/// (`rd_kafka_offset_store`) commits the offset after it. Topics are the
/// input topics' static names (no allocation per message).
pub type Offsets = BTreeMap<(&'static str, i32), i64>;

/// Decoded messages with the offsets they complete.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The accepted messages, in the order read.
    pub msgs: Vec<Msg>,
    /// Last offset per partition, stored once the batch is published.
    pub offsets: Offsets,
    /// Messages in the batch (dead-lettered and ignored ones included).
    pub messages: u64,
    /// Of them, messages of the item-relations topic.
    pub relation_messages: u64,
    /// When ingest closed the batch.
    pub closed: Instant,
    /// The batch's dead letters on their way: the offsets wait for them.
    pub deliveries: Vec<Delivery>,
}

impl Batch {
    /// Appends `later` (read after this batch): its messages follow, its
    /// offsets win (offsets only grow within a partition).
    pub fn absorb(&mut self, later: Batch) {
        self.msgs.extend(later.msgs);
        self.offsets.extend(later.offsets);
        self.messages += later.messages;
        self.relation_messages += later.relation_messages;
        self.deliveries.extend(later.deliveries);
    }

    /// Whether any message is an item event (whose text needs embedding).
    pub fn has_items(&self) -> bool {
        self.msgs.iter().any(|m| matches!(m.event, Event::Item(_)))
    }
}

/// What ingest sends down the pipeline, in order.
#[derive(Debug)]
pub enum Work {
    /// Events to apply and publish.
    Batch(Batch),
    /// The input went quiet: refresh and reconcile.
    Idle,
    /// The model folder holds a new version: load and swap it.
    Reload,
    /// Redis lost what was published (a restart without persistence, a
    /// flush): publish everything again.
    Repair,
    /// This replica's share of the users changed (a rebalance): publish the
    /// users it gained ([`crate::serve::replica`]).
    Owned,
}

/// `w` merged with the batches queued behind it in `rx`, in order, while
/// they hold at most `max` messages together; the first work that is no
/// batch (or would pass `max`) is left in `held`.
pub fn coalesce(
    w: Work,
    rx: &mut mpsc::Receiver<Work>,
    held: &mut Option<Work>,
    max: usize,
) -> Work {
    let Work::Batch(mut batch) = w else {
        return w;
    };
    while let Ok(next) = rx.try_recv() {
        match next {
            Work::Batch(b) if batch.msgs.len() + b.msgs.len() <= max => batch.absorb(b),
            other => {
                *held = Some(other);
                break;
            }
        }
    }
    Work::Batch(batch)
}

/// A batch as [`Batcher::close`] hands it over.
#[derive(Debug)]
pub struct Closed {
    /// The batch (no deliveries yet).
    pub batch: Batch,
    /// Seconds each accepted message spent between Kafka and ingest.
    pub delays: Vec<f64>,
    /// Its dead letters, to send.
    pub letters: Vec<Letter>,
}

/// The ingest stage's open batch.
#[derive(Debug, Default)]
pub struct Batcher {
    msgs: Vec<Msg>,
    offsets: Offsets,
    messages: u64,
    relation_messages: u64,
    /// Seconds each accepted message spent between Kafka and ingest.
    delays: Vec<f64>,
    /// Dead letters to send when the batch closes, and their bytes.
    letters: Vec<Letter>,
    letter_bytes: usize,
    opened: Option<Instant>,
}

/// A batch closes when its dead letters hold this many bytes (a backlog of
/// large rejected messages stays bounded in memory).
pub const MAX_LETTER_BYTES: usize = 16 << 20;

impl Batcher {
    /// Records one message read at `(topic, partition, offset)` (`topic`
    /// `None`: not an input topic): `msg` when
    /// it was accepted (`None` when dead-lettered or ignored), with its
    /// ingest delay in seconds when known. Opens the batch if none is open.
    pub fn push(
        &mut self,
        topic: Option<Topic>,
        partition: i32,
        offset: i64,
        msg: Option<(Msg, Option<f64>)>,
    ) {
        self.opened.get_or_insert_with(Instant::now);
        self.messages += 1;
        if topic == Some(Topic::ItemRelations) {
            self.relation_messages += 1;
        }
        if let Some((m, delay)) = msg {
            self.msgs.push(m);
            self.delays.extend(delay);
        }
        // Only the input topics are subscribed: another one has no offset to
        // commit here.
        if let Some(t) = topic {
            self.offsets.insert((t.name(), partition), offset);
        }
    }

    /// Records a rejected message's dead letter (its offset is recorded by
    /// [`Batcher::push`]).
    pub fn push_letter(&mut self, letter: Letter) {
        self.letter_bytes += letter.bytes();
        self.letters.push(letter);
    }

    /// When the open batch got its first message (`None`: no batch open).
    pub fn opened(&self) -> Option<Instant> {
        self.opened
    }

    /// Whether the batch holds `max` messages, or [`MAX_LETTER_BYTES`] of
    /// dead letters.
    pub fn is_full(&self, max: usize) -> bool {
        self.messages >= max.max(1) as u64 || self.letter_bytes >= MAX_LETTER_BYTES
    }

    /// Whether the open batch is due: open for `window` or longer. Checked
    /// before each read, so that a steady stream (where a read never waits)
    /// still closes batches on time.
    pub fn is_due(&self, window: std::time::Duration) -> bool {
        self.opened.is_some_and(|t| t.elapsed() >= window)
    }

    /// Closes the open batch: it, its messages' ingest delays and its dead
    /// letters, or `None` when no batch is open.
    pub fn close(&mut self) -> Option<Closed> {
        self.opened.take()?;
        let batch = Batch {
            msgs: std::mem::take(&mut self.msgs),
            offsets: std::mem::take(&mut self.offsets),
            messages: std::mem::take(&mut self.messages),
            relation_messages: std::mem::take(&mut self.relation_messages),
            closed: Instant::now(),
            deliveries: Vec::new(),
        };
        self.letter_bytes = 0;
        Some(Closed {
            batch,
            delays: std::mem::take(&mut self.delays),
            letters: std::mem::take(&mut self.letters),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ingest::{InteractionEvent, ItemEvent, Kind, Op, RelationEvent};

    pub(crate) fn item(id: &str) -> Msg {
        Msg::new(
            Event::Item(ItemEvent {
                item_id: id.into(),
                title: format!("title of {id}"),
                description: None,
                categories: vec![],
                features: None,
                ts: 1,
            }),
            Some(1),
        )
    }

    pub(crate) fn edge(a: &str, b: &str) -> Msg {
        Msg::new(
            Event::Relation(RelationEvent {
                src: a.into(),
                dst: b.into(),
                relation: "also_bought".into(),
                op: Op::Add,
                ts: 1,
            }),
            Some(1),
        )
    }

    pub(crate) fn click(u: &str, i: &str) -> Msg {
        Msg::new(
            Event::Interaction(InteractionEvent {
                user_id: u.into(),
                item_id: i.into(),
                kind: Kind::Click,
                value: None,
                ts: 1,
            }),
            Some(1),
        )
    }

    pub(crate) fn batch(msgs: Vec<Msg>) -> Batch {
        let mut b = Batcher::default();
        for (n, m) in msgs.into_iter().enumerate() {
            let topic = m.event.topic();
            b.push(Some(topic), 0, n as i64, Some((m, None)));
        }
        b.close().expect("an open batch").batch
    }

    #[test]
    fn a_batch_keeps_its_last_offset_per_partition_and_counts_rejects() {
        let mut b = Batcher::default();
        assert!(b.close().is_none(), "nothing open");
        b.push(Some(Topic::Items), 0, 5, Some((item("a"), Some(0.5))));
        b.push(Some(Topic::Items), 0, 6, None);
        b.push(
            Some(Topic::ItemRelations),
            2,
            9,
            Some((edge("a", "b"), None)),
        );
        assert!(b.opened().is_some());
        assert!(b.is_full(3) && !b.is_full(4));
        let Closed { batch, delays, .. } = b.close().unwrap();
        assert_eq!(batch.msgs.len(), 2);
        assert_eq!((batch.messages, batch.relation_messages), (3, 1));
        assert_eq!(batch.offsets[&("items", 0)], 6);
        assert_eq!(batch.offsets[&("item-relations", 2)], 9);
        assert_eq!(delays, vec![0.5]);
        assert!(b.opened().is_none() && b.close().is_none());
    }

    /// Defect: one valid event with `ts` = 2^53 − 1 moved the engine's clock
    /// to the year 287396 and changed every user's list for good.
    #[test]
    fn far_future_times_are_capped_to_the_kafka_time_plus_tolerance() {
        let mut far = click("u", "i");
        if let Event::Interaction(e) = &mut far.event {
            e.ts = crate::ingest::events::MAX_TS;
        }
        let kafka = 1_700_000_000_000i64;
        assert!(cap_future(&mut far.event, Some(kafka), 60_000));
        assert_eq!(far.event.ts(), kafka as u64 + 60_000);
        // Within the tolerance, or in the past: kept.
        let mut near = click("u", "i");
        if let Event::Interaction(e) = &mut near.event {
            e.ts = kafka as u64 + 59_000;
        }
        assert!(!cap_future(&mut near.event, Some(kafka), 60_000));
        assert_eq!(near.event.ts(), kafka as u64 + 59_000);
        // No Kafka timestamp: nothing to cap against (a restore must cap as
        // the live read did, so never against the wall clock).
        let mut none = click("u", "i");
        if let Event::Interaction(e) = &mut none.event {
            e.ts = crate::ingest::events::MAX_TS;
        }
        assert!(!cap_future(&mut none.event, None, 0));
    }

    #[test]
    fn a_batch_is_due_after_its_window() {
        let mut b = Batcher::default();
        let window = std::time::Duration::from_millis(30);
        assert!(!b.is_due(window), "nothing open");
        b.push(Some(Topic::Items), 0, 1, Some((item("a"), None)));
        assert!(!b.is_due(window));
        std::thread::sleep(window);
        assert!(b.is_due(window));
        b.close();
        assert!(!b.is_due(window));
    }

    #[test]
    fn coalesce_merges_queued_batches_up_to_the_cap_and_holds_the_rest() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.try_send(Work::Batch(batch(vec![item("b"), item("c")])))
            .unwrap();
        tx.try_send(Work::Batch(batch(vec![item("d"), item("e")])))
            .unwrap();
        tx.try_send(Work::Idle).unwrap();
        let mut held = None;
        let w = coalesce(Work::Batch(batch(vec![item("a")])), &mut rx, &mut held, 3);
        let Work::Batch(b) = w else { panic!("a batch") };
        assert_eq!(b.msgs.len(), 3, "a + b, c; d, e would pass the cap");
        assert!(matches!(held, Some(Work::Batch(ref h)) if h.msgs.len() == 2));
        let mut held2 = None;
        let w = coalesce(held.take().unwrap(), &mut rx, &mut held2, 10);
        assert!(matches!(w, Work::Batch(ref b) if b.msgs.len() == 2));
        assert!(matches!(held2, Some(Work::Idle)), "idle is never merged");
    }
}
