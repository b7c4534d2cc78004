//! MetaKG: meta-learning on the collaborative knowledge graph for cold-start
//! recommendation (`../shared/papers/metakg-meta-learning-knowledge-graph.txt`,
//! §5.2–5.7, eq. 10–26, Algorithm 1).
//!
//! - Collaborative knowledge graph (CKG): users, KG entities (an item without a
//!   link gets an entity of its own), KG relations and their inverses, and an
//!   `interact` / `interacted-by` relation pair from the training interactions.
//! - Embedding layer ϕ (eq. 9, the one-hot projection is an embedding table),
//!   initialised with TransR (eq. 22–23, Algorithm 1 line 1).
//! - Graph gated attention ω (eq. 10–14): relation-aware attention (eq. 11–12)
//!   over a node's sampled collaborative neighbours and, separately, over its
//!   sampled knowledge neighbours, fused by the gate of eq. 13–14. As in KGAT
//!   (whose code MetaKG builds on) the attention weights are computed from the
//!   layer-0 embeddings and refreshed once per epoch.
//! - Bi-interaction aggregator γ (eq. 15), L layers (64 → 32 → 16), prediction by
//!   the inner product of the concatenated layers (eq. 16; the layer-0 embedding
//!   is included, as in KGAT) and BPR (eq. 17).
//! - Collaborative-aware meta learner (eq. 19–21): per task, SGD steps on γ with
//!   the support BPR loss; the inner gradient is written out in tensor ops
//!   ([`Model::local_update`]) so that the outer (query) loss is differentiated
//!   *through* the local step (second-order MAML, not first-order). The local
//!   step is the partial derivative of eq. 21: it adapts the user's aggregation
//!   `e⋆_u = ‖_l y_γ(e^l_u, →e^l_u)` with the inputs `e^l_u`, `→e^l_u` and the
//!   item representations held at the meta-parameters' values.
//! - Knowledge-aware meta learner (eq. 24–25): the KG loss updates ϕ and the
//!   TransR projections `W_r`, alternating with the CF meta-update (Algorithm 1
//!   lines 8–10). The gate matrices `W_c`, `W_k` get no gradient from the KG
//!   loss, so they are updated with γ by the CF meta-loss. By default the CF
//!   meta-loss also trains ϕ through each node's own layer-0 term (as the
//!   KGAT-based published code does; the layer-0 neighbour sums stay per-epoch
//!   constants); `cf_embeddings = false` is Algorithm 1's KG-only ϕ.
//! - Adaptive task scheduler (eq. 18): instead of the paper's LSTM, a small MLP
//!   over each task's last seen query loss and support/query gradient cosine
//!   (its history), trained by REINFORCE with the decrease of the sampled
//!   tasks' query loss over the meta-update as reward.
//! - Co-adaptation (eq. 26, aware mode): a few steps of support BPR on the
//!   scenario's support sets plus the KG loss before scoring.
//! - Scoring: every user gets the local update on their own training items
//!   (in the blind mode too: it uses only the user's history, not the scenario).
//!
//! Optimisers are Adam (the paper writes plain gradient steps with rate k).
//! Training is seeded and deterministic on CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ndarray::{Array1, Array2, ArrayView1, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Result, TrainError};
use crate::dataset::Dataset;
use crate::eval::split::Task;
use crate::eval::TrainSet;

/// A part of MetaKG that an ablation can switch off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    /// The adaptive task scheduler (eq. 18): tasks are drawn uniformly.
    Scheduler,
    /// The knowledge-aware meta learner (eq. 24–25): no KG steps in meta-training.
    Knowledge,
    /// The collaborative-aware meta learner's local update (eq. 21): plain BPR.
    Local,
    /// The gated attention (eq. 11–14): mean over neighbours, no gate.
    Gate,
    /// TransR initialisation (Algorithm 1 line 1): random embeddings.
    Transr,
    /// Co-adaptation to the scenario (eq. 26).
    Coadapt,
}

impl std::str::FromStr for Component {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "scheduler" => Ok(Component::Scheduler),
            "knowledge" => Ok(Component::Knowledge),
            "local" => Ok(Component::Local),
            "gate" => Ok(Component::Gate),
            "transr" => Ok(Component::Transr),
            "coadapt" => Ok(Component::Coadapt),
            _ => Err(format!(
                "unknown MetaKG component `{s}` (scheduler, knowledge, local, gate, transr, coadapt)"
            )),
        }
    }
}

/// Hyper-parameters of MetaKG.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetaKgConfig {
    /// Layer sizes: the embedding size, then one per aggregation layer
    /// (64 → 32 → 16, the paper's).
    pub dims: Vec<usize>,
    /// TransR relation-space size d_r.
    pub rel_dim: usize,
    /// Sampled neighbours per node and kind (collaborative, knowledge): bounds
    /// the cost of a layer.
    pub fanout: usize,
    /// LeakyReLU slope of eq. 15.
    pub slope: f32,
    /// Local-update learning rate v (eq. 21).
    pub inner_lr: f32,
    /// Local-update SGD steps.
    pub inner_steps: usize,
    /// Adam rate of the CF meta-update (γ and the gate).
    pub outer_lr: f64,
    /// Adam rate of the KG loss (ϕ and W_r, e_r).
    pub kg_lr: f64,
    /// Triples per KG step.
    pub kg_batch: usize,
    /// L2 weight on the embeddings of a KG batch.
    pub kg_l2: f32,
    /// Tasks per meta-batch.
    pub meta_batch: usize,
    /// (positive, negative) pairs drawn per task's support and query sets.
    pub pairs: usize,
    /// Pairs of a user's own items in the scoring-time local update.
    pub score_pairs: usize,
    /// TransR initialisation steps.
    pub transr_steps: usize,
    /// Most meta-training epochs (the count is chosen on `valid/`).
    pub max_epochs: usize,
    /// Most meta-batches per epoch (an epoch is one pass over the tasks).
    pub max_steps_per_epoch: usize,
    /// Epochs without a better valid score before stopping.
    pub patience: usize,
    /// Candidate tasks per meta-batch slot for the scheduler.
    pub pool: usize,
    /// Scheduler learning rate (REINFORCE).
    pub scheduler_lr: f64,
    /// Co-adaptation steps (eq. 26) in the aware mode.
    pub coadapt_steps: usize,
    /// Whether the CF meta-loss also updates the embeddings ϕ (through each
    /// node's own layer-0 term), as in KGAT's and MetaKG's published code;
    /// Algorithm 1 updates ϕ with the KG loss only (`false`).
    pub cf_embeddings: bool,
    /// Switched-off components (ablations).
    pub without: Vec<Component>,
}

impl Default for MetaKgConfig {
    fn default() -> Self {
        Self {
            dims: vec![64, 32, 16],
            rel_dim: 32,
            fanout: 16,
            slope: 0.2,
            inner_lr: 0.5,
            inner_steps: 1,
            outer_lr: 3e-3,
            kg_lr: 3e-3,
            kg_batch: 1024,
            kg_l2: 1e-4,
            meta_batch: 32,
            pairs: 16,
            score_pairs: 64,
            transr_steps: 400,
            max_epochs: 6,
            max_steps_per_epoch: 40,
            patience: 2,
            pool: 4,
            scheduler_lr: 0.05,
            coadapt_steps: 20,
            cf_embeddings: true,
            without: Vec::new(),
        }
    }
}

impl MetaKgConfig {
    /// Whether `c` is switched on.
    pub fn has(&self, c: Component) -> bool {
        !self.without.contains(&c)
    }

    /// Reads the ablation and budget overrides from the environment:
    /// `THAW_METAKG_WITHOUT` (comma-separated components) and
    /// `THAW_METAKG_EPOCHS` (most epochs), `THAW_METAKG_CF_EMBEDDINGS` (0: ϕ
    /// from the KG loss only, as Algorithm 1).
    pub fn from_env() -> Result<Self> {
        let mut cfg = Self::default();
        if let Ok(w) = std::env::var("THAW_METAKG_WITHOUT") {
            for part in w.split(',').filter(|s| !s.trim().is_empty()) {
                cfg.without
                    .push(part.parse().map_err(|e: String| TrainError::Data(e))?);
            }
        }
        if let Ok(v) = std::env::var("THAW_METAKG_CF_EMBEDDINGS") {
            cfg.cf_embeddings = match v.trim() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => {
                    return Err(TrainError::Data(format!(
                        "THAW_METAKG_CF_EMBEDDINGS={v:?}: expected 0 or 1"
                    )))
                }
            };
        }
        if let Ok(e) = std::env::var("THAW_METAKG_EPOCHS") {
            cfg.max_epochs = e.trim().parse().map_err(|_| {
                TrainError::Data(format!("THAW_METAKG_EPOCHS={e:?}: not a whole number"))
            })?;
        }
        Ok(cfg)
    }
}

// ---------------------------------------------------------------- CKG

/// Sampled neighbour slots: `fanout` per node, row-major.
#[derive(Debug, Clone)]
struct Slots {
    /// Neighbour node (0 where the slot is empty).
    node: Vec<u32>,
    /// Relation of the edge (head → neighbour).
    rel: Vec<u32>,
    /// Whether the slot holds an edge.
    valid: Vec<bool>,
}

/// The collaborative knowledge graph. Nodes: entities (KG entities, then one
/// per unlinked item), then users.
#[derive(Debug, Clone)]
pub struct Ckg {
    /// Entity nodes (users follow).
    pub n_entities: usize,
    /// All nodes.
    pub n_nodes: usize,
    /// Relations: KG relations, their inverses, interact, interacted-by.
    pub n_rel: usize,
    /// Node of every dataset item.
    pub item_node: Vec<u32>,
    /// Distinct item nodes (negatives of the KG loss's interact triples).
    item_nodes: Vec<u32>,
    /// KG triples (head, relation, tail) in both directions.
    kg_triples: Vec<(u32, u32, u32)>,
    /// Interaction triples in both directions.
    cf_triples: Vec<(u32, u32, u32)>,
    fanout: usize,
    collab: Slots,
    know: Slots,
}

impl Ckg {
    /// Builds the CKG of `ds` with the interactions `user_items`, sampling
    /// `fanout` neighbours of each kind per node.
    pub fn build(ds: &Dataset, user_items: &[Vec<u32>], fanout: usize, seed: u64) -> Self {
        let n_kg = ds.entities.len();
        let mut item_node = Vec::with_capacity(ds.n_items());
        let mut next = n_kg as u32;
        for e in &ds.item_entity {
            match e {
                Some(e) => item_node.push(*e),
                None => {
                    item_node.push(next);
                    next += 1;
                }
            }
        }
        let n_entities = next as usize;
        let n_users = user_items.len();
        let n_nodes = n_entities + n_users;
        let r_kg = ds.relations.len() as u32;
        let (interact, interacted) = (2 * r_kg, 2 * r_kg + 1);
        let mut kg_triples = Vec::with_capacity(ds.triples.len() * 2);
        for t in &ds.triples {
            kg_triples.push((t.head, t.relation, t.tail));
            kg_triples.push((t.tail, t.relation + r_kg, t.head));
        }
        let mut cf_triples = Vec::new();
        for (u, its) in user_items.iter().enumerate() {
            let un = (n_entities + u) as u32;
            for &i in its {
                let inode = item_node[i as usize];
                cf_triples.push((un, interact, inode));
                cf_triples.push((inode, interacted, un));
            }
        }
        let mut item_nodes = item_node.clone();
        item_nodes.sort_unstable();
        item_nodes.dedup();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b67);
        let sample = |triples: &[(u32, u32, u32)], rng: &mut ChaCha8Rng| {
            let mut adj: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n_nodes];
            for &(h, r, t) in triples {
                adj[h as usize].push((t, r));
            }
            let mut s = Slots {
                node: vec![0; n_nodes * fanout],
                rel: vec![0; n_nodes * fanout],
                valid: vec![false; n_nodes * fanout],
            };
            for (h, list) in adj.iter_mut().enumerate() {
                list.sort_unstable();
                list.dedup();
                if list.len() > fanout {
                    list.partial_shuffle(rng, fanout);
                    list.truncate(fanout);
                }
                for (k, &(t, r)) in list.iter().enumerate() {
                    s.node[h * fanout + k] = t;
                    s.rel[h * fanout + k] = r;
                    s.valid[h * fanout + k] = true;
                }
            }
            s
        };
        let know = sample(&kg_triples, &mut rng);
        let collab = sample(&cf_triples, &mut rng);
        Self {
            n_entities,
            n_nodes,
            n_rel: 2 * r_kg as usize + 2,
            item_node,
            item_nodes,
            kg_triples,
            cf_triples,
            fanout,
            collab,
            know,
        }
    }

    fn user_node(&self, u: u32) -> u32 {
        self.n_entities as u32 + u
    }
}

// ---------------------------------------------------------------- model

/// Per-epoch constants: layer-0 embeddings and attention-weighted neighbour
/// sums (eq. 10–12) of every node, and the attention weights of every slot.
struct Consts {
    e0: Tensor,
    nc0: Tensor,
    nk0: Tensor,
    alpha_c: Vec<f32>,
    alpha_k: Vec<f32>,
}

/// MetaKG's parameters θ = (ϕ, ω, γ).
pub struct Model {
    cfg: MetaKgConfig,
    dtype: DType,
    /// ϕ: node embeddings [n_nodes, d0].
    ent: Var,
    /// TransR relation embeddings e_r [n_rel, d_r].
    rel: Var,
    /// TransR projections W_r [n_rel, d_r, d0] (ω).
    wr: Var,
    /// Gate W_c per layer [d_l, d_l] (ω).
    wc: Vec<Var>,
    /// Gate W_k per layer [d_l, d_l] (ω).
    wk: Vec<Var>,
    /// Aggregator W_1 per layer [d_l, d_{l+1}] (γ).
    w1: Vec<Var>,
    /// Aggregator W_2 per layer [d_l, d_{l+1}] (γ).
    w2: Vec<Var>,
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f32, dtype: DType) -> Result<Var> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| super::mpkg::gaussian(rng, std)).collect();
    Ok(Var::from_tensor(
        &Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?,
    )?)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(x.neg()?.exp()?.affine(1.0, 1.0)?.recip()?)
}

/// log(1 + e^x), stable.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?)
}

fn idx(v: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu)?)
}

/// What [`Model::forward`] returns for its targets.
struct Fwd {
    /// e⋆ (eq. 16) [T, D⋆].
    star: Tensor,
    /// Per layer, the aggregator inputs e + →e [T, d_l].
    a: Vec<Tensor>,
    /// Per layer, e ⊙ →e [T, d_l].
    b: Vec<Tensor>,
}

/// One meta-training task: a user, support and query items.
#[derive(Debug, Clone)]
struct MetaTask {
    user: u32,
    support: Vec<u32>,
    query: Vec<u32>,
}

/// Index tensors of a batch of tasks.
struct Batch {
    targets: Vec<u32>,
    user_pos: Tensor,
    sp: Tensor,
    sn: Tensor,
    qp: Tensor,
    qn: Tensor,
    b: usize,
}

impl Model {
    /// Random parameters for `ckg`.
    pub fn new(ckg: &Ckg, cfg: &MetaKgConfig, dtype: DType, seed: u64) -> Result<Self> {
        if cfg.dims.len() < 2 {
            return Err(TrainError::Data(
                "MetaKG needs at least one aggregation layer (dims of length ≥ 2)".into(),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let d0 = cfg.dims[0];
        let xavier = |a: usize, b: usize| (2.0 / (a + b) as f32).sqrt();
        let ent = randn(&mut rng, &[ckg.n_nodes, d0], 0.1, dtype)?;
        let rel = randn(&mut rng, &[ckg.n_rel, cfg.rel_dim], 0.1, dtype)?;
        let wr = randn(
            &mut rng,
            &[ckg.n_rel, cfg.rel_dim, d0],
            xavier(cfg.rel_dim, d0),
            dtype,
        )?;
        let (mut wc, mut wk, mut w1, mut w2) = (vec![], vec![], vec![], vec![]);
        for l in 0..cfg.dims.len() - 1 {
            let (a, b) = (cfg.dims[l], cfg.dims[l + 1]);
            wc.push(randn(&mut rng, &[a, a], xavier(a, a), dtype)?);
            wk.push(randn(&mut rng, &[a, a], xavier(a, a), dtype)?);
            w1.push(randn(&mut rng, &[a, b], xavier(a, b), dtype)?);
            w2.push(randn(&mut rng, &[a, b], xavier(a, b), dtype)?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            ent,
            rel,
            wr,
            wc,
            wk,
            w1,
            w2,
        })
    }

    fn layers(&self) -> usize {
        self.cfg.dims.len() - 1
    }

    /// A deep copy (co-adaptation starts from the meta-trained parameters).
    fn copy(&self) -> Result<Self> {
        let c = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?)?) };
        let cs = |v: &[Var]| -> Result<Vec<Var>> { v.iter().map(c).collect() };
        Ok(Self {
            cfg: self.cfg.clone(),
            dtype: self.dtype,
            ent: c(&self.ent)?,
            rel: c(&self.rel)?,
            wr: c(&self.wr)?,
            wc: cs(&self.wc)?,
            wk: cs(&self.wk)?,
            w1: cs(&self.w1)?,
            w2: cs(&self.w2)?,
        })
    }

    fn kg_vars(&self) -> Vec<Var> {
        vec![self.ent.clone(), self.rel.clone(), self.wr.clone()]
    }

    fn cf_vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.w1.iter().chain(&self.w2).cloned().collect();
        if self.cfg.has(Component::Gate) {
            v.extend(self.wc.iter().chain(&self.wk).cloned());
        }
        if self.cfg.cf_embeddings {
            v.push(self.ent.clone());
        }
        v
    }

    /// TransR energy s(h, r, t) = ‖W_r e_h + e_r − W_r e_t‖² (eq. 22), per triple.
    fn energy(&self, h: &Tensor, r: &Tensor, t: &Tensor) -> Result<Tensor> {
        let w = self.wr.as_tensor().index_select(r, 0)?; // [K, dr, d0]
        let proj = |n: &Tensor| -> Result<Tensor> {
            let e = self.ent.as_tensor().index_select(n, 0)?.unsqueeze(2)?;
            Ok(w.matmul(&e)?.squeeze(2)?)
        };
        let er = self.rel.as_tensor().index_select(r, 0)?;
        Ok(((proj(h)? + er)? - proj(t)?)?.sqr()?.sum(1)?)
    }

    /// The KG loss (eq. 23) on triples with corrupted tails, plus L2 on the
    /// embeddings involved.
    fn kg_loss(&self, triples: &[(u32, u32, u32)], neg_tails: &[u32]) -> Result<Tensor> {
        let h = idx(&triples.iter().map(|t| t.0).collect::<Vec<_>>())?;
        let r = idx(&triples.iter().map(|t| t.1).collect::<Vec<_>>())?;
        let t = idx(&triples.iter().map(|t| t.2).collect::<Vec<_>>())?;
        let tn = idx(neg_tails)?;
        let pos = self.energy(&h, &r, &t)?;
        let neg = self.energy(&h, &r, &tn)?;
        let loss = softplus(&(pos - neg)?)?.mean_all()?;
        let sq = |v: &Var, i: &Tensor| -> Result<Tensor> {
            Ok(v.as_tensor()
                .index_select(i, 0)?
                .sqr()?
                .sum(1)?
                .mean_all()?)
        };
        let l2 = (((sq(&self.ent, &h)? + sq(&self.ent, &t)?)? + sq(&self.ent, &tn)?)?
            + sq(&self.rel, &r)?)?;
        Ok((loss + (l2 * self.cfg.kg_l2 as f64)?)?)
    }

    /// Attention weights (eq. 11–12) of every slot and the layer-0 neighbour
    /// sums. Computed from the current ϕ and W_r, constant until the next call.
    fn consts(&self, ckg: &Ckg) -> Result<Consts> {
        let f = ckg.fanout;
        let e0 = self.ent.as_tensor().detach();
        let ent = to_array2(&e0)?;
        let rel = to_array2(&self.rel.as_tensor().detach())?;
        let wr = self
            .wr
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (dr, d0) = (self.cfg.rel_dim, self.cfg.dims[0]);
        let gated = self.cfg.has(Component::Gate);
        let attention = |slots: &Slots| -> Result<Vec<f32>> {
            let mut alpha = vec![0f32; ckg.n_nodes * f];
            if !gated {
                for h in 0..ckg.n_nodes {
                    let row = &slots.valid[h * f..(h + 1) * f];
                    let n = row.iter().filter(|v| **v).count();
                    for k in 0..f {
                        if row[k] {
                            alpha[h * f + k] = 1.0 / n as f32;
                        }
                    }
                }
                return Ok(alpha);
            }
            // W_r e_n for every (relation, node) pair a slot needs, per relation.
            let mut need: Vec<Vec<u32>> = vec![Vec::new(); ckg.n_rel];
            for h in 0..ckg.n_nodes {
                for k in 0..f {
                    if slots.valid[h * f + k] {
                        let r = slots.rel[h * f + k] as usize;
                        need[r].push(h as u32);
                        need[r].push(slots.node[h * f + k]);
                    }
                }
            }
            let mut proj: Vec<(HashMap<u32, usize>, Array2<f32>)> = Vec::with_capacity(ckg.n_rel);
            for (r, nodes) in need.iter_mut().enumerate() {
                nodes.sort_unstable();
                nodes.dedup();
                let rows: Vec<usize> = nodes.iter().map(|&n| n as usize).collect();
                let w =
                    ndarray::ArrayView2::from_shape((dr, d0), &wr[r * dr * d0..(r + 1) * dr * d0])
                        .map_err(|e| TrainError::Data(e.to_string()))?;
                let p = ent.select(Axis(0), &rows).dot(&w.t());
                let pos = nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
                proj.push((pos, p));
            }
            for h in 0..ckg.n_nodes {
                let mut logits = [f32::NEG_INFINITY; 256];
                let mut any = false;
                for k in 0..f {
                    if !slots.valid[h * f + k] {
                        continue;
                    }
                    let r = slots.rel[h * f + k] as usize;
                    let (pos, p) = &proj[r];
                    let ph = p.row(pos[&(h as u32)]);
                    let pt = p.row(pos[&slots.node[h * f + k]]);
                    let er = rel.row(r);
                    logits[k] = (0..dr).map(|j| pt[j] * (ph[j] + er[j]).tanh()).sum();
                    any = true;
                }
                if !any {
                    continue;
                }
                let m = logits[..f]
                    .iter()
                    .cloned()
                    .fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = logits[..f].iter().map(|&x| (x - m).exp()).sum();
                for k in 0..f {
                    if slots.valid[h * f + k] {
                        alpha[h * f + k] = (logits[k] - m).exp() / z;
                    }
                }
            }
            Ok(alpha)
        };
        if f > 256 {
            return Err(TrainError::Data("MetaKG fanout is at most 256".into()));
        }
        let alpha_c = attention(&ckg.collab)?;
        let alpha_k = attention(&ckg.know)?;
        let sums = |slots: &Slots, alpha: &[f32]| -> Array2<f32> {
            let mut out = Array2::<f32>::zeros((ckg.n_nodes, d0));
            for h in 0..ckg.n_nodes {
                let mut row = out.row_mut(h);
                for k in 0..f {
                    let a = alpha[h * f + k];
                    if a != 0.0 {
                        row.scaled_add(a, &ent.row(slots.node[h * f + k] as usize));
                    }
                }
            }
            out
        };
        let t = |a: Array2<f32>| -> Result<Tensor> { from_array2(&a, self.dtype) };
        Ok(Consts {
            nc0: t(sums(&ckg.collab, &alpha_c))?,
            nk0: t(sums(&ckg.know, &alpha_k))?,
            e0,
            alpha_c,
            alpha_k,
        })
    }

    /// One gated-attention + bi-interaction layer (eq. 13–15): returns the
    /// layer's output and the aggregator's inputs (e + →e, e ⊙ →e).
    fn layer(&self, l: usize, e: &Tensor, nc: &Tensor, nk: &Tensor) -> Result<[Tensor; 3]> {
        let n = if self.cfg.has(Component::Gate) {
            let g = sigmoid(
                &(nc.matmul(self.wc[l].as_tensor())? + nk.matmul(self.wk[l].as_tensor())?)?,
            )?;
            ((&g * nk)? + (g.affine(-1.0, 1.0)? * nc)?)?
        } else {
            ((nc + nk)? * 0.5)?
        };
        let a = (e + &n)?;
        let b = (e * &n)?;
        let out = (self.lrelu(&a.matmul(self.w1[l].as_tensor())?)?
            + self.lrelu(&b.matmul(self.w2[l].as_tensor())?)?)?;
        Ok([out, a, b])
    }

    fn lrelu(&self, x: &Tensor) -> Result<Tensor> {
        Ok((x.relu()? - (x.neg()?.relu()? * self.cfg.slope as f64)?)?)
    }

    /// LeakyReLU's derivative, detached (piecewise constant).
    fn lrelu_grad(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.cfg.slope as f64;
        Ok(x.detach()
            .ge(0.0)?
            .to_dtype(self.dtype)?
            .affine(1.0 - s, s)?)
    }

    /// e⋆ (eq. 16) and the aggregator inputs of `targets` (distinct nodes),
    /// propagating through the sampled neighbours layer by layer.
    fn forward(&self, ckg: &Ckg, c: &Consts, targets: &[u32]) -> Result<Fwd> {
        let f = ckg.fanout;
        let n_layers = self.layers();
        // sets[l]: nodes whose e^l is needed; each starts with the next one's
        // nodes in order, so the targets are a prefix of every set.
        let mut sets: Vec<Vec<u32>> = vec![Vec::new(); n_layers + 1];
        sets[n_layers] = targets.to_vec();
        let mut pos: Vec<HashMap<u32, u32>> = vec![HashMap::new(); n_layers + 1];
        for l in (1..n_layers).rev() {
            let mut s = sets[l + 1].clone();
            let mut seen: HashMap<u32, u32> =
                s.iter().enumerate().map(|(i, &n)| (n, i as u32)).collect();
            for &h in &sets[l + 1] {
                for slots in [&ckg.collab, &ckg.know] {
                    for k in 0..f {
                        let t = slots.node[h as usize * f + k];
                        if slots.valid[h as usize * f + k] && !seen.contains_key(&t) {
                            seen.insert(t, s.len() as u32);
                            s.push(t);
                        }
                    }
                }
            }
            sets[l] = s;
            pos[l] = seen;
        }
        let nt = targets.len();
        let s1 = idx(&sets[1])?;
        // The layer-0 neighbour sums are per-epoch constants; a node's own
        // embedding is live when the CF loss trains ϕ.
        let e0 = if self.cfg.cf_embeddings {
            self.ent.as_tensor().index_select(&s1, 0)?
        } else {
            c.e0.index_select(&s1, 0)?
        };
        let [mut e, a0, b0] = self.layer(
            0,
            &e0,
            &c.nc0.index_select(&s1, 0)?,
            &c.nk0.index_select(&s1, 0)?,
        )?;
        let mut stars = vec![e0.narrow(0, 0, nt)?, e.narrow(0, 0, nt)?];
        let (mut a, mut b) = (vec![a0.narrow(0, 0, nt)?], vec![b0.narrow(0, 0, nt)?]);
        for l in 1..n_layers {
            // e holds e^l of sets[l]; compute e^{l+1} of sets[l+1].
            let next = &sets[l + 1];
            let m = next.len();
            let d = self.cfg.dims[l];
            let agg = |slots: &Slots, alpha: &[f32]| -> Result<Tensor> {
                let mut gi = Vec::with_capacity(m * f);
                let mut w = Vec::with_capacity(m * f);
                for &h in next {
                    for k in 0..f {
                        let s = h as usize * f + k;
                        if slots.valid[s] {
                            gi.push(pos[l][&slots.node[s]]);
                        } else {
                            gi.push(0);
                        }
                        w.push(alpha[s]);
                    }
                }
                let g = e.index_select(&idx(&gi)?, 0)?.reshape((m, f, d))?;
                let w = Tensor::from_vec(w, (m, f, 1), &Device::Cpu)?.to_dtype(self.dtype)?;
                Ok(g.broadcast_mul(&w)?.sum(1)?)
            };
            let nc = agg(&ckg.collab, &c.alpha_c)?;
            let nk = agg(&ckg.know, &c.alpha_k)?;
            let own = e.narrow(0, 0, m)?;
            let [out, al, bl] = self.layer(l, &own, &nc, &nk)?;
            a.push(al.narrow(0, 0, nt)?);
            b.push(bl.narrow(0, 0, nt)?);
            stars.push(out.narrow(0, 0, nt)?);
            e = out;
        }
        Ok(Fwd {
            star: Tensor::cat(&stars, 1)?,
            a,
            b,
        })
    }

    /// The user's e⋆ under per-task aggregators `w1`, `w2` ([B, d_l, d_{l+1}])
    /// with the inputs `a`, `b` ([B, d_l]) held fixed (eq. 20).
    fn user_star(
        &self,
        e0: &Tensor,
        a: &[Tensor],
        b: &[Tensor],
        w1: &[Tensor],
        w2: &[Tensor],
    ) -> Result<Tensor> {
        let mut parts = vec![e0.clone()];
        for l in 0..self.layers() {
            let z1 = a[l].unsqueeze(1)?.matmul(&w1[l])?.squeeze(1)?;
            let z2 = b[l].unsqueeze(1)?.matmul(&w2[l])?.squeeze(1)?;
            parts.push((self.lrelu(&z1)? + self.lrelu(&z2)?)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Mean BPR loss (eq. 17/19) of users `u` [B, D⋆] over pairs `p`, `n` [B, P, D⋆].
    fn bpr(u: &Tensor, p: &Tensor, n: &Tensor) -> Result<Tensor> {
        let x = u.unsqueeze(1)?.broadcast_mul(&(p - n)?)?.sum(2)?;
        Ok(softplus(&x.neg()?)?.mean_all()?)
    }

    /// The local update of eq. 21: `steps` SGD steps of the per-task
    /// aggregators on the support BPR loss, the gradient written in tensor ops
    /// so that autograd differentiates through it. Returns the adapted
    /// aggregators ([B, d_l, d_{l+1}]) and the first step's gradient (flattened
    /// per task, [B, |γ|]) for the scheduler.
    #[allow(clippy::too_many_arguments)]
    fn local_update(
        &self,
        e0: &Tensor,
        a: &[Tensor],
        b: &[Tensor],
        p: &Tensor,
        n: &Tensor,
        steps: usize,
        lr: f32,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>, Option<Tensor>)> {
        let bsz = e0.dim(0)?;
        let mut w1: Vec<Tensor> = Vec::new();
        let mut w2: Vec<Tensor> = Vec::new();
        for l in 0..self.layers() {
            let (di, dn) = (self.cfg.dims[l], self.cfg.dims[l + 1]);
            w1.push(
                self.w1[l]
                    .as_tensor()
                    .unsqueeze(0)?
                    .broadcast_as((bsz, di, dn))?
                    .contiguous()?,
            );
            w2.push(
                self.w2[l]
                    .as_tensor()
                    .unsqueeze(0)?
                    .broadcast_as((bsz, di, dn))?
                    .contiguous()?,
            );
        }
        let diff = (p - n)?;
        let npairs = p.dim(1)? as f64;
        let mut first = None;
        for step in 0..steps {
            let u = self.user_star(e0, a, b, &w1, &w2)?;
            let x = u.unsqueeze(1)?.broadcast_mul(&diff)?.sum(2)?; // [B, P]
            let coef = (sigmoid(&x.neg()?)? * (-1.0 / npairs))?; // dL/dx
            let g = coef.unsqueeze(2)?.broadcast_mul(&diff)?.sum(1)?; // dL/du [B, D⋆]
            let mut off = self.cfg.dims[0];
            let mut flat = Vec::new();
            for l in 0..self.layers() {
                let dn = self.cfg.dims[l + 1];
                let gl = g.narrow(1, off, dn)?;
                off += dn;
                let z1 = a[l].unsqueeze(1)?.matmul(&w1[l])?.squeeze(1)?;
                let z2 = b[l].unsqueeze(1)?.matmul(&w2[l])?.squeeze(1)?;
                let d1 = (&gl * self.lrelu_grad(&z1)?)?;
                let d2 = (&gl * self.lrelu_grad(&z2)?)?;
                let g1 = a[l].unsqueeze(2)?.broadcast_mul(&d1.unsqueeze(1)?)?;
                let g2 = b[l].unsqueeze(2)?.broadcast_mul(&d2.unsqueeze(1)?)?;
                if step == 0 {
                    flat.push(g1.flatten_from(1)?);
                    flat.push(g2.flatten_from(1)?);
                }
                w1[l] = (&w1[l] - (g1 * lr as f64)?)?;
                w2[l] = (&w2[l] - (g2 * lr as f64)?)?;
            }
            if step == 0 {
                first = Some(Tensor::cat(&flat, 1)?);
            }
        }
        Ok((w1, w2, first))
    }

    /// The CF meta-loss of a batch: per task, local update on the support
    /// pairs, BPR on the query pairs with the adapted aggregator (eq. 19–21,
    /// Algorithm 1 lines 5–7). Also the per-task query losses and
    /// support/query gradient cosines (eq. 18's features), detached.
    fn meta_loss(
        &self,
        ckg: &Ckg,
        c: &Consts,
        batch: &Batch,
    ) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
        let fwd = self.forward(ckg, c, &batch.targets)?;
        let (b, p) = (batch.b, self.cfg.pairs);
        let dstar = fwd.star.dim(1)?;
        let gather = |i: &Tensor| -> Result<Tensor> {
            Ok(fwd.star.index_select(i, 0)?.reshape((b, p, dstar))?)
        };
        let (sp, sn, qp, qn) = (
            gather(&batch.sp)?,
            gather(&batch.sn)?,
            gather(&batch.qp)?,
            gather(&batch.qn)?,
        );
        let e0 = fwd
            .star
            .narrow(1, 0, self.cfg.dims[0])?
            .contiguous()?
            .index_select(&batch.user_pos, 0)?;
        let a: Vec<Tensor> = fwd
            .a
            .iter()
            .map(|t| t.index_select(&batch.user_pos, 0))
            .collect::<candle_core::Result<_>>()?;
        let bb: Vec<Tensor> = fwd
            .b
            .iter()
            .map(|t| t.index_select(&batch.user_pos, 0))
            .collect::<candle_core::Result<_>>()?;
        let steps = if self.cfg.has(Component::Local) {
            self.cfg.inner_steps
        } else {
            0
        };
        let (w1, w2, gs) =
            self.local_update(&e0, &a, &bb, &sp, &sn, steps.max(1), self.cfg.inner_lr)?;
        let (w1, w2) = if steps == 0 {
            // Without the local update the query loss is taken at γ itself.
            let base = self.local_update(&e0, &a, &bb, &sp, &sn, 0, 0.0)?;
            (base.0, base.1)
        } else {
            (w1, w2)
        };
        let u = self.user_star(&e0, &a, &bb, &w1, &w2)?;
        let x = u.unsqueeze(1)?.broadcast_mul(&(&qp - &qn)?)?.sum(2)?;
        let per_task = softplus(&x.neg()?)?.mean(1)?; // [B]
        let loss = per_task.mean_all()?;
        // Scheduler features: query loss and cos(∇_γ L_S, ∇_γ L_Q) at γ.
        let (_, _, gq) = self.local_update(&e0, &a, &bb, &qp.detach(), &qn.detach(), 1, 0.0)?;
        let cos = match (gs, gq) {
            (Some(gs), Some(gq)) => {
                let (gs, gq) = (gs.detach(), gq.detach());
                let dot = (&gs * &gq)?.sum(1)?;
                let norm = (gs.sqr()?.sum(1)? * gq.sqr()?.sum(1)?)?
                    .sqrt()?
                    .affine(1.0, 1e-12)?;
                (dot / norm)?.to_dtype(DType::F32)?.to_vec1::<f32>()?
            }
            _ => vec![0.0; b],
        };
        let ql = per_task.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((loss, ql, cos))
    }
}

fn to_array2(t: &Tensor) -> Result<Array2<f32>> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Array2::from_shape_vec((r, c), v).map_err(|e| TrainError::Data(e.to_string()))
}

fn from_array2(a: &Array2<f32>, dtype: DType) -> Result<Tensor> {
    let v: Vec<f32> = a.iter().copied().collect();
    Ok(Tensor::from_vec(v, a.dim(), &Device::Cpu)?.to_dtype(dtype)?)
}

// ---------------------------------------------------------------- ndarray local update

/// The local update (eq. 21) in plain ndarray, as scoring runs it: `steps` SGD
/// steps of `w1`, `w2` ([d_l, d_{l+1}] per layer) on the mean BPR loss of the
/// user `(e0, a, b)` over the pairs `(p, n)` ([P, D⋆] each), the inputs fixed.
/// Returns the adapted user's e⋆.
#[allow(clippy::too_many_arguments)]
pub fn local_update_nd(
    e0: ArrayView1<f32>,
    a: &[Array1<f32>],
    b: &[Array1<f32>],
    w1: &[Array2<f32>],
    w2: &[Array2<f32>],
    p: &Array2<f32>,
    n: &Array2<f32>,
    steps: usize,
    lr: f32,
    slope: f32,
) -> Array1<f32> {
    let lrelu = |x: f32| if x >= 0.0 { x } else { slope * x };
    let dlrelu = |x: f32| if x >= 0.0 { 1.0 } else { slope };
    let mut w1: Vec<Array2<f32>> = w1.to_vec();
    let mut w2: Vec<Array2<f32>> = w2.to_vec();
    let diff = p - n;
    let star = |w1: &[Array2<f32>], w2: &[Array2<f32>]| -> Array1<f32> {
        let mut parts = e0.to_vec();
        for l in 0..w1.len() {
            let z1 = a[l].dot(&w1[l]);
            let z2 = b[l].dot(&w2[l]);
            parts.extend(z1.iter().zip(&z2).map(|(x, y)| lrelu(*x) + lrelu(*y)));
        }
        Array1::from(parts)
    };
    for _ in 0..steps {
        let u = star(&w1, &w2);
        let x = diff.dot(&u);
        let np = diff.nrows() as f32;
        let coef = x.mapv(|x| -1.0 / (1.0 + x.exp()) / np);
        let g = diff.t().dot(&coef);
        let mut off = e0.len();
        for l in 0..w1.len() {
            let dn = w1[l].ncols();
            let gl = g.slice(ndarray::s![off..off + dn]);
            off += dn;
            let z1 = a[l].dot(&w1[l]);
            let z2 = b[l].dot(&w2[l]);
            let d1: Array1<f32> = gl.iter().zip(&z1).map(|(g, z)| g * dlrelu(*z)).collect();
            let d2: Array1<f32> = gl.iter().zip(&z2).map(|(g, z)| g * dlrelu(*z)).collect();
            let col = |v: &Array1<f32>| v.view().insert_axis(Axis(1)).to_owned();
            let row = |v: &Array1<f32>| v.view().insert_axis(Axis(0)).to_owned();
            w1[l] = &w1[l] - &(col(&a[l]).dot(&row(&d1)) * lr);
            w2[l] = &w2[l] - &(col(&b[l]).dot(&row(&d2)) * lr);
        }
    }
    star(&w1, &w2)
}

// ---------------------------------------------------------------- scheduler

/// The adaptive task scheduler z_δ (eq. 18): an MLP from a task's features
/// (last query loss, support/query gradient cosine) to a sampling logit.
#[derive(Debug, Clone)]
struct Scheduler {
    w1: [[f64; 2]; 8],
    b1: [f64; 8],
    w2: [f64; 8],
    baseline: Option<f64>,
}

impl Scheduler {
    fn new(rng: &mut ChaCha8Rng) -> Self {
        let mut s = Self {
            w1: [[0.0; 2]; 8],
            b1: [0.0; 8],
            w2: [0.0; 8],
            baseline: None,
        };
        for j in 0..8 {
            s.w1[j] = [
                super::mpkg::gaussian(rng, 0.5) as f64,
                super::mpkg::gaussian(rng, 0.5) as f64,
            ];
            s.w2[j] = super::mpkg::gaussian(rng, 0.5) as f64;
        }
        s
    }

    fn hidden(&self, x: [f64; 2]) -> [f64; 8] {
        let mut h = [0.0; 8];
        for (j, hj) in h.iter_mut().enumerate() {
            *hj = (self.w1[j][0] * x[0] + self.w1[j][1] * x[1] + self.b1[j]).tanh();
        }
        h
    }

    fn logit(&self, x: [f64; 2]) -> f64 {
        let h = self.hidden(x);
        (0..8).map(|j| self.w2[j] * h[j]).sum()
    }

    /// REINFORCE: raises the log-probability of the chosen candidates by the
    /// advantage of `reward` over its running mean.
    fn reinforce(&mut self, feats: &[[f64; 2]], chosen: &[usize], reward: f64, lr: f64) {
        let base = *self.baseline.get_or_insert(reward);
        let adv = reward - base;
        self.baseline = Some(0.9 * base + 0.1 * reward);
        let logits: Vec<f64> = feats.iter().map(|&x| self.logit(x)).collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        let p: Vec<f64> = logits.iter().map(|l| (l - m).exp() / z).collect();
        // d/dlogit_c of Σ_{u ∈ chosen} log p_u = [c ∈ chosen] − |chosen| p_c
        let mut dl = vec![0.0; feats.len()];
        for &u in chosen {
            dl[u] += 1.0;
        }
        for (c, d) in dl.iter_mut().enumerate() {
            *d -= chosen.len() as f64 * p[c];
        }
        let (mut gw1, mut gb1, mut gw2) = ([[0.0; 2]; 8], [0.0; 8], [0.0; 8]);
        for (c, &x) in feats.iter().enumerate() {
            let h = self.hidden(x);
            for j in 0..8 {
                gw2[j] += dl[c] * h[j];
                let dh = dl[c] * self.w2[j] * (1.0 - h[j] * h[j]);
                gb1[j] += dh;
                gw1[j][0] += dh * x[0];
                gw1[j][1] += dh * x[1];
            }
        }
        let s = lr * adv / chosen.len().max(1) as f64;
        for j in 0..8 {
            self.w2[j] += s * gw2[j];
            self.b1[j] += s * gb1[j];
            self.w1[j][0] += s * gw1[j][0];
            self.w1[j][1] += s * gw1[j][1];
        }
    }
}

// ---------------------------------------------------------------- tasks

/// Meta-training tasks (§5.2) from users' interactions in time order `order`
/// (per user, items in the order the stream sees them): user cold start
/// (support: the first items, query: the last), item cold start (the last 20%
/// of items to appear are held out as new: support and query among the user's
/// new items) and user-item cold start (support: the user's first few items,
/// query: their new items). Returns the tasks and their query pairs, which the
/// meta-training CKG leaves out.
fn build_tasks(order: &[Vec<u32>], n_items: usize) -> (Vec<MetaTask>, Vec<(u32, u32)>) {
    // Items by first appearance in the stream (users interleaved by position).
    let mut first: Vec<Option<(usize, u32)>> = vec![None; n_items];
    for (u, its) in order.iter().enumerate() {
        for (k, &i) in its.iter().enumerate() {
            let key = (k, u as u32);
            let e = &mut first[i as usize];
            if e.is_none_or(|f| key < f) {
                *e = Some(key);
            }
        }
    }
    let mut seen: Vec<(usize, u32, u32)> = first
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.map(|(k, u)| (k, u, i as u32)))
        .collect();
    seen.sort_unstable();
    let cut = seen.len() - seen.len() / 5;
    let mut new_item = vec![false; n_items];
    for &(_, _, i) in &seen[cut..] {
        new_item[i as usize] = true;
    }
    let (mut tasks, mut query_pairs) = (Vec::new(), Vec::new());
    for (u, its) in order.iter().enumerate() {
        let old: Vec<u32> = its
            .iter()
            .copied()
            .filter(|&i| !new_item[i as usize])
            .collect();
        let new: Vec<u32> = its
            .iter()
            .copied()
            .filter(|&i| new_item[i as usize])
            .collect();
        let u = u as u32;
        if old.len() >= 8 {
            let q = (old.len() / 2).min(10);
            let s = (old.len() - q).min(10);
            tasks.push(MetaTask {
                user: u,
                support: old[..s].to_vec(),
                query: old[old.len() - q..].to_vec(),
            });
            query_pairs.extend(old[old.len() - q..].iter().map(|&i| (u, i)));
        }
        if new.len() >= 4 {
            let q = (new.len() / 2).min(10);
            let s = (new.len() - q).min(10);
            let query = new[new.len() - q..].to_vec();
            query_pairs.extend(query.iter().map(|&i| (u, i)));
            tasks.push(MetaTask {
                user: u,
                support: new[..s].to_vec(),
                query: query.clone(),
            });
            if old.len() >= 3 {
                tasks.push(MetaTask {
                    user: u,
                    support: old[..3].to_vec(),
                    query,
                });
            }
        }
    }
    query_pairs.sort_unstable();
    query_pairs.dedup();
    (tasks, query_pairs)
}

// ---------------------------------------------------------------- training

/// A trainer: the CKG, the model and the optimisers' state.
pub struct Trainer {
    ckg: Ckg,
    model: Model,
    user_items: Vec<Vec<u32>>,
    n_items: usize,
    tasks: Vec<MetaTask>,
    cf_opt: AdamW,
    kg_opt: AdamW,
    scheduler: Scheduler,
    history: Vec<[f64; 2]>,
    rng: ChaCha8Rng,
    consts: Option<Consts>,
}

fn adam(vars: Vec<Var>, lr: f64) -> Result<AdamW> {
    Ok(AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
}

impl Trainer {
    /// Builds the meta-training tasks and CKG from `user_items` (items of each
    /// user in time order) and runs the TransR initialisation.
    pub fn new(
        ds: &Dataset,
        order: &[Vec<u32>],
        cfg: &MetaKgConfig,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        let n_items = ds.n_items();
        let (tasks, query_pairs) = build_tasks(order, n_items);
        if tasks.is_empty() {
            return Err(TrainError::Data(
                "MetaKG: no user has enough items for a meta-training task".into(),
            ));
        }
        let mut user_items: Vec<Vec<u32>> = order
            .iter()
            .map(|its| {
                let mut v = its.clone();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();
        // The meta-training CKG leaves the tasks' query interactions out.
        let ckg_items: Vec<Vec<u32>> = user_items
            .iter()
            .enumerate()
            .map(|(u, its)| {
                its.iter()
                    .copied()
                    .filter(|&i| query_pairs.binary_search(&(u as u32, i)).is_err())
                    .collect()
            })
            .collect();
        let ckg = Ckg::build(ds, &ckg_items, cfg.fanout, seed);
        let model = Model::new(&ckg, cfg, dtype, seed)?;
        for its in &mut user_items {
            its.shrink_to_fit();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let scheduler = Scheduler::new(&mut rng);
        let mut t = Self {
            cf_opt: adam(model.cf_vars(), cfg.outer_lr)?,
            kg_opt: adam(model.kg_vars(), cfg.kg_lr)?,
            history: vec![[std::f64::consts::LN_2, 0.0]; tasks.len()],
            ckg,
            model,
            user_items,
            n_items,
            tasks,
            scheduler,
            rng,
            consts: None,
        };
        if cfg.has(Component::Transr) {
            for _ in 0..cfg.transr_steps {
                t.kg_step(None)?;
            }
        }
        Ok(t)
    }

    fn negative(&mut self, user: u32) -> u32 {
        let seen = &self.user_items[user as usize];
        for _ in 0..100 {
            let j = self.rng.random_range(0..self.n_items as u32);
            if seen.binary_search(&j).is_err() {
                return j;
            }
        }
        self.rng.random_range(0..self.n_items as u32)
    }

    /// One KG step (eq. 23–25); with `extra`, half the batch comes from those
    /// interaction pairs (co-adaptation).
    fn kg_step(&mut self, extra: Option<&[(u32, u32)]>) -> Result<f32> {
        let k = self.model.cfg.kg_batch;
        let n_kg = self.ckg.kg_triples.len();
        let n_all = n_kg + self.ckg.cf_triples.len();
        let mut triples = Vec::with_capacity(k);
        let mut negs = Vec::with_capacity(k);
        let interact = self.ckg.n_rel as u32 - 2;
        for s in 0..k {
            let tr = match extra {
                Some(e) if !e.is_empty() && s % 2 == 0 => {
                    let (u, i) = e[self.rng.random_range(0..e.len())];
                    (
                        self.ckg.user_node(u),
                        interact,
                        self.ckg.item_node[i as usize],
                    )
                }
                _ => {
                    let j = self.rng.random_range(0..n_all);
                    if j < n_kg {
                        self.ckg.kg_triples[j]
                    } else {
                        self.ckg.cf_triples[j - n_kg]
                    }
                }
            };
            let neg = if tr.2 as usize >= self.ckg.n_entities {
                self.ckg.n_entities as u32
                    + self
                        .rng
                        .random_range(0..(self.ckg.n_nodes - self.ckg.n_entities) as u32)
            } else if tr.1 == interact {
                self.ckg.item_nodes[self.rng.random_range(0..self.ckg.item_nodes.len())]
            } else {
                self.rng.random_range(0..self.ckg.n_entities as u32)
            };
            triples.push(tr);
            negs.push(neg);
        }
        let loss = self.model.kg_loss(&triples, &negs)?;
        self.kg_opt.backward_step(&loss)?;
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }

    /// Index tensors of a batch of tasks: `pairs` support and query pairs each.
    fn batch(&mut self, tasks: &[MetaTask]) -> Result<Batch> {
        let p = self.model.cfg.pairs;
        let mut targets: Vec<u32> = Vec::new();
        let mut pos: HashMap<u32, u32> = HashMap::new();
        let mut at = |n: u32, targets: &mut Vec<u32>| -> u32 {
            *pos.entry(n).or_insert_with(|| {
                targets.push(n);
                targets.len() as u32 - 1
            })
        };
        let (mut up, mut sp, mut sn, mut qp, mut qn) = (vec![], vec![], vec![], vec![], vec![]);
        for t in tasks {
            up.push(at(self.ckg.user_node(t.user), &mut targets));
            for (set, pv, nv) in [(&t.support, &mut sp, &mut sn), (&t.query, &mut qp, &mut qn)] {
                for _ in 0..p {
                    let i = set[self.rng.random_range(0..set.len())];
                    let j = self.negative(t.user);
                    pv.push(at(self.ckg.item_node[i as usize], &mut targets));
                    nv.push(at(self.ckg.item_node[j as usize], &mut targets));
                }
            }
        }
        Ok(Batch {
            targets,
            user_pos: idx(&up)?,
            sp: idx(&sp)?,
            sn: idx(&sn)?,
            qp: idx(&qp)?,
            qn: idx(&qn)?,
            b: tasks.len(),
        })
    }

    fn refresh(&mut self) -> Result<()> {
        self.consts = Some(self.model.consts(&self.ckg)?);
        Ok(())
    }

    /// One meta-training epoch (Algorithm 1 lines 3–11): per meta-batch, the
    /// scheduler picks tasks, the CF meta-update steps γ, the KG step updates
    /// ϕ and ω. Returns the mean meta (query) loss.
    pub fn epoch(&mut self) -> Result<f32> {
        // The previous epoch ends with a refresh.
        if self.consts.is_none() {
            self.refresh()?;
        }
        let cfg = self.model.cfg.clone();
        let steps = self
            .tasks
            .len()
            .div_ceil(cfg.meta_batch)
            .min(cfg.max_steps_per_epoch);
        let mut total = 0.0;
        for _ in 0..steps {
            let bsz = cfg.meta_batch.min(self.tasks.len());
            let (chosen_ids, cand, chosen_in_cand): (Vec<usize>, Vec<usize>, Vec<usize>) = if cfg
                .has(Component::Scheduler)
            {
                let n_cand = (bsz * cfg.pool).min(self.tasks.len());
                let cand: Vec<usize> =
                    rand::seq::index::sample(&mut self.rng, self.tasks.len(), n_cand).into_vec();
                // Gumbel top-k: sampling without replacement ∝ softmax(z).
                let mut keyed: Vec<(f64, usize)> = cand
                    .iter()
                    .enumerate()
                    .map(|(ci, &t)| {
                        let g: f64 = -(-(self.rng.random::<f64>().max(1e-12)).ln()).ln();
                        (self.scheduler.logit(self.history[t]) + g, ci)
                    })
                    .collect();
                keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let cin: Vec<usize> = keyed[..bsz].iter().map(|k| k.1).collect();
                (cin.iter().map(|&c| cand[c]).collect(), cand, cin)
            } else {
                let ids = rand::seq::index::sample(&mut self.rng, self.tasks.len(), bsz).into_vec();
                (ids, vec![], vec![])
            };
            let tasks: Vec<MetaTask> = chosen_ids.iter().map(|&i| self.tasks[i].clone()).collect();
            let batch = self.batch(&tasks)?;
            let consts = self
                .consts
                .as_ref()
                .ok_or_else(|| TrainError::Data("no constants".into()))?;
            let (loss, ql, cos) = self.model.meta_loss(&self.ckg, consts, &batch)?;
            let before = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            self.cf_opt.backward_step(&loss)?;
            total += before;
            if cfg.has(Component::Scheduler) {
                let consts = self
                    .consts
                    .as_ref()
                    .ok_or_else(|| TrainError::Data("no constants".into()))?;
                let (after, _, _) = self.model.meta_loss(&self.ckg, consts, &batch)?;
                let after = after.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let feats: Vec<[f64; 2]> = cand.iter().map(|&t| self.history[t]).collect();
                self.scheduler.reinforce(
                    &feats,
                    &chosen_in_cand,
                    (before - after) as f64,
                    cfg.scheduler_lr,
                );
            }
            for (k, &t) in chosen_ids.iter().enumerate() {
                self.history[t] = [ql[k] as f64, cos[k] as f64];
            }
            if cfg.has(Component::Knowledge) {
                self.kg_step(None)?;
            }
        }
        self.refresh()?;
        Ok(total / steps.max(1) as f32)
    }

    /// Co-adaptation to a scenario (eq. 26): steps of support BPR on the
    /// scenario's tasks (at γ, no local update) plus the KG loss with half of
    /// each batch from the support interactions.
    pub fn coadapt(&mut self, tasks: &[Task]) -> Result<()> {
        let tasks: Vec<MetaTask> = tasks
            .iter()
            .filter(|t| !t.support.is_empty())
            .map(|t| MetaTask {
                user: t.user,
                support: t.support.clone(),
                query: t.support.clone(),
            })
            .collect();
        if tasks.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(u32, u32)> = tasks
            .iter()
            .flat_map(|t| t.support.iter().map(move |&i| (t.user, i)))
            .collect();
        let cfg = self.model.cfg.clone();
        // Attention and layer-0 sums once, as in an epoch of meta-training.
        self.refresh()?;
        for _ in 0..cfg.coadapt_steps {
            let ids = rand::seq::index::sample(
                &mut self.rng,
                tasks.len(),
                cfg.meta_batch.min(tasks.len()),
            )
            .into_vec();
            let chosen: Vec<MetaTask> = ids.iter().map(|&i| tasks[i].clone()).collect();
            let batch = self.batch(&chosen)?;
            let consts = self
                .consts
                .as_ref()
                .ok_or_else(|| TrainError::Data("no constants".into()))?;
            let fwd = self.model.forward(&self.ckg, consts, &batch.targets)?;
            let d = fwd.star.dim(1)?;
            let g = |i: &Tensor| -> Result<Tensor> {
                Ok(fwd
                    .star
                    .index_select(i, 0)?
                    .reshape((batch.b, cfg.pairs, d))?)
            };
            let u = fwd.star.index_select(&batch.user_pos, 0)?;
            let loss = Model::bpr(&u, &g(&batch.sp)?, &g(&batch.sn)?)?;
            self.cf_opt.backward_step(&loss)?;
            self.kg_step(Some(&pairs))?;
        }
        self.refresh()
    }

    /// The scorer: every node's e⋆ and every user's local update on their own
    /// items (in ndarray, [`local_update_nd`]).
    pub fn scorer(&mut self, seed: u64) -> Result<MetaKgRec> {
        if self.consts.is_none() {
            self.refresh()?;
        }
        let consts = self
            .consts
            .as_ref()
            .ok_or_else(|| TrainError::Data("no constants".into()))?;
        let all: Vec<u32> = (0..self.ckg.n_nodes as u32).collect();
        let fwd = self.model.forward(&self.ckg, consts, &all)?;
        let star = to_array2(&fwd.star)?;
        let a: Vec<Array2<f32>> = fwd.a.iter().map(to_array2).collect::<Result<_>>()?;
        let b: Vec<Array2<f32>> = fwd.b.iter().map(to_array2).collect::<Result<_>>()?;
        let w1: Vec<Array2<f32>> = self
            .model
            .w1
            .iter()
            .map(|v| to_array2(v.as_tensor()))
            .collect::<Result<_>>()?;
        let w2: Vec<Array2<f32>> = self
            .model
            .w2
            .iter()
            .map(|v| to_array2(v.as_tensor()))
            .collect::<Result<_>>()?;
        let rows: Vec<usize> = self.ckg.item_node.iter().map(|&n| n as usize).collect();
        let items = star.select(Axis(0), &rows);
        let cfg = &self.model.cfg;
        let steps = if cfg.has(Component::Local) {
            cfg.inner_steps
        } else {
            0
        };
        let d0 = cfg.dims[0];
        let mut users = Array2::<f32>::zeros((self.user_items.len(), star.ncols()));
        for (u, its) in self.user_items.iter().enumerate() {
            let node = self.ckg.user_node(u as u32) as usize;
            let mut row = users.row_mut(u);
            if its.is_empty() || steps == 0 {
                row.assign(&star.row(node));
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u as u64).wrapping_mul(0x9e37_79b9));
            let np = cfg.score_pairs;
            let mut p = Array2::<f32>::zeros((np, star.ncols()));
            let mut n = Array2::<f32>::zeros((np, star.ncols()));
            for k in 0..np {
                let i = if its.len() <= np {
                    its[k % its.len()]
                } else {
                    its[rng.random_range(0..its.len())]
                };
                let j = loop {
                    let j = rng.random_range(0..self.n_items as u32);
                    if its.binary_search(&j).is_err() || its.len() >= self.n_items {
                        break j;
                    }
                };
                p.row_mut(k).assign(&items.row(i as usize));
                n.row_mut(k).assign(&items.row(j as usize));
            }
            let al: Vec<Array1<f32>> = a.iter().map(|m| m.row(node).to_owned()).collect();
            let bl: Vec<Array1<f32>> = b.iter().map(|m| m.row(node).to_owned()).collect();
            let s = local_update_nd(
                star.row(node).slice(ndarray::s![..d0]),
                &al,
                &bl,
                &w1,
                &w2,
                &p,
                &n,
                steps,
                cfg.inner_lr,
                cfg.slope,
            );
            row.assign(&s);
        }
        let bias = Array1::zeros(items.nrows());
        Ok(MetaKgRec { users, items, bias })
    }

    /// A copy with the same state, for co-adaptation (optimiser moments restart).
    fn fork(&self) -> Result<Self> {
        let model = self.model.copy()?;
        Ok(Self {
            ckg: self.ckg.clone(),
            cf_opt: adam(model.cf_vars(), self.model.cfg.outer_lr)?,
            kg_opt: adam(model.kg_vars(), self.model.cfg.kg_lr)?,
            model,
            user_items: self.user_items.clone(),
            n_items: self.n_items,
            tasks: self.tasks.clone(),
            scheduler: self.scheduler.clone(),
            history: self.history.clone(),
            rng: self.rng.clone(),
            consts: None,
        })
    }
}

/// Fitted MetaKG scores: adapted users' e⋆ against items' e⋆ (eq. 16), a
/// matrix factorisation without bias.
pub type MetaKgRec = crate::eval::baselines::Mf;

/// Per user, their training items in stream order (`stream` first, then any
/// pair of `train` the stream lacks).
pub fn time_order(train: &TrainSet, stream: &[(u32, u32)]) -> Vec<Vec<u32>> {
    let mut order: Vec<Vec<u32>> = vec![Vec::new(); train.user_items.len()];
    let mut seen: Vec<std::collections::HashSet<u32>> =
        vec![Default::default(); train.user_items.len()];
    for &(u, i) in stream {
        let u = u as usize;
        if u < order.len() && train.user_items[u].binary_search(&i).is_ok() && seen[u].insert(i) {
            order[u].push(i);
        }
    }
    for (u, its) in train.user_items.iter().enumerate() {
        for &i in its {
            if seen[u].insert(i) {
                order[u].push(i);
            }
        }
    }
    order
}

/// What meta-training leaves for co-adaptation: a trained model per
/// (dataset, training data, seed, settings), so that the aware mode's four
/// scenarios share one meta-training.
type Cached = (String, Arc<Mutex<Trainer>>, serde_json::Value);
static CACHE: Mutex<Option<Cached>> = Mutex::new(None);

/// Meta-trains MetaKG on `train` (choosing the epoch count on `valid`, whose
/// own training data rebuild the protocol inside meta-training), or returns the
/// cached result of the same call. Returns the trainer and the report params.
pub fn meta_train(
    ds: &Dataset,
    train: &TrainSet,
    stream: &[(u32, u32)],
    valid: &crate::eval::split::Split,
    k: usize,
    seed: u64,
    cfg: &MetaKgConfig,
) -> Result<(Arc<Mutex<Trainer>>, serde_json::Value)> {
    let key = format!(
        "{}|{}|{}|{}|{}",
        ds.digest,
        train.pairs().len(),
        valid.digest,
        seed,
        serde_json::to_string(cfg).map_err(|e| TrainError::Data(e.to_string()))?
    );
    let mut cache = CACHE
        .lock()
        .map_err(|_| TrainError::Data("MetaKG cache poisoned".into()))?;
    if let Some((k0, t, p)) = cache.as_ref() {
        if *k0 == key {
            return Ok((t.clone(), p.clone()));
        }
    }
    let start = std::time::Instant::now();
    // Epoch count on valid/.
    let vtrain = TrainSet::from_split(valid, train.user_items.len(), train.n_items);
    let vorder = time_order(&vtrain, stream);
    let mut vt = Trainer::new(ds, &vorder, cfg, DType::F32, seed)?;
    let (mut best, mut best_epochs, mut since) = (f64::NEG_INFINITY, 0usize, 0usize);
    let mut curve = serde_json::Map::new();
    let s0 = vt.scorer(seed)?;
    let v0 = crate::eval::valid_ndcg(&s0, valid, &vtrain, k);
    curve.insert("0".into(), serde_json::json!(v0));
    if v0 > best {
        best = v0;
    }
    for epoch in 1..=cfg.max_epochs {
        let loss = vt.epoch()?;
        let s = crate::eval::valid_ndcg(&vt.scorer(seed)?, valid, &vtrain, k);
        tracing::info!(epoch, loss, valid_ndcg = s, "metakg valid epoch");
        curve.insert(epoch.to_string(), serde_json::json!(s));
        if s > best {
            (best, best_epochs, since) = (s, epoch, 0);
        } else {
            since += 1;
            if since >= cfg.patience {
                break;
            }
        }
    }
    let valid_s = start.elapsed().as_secs_f64();
    let order = time_order(train, stream);
    let mut t = Trainer::new(ds, &order, cfg, DType::F32, seed)?;
    for _ in 0..best_epochs {
        t.epoch()?;
    }
    let params = serde_json::json!({
        "dims": cfg.dims, "fanout": cfg.fanout, "inner_lr": cfg.inner_lr,
        "inner_steps": cfg.inner_steps, "meta_batch": cfg.meta_batch,
        "transr_steps": cfg.transr_steps, "epochs": best_epochs,
        "max_epochs": cfg.max_epochs, "tasks": t.tasks.len(),
        "without": cfg.without, "valid_ndcg_by_epoch": curve,
        "valid_seconds": valid_s, "train_seconds": start.elapsed().as_secs_f64() - valid_s,
    });
    let t = Arc::new(Mutex::new(t));
    *cache = Some((key, t.clone(), params.clone()));
    Ok((t, params))
}

/// The fitted scorer: the meta-trained model, co-adapted to `scenario`'s
/// support sets first when given (aware mode).
pub fn fitted(trainer: &Mutex<Trainer>, scenario: Option<&[Task]>, seed: u64) -> Result<MetaKgRec> {
    let mut t = trainer
        .lock()
        .map_err(|_| TrainError::Data("MetaKG trainer poisoned".into()))?;
    match scenario {
        Some(tasks) if t.model.cfg.has(Component::Coadapt) => {
            let mut own = t.fork()?;
            own.coadapt(tasks)?;
            own.scorer(seed)
        }
        _ => t.scorer(seed),
    }
}

#[cfg(test)]
mod tests;
