//! The text stage: item texts embedded on a thread of their own, while the
//! core works on the batch before.
//!
//! A batch's relation events go on at once (an edge naming an item not
//! described yet gives it a placeholder, as it would had it come first); its
//! items and interactions follow once the texts are embedded (a user's list
//! needs the items described). The stage ends when its input closes, after
//! passing on everything it received.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use ndarray::Array2;
use tokio::sync::mpsc;

use super::text::TextEncoder;
use crate::ingest::batch::{coalesce, Batch, Msg, Work};
use crate::ingest::{Event, ItemEvent, Topic};
use crate::serve::metrics::Metrics;

/// The text of an item event the encoder embeds: `title. description`, or
/// whichever of the two is there.
pub fn item_text(e: &ItemEvent) -> String {
    match e.description.as_deref() {
        Some(d) if !d.is_empty() && !e.title.is_empty() => format!("{}. {d}", e.title),
        Some(d) if !d.is_empty() => d.to_string(),
        _ => e.title.clone(),
    }
}

/// What embeds the item texts of a batch: the [`TextEncoder`], or a stand-in
/// in tests.
pub trait EmbedTexts: Send + 'static {
    /// Sets [`Msg::text`] of every item event in `msgs` that has none yet;
    /// returns how many were set.
    fn embed_texts(&self, msgs: &mut [Msg]) -> Result<usize>;
    /// The execution provider, a metric label.
    fn provider(&self) -> &'static str;
}

impl EmbedTexts for Arc<TextEncoder> {
    fn embed_texts(&self, msgs: &mut [Msg]) -> Result<usize> {
        embed_texts(self, msgs)
    }

    fn provider(&self) -> &'static str {
        TextEncoder::provider(self)
    }
}

/// Embeds the text of every item event in `msgs` that has none yet. An
/// empty text gets a zero vector. Returns the number of texts embedded.
pub fn embed_texts(text: &TextEncoder, msgs: &mut [Msg]) -> Result<usize> {
    embed_with(msgs, text.dim(), |strs| Ok(text.embed(strs)?))
}

/// [`embed_texts`] with `embed` turning the non-empty texts into rows.
fn embed_with(
    msgs: &mut [Msg],
    dim: usize,
    embed: impl FnOnce(&[&str]) -> Result<Array2<f32>>,
) -> Result<usize> {
    let mut todo: Vec<(usize, String)> = Vec::new();
    for (k, m) in msgs.iter().enumerate() {
        if let (Event::Item(e), None) = (&m.event, &m.text) {
            todo.push((k, item_text(e)));
        }
    }
    let nonempty: Vec<&(usize, String)> = todo.iter().filter(|(_, t)| !t.is_empty()).collect();
    let strs: Vec<&str> = nonempty.iter().map(|(_, t)| t.as_str()).collect();
    let emb = if strs.is_empty() {
        Array2::zeros((0, dim))
    } else {
        embed(&strs)?
    };
    for (row, (k, _)) in nonempty.iter().enumerate() {
        msgs[*k].text = Some(emb.row(row).to_vec());
    }
    for (k, t) in &todo {
        if t.is_empty() {
            msgs[*k].text = Some(vec![0.0; dim]);
        }
    }
    Ok(todo.len())
}

/// Texts below which a batch is not split among the pool's encoders.
const MIN_PER_ENCODER: usize = 16;

/// Text encoders, one ONNX Runtime session each, run side by side on the
/// texts of a batch: each takes a contiguous share of them on a thread of
/// its own (ONNX Runtime with one intra-op thread per session is fastest on
/// few cores, so parallelism comes from sessions, not from intra-op threads).
pub struct TextPool {
    encoders: Vec<Arc<TextEncoder>>,
}

impl TextPool {
    /// `first` (the core's encoder) and `threads − 1` more loaded with `cfg`.
    pub fn new(
        first: Arc<TextEncoder>,
        cfg: &super::text::TextEncoderConfig,
        threads: usize,
    ) -> Result<Self> {
        let mut encoders = vec![first];
        for _ in 1..threads.max(1) {
            encoders.push(Arc::new(TextEncoder::load(cfg)?));
        }
        Ok(Self { encoders })
    }

    /// Sessions in the pool.
    pub fn threads(&self) -> usize {
        self.encoders.len()
    }

    /// Row `i` the embedding of `texts[i]`, the texts shared among the
    /// encoders when there are enough of them.
    pub fn embed(&self, texts: &[&str]) -> Result<Array2<f32>> {
        let parts = self
            .encoders
            .len()
            .min(texts.len() / MIN_PER_ENCODER)
            .max(1);
        if parts == 1 {
            return Ok(self.encoders[0].embed(texts)?);
        }
        let chunk = texts.len().div_ceil(parts);
        let rows: Vec<Result<Array2<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = texts
                .chunks(chunk)
                .zip(&self.encoders)
                .map(|(part, enc)| scope.spawn(move || Ok(enc.embed(part)?)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a text encoder thread panicked")))
                })
                .collect()
        });
        let rows = rows.into_iter().collect::<Result<Vec<_>>>()?;
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        Ok(ndarray::concatenate(ndarray::Axis(0), &views)?)
    }
}

impl EmbedTexts for TextPool {
    fn embed_texts(&self, msgs: &mut [Msg]) -> Result<usize> {
        embed_with(msgs, self.encoders[0].dim(), |strs| self.embed(strs))
    }

    fn provider(&self) -> &'static str {
        self.encoders[0].provider()
    }
}

/// Splits a batch into its relation events, which can go ahead while the
/// items' texts are embedded, and the rest (items and interactions), each
/// with its topics' offsets and message counts: `(to send now, to send once
/// the texts are embedded)`. Without item events the whole batch goes now;
/// without relation messages, the whole batch waits for its texts.
pub fn split_items(b: Batch) -> (Option<Batch>, Option<Batch>) {
    if !b.has_items() {
        return (Some(b), None);
    }
    if b.relation_messages == 0 {
        return (None, Some(b));
    }
    let relations = Topic::ItemRelations.name();
    let (rel_msgs, item_msgs): (Vec<Msg>, Vec<Msg>) = b
        .msgs
        .into_iter()
        .partition(|m| matches!(m.event, Event::Relation(_)));
    let (rel_offsets, item_offsets) = b
        .offsets
        .into_iter()
        .partition(|((t, _), _)| *t == relations);
    let now = Batch {
        msgs: rel_msgs,
        offsets: rel_offsets,
        messages: b.relation_messages,
        relation_messages: b.relation_messages,
        closed: b.closed,
        // Both halves store offsets: both wait for the dead letters.
        deliveries: b.deliveries.clone(),
    };
    let later = Batch {
        msgs: item_msgs,
        offsets: item_offsets,
        messages: b.messages - b.relation_messages,
        relation_messages: 0,
        closed: b.closed,
        deliveries: b.deliveries,
    };
    (Some(now), Some(later))
}

/// Most messages the text stage merges from queued batches.
const MAX_COALESCED: usize = 20_000;

/// The text stage.
pub struct TextStage<E> {
    encoder: E,
    metrics: Arc<Metrics>,
}

impl<E: EmbedTexts> TextStage<E> {
    /// The stage around `encoder`, reporting to `metrics`
    /// (`thaw_infer_seconds{model="text_encoder"}`).
    pub fn build(encoder: E, metrics: Arc<Metrics>) -> Self {
        Self { encoder, metrics }
    }

    /// Runs until `rx` closes (the shutdown: ingest stopped and drained) or
    /// `tx` does (the core stopped); blocking, on a thread of its own.
    pub fn run(self, mut rx: mpsc::Receiver<Work>, tx: mpsc::Sender<Work>) -> Result<()> {
        let mut held: Option<Work> = None;
        while let Some(w) = held.take().or_else(|| rx.blocking_recv()) {
            // Dynamic batches: the batches queued behind this one go with
            // it, so the encoders get full batches under load.
            let w = coalesce(w, &mut rx, &mut held, MAX_COALESCED);
            let Work::Batch(b) = w else {
                if tx.blocking_send(w).is_err() {
                    break;
                }
                continue;
            };
            let (now, later) = split_items(b);
            if let Some(now) = now {
                if tx.blocking_send(Work::Batch(now)).is_err() {
                    break;
                }
            }
            let Some(mut later) = later else { continue };
            let t0 = Instant::now();
            let n = self.encoder.embed_texts(&mut later.msgs)?;
            if n > 0 {
                let provider = self.encoder.provider();
                self.metrics
                    .inference("text_encoder", provider, n, t0.elapsed().as_secs_f64());
            }
            if tx.blocking_send(Work::Batch(later)).is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::batch::tests::{batch, click, edge, item};

    /// Sets each text to `[n]`, n the number of calls so far.
    struct Counting(std::sync::Mutex<usize>);

    impl EmbedTexts for Counting {
        fn embed_texts(&self, msgs: &mut [Msg]) -> Result<usize> {
            let mut calls = self.0.lock().unwrap();
            *calls += 1;
            let mut n = 0;
            for m in msgs
                .iter_mut()
                .filter(|m| matches!(m.event, Event::Item(_)))
            {
                m.text = Some(vec![*calls as f32]);
                n += 1;
            }
            Ok(n)
        }

        fn provider(&self) -> &'static str {
            "test"
        }
    }

    fn run_stage(input: Vec<Work>) -> Vec<Work> {
        let (tx_in, rx_in) = mpsc::channel(16);
        let (tx_out, mut rx_out) = mpsc::channel(16);
        for w in input {
            tx_in.try_send(w).unwrap();
        }
        drop(tx_in);
        let metrics = Arc::new(Metrics::new());
        let stage = TextStage::build(Counting(Default::default()), metrics.clone());
        stage
            .run(rx_in, tx_out)
            .expect("the stage ends with its input");
        let mut out = Vec::new();
        while let Ok(w) = rx_out.try_recv() {
            out.push(w);
        }
        assert!(metrics.encode().contains("text_encoder"));
        out
    }

    #[test]
    fn relations_go_ahead_items_and_interactions_follow_embedded() {
        let b = batch(vec![
            item("a"),
            edge("a", "b"),
            click("u", "a"),
            edge("b", "c"),
        ]);
        let out = run_stage(vec![Work::Batch(b), Work::Idle]);
        assert_eq!(out.len(), 3);
        let Work::Batch(now) = &out[0] else { panic!() };
        assert_eq!(now.msgs.len(), 2);
        assert!(now
            .msgs
            .iter()
            .all(|m| matches!(m.event, Event::Relation(_))));
        assert_eq!((now.messages, now.relation_messages), (2, 2));
        assert_eq!(
            now.offsets.keys().map(|k| k.0).collect::<Vec<_>>(),
            ["item-relations"]
        );
        let Work::Batch(later) = &out[1] else {
            panic!()
        };
        assert_eq!(later.msgs.len(), 2);
        assert_eq!((later.messages, later.relation_messages), (2, 0));
        assert_eq!(later.msgs[0].text.as_deref(), Some(&[1.0][..]));
        assert!(later.msgs[1].text.is_none(), "an interaction has no text");
        assert!(matches!(out[2], Work::Idle));
    }

    #[test]
    fn batches_without_items_or_without_relations_stay_whole() {
        let edges = batch(vec![edge("a", "b"), click("u", "a")]);
        let items = batch(vec![item("a"), click("u", "a")]);
        let out = run_stage(vec![Work::Batch(edges), Work::Idle, Work::Batch(items)]);
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[0], Work::Batch(b) if b.msgs.len() == 2 && b.messages == 2));
        assert!(matches!(out[1], Work::Idle));
        assert!(matches!(&out[2], Work::Batch(b) if b.msgs.len() == 2 && b.msgs[0].text.is_some()));
    }

    #[test]
    fn queued_batches_are_embedded_together_in_order() {
        let first = batch(vec![item("a"), edge("a", "b")]);
        let second = batch(vec![click("u", "a"), item("b")]);
        let out = run_stage(vec![Work::Batch(first), Work::Batch(second), Work::Reload]);
        assert_eq!(out.len(), 3, "one merged batch, split, then the reload");
        let Work::Batch(now) = &out[0] else { panic!() };
        assert_eq!((now.msgs.len(), now.messages), (1, 1));
        let Work::Batch(later) = &out[1] else {
            panic!()
        };
        let order: Vec<&str> = later
            .msgs
            .iter()
            .map(|m| match &m.event {
                Event::Item(e) => e.item_id.as_str(),
                Event::Interaction(e) => e.user_id.as_str(),
                Event::Relation(_) => "edge",
            })
            .collect();
        assert_eq!(order, ["a", "u", "b"], "order kept");
        assert_eq!(later.messages, 3);
        assert!(
            later
                .msgs
                .iter()
                .filter(|m| matches!(m.event, Event::Item(_)))
                .all(|m| m.text.as_deref() == Some(&[1.0][..])),
            "both batches' items in one call"
        );
        assert!(matches!(out[2], Work::Reload));
    }

    #[test]
    fn item_text_joins_title_and_description() {
        let Event::Item(mut e) = item("a").event else {
            panic!()
        };
        e.title = "T".into();
        assert_eq!(item_text(&e), "T");
        e.description = Some("D".into());
        assert_eq!(item_text(&e), "T. D");
        e.title.clear();
        assert_eq!(item_text(&e), "D");
    }
}
