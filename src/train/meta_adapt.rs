//! Meta-learned per-user adaptation: the starting point of a new user's
//! vector and per-step, per-dimension learning rates (Meta-SGD, Li et al.
//! 2017) over MPKG's item embeddings, meta-trained on tasks chosen by an
//! adaptive task scheduler (MetaKG eq. 18).
//!
//! The engine adapts a user from their items ([`crate::adapt`]): a
//! starting point from the mean of their items, then BPR steps against
//! hashed negatives. Here that path is learned as MetaKG learns its local
//! update (eqs. 19, 21): a *task* is a meta-training user whose items are
//! split into a support set (what the engine would have seen) and a query
//! set of held-out items. The inner loop runs the engine's steps on the
//! support set, written as tensor operations so that candle differentiates
//! through them (second order, not first-order MAML); the outer loss is the
//! softmax cross-entropy of the query items over the whole catalogue with
//! the user's other score terms (graph neighbours) added, the support items
//! excluded: what ranking does. The parameters, `θ = (init_scale,
//! init_shift, lr[t])`, are few (`(2 + steps) · d`) and shared by every
//! user, so a user with three items gets the same learned path as one with
//! sixty.
//!
//! Leakage: the tasks' query interactions are removed from the graph and the
//! bias features the inner loop sees (the embeddings are recomputed over
//! that graph), as the evaluation's query items are unseen.
//!
//! The scheduler (eq. 18): each iteration draws a pool of candidate tasks
//! uniformly, scores each from its query loss and the cosine between its
//! support and query gradients at the starting point (both standardised
//! over the pool) with weights `δ`, and samples the batch in proportion to
//! `exp(score)` (Gumbel top-k). MetaKG trains an LSTM over these factors with
//! the meta-loss; here `δ` is a linear scorer trained by REINFORCE on the
//! improvement of a held-out batch's loss after each update (the reward of
//! Yao et al.'s adaptive task scheduler), with a moving-average baseline.
//!
//! Model selection: 10% of the task users are held out; θ is evaluated on
//! them every [`MetaAdaptConfig::eval_every`] iterations and the best is
//! kept. All of it is meta-training data: no valid/ or test query is read.

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Result, TrainError};
use crate::adapt::{self, Catalogue, MetaAdapt};

/// The file in a model folder holding the meta-learned adaptation.
pub const FILE: &str = "meta_adapt.json";

/// Cut-off of the held-out Recall that selects θ.
const HELD_OUT_K: usize = 20;

/// Settings of the meta-training (`thaw train`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaAdaptConfig {
    /// Meta-train one (`thaw train --meta-adapt off` to skip).
    pub enabled: bool,
    /// Adaptation steps (the engine runs exactly these).
    pub steps: usize,
    /// Outer iterations (one batch of tasks each).
    pub iterations: usize,
    /// Tasks per batch.
    pub batch: usize,
    /// AdamW learning rate of θ.
    pub lr: f64,
    /// Query items per task (10, as the evaluation protocol).
    pub query: usize,
    /// Least items a user needs to be a task (query plus 3 support items).
    pub min_items: usize,
    /// Starting learning rate of every step and dimension (the plain path's).
    pub init_lr: f32,
    /// L2 pull towards the starting point.
    pub l2: f32,
    /// The adaptive task scheduler (false: uniform sampling, the ablation).
    pub scheduler: bool,
    /// Candidate tasks the scheduler scores per batch, as a multiple of the batch.
    pub pool: usize,
    /// Learning rate of the scheduler's weights.
    pub scheduler_lr: f32,
    /// Held-out evaluation every this many iterations (best θ kept).
    pub eval_every: usize,
    /// Seed of task, query and batch draws.
    pub seed: u64,
}

impl Default for MetaAdaptConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            steps: 5,
            iterations: 100,
            batch: 32,
            lr: 0.01,
            query: 10,
            min_items: 13,
            init_lr: 0.5,
            l2: 0.1,
            scheduler: true,
            pool: 4,
            scheduler_lr: 0.05,
            eval_every: 20,
            seed: 13,
        }
    }
}

/// Reads `dir/meta_adapt.json` if present, checked against the model's
/// embedding size `d`.
pub fn read(dir: &Path, d: usize) -> Result<Option<MetaAdapt>> {
    let p = dir.join(FILE);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(super::io(&p))?;
    let m: MetaAdapt = serde_json::from_str(&text)
        .map_err(|e| TrainError::Data(format!("{}: {e}", p.display())))?;
    m.check(d)
        .map_err(|e| TrainError::Data(format!("{}: {e}", p.display())))?;
    Ok(Some(m))
}

/// Writes `dir/meta_adapt.json`.
pub fn write(dir: &Path, m: &MetaAdapt) -> Result<()> {
    let p = dir.join(FILE);
    let text = serde_json::to_string_pretty(m).map_err(|e| TrainError::Data(e.to_string()))?;
    std::fs::write(&p, text).map_err(super::io(&p))
}

/// One task: a user's support and query items (catalogue slots).
#[derive(Debug, Clone)]
pub struct MetaTask {
    /// The user's key ([`adapt::key`] of their id): the negatives' draw.
    pub user: u64,
    /// Support items in stream order (oldest first).
    pub support: Vec<u32>,
    /// Held-out query items.
    pub query: Vec<u32>,
}

/// The catalogue the tasks are scored over: embeddings, biases, keys, and
/// the graph-neighbour term.
pub struct MetaCatalogue<'a> {
    /// Item embeddings [n, d].
    pub emb: ArrayView2<'a, f32>,
    /// Item biases [n].
    pub bias: ArrayView1<'a, f32>,
    /// [`adapt::key`] of every slot's id.
    pub keys: &'a [u64],
    /// The graph and its neighbour weights (the ranking's graph term).
    pub graph: Option<(&'a crate::graph::Pkg, &'a [f32])>,
    /// The co-occurrence counts and the item-kNN weight (the ranking's
    /// item-kNN term).
    pub knn: Option<(&'a crate::graph::co::CoGraph, f32)>,
}

impl MetaCatalogue<'_> {
    fn catalogue<'b>(&'b self, active: &'b [bool]) -> Catalogue<'b> {
        Catalogue {
            emb: self.emb,
            bias: self.bias,
            active,
            keys: self.keys,
            graph: self.graph,
            fresh: None,
            knn: self.knn.map(|(co, w)| {
                let w = adapt::KnnWeights { all: w, fresh: 0.0 };
                (co, w)
            }),
            pool: None,
        }
    }
}

/// A task's fixed inputs: positives, negatives, and the per-item extra score
/// and exclusion mask.
struct Prepared {
    pos: Vec<u32>,
    neg: Vec<u32>,
    query: Vec<u32>,
    /// Graph-neighbour score of the support items, per slot.
    extra: Array1<f32>,
    /// The support items (excluded from the ranking).
    support: Vec<u32>,
}

fn prepare(
    cat: &MetaCatalogue<'_>,
    active: &[bool],
    t: &MetaTask,
    cfg: &adapt::AdaptConfig,
) -> Prepared {
    let c = cat.catalogue(active);
    let start = t.support.len().saturating_sub(cfg.max_positives.max(1));
    let mut pos: Vec<u32> = t.support[start..].to_vec();
    pos.sort_unstable();
    pos.dedup();
    let neg = adapt::negatives(&c, &t.support, t.user, cfg.negatives);
    let mut extra = Array1::<f32>::zeros(cat.emb.nrows());
    if let Some((pkg, w)) = cat.graph {
        pkg.add_neighbour_scores(w, &t.support, extra.view_mut());
    }
    if let Some((co, w)) = cat.knn {
        co.add_similarity_scores(w, &t.support, extra.view_mut());
    }
    let mut support = t.support.clone();
    support.sort_unstable();
    support.dedup();
    Prepared {
        pos,
        neg,
        query: t.query.clone(),
        extra,
        support,
    }
}

/// θ as candle variables.
struct Theta {
    scale: Var,
    shift: Var,
    lr: Var,
    l2: f32,
    /// log τ of the outer loss's softmax temperature: ranking does not
    /// depend on τ, but without it the loss could only fit the scale of the
    /// fixed graph term by bending the user vectors (see [`query_loss`]).
    log_tau: Var,
}

impl Theta {
    fn new(m: &MetaAdapt) -> Result<Self> {
        let d = m.dim();
        let dev = &Device::Cpu;
        let steps = m.lr.len();
        Ok(Self {
            scale: Var::from_tensor(&Tensor::from_slice(&m.init_scale, d, dev)?)?,
            shift: Var::from_tensor(&Tensor::from_slice(&m.init_shift, d, dev)?)?,
            lr: Var::from_tensor(&Tensor::from_vec(
                m.lr.iter().flatten().copied().collect::<Vec<_>>(),
                (steps, d),
                dev,
            )?)?,
            l2: m.l2,
            log_tau: Var::from_tensor(&Tensor::new(&[0f32], dev)?)?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.scale.clone(),
            self.shift.clone(),
            self.lr.clone(),
            self.log_tau.clone(),
        ]
    }

    fn to_meta(&self) -> Result<MetaAdapt> {
        Ok(MetaAdapt {
            init_scale: self.scale.as_tensor().to_vec1()?,
            init_shift: self.shift.as_tensor().to_vec1()?,
            lr: self.lr.as_tensor().to_vec2()?,
            l2: self.l2,
        })
    }
}

/// σ(x) as `(1 + tanh(x / 2)) / 2`: stable, and differentiable by candle.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

/// A batch of prepared tasks as tensors.
struct Batch {
    /// [B, P, d], [B, P], mask [B, P], positives per task [B, 1].
    ep: Tensor,
    bp: Tensor,
    mp: Tensor,
    np: Tensor,
    /// [B, K, d], [B, K] (K the same for every task).
    en: Tensor,
    bn: Tensor,
    /// [B, n]: the extra scores plus −1e9 on support items.
    extra: Tensor,
    /// [B, n]: 1/|query| on query items.
    qmask: Tensor,
}

fn batch(cat: &MetaCatalogue<'_>, tasks: &[&Prepared]) -> Result<Batch> {
    let d = cat.emb.ncols();
    let n = cat.emb.nrows();
    let b = tasks.len();
    let p = tasks.iter().map(|t| t.pos.len()).max().unwrap_or(1).max(1);
    let k = tasks.iter().map(|t| t.neg.len()).min().unwrap_or(0);
    let mut ep = vec![0f32; b * p * d];
    let mut bp = vec![0f32; b * p];
    let mut mp = vec![0f32; b * p];
    let mut np = vec![0f32; b];
    let mut en = vec![0f32; b * k * d];
    let mut bn = vec![0f32; b * k];
    let mut extra = vec![0f32; b * n];
    let mut qmask = vec![0f32; b * n];
    for (t, task) in tasks.iter().enumerate() {
        for (j, &i) in task.pos.iter().enumerate() {
            let o = (t * p + j) * d;
            ep[o..o + d].copy_from_slice(&cat.emb.row(i as usize).to_vec());
            bp[t * p + j] = cat.bias[i as usize];
            mp[t * p + j] = 1.0;
        }
        np[t] = task.pos.len().max(1) as f32;
        for (j, &i) in task.neg.iter().take(k).enumerate() {
            let o = (t * k + j) * d;
            en[o..o + d].copy_from_slice(&cat.emb.row(i as usize).to_vec());
            bn[t * k + j] = cat.bias[i as usize];
        }
        let row = &mut extra[t * n..(t + 1) * n];
        ndarray::ArrayViewMut1::from(&mut *row).assign(&task.extra);
        for &i in &task.support {
            row[i as usize] = -1e9;
        }
        let q = task.query.len().max(1) as f32;
        for &i in &task.query {
            qmask[t * n + i as usize] = 1.0 / q;
        }
    }
    let dev = &Device::Cpu;
    Ok(Batch {
        ep: Tensor::from_vec(ep, (b, p, d), dev)?,
        bp: Tensor::from_vec(bp, (b, p), dev)?,
        mp: Tensor::from_vec(mp, (b, p), dev)?,
        np: Tensor::from_vec(np, (b, 1), dev)?,
        en: Tensor::from_vec(en, (b, k, d), dev)?,
        bn: Tensor::from_vec(bn, (b, k), dev)?,
        extra: Tensor::from_vec(extra, (b, n), dev)?,
        qmask: Tensor::from_vec(qmask, (b, n), dev)?,
    })
}

/// The adapted users [B, d] of a batch under θ: the engine's steps
/// ([`adapt::adapt_steps`]) as differentiable tensor operations.
fn adapted(theta: &Theta, x: &Batch) -> candle_core::Result<Tensor> {
    let k = x.en.dim(1)? as f64;
    let mean =
        x.ep.broadcast_mul(&x.mp.unsqueeze(2)?)?
            .sum(1)?
            .broadcast_div(&x.np)?;
    let start = mean
        .broadcast_mul(theta.scale.as_tensor())?
        .broadcast_add(theta.shift.as_tensor())?;
    let pairs = (&x.np * k)?;
    let mut u = start.clone();
    for t in 0..theta.lr.dim(0)? {
        let uc = u.unsqueeze(2)?;
        let sp = (x.ep.matmul(&uc)?.squeeze(2)? + &x.bp)?;
        let sn = (x.en.matmul(&uc)?.squeeze(2)? + &x.bn)?;
        let w = sigmoid(&sn.unsqueeze(1)?.broadcast_sub(&sp.unsqueeze(2)?)?)?
            .broadcast_mul(&x.mp.unsqueeze(2)?)?;
        let toward = w.sum_keepdim(1)?.matmul(&x.en)?.squeeze(1)?;
        let away = w
            .sum_keepdim(2)?
            .transpose(1, 2)?
            .matmul(&x.ep)?
            .squeeze(1)?;
        let grad =
            ((toward - away)?.broadcast_div(&pairs)? + ((&u - &start)? * f64::from(theta.l2))?)?;
        let lr = theta.lr.as_tensor().get(t)?;
        u = (u - grad.broadcast_mul(&lr)?)?;
    }
    Ok(u)
}

/// Per-task query loss [B] of adapted users `u` [B, d]: softmax
/// cross-entropy of the query items over the catalogue at temperature
/// `exp(log_tau)` (1 when `None`).
fn query_loss(
    cat_e: &Tensor,
    cat_b: &Tensor,
    u: &Tensor,
    x: &Batch,
    log_tau: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let mut logits = u.matmul(&cat_e.t()?)?.broadcast_add(cat_b)?.add(&x.extra)?;
    if let Some(t) = log_tau {
        logits = logits.broadcast_mul(&t.neg()?.exp()?)?;
    }
    let logp = candle_nn::ops::log_softmax(&logits, 1)?;
    (logp * &x.qmask)?.sum(1)?.neg()
}

/// What [`train`] returns: the learned adaptation and its curves.
pub struct Trained {
    /// θ (the best held-out Recall@20; iteration 0, the plain path at
    /// `init_lr` or the given start, is a candidate).
    pub meta: MetaAdapt,
    /// Held-out (iteration, mean query loss, Recall@20) per evaluation.
    pub held_out: Vec<(usize, f32, f32)>,
    /// Held-out (mean query loss at τ = 1, Recall@20) of the engine's plain path.
    pub plain: (f32, f32),
    /// Training batch loss per iteration.
    pub losses: Vec<f32>,
    /// The scheduler's final weights on (query loss, gradient similarity).
    pub scheduler: [f32; 2],
}

/// Meta-trains the adaptation on `tasks` over `cat` (every slot active),
/// from `init` (a learned adaptation to co-adapt, MetaKG eq. 26) or else the
/// plain path at `cfg.init_lr`. `engine` gives the engine's positives cap
/// and negatives.
pub fn train(
    cat: &MetaCatalogue<'_>,
    tasks: &[MetaTask],
    engine: &adapt::AdaptConfig,
    cfg: &MetaAdaptConfig,
    init: Option<&MetaAdapt>,
) -> Result<Trained> {
    let d = cat.emb.ncols();
    let n = cat.emb.nrows();
    if tasks.len() < 10 {
        return Err(TrainError::Data(format!(
            "meta-adaptation needs at least 10 tasks (users with ≥ {} items), got {}",
            cfg.min_items,
            tasks.len()
        )));
    }
    let active = vec![true; n];
    let prepared: Vec<Prepared> = tasks
        .iter()
        .map(|t| prepare(cat, &active, t, engine))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..prepared.len()).collect();
    order.shuffle(&mut rng);
    let n_held = (prepared.len() / 5).max(1);
    let (held, train_ids) = order.split_at(n_held);
    let held: Vec<&Prepared> = held.iter().map(|&i| &prepared[i]).collect();
    let dev = &Device::Cpu;
    let cat_e = Tensor::from_slice(
        cat.emb.as_standard_layout().as_slice().unwrap_or(&[]),
        (n, d),
        dev,
    )?;
    let cat_b = Tensor::from_slice(&cat.bias.to_vec(), n, dev)?;
    // Held-out (mean query loss, Recall@20) of θ; Recall@20 as `thaw eval`
    // counts it (query hits in the top 20, support excluded, over the query
    // size), which is what model selection maximises.
    let held_eval = |theta: &Theta| -> Result<(f32, f32)> {
        let (mut loss, mut recall) = (0f32, 0f32);
        for chunk in held.chunks(64) {
            let x = batch(cat, chunk)?;
            let u = adapted(theta, &x)?;
            let l = query_loss(&cat_e, &cat_b, &u, &x, Some(theta.log_tau.as_tensor()))?;
            loss += l.sum_all()?.to_scalar::<f32>()?;
            let scores = u
                .matmul(&cat_e.t()?)?
                .broadcast_add(&cat_b)?
                .add(&x.extra)?
                .to_vec2::<f32>()?;
            for (row, t) in scores.iter().zip(chunk) {
                let mut idx: Vec<u32> = (0..row.len() as u32).collect();
                let k = HELD_OUT_K.min(idx.len());
                if k == 0 {
                    continue;
                }
                idx.select_nth_unstable_by(k - 1, |&a, &b| {
                    row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
                });
                let hits = idx[..k].iter().filter(|i| t.query.contains(i)).count();
                recall += hits as f32 / t.query.len().max(1) as f32;
            }
        }
        let n = held.len() as f32;
        Ok((loss / n, recall / n))
    };
    let plain = Theta::new(&MetaAdapt::plain(d, engine.steps, engine.lr, engine.l2))?;
    let plain_eval = held_eval(&plain)?;
    let theta = Theta::new(
        &init
            .cloned()
            .unwrap_or_else(|| MetaAdapt::plain(d, cfg.steps, cfg.init_lr, cfg.l2)),
    )?;
    // The temperature starts at the spread of the starting scores.
    {
        let x = batch(cat, &held[..held.len().min(64)])?;
        let s = adapted(&theta, &x)?
            .matmul(&cat_e.t()?)?
            .broadcast_add(&cat_b)?
            .add(&x.extra.clamp(-1e4f32, f32::MAX)?)?;
        let sd = s.flatten_all()?.to_vec1::<f32>()?;
        let mean = sd.iter().filter(|v| **v > -1e3).sum::<f32>() / sd.len().max(1) as f32;
        let var = sd
            .iter()
            .filter(|v| **v > -1e3)
            .map(|v| (v - mean).powi(2))
            .sum::<f32>()
            / sd.len().max(1) as f32;
        theta
            .log_tau
            .set(&Tensor::new(&[var.sqrt().max(1e-3).ln()], dev)?)?;
    }
    let mut opt = AdamW::new(
        theta.vars(),
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let first = held_eval(&theta)?;
    let mut best = (first, theta.to_meta()?);
    let mut curve = vec![(0, first.0, first.1)];
    let mut losses = Vec::with_capacity(cfg.iterations);
    let mut delta = [0f32; 2];
    let mut baseline = 0f32;
    // A fixed held-out batch measures each update for the scheduler's reward.
    let reward_batch = batch(cat, &held[..held.len().min(cfg.batch)])?;
    let reward_loss = |theta: &Theta| -> Result<f32> {
        let l = query_loss(
            &cat_e,
            &cat_b,
            &adapted(theta, &reward_batch)?,
            &reward_batch,
            Some(theta.log_tau.as_tensor()),
        )?;
        Ok(l.mean_all()?.to_scalar::<f32>()?)
    };
    let bsz = cfg.batch.min(train_ids.len());
    for it in 1..=cfg.iterations {
        let (chosen, grad_logp) = if cfg.scheduler {
            let pool: Vec<usize> = train_ids
                .choose_multiple(&mut rng, (cfg.pool.max(1) * bsz).min(train_ids.len()))
                .copied()
                .collect();
            let m = theta.to_meta()?;
            let feats: Vec<[f32; 2]> = pool
                .iter()
                .map(|&i| task_factors(cat, &prepared[i], &m))
                .collect();
            let z = standardise(&feats);
            let score: Vec<f32> = z
                .iter()
                .map(|f| delta[0] * f[0] + delta[1] * f[1])
                .collect();
            // Gumbel top-k: a sample without replacement ∝ exp(score).
            let mut keyed: Vec<(f32, usize)> = score
                .iter()
                .enumerate()
                .map(|(j, &s)| {
                    let g = -(-(rng.random::<f32>().max(1e-12)).ln()).ln();
                    (s + g, j)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            let picked: Vec<usize> = keyed[..bsz].iter().map(|&(_, j)| j).collect();
            // ∇δ log p(batch) ≈ Σ_picked (f − E_p[f]).
            let mx = score.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ps: Vec<f32> = score.iter().map(|s| (s - mx).exp()).collect();
            let zsum: f32 = ps.iter().sum();
            let mut expect = [0f32; 2];
            for (p, f) in ps.iter().zip(&z) {
                expect[0] += p / zsum * f[0];
                expect[1] += p / zsum * f[1];
            }
            let mut g = [0f32; 2];
            for &j in &picked {
                g[0] += z[j][0] - expect[0];
                g[1] += z[j][1] - expect[1];
            }
            (picked.iter().map(|&j| pool[j]).collect::<Vec<_>>(), Some(g))
        } else {
            (
                train_ids.choose_multiple(&mut rng, bsz).copied().collect(),
                None,
            )
        };
        let before = if grad_logp.is_some() {
            reward_loss(&theta)?
        } else {
            0.0
        };
        let refs: Vec<&Prepared> = chosen.iter().map(|&i| &prepared[i]).collect();
        let x = batch(cat, &refs)?;
        let loss = query_loss(
            &cat_e,
            &cat_b,
            &adapted(&theta, &x)?,
            &x,
            Some(theta.log_tau.as_tensor()),
        )?
        .mean_all()?;
        opt.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
        if let Some(g) = grad_logp {
            let reward = before - reward_loss(&theta)?;
            let adv = reward - baseline;
            baseline = 0.9 * baseline + 0.1 * reward;
            let scale = cfg.scheduler_lr * adv / bsz as f32;
            delta[0] = (delta[0] + scale * g[0]).clamp(-3.0, 3.0);
            delta[1] = (delta[1] + scale * g[1]).clamp(-3.0, 3.0);
        }
        if it % cfg.eval_every.max(1) == 0 || it == cfg.iterations {
            let (l, r) = held_eval(&theta)?;
            curve.push((it, l, r));
            tracing::debug!(
                it,
                held_out_loss = l,
                held_out_recall = r,
                ?delta,
                "meta-adaptation"
            );
            if r > best.0 .1 || (r == best.0 .1 && l < best.0 .0) {
                best = ((l, r), theta.to_meta()?);
            }
        }
    }
    Ok(Trained {
        meta: best.1,
        held_out: curve,
        plain: plain_eval,
        losses,
        scheduler: delta,
    })
}

/// The scheduler's factors of a task at the starting point of `m` (eq. 18):
/// the query loss, and the cosine between the support BPR gradient and the
/// query loss gradient (both with respect to the user vector).
fn task_factors(cat: &MetaCatalogue<'_>, t: &Prepared, m: &MetaAdapt) -> [f32; 2] {
    let d = cat.emb.ncols();
    if t.pos.is_empty() || t.neg.is_empty() || t.query.is_empty() {
        return [0.0, 0.0];
    }
    let sel = |v: &[u32]| {
        cat.emb
            .select(Axis(0), &v.iter().map(|&i| i as usize).collect::<Vec<_>>())
    };
    let e_pos = sel(&t.pos);
    let e_neg = sel(&t.neg);
    let mean = e_pos.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(d));
    let u = &mean * &ArrayView1::from(&m.init_scale[..]) + ArrayView1::from(&m.init_shift[..]);
    // Support: the gradient of the engine's BPR steps.
    let bias_of = |v: &[u32]| {
        v.iter()
            .map(|&i| cat.bias[i as usize])
            .collect::<Array1<f32>>()
    };
    let g_s = adapt::bpr_gradient(
        u.view(),
        (e_pos.view(), bias_of(&t.pos).view()),
        (e_neg.view(), bias_of(&t.neg).view()),
        &mut Array2::zeros((t.pos.len(), t.neg.len())),
    );
    // Query: softmax cross-entropy over the catalogue, support excluded.
    let mut logits = cat.emb.dot(&u) + cat.bias + &t.extra;
    for &i in &t.support {
        logits[i as usize] = f32::NEG_INFINITY;
    }
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let p = logits.mapv(|l| (l - mx).exp());
    let z: f32 = p.sum();
    let p = p / z;
    let q = t.query.len() as f32;
    let loss = t
        .query
        .iter()
        .map(|&i| -(p[i as usize].max(1e-30)).ln())
        .sum::<f32>()
        / q;
    let g_q = p.dot(&cat.emb) - sel(&t.query).sum_axis(Axis(0)) / q;
    let cos = g_s.dot(&g_q) / (g_s.dot(&g_s).sqrt() * g_q.dot(&g_q).sqrt()).max(1e-12);
    [loss, cos]
}

/// Each factor standardised over the pool.
fn standardise(f: &[[f32; 2]]) -> Vec<[f32; 2]> {
    let n = f.len().max(1) as f32;
    let mut out = f.to_vec();
    for k in 0..2 {
        let mean = f.iter().map(|x| x[k]).sum::<f32>() / n;
        let var = f.iter().map(|x| (x[k] - mean).powi(2)).sum::<f32>() / n;
        let sd = var.sqrt().max(1e-6);
        for o in &mut out {
            o[k] = (o[k] - mean) / sd;
        }
    }
    out
}

/// Co-adaptation tasks from a scenario's support sets (MetaKG eq. 26): each
/// user's support items in stream order, a seeded `share` of them (at least
/// one, leaving at least two) held out as the query. Users with fewer than
/// three support items give no task.
pub fn support_tasks(supports: &[(u64, Vec<u32>)], share: f64, seed: u64) -> Vec<MetaTask> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5c0a);
    let mut out = Vec::new();
    for (user, items) in supports {
        if items.len() < 3 {
            continue;
        }
        let nq = ((items.len() as f64 * share).round() as usize).clamp(1, items.len() - 2);
        let mut idx: Vec<usize> = (0..items.len()).collect();
        idx.shuffle(&mut rng);
        let mut q = idx[..nq].to_vec();
        q.sort_unstable();
        out.push(MetaTask {
            user: *user,
            query: q.iter().map(|&j| items[j]).collect(),
            support: items
                .iter()
                .enumerate()
                .filter(|(j, _)| q.binary_search(j).is_err())
                .map(|(_, &i)| i)
                .collect(),
        });
    }
    out
}

/// Tasks from per-user item lists in stream order (oldest first): users with
/// at least `cfg.min_items` items, `cfg.query` of them drawn at random
/// (seeded) as the query, the rest the support, in order. `keys[u]` is the
/// user's [`adapt::key`].
pub fn tasks(user_items: &[Vec<u32>], keys: &[u64], cfg: &MetaAdaptConfig) -> Vec<MetaTask> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x7a5c);
    let mut out = Vec::new();
    for (u, items) in user_items.iter().enumerate() {
        if items.len() < cfg.min_items.max(cfg.query + 1) {
            continue;
        }
        let mut idx: Vec<usize> = (0..items.len()).collect();
        idx.shuffle(&mut rng);
        let mut q: Vec<usize> = idx[..cfg.query].to_vec();
        q.sort_unstable();
        let query: Vec<u32> = q.iter().map(|&j| items[j]).collect();
        let support: Vec<u32> = items
            .iter()
            .enumerate()
            .filter(|(j, _)| q.binary_search(j).is_err())
            .map(|(_, &i)| i)
            .collect();
        out.push(MetaTask {
            user: keys[u],
            support,
            query,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize, d: usize, seed: u64) -> (Array2<f32>, Array1<f32>, Vec<u64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let emb = Array2::from_shape_fn((n, d), |_| super::super::mpkg::gaussian(&mut rng, 0.5));
        let bias = Array1::from_shape_fn(n, |_| super::super::mpkg::gaussian(&mut rng, 0.2));
        let keys = (0..n).map(|i| adapt::key(&format!("i{i}"))).collect();
        (emb, bias, keys)
    }

    fn some_meta(d: usize, steps: usize, seed: u64) -> MetaAdapt {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut g = |s: f32, m: f32| {
            (0..d)
                .map(|_| m + super::super::mpkg::gaussian(&mut rng, s))
                .collect::<Vec<f32>>()
        };
        MetaAdapt {
            init_scale: g(0.2, 1.0),
            init_shift: g(0.1, 0.0),
            lr: (0..steps).map(|_| g(0.2, 0.6)).collect(),
            l2: 0.1,
        }
    }

    /// The engine's adaptation (ndarray, `adapt::adapt_user`) and the
    /// trainer's (candle, differentiated through) give the same user.
    #[test]
    fn engine_steps_equal_the_trainers() {
        let (n, d) = (60, 8);
        let (emb, bias, keys) = toy(n, d, 1);
        let active = vec![true; n];
        let cat = MetaCatalogue {
            emb: emb.view(),
            bias: bias.view(),
            keys: &keys,
            graph: None,
            knn: None,
        };
        let meta = std::sync::Arc::new(some_meta(d, 4, 2));
        let engine = adapt::AdaptConfig {
            negatives: 16,
            max_positives: 5,
            ..Default::default()
        }
        .with_meta(Some(&meta));
        let tasks: Vec<MetaTask> = (0..3)
            .map(|u| MetaTask {
                user: adapt::key(&format!("u{u}")),
                support: (0..(3 + 2 * u as u32))
                    .map(|j| (7 * j + u as u32) % n as u32)
                    .collect(),
                query: vec![50, 51],
            })
            .collect();
        let prepared: Vec<Prepared> = tasks
            .iter()
            .map(|t| prepare(&cat, &active, t, &engine))
            .collect();
        let x = batch(&cat, &prepared.iter().collect::<Vec<_>>()).unwrap();
        let theta = Theta::new(&meta).unwrap();
        let u = adapted(&theta, &x).unwrap().to_vec2::<f32>().unwrap();
        for (t, task) in tasks.iter().enumerate() {
            let c = cat.catalogue(&active);
            let want = adapt::adapt_user(&c, &task.support, task.user, &engine).unwrap();
            for k in 0..d {
                assert!(
                    (u[t][k] - want[k]).abs() < 1e-5,
                    "task {t} dim {k}: {} vs {}",
                    u[t][k],
                    want[k]
                );
            }
        }
    }

    /// The outer gradient candle takes through the inner steps matches
    /// finite differences of the query loss (in every kind of parameter).
    #[test]
    fn meta_gradient_matches_finite_differences() {
        let (n, d) = (40, 6);
        let (emb, bias, keys) = toy(n, d, 3);
        let active = vec![true; n];
        let cat = MetaCatalogue {
            emb: emb.view(),
            bias: bias.view(),
            keys: &keys,
            graph: None,
            knn: None,
        };
        let engine = adapt::AdaptConfig {
            negatives: 12,
            ..Default::default()
        };
        let task = MetaTask {
            user: 9,
            support: vec![1, 4, 9, 16],
            query: vec![30, 31, 32],
        };
        let p = prepare(&cat, &active, &task, &engine);
        let x = batch(&cat, &[&p]).unwrap();
        let cat_e = Tensor::from_slice(emb.as_slice().unwrap(), (n, d), &Device::Cpu).unwrap();
        let cat_b = Tensor::from_slice(bias.as_slice().unwrap(), n, &Device::Cpu).unwrap();
        let meta = some_meta(d, 3, 4);
        let loss_of = |m: &MetaAdapt| -> f64 {
            let th = Theta::new(m).unwrap();
            let l = query_loss(&cat_e, &cat_b, &adapted(&th, &x).unwrap(), &x, None).unwrap();
            f64::from(l.sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        let th = Theta::new(&meta).unwrap();
        let l = query_loss(&cat_e, &cat_b, &adapted(&th, &x).unwrap(), &x, None)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = l.backward().unwrap();
        let g_scale = grads
            .get(th.scale.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let g_shift = grads
            .get(th.shift.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let g_lr = grads
            .get(th.lr.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let h = 1e-2f32;
        let check = |analytic: f32, bump: &dyn Fn(&mut MetaAdapt, f32)| {
            let (mut a, mut b) = (meta.clone(), meta.clone());
            bump(&mut a, h);
            bump(&mut b, -h);
            let fd = (loss_of(&a) - loss_of(&b)) / (2.0 * f64::from(h));
            let tol = 2e-3 + 2e-2 * fd.abs();
            assert!(
                (f64::from(analytic) - fd).abs() < tol,
                "analytic {analytic} vs finite difference {fd}"
            );
        };
        for k in [0, 3, 5] {
            check(g_scale[k], &|m, e| m.init_scale[k] += e);
            check(g_shift[k], &|m, e| m.init_shift[k] += e);
            check(g_lr[1][k], &|m, e| m.lr[1][k] += e);
            check(g_lr[2][k], &|m, e| m.lr[2][k] += e);
        }
    }

    /// A meta-learned path beats the plain one on held-out tasks of a toy
    /// catalogue whose users prefer a direction the mean alone under-weights,
    /// and two runs with one seed learn the same θ.
    #[test]
    fn training_lowers_the_held_out_loss_and_is_deterministic() {
        let (n, d) = (120, 8);
        let (emb, bias, keys) = toy(n, d, 5);
        let cat = MetaCatalogue {
            emb: emb.view(),
            bias: bias.view(),
            keys: &keys,
            graph: None,
            knn: None,
        };
        // Users like items whose first coordinate is high.
        let mut by_first: Vec<u32> = (0..n as u32).collect();
        by_first.sort_by(|&a, &b| emb[[b as usize, 0]].total_cmp(&emb[[a as usize, 0]]));
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let users: Vec<Vec<u32>> = (0..120)
            .map(|_| {
                by_first[..40]
                    .choose_multiple(&mut rng, 16)
                    .copied()
                    .collect()
            })
            .collect();
        let ukeys: Vec<u64> = (0..users.len())
            .map(|u| adapt::key(&format!("u{u}")))
            .collect();
        let cfg = MetaAdaptConfig {
            iterations: 60,
            batch: 16,
            lr: 0.05,
            eval_every: 10,
            ..Default::default()
        };
        let engine = adapt::AdaptConfig {
            negatives: 32,
            ..Default::default()
        };
        let tasks = tasks(&users, &ukeys, &cfg);
        let a = train(&cat, &tasks, &engine, &cfg, None).unwrap();
        let start = a.held_out[0].1;
        let last = a.held_out.last().unwrap().1;
        assert!(last < start - 0.05, "held-out loss {start} -> {last}");
        let b = train(&cat, &tasks, &engine, &cfg, None).unwrap();
        assert_eq!(a.meta, b.meta);
        let c = train(
            &cat,
            &tasks,
            &engine,
            &MetaAdaptConfig {
                scheduler: false,
                ..cfg
            },
            None,
        )
        .unwrap();
        assert!(c.held_out.len() == a.held_out.len());
    }
}
