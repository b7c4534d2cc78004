//! Dead letters, written without holding the stream back.
//!
//! The ingest stage collects a batch's rejected messages ([`Letter`]) and, when
//! the batch closes, hands them to [`DeadLetters::deliver`], which sends them
//! all at once on a task of its own and returns a [`Delivery`]. The batch goes
//! on down the pipeline at once; the publish stage waits for its deliveries
//! before it stores the batch's offsets, so a dead letter is never lost to a
//! crash (at-least-once, like everything else).
//!
//! A record always fits: the producer's `message.max.bytes` is the DLQ topic's
//! `max.message.bytes` ([`record_limit`]) and each letter is cut to it
//! ([`DeadLetter::within`]). Should the broker still refuse one as too large
//! (a topic limit changed under the engine), the letter is resent without its
//! payload (its SHA-256 and lengths stay) rather than retried for ever.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

use super::events::Source;
use super::{DeadLetter, Rejection, Topic, DLQ_TOPIC};
use crate::kafka::KafkaSettings;
use crate::serve::error::{EngineError, Stage};
use crate::serve::metrics::{Health, Metrics};
use crate::serve::Progress;

/// librdkafka's default `message.max.bytes`.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// A rejected message, ready to send.
#[derive(Debug, Clone)]
pub struct Letter {
    /// The DLQ record's Kafka key ([`DeadLetter::record_key`]).
    pub key: Option<Vec<u8>>,
    /// The record's body.
    pub letter: DeadLetter,
    /// The source topic (for the counters).
    pub topic: Topic,
}

impl Letter {
    /// Bytes the letter holds in memory (for the batch's bound).
    pub fn bytes(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.letter.payload_base64.len()
            + self.letter.reason.len()
    }

    /// What is sent when the broker refuses the record as too large: the
    /// letter without its payload, then without its key too; false when
    /// nothing is left to cut.
    fn cut(&mut self) -> bool {
        tracing::warn!(
            topic = %self.letter.topic,
            offset = self.letter.offset,
            "dead letter too large for the DLQ topic; sent with less of the original"
        );
        self.letter.truncated = true;
        if !self.letter.payload_base64.is_empty() {
            self.letter.payload_base64.clear();
        } else if self.key.is_some() || self.letter.key_base64.is_some() {
            self.key = None;
            self.letter.key_base64 = None;
        } else {
            return false;
        }
        true
    }
}

/// The outcome of one batch's dead letters: `None` while they are on their
/// way, then `Ok` (all delivered) or the error that stopped them (only while
/// the engine stops).
#[derive(Debug, Clone)]
pub struct Delivery(watch::Receiver<Option<Result<(), String>>>);

impl Delivery {
    /// A delivery that is already done (for tests).
    pub fn done() -> Self {
        Self(watch::channel(Some(Ok(()))).1)
    }

    /// Waits for the batch's dead letters: `Err` when they could not be
    /// delivered before the engine stopped.
    pub async fn wait(mut self) -> Result<()> {
        match self.0.wait_for(Option::is_some).await {
            Ok(r) => match r.as_ref() {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(anyhow::anyhow!("dead letters not delivered: {e}")),
                None => unreachable!("wait_for returned a pending delivery"),
            },
            Err(_) => Err(anyhow::anyhow!("dead-letter delivery task ended")),
        }
    }
}

/// The dead-letter writer of the ingest stage.
pub struct DeadLetters {
    producer: FutureProducer,
    max_record: usize,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    health: Arc<Health>,
}

impl DeadLetters {
    /// The DLQ producer, its `message.max.bytes` set to the DLQ topic's
    /// record limit ([`record_limit`]).
    pub async fn build(
        kafka: &KafkaSettings,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        health: Arc<Health>,
    ) -> Result<Self> {
        let max_record = record_limit(kafka).await;
        let mut cfg = kafka.producer_config();
        cfg.set("message.max.bytes", max_record.to_string());
        let producer = cfg.create().context("creating the DLQ producer")?;
        tracing::info!(max_record, "dead-letter record limit");
        Ok(Self {
            producer,
            max_record,
            metrics,
            progress,
            health,
        })
    }

    /// The largest DLQ record this writer sends, in bytes.
    pub fn max_record(&self) -> usize {
        self.max_record
    }

    /// The dead letter of a message `rejection` refused, cut to the record
    /// limit.
    pub fn letter(&self, topic: Topic, source: &Source<'_>, rejection: &Rejection) -> Letter {
        let now = super::batch::now_ms() as u64;
        Letter {
            key: DeadLetter::record_key(source.key).map(<[u8]>::to_vec),
            letter: DeadLetter::within(source, rejection, now, self.max_record),
            topic,
        }
    }

    /// Sends `letters` on a task of their own, each retried until delivered
    /// or, once `stop` is set, until a round fails. Each delivered letter is
    /// counted (`thaw_ingest_dead_letters_total{reason}`, the topic's
    /// `dead_lettered` outcome, [`Progress::dead_lettered`]).
    pub fn deliver(&self, letters: Vec<Letter>, stop: watch::Receiver<bool>) -> Delivery {
        let (tx, rx) = watch::channel(None);
        let run = Run {
            producer: self.producer.clone(),
            metrics: self.metrics.clone(),
            progress: self.progress.clone(),
            health: self.health.clone(),
        };
        tokio::spawn(async move {
            let r = run.all(letters, stop).await;
            let _ = tx.send(Some(r));
        });
        Delivery(rx)
    }
}

/// What a delivery task holds.
struct Run {
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    health: Arc<Health>,
}

impl Run {
    async fn all(self, letters: Vec<Letter>, stop: watch::Receiver<bool>) -> Result<(), String> {
        let mut pending = letters;
        let mut delay = Duration::from_millis(100);
        loop {
            let sends = pending.iter().map(|l| self.send(l));
            let results = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            let mut error = None;
            for (l, r) in pending.into_iter().zip(results) {
                match r {
                    Ok(()) => self.count(&l),
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                        let mut l = l;
                        if l.cut() {
                            failed.push(l);
                        } else {
                            self.give_up(&l);
                        }
                    }
                    Err(e) => {
                        error = Some(e);
                        failed.push(l);
                    }
                }
            }
            if failed.is_empty() {
                self.health.dlq_ok.store(true, Ordering::SeqCst);
                return Ok(());
            }
            pending = failed;
            if let Some(e) = &error {
                self.health.dlq_ok.store(false, Ordering::SeqCst);
                EngineError::retryable(Stage::Ingest, anyhow::anyhow!("dead-letter write: {e}"))
                    .report(&self.metrics);
                if *stop.borrow() {
                    return Err(format!("stopping with {} undelivered: {e}", pending.len()));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }

    /// A letter the broker refuses even without its payload and key: counted
    /// as a runtime error and logged with where it came from, never retried
    /// for ever (the stream must go on).
    fn give_up(&self, l: &Letter) {
        EngineError::retryable(
            Stage::Ingest,
            anyhow::anyhow!(
                "dead letter of {}/{}@{} refused as too large even without payload and key; dropped",
                l.letter.topic,
                l.letter.partition,
                l.letter.offset
            ),
        )
        .report(&self.metrics);
    }

    async fn send(&self, l: &Letter) -> Result<(), KafkaError> {
        let body = serde_json::to_vec(&l.letter).expect("a dead letter serialises");
        let mut rec = FutureRecord::<[u8], [u8]>::to(DLQ_TOPIC).payload(&body);
        if let Some(k) = &l.key {
            rec = rec.key(k);
        }
        self.producer
            .send(rec, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    fn count(&self, l: &Letter) {
        self.metrics.event(l.topic.name(), "dead_lettered");
        self.metrics.dead_letter(l.letter.reason_code.as_str());
        self.progress.dead_lettered.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(
            topic = %l.letter.topic,
            partition = l.letter.partition,
            offset = l.letter.offset,
            reason = %l.letter.reason,
            "dead-lettered"
        );
    }
}

/// The DLQ record limit: the DLQ topic's `max.message.bytes` as the broker
/// reports it (else as `streams/topics.json` gives it), at most a
/// `message.max.bytes` set in `kafka.properties`.
pub async fn record_limit(kafka: &KafkaSettings) -> usize {
    let topic = broker_topic_limit(kafka).await.unwrap_or_else(|| {
        let fallback = crate::kafka::topic_config(DLQ_TOPIC, "max.message.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES);
        tracing::info!(
            fallback,
            "DLQ topic limit not read from the broker; using streams/topics.json"
        );
        fallback
    });
    match kafka
        .properties
        .get("message.max.bytes")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(own) => own.min(topic),
        None => topic,
    }
}

/// The DLQ topic's `max.message.bytes` from the broker (DescribeConfigs),
/// `None` when it does not answer within 3 s or has no such value.
async fn broker_topic_limit(kafka: &KafkaSettings) -> Option<usize> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config(&[]).create().ok()?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(3)));
    let spec = [ResourceSpecifier::Topic(DLQ_TOPIC)];
    let fut = admin.describe_configs(&spec, &opts);
    let results = tokio::time::timeout(Duration::from_secs(4), fut)
        .await
        .ok()?
        .ok()?;
    let resource = results.into_iter().next()?.ok()?;
    resource
        .get("max.message.bytes")?
        .value
        .as_deref()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::events::{sha256_hex, DLQ_RECORD_OVERHEAD};

    fn oversized(n: usize) -> Rejection {
        Rejection::Oversized {
            bytes: n,
            limit: 65536,
        }
    }

    /// Defect: a 1 MiB message (accepted by its topic) became a 1.4 MB dead
    /// letter, over the producer's 1,000,000-byte limit, retried for ever.
    #[test]
    fn the_largest_dead_letter_fits_the_record_limit_with_its_digest() {
        let payload: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let key = vec![b'k'; 1 << 20];
        let source = Source {
            topic: "items",
            partition: 0,
            offset: 9,
            key: Some(&key),
            payload: &payload,
        };
        for limit in [LIBRDKAFKA_MESSAGE_MAX_BYTES, 3 << 20, 200_000] {
            let l = DeadLetter::within(&source, &oversized(payload.len()), 1, limit);
            let body = l.encode().unwrap().len();
            let record_key = DeadLetter::record_key(Some(&key)).unwrap().len();
            assert!(
                body + record_key + DLQ_RECORD_OVERHEAD <= limit,
                "{body} + {record_key} > {limit}"
            );
            assert!(l.truncated && l.payload_bytes == payload.len());
            let kept = l.original_payload().unwrap();
            assert!(!kept.is_empty() && payload.starts_with(&kept));
            assert_eq!(l.payload_sha256, sha256_hex(&payload));
        }
        // Small letters are kept whole.
        let small = Source {
            payload: b"{}",
            key: None,
            ..source
        };
        let l = DeadLetter::within(&small, &oversized(2), 1, LIBRDKAFKA_MESSAGE_MAX_BYTES);
        assert!(!l.truncated);
        assert_eq!(l.original_payload().unwrap(), b"{}");
    }

    #[tokio::test]
    async fn the_record_limit_follows_the_topic_and_a_smaller_own_setting() {
        // No broker answers here: the topic limit comes from topics.json.
        let mut k = KafkaSettings::with_brokers("127.0.0.1:1");
        assert_eq!(record_limit(&k).await, 3 << 20, "topics.json: 3 MiB");
        k.properties
            .insert("message.max.bytes".into(), "500000".into());
        assert_eq!(record_limit(&k).await, 500_000);
    }
}
