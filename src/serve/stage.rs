//! The core stage: one blocking thread owns the engine's state ([`Core`]) and
//! turns each unit of work into what to publish ([`Out`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc;

use super::config::ModelSettings;
use super::error::{EngineError, Stage};
use super::metrics::Metrics;
use super::snapshot::{Covered, Snapshots};
use super::state::{Applied, Core, LoadedModel, Mode};
use crate::ingest::batch::{coalesce, Batch, Work};
use crate::publish::stage::Out;

/// Loads the model folder named by `s`.
pub fn load_model(s: &ModelSettings) -> Result<LoadedModel> {
    let model = LoadedModel::load(&s.dir, &s.text_dir, s.ort_dylib.as_deref())?;
    // The version names the Redis keys: refused here, not at the first write.
    crate::publish::keys::check_part("the model version", &model.card.version)?;
    Ok(model)
}

/// The snapshot a stopping core stage leaves to write.
pub struct FinalSnapshot {
    snapshots: Snapshots,
    state: super::state::CoreState,
    covered: Covered,
}

impl FinalSnapshot {
    /// Writes it (after the write in flight), unless the last snapshot
    /// covers the same offsets.
    pub fn write(mut self) {
        self.snapshots.finish(self.state, self.covered);
    }
}

/// The core stage.
pub struct CoreStage {
    core: Core,
    /// Most messages applied in one go when batches queue up.
    max_coalesced: usize,
    /// Longest a backlog may hold back propagation and publishing
    /// ([`Mode::CatchUp`]); zero: never held back.
    catch_up: Duration,
    /// The batches held back: their offsets and messages go out with the
    /// next live batch's publish, never before (at-least-once).
    held: Option<(Batch, Instant)>,
    /// Where a new model version is loaded from on [`Work::Reload`].
    model: ModelSettings,
    /// Per input partition, the next offset: every message before it is in
    /// the state.
    covered: Covered,
    /// The snapshot writer (`snapshot.dir`).
    snapshots: Option<Snapshots>,
    metrics: Arc<Metrics>,
}

impl CoreStage {
    /// The stage around `core`; `catch_up` as [`CoreStage::catch_up`].
    pub fn build(
        core: Core,
        max_coalesced: usize,
        catch_up: Duration,
        model: ModelSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            core,
            max_coalesced: max_coalesced.max(1),
            catch_up,
            held: None,
            model,
            covered: Covered::new(),
            snapshots: None,
            metrics,
        }
    }

    /// Takes snapshots with `snapshots`, of a state that starts covering
    /// `covered` (the offsets the restore reached).
    pub fn with_snapshots(mut self, snapshots: Option<Snapshots>, covered: Covered) -> Self {
        self.snapshots = snapshots;
        self.covered = covered;
        self
    }

    /// A snapshot, when one is due (after a published batch or when idle).
    fn maybe_snapshot(&mut self, idle: bool) {
        if let Some(s) = self.snapshots.as_mut() {
            if self.core.pending_batches() == 0 && s.due(&self.covered, idle) {
                s.start(self.core.state(), self.covered.clone());
            }
        }
    }

    /// Runs until `rx` closes (the shutdown: the stages before it drained)
    /// or `tx` does; blocking, on a thread of its own. Under load, the
    /// batches waiting behind one are applied with it: one propagation and
    /// one publish for all of them; and while more keep waiting (a backlog),
    /// propagation and publishing are held back for up to `catch_up`.
    ///
    /// Returns the shutdown's snapshot, to write once the final commit is
    /// done (so that the commit does not wait for it, and the snapshot is
    /// within it).
    pub fn run(
        mut self,
        mut rx: mpsc::Receiver<Work>,
        tx: mpsc::Sender<Out>,
    ) -> Result<Option<FinalSnapshot>> {
        let mut held: Option<Work> = None;
        while let Some(w) = held.take().or_else(|| rx.blocking_recv()) {
            let w = coalesce(w, &mut rx, &mut held, self.max_coalesced);
            let behind = held.is_some() || !rx.is_empty();
            if !matches!(w, Work::Batch(_)) && self.held.is_some() {
                // Idle or a reload: what a backlog held back goes out first.
                let out = self.batch(None, false)?;
                if tx.blocking_send(self.shared(out)).is_err() {
                    break;
                }
            }
            let idle = matches!(w, Work::Idle);
            let out = match w {
                Work::Batch(b) => match self.batch(Some(b), behind)? {
                    out if out.messages == 0 && out.offsets.is_empty() => continue,
                    out => out,
                },
                Work::Idle => Out {
                    publish: self.core.idle()?,
                    version: self.core.card().version.clone(),
                    idle: true,
                    ..Default::default()
                },
                Work::Reload => match self.reload() {
                    Some(out) => out,
                    None => continue,
                },
                Work::Repair => self.repair()?,
                Work::Owned => {
                    let card = self.core.card();
                    let flip = Some((card.version.clone(), card.dim, card.relations.clone()));
                    Out {
                        version: card.version.clone(),
                        flip,
                        publish: self.core.publish_gained()?,
                        ..Default::default()
                    }
                }
            };
            // Evictions handed over without offsets (idle, repair, reload)
            // leave the state's list: a snapshot now, within the committed
            // offsets, would forget them if Redis never got the deletions.
            let unsafe_now = !out.publish.evicted.is_empty() && out.offsets.is_empty();
            if tx.blocking_send(self.shared(out)).is_err() {
                break;
            }
            if !unsafe_now {
                self.maybe_snapshot(idle);
            }
        }
        if self.held.is_some() {
            let out = self.batch(None, false)?;
            let _ = tx.blocking_send(self.shared(out));
        }
        // Of what the drain applied; used at the next start once the final
        // commit covers it.
        Ok(self.snapshots.take().map(|s| FinalSnapshot {
            snapshots: s,
            state: self.core.state(),
            covered: self.covered.clone(),
        }))
    }

    /// `out` as this replica writes it ([`Core::share`]): the items only
    /// when it leads, and the shares a model flip records.
    fn shared(&self, mut out: Out) -> Out {
        out.shares = self.core.share(&mut out.publish);
        out
    }

    /// Applies `b` (none: only flush what was held back): held back while
    /// `behind` and within the catch-up window, else live with everything
    /// held back before it. An output with no messages and no offsets
    /// means held back.
    fn batch(&mut self, b: Option<Batch>, behind: bool) -> Result<Out> {
        let started = Instant::now();
        let hold = behind
            && !self.catch_up.is_zero()
            && self
                .held
                .as_ref()
                .is_none_or(|(_, since)| since.elapsed() < self.catch_up);
        let msgs = b.as_ref().map_or(&[][..], |b| &b.msgs[..]);
        let mode = if hold { Mode::CatchUp } else { Mode::Live };
        let (publish, applied) = self.core.apply(msgs, mode)?;
        self.count(&applied);
        // The batches held back and this one, as one (their messages are
        // applied: only the offsets and counts are kept).
        let b = b.map(|mut b| {
            b.msgs = Vec::new();
            b
        });
        let all = match (self.held.take(), b) {
            (Some((mut h, since)), Some(b)) => {
                h.absorb(b);
                (h, since)
            }
            (Some(h), None) => h,
            (None, Some(b)) => (b, Instant::now()),
            (None, None) => return Ok(Out::default()),
        };
        if hold {
            self.held = Some(all);
            return Ok(Out::default());
        }
        let (b, _) = all;
        for (&(topic, partition), &offset) in &b.offsets {
            self.covered
                .insert((topic.to_string(), partition), offset + 1);
        }
        Ok(Out {
            publish,
            version: self.core.card().version.clone(),
            offsets: b.offsets,
            deliveries: b.deliveries,
            messages: b.messages,
            trace: Some((b.closed, started, Instant::now())),
            ..Default::default()
        })
    }

    /// `thaw_events_total{outcome="applied"|"ignored"}` of one batch.
    fn count(&self, applied: &Applied) {
        for (topic, n) in &applied.applied {
            self.metrics.events(topic, "applied", *n);
        }
        for (topic, n) in &applied.ignored {
            self.metrics.events(topic, "ignored", *n);
        }
    }

    /// Everything, to publish again after Redis lost it, with the model
    /// marker written last.
    fn repair(&mut self) -> Result<Out> {
        let publish = self.core.publish_all()?;
        let card = self.core.card();
        let v = card.version.clone();
        tracing::warn!(
            items = publish.items.len(),
            users = publish.users.len(),
            "Redis lost its data: publishing everything again"
        );
        Ok(Out {
            publish,
            version: v.clone(),
            flip: Some((v, card.dim, card.relations.clone())),
            ..Default::default()
        })
    }

    /// Loads the model folder's version and swaps it in; `None` (the running
    /// model kept, one error line) when that fails.
    fn reload(&mut self) -> Option<Out> {
        let failed = |e: anyhow::Error, what: &str| {
            EngineError::retryable(
                Stage::Core,
                e.context(format!("{what}; keeping the running model")),
            )
            .report(&self.metrics)
        };
        let model = load_model(&self.model)
            .map_err(|e| failed(e, "new model not loaded"))
            .ok()?;
        let v = model.card.version.clone();
        let publish = self
            .core
            .swap_model(model)
            .map_err(|e| failed(e, "model swap failed"))
            .ok()?;
        tracing::info!(version = %v, "switching model");
        if let Some(s) = self.snapshots.as_mut() {
            s.forget();
        }
        let card = self.core.card();
        Some(Out {
            publish,
            version: v.clone(),
            flip: Some((v, card.dim, card.relations.clone())),
            offsets: BTreeMap::new(),
            ..Default::default()
        })
    }
}
