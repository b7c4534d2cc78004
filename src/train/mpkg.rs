//! MPKG: pre-training a product knowledge graph encoder for zero-shot items
//! (`../shared/papers/mpkg-pretraining-product-knowledge-graph.txt`).
//!
//! - Encoder, eq. 1: `E_r = S_r^M X W_r`. Propagation is linear and fixed, so
//!   training precomputes `Z_r = S_r^M X` once and learns `W_r` through
//!   `E_r = Z_r W_r`; inference projects first and propagates `X W_r`
//!   (identical by associativity).
//! - ToA layers, eq. 2: concat for HNR (eq. 5) and FR (eq. 8); the MRA
//!   self-excitation weighted sum (eq. 11): per relation two FC layers give a
//!   score, a softmax over relations gives the weights.
//! - Pre-training tasks: KR (eq. 3-4), HNR (eq. 6-7), FR (eq. 9-10), MRA
//!   (eq. 12-13), weighted as in eq. 14.
//! - Fine-tuning (eq. 15-16): only the MRA self-excitation layers (plus an item
//!   bias from observable popularity, see [`BIAS_FEATURES`]) with BPR, the user
//!   being the mean of their items' embeddings — leaving the scored positive out
//!   of that mean, so that training matches inference, where query items are
//!   never in the user's history.
//!
//! Training is seeded and deterministic on CPU: weights are initialised from a
//! ChaCha RNG, samples are drawn from one, and candle's CPU kernels are
//! deterministic for a fixed thread count.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Result, TrainError};

/// Item-bias features: `log1p(interactions)`, `log1p(interactions per day since
/// the item's first interaction)`, `log1p(interactions within the user's
/// scenario)` (zero in the blind mode). All are observable in a stream.
pub const BIAS_FEATURES: usize = 3;

/// A pre-training task (for ablations: `--without`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Knowledge reconstruction, eq. 3-4.
    Kr,
    /// High-order neighbour reconstruction, eq. 5-7.
    Hnr,
    /// Feature reconstruction, eq. 8-10.
    Fr,
    /// Meta relation adaptation, eq. 11-13.
    Mra,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kr" => Ok(Task::Kr),
            "hnr" => Ok(Task::Hnr),
            "fr" => Ok(Task::Fr),
            "mra" => Ok(Task::Mra),
            _ => Err(format!(
                "unknown pre-training task `{s}` (kr, hnr, fr, mra)"
            )),
        }
    }
}

/// Hyper-parameters of MPKG.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MpkgConfig {
    /// Embedding size d (64, as the paper's).
    pub dim: usize,
    /// Hidden size of the self-excitation layers (32).
    pub hidden: usize,
    /// Propagation hops M (3, eq. 1).
    pub hops: usize,
    /// Weights α, β, θ, γ of KR, FR, HNR, MRA (eq. 14).
    pub alpha: f32,
    /// β (FR).
    pub beta: f32,
    /// θ (HNR).
    pub theta: f32,
    /// γ (MRA).
    pub gamma: f32,
    /// Pre-training steps (AdamW, one sampled batch each).
    pub pretrain_steps: usize,
    /// Fine-tuning steps.
    pub finetune_steps: usize,
    /// Fine-tuning steps of the per-scenario adaptation (aware mode).
    pub adapt_steps: usize,
    /// Sampled edges per relation and step (KR, MRA) and pairs (HNR, BPR).
    pub batch: usize,
    /// Learning rate of pre-training.
    pub lr: f64,
    /// Learning rate of fine-tuning.
    pub finetune_lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Pre-training tasks left out (ablations).
    pub without: Vec<Task>,
    /// Seed of initialisation and sampling.
    pub seed: u64,
}

impl Default for MpkgConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            hidden: 32,
            hops: 3,
            alpha: 1.0,
            beta: 1.0,
            theta: 1.0,
            gamma: 1.0,
            pretrain_steps: 300,
            finetune_steps: 300,
            adapt_steps: 150,
            batch: 1024,
            lr: 0.005,
            finetune_lr: 0.01,
            weight_decay: 1e-4,
            without: Vec::new(),
            seed: 2020,
        }
    }
}

/// One fine-tuning run: steps, learning rate, seed.
#[derive(Debug, Clone, Copy)]
pub struct FinetuneRun {
    /// BPR steps.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Sampling seed.
    pub seed: u64,
}

/// The learnable weights.
pub struct Mpkg {
    /// `W_r`, `[R, d_in, d]`.
    pub proj: Var,
    /// Self-excitation first layer, `[R, d, h]`.
    pub w1: Var,
    /// Its bias, `[R, h]`.
    pub b1: Var,
    /// Self-excitation second layer, `[R, h]`.
    pub w2: Var,
    /// Its bias, `[R]`.
    pub b2: Var,
    /// FR decoder, `[R·d, d_in]`.
    pub dec_w: Var,
    /// Its bias, `[d_in]`.
    pub dec_b: Var,
    /// Item-bias weights over [`BIAS_FEATURES`].
    pub bias_w: Var,
}

/// A normal sample with standard deviation `std` (Box-Muller: rand 0.9 has no
/// normal distribution without `rand_distr`). Shared by every seeded
/// initialisation in the crate.
pub fn gaussian(rng: &mut impl Rng, std: f32) -> f32 {
    let (a, b): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
    std * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Result<Var> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| gaussian(rng, std)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        v,
        shape,
        &Device::Cpu,
    )?)?)
}

/// A progress bar on stderr (hidden when stderr is not a terminal, e.g. in CI).
fn progress(len: usize, what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}<{eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// Numerically stable `log(1 + exp(x))`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    Ok((x.relu()? + (neg_abs.exp()? + 1.0)?.log()?)?)
}

/// Mean BCE-with-logits of positive and negative scores (eq. 4, 7, 13).
fn bce(pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
    Ok((softplus(&pos.neg()?)? + softplus(neg)?)?.mean_all()?)
}

fn idx(v: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}

/// Sampled links: anchors i, positives j, negatives j⁻.
type Triples = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Link-prediction BCE of σ(f(i)·f(j)) against σ(f(i)·f(j⁻)) (eq. 4, 7, 13),
/// with `embed` the task's ToA embedding of a set of items.
fn link_loss(t: &Triples, embed: impl Fn(&[u32]) -> Result<Tensor>) -> Result<Tensor> {
    let (ei, ej, en) = (embed(&t.0)?, embed(&t.1)?, embed(&t.2)?);
    bce(&(&ei * &ej)?.sum(1)?, &(&ei * &en)?.sum(1)?)
}

/// Sum over the relations that have sampled edges of `loss(r, edges)` (eq. 4
/// and 13 sum per-relation means); `None` when no relation has edges.
fn per_relation(
    s: &Sample,
    loss: impl Fn(usize, &Triples) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (r, t) in s.edges.iter().enumerate().filter(|(_, t)| !t.0.is_empty()) {
        let l = loss(r, t)?;
        total = Some(match total {
            Some(acc) => (acc + l)?,
            None => l,
        });
    }
    Ok(total)
}

/// Sampled training signal of one pre-training step.
struct Sample {
    /// Per relation: (i, j, j⁻).
    edges: Vec<Triples>,
    /// K-hop pairs (i, j, j⁻) over all relations.
    hop_pairs: Triples,
    /// Items whose features FR reconstructs.
    fr_items: Vec<u32>,
}

/// The graph as the trainer sees it: per relation, an edge list (both
/// directions) and an adjacency list of the union of relations.
pub struct TrainGraph {
    /// Number of nodes.
    pub n: usize,
    /// Per relation, directed edges (both directions of each undirected edge).
    pub edges: Vec<Vec<(u32, u32)>>,
    /// Union adjacency.
    pub union: Vec<Vec<u32>>,
}

impl TrainGraph {
    /// From per-relation neighbour lists.
    pub fn new(n: usize, neighbours: Vec<Vec<Vec<u32>>>) -> Self {
        let mut union = vec![Vec::new(); n];
        let mut edges = Vec::new();
        for rel in &neighbours {
            let mut e = Vec::new();
            for (i, ns) in rel.iter().enumerate() {
                for &j in ns {
                    e.push((i as u32, j));
                    union[i].push(j);
                }
            }
            edges.push(e);
        }
        for u in &mut union {
            u.sort_unstable();
            u.dedup();
        }
        Self { n, edges, union }
    }

    fn sample(&self, batch: usize, rng: &mut ChaCha8Rng) -> Sample {
        let n = self.n as u32;
        let edges = self
            .edges
            .iter()
            .map(|e| {
                let mut t = (Vec::new(), Vec::new(), Vec::new());
                if !e.is_empty() {
                    for _ in 0..batch {
                        let (i, j) = e[rng.random_range(0..e.len())];
                        t.0.push(i);
                        t.1.push(j);
                        t.2.push(rng.random_range(0..n));
                    }
                }
                t
            })
            .collect();
        let with_nbrs: Vec<u32> = (0..n)
            .filter(|&i| !self.union[i as usize].is_empty())
            .collect();
        let mut hop_pairs = (Vec::new(), Vec::new(), Vec::new());
        if !with_nbrs.is_empty() {
            for _ in 0..batch {
                // A 1- or 2-hop neighbour (K = 2, eq. 7), regardless of relation.
                let i = with_nbrs[rng.random_range(0..with_nbrs.len())];
                let ns = &self.union[i as usize];
                let mut j = ns[rng.random_range(0..ns.len())];
                if rng.random_bool(0.5) {
                    let ns2 = &self.union[j as usize];
                    let k = ns2[rng.random_range(0..ns2.len())];
                    if k != i {
                        j = k;
                    }
                }
                hop_pairs.0.push(i);
                hop_pairs.1.push(j);
                hop_pairs.2.push(rng.random_range(0..n));
            }
        }
        let fr_items = (0..batch.min(self.n))
            .map(|_| rng.random_range(0..n))
            .collect();
        Sample {
            edges,
            hop_pairs,
            fr_items,
        }
    }
}

impl Mpkg {
    /// Fresh weights for `r` relations and `d_in` input features.
    pub fn new(r: usize, d_in: usize, cfg: &MpkgConfig) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let (d, h) = (cfg.dim, cfg.hidden);
        Ok(Self {
            proj: randn(&mut rng, &[r, d_in, d], (1.0 / d_in as f32).sqrt())?,
            w1: randn(&mut rng, &[r, d, h], (1.0 / d as f32).sqrt())?,
            b1: Var::zeros((r, h), DType::F32, &Device::Cpu)?,
            w2: randn(&mut rng, &[r, h], (1.0 / h as f32).sqrt())?,
            b2: Var::zeros(r, DType::F32, &Device::Cpu)?,
            dec_w: randn(&mut rng, &[r * d, d_in], (1.0 / (r * d) as f32).sqrt())?,
            dec_b: Var::zeros(d_in, DType::F32, &Device::Cpu)?,
            bias_w: Var::zeros(BIAS_FEATURES, DType::F32, &Device::Cpu)?,
        })
    }

    /// Number of relations.
    pub fn relations(&self) -> usize {
        self.proj.dims()[0]
    }

    /// Eq. 1 with precomputed propagation: `E_r = Z_r W_r`, `[R, N, d]`.
    pub fn encode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.matmul(self.proj.as_tensor())?)
    }

    /// Self-excitation scores of eq. 11 per item and relation, [N, R], from `e` [R, N, d].
    pub fn excitation(&self, e: &Tensor) -> Result<Tensor> {
        let hid = e
            .matmul(self.w1.as_tensor())?
            .broadcast_add(&self.b1.as_tensor().unsqueeze(1)?)?
            .relu()?;
        let s = hid.matmul(&self.w2.as_tensor().unsqueeze(2)?)?.squeeze(2)?;
        Ok(s.broadcast_add(&self.b2.as_tensor().unsqueeze(1)?)?.t()?)
    }

    /// The MRA ToA layer (eq. 11): softmax-weighted sum over relations, `[N, d]`.
    /// `exclude` masks one relation per item (the target relation of r-MRA).
    pub fn fuse(&self, e: &Tensor, exclude: Option<&[u32]>) -> Result<Tensor> {
        let mut s = self.excitation(e)?;
        if let Some(ex) = exclude {
            let (n, r) = s.dims2()?;
            let mut m = vec![0f32; n * r];
            for (row, &t) in ex.iter().enumerate() {
                m[row * r + t as usize] = -1e9;
            }
            s = (s + Tensor::from_vec(m, (n, r), &Device::Cpu)?)?;
        }
        let w = candle_nn::ops::softmax(&s, D::Minus1)?;
        let e_nr = e.transpose(0, 1)?;
        Ok(e_nr.broadcast_mul(&w.unsqueeze(2)?)?.sum(1)?)
    }

    /// KR loss (eq. 4): per relation, BCE of σ(E_r(i)·E_r(j)) against a sampled negative, summed.
    fn kr(&self, e: &Tensor, s: &Sample) -> Result<Option<Tensor>> {
        per_relation(s, |r, t| {
            let er = e.get(r)?;
            link_loss(t, |items| Ok(er.index_select(&idx(items)?, 0)?))
        })
    }

    /// Concatenated relation embeddings (eq. 5, 8) of some items, `[B, R·d]`.
    fn concat(&self, e: &Tensor, items: &[u32]) -> Result<Tensor> {
        let (r, _, d) = e.dims3()?;
        let sel = e.index_select(&idx(items)?, 1)?; // [R, B, d]
        Ok(sel
            .transpose(0, 1)?
            .contiguous()?
            .reshape((items.len(), r * d))?)
    }

    /// HNR loss (eq. 7) over sampled K-hop pairs.
    fn hnr(&self, e: &Tensor, s: &Sample) -> Result<Option<Tensor>> {
        if s.hop_pairs.0.is_empty() {
            return Ok(None);
        }
        Ok(Some(link_loss(&s.hop_pairs, |items| {
            self.concat(e, items)
        })?))
    }

    /// FR loss (eq. 10, averaged over items): ‖X_i − Dec(E_FR(i))‖².
    fn fr(&self, e: &Tensor, x: &Tensor, s: &Sample) -> Result<Tensor> {
        let ecat = self.concat(e, &s.fr_items)?;
        let rec = ecat
            .matmul(self.dec_w.as_tensor())?
            .broadcast_add(self.dec_b.as_tensor())?;
        let target = x.index_select(&idx(&s.fr_items)?, 0)?;
        Ok((rec - target)?.sqr()?.sum(1)?.mean_all()?)
    }

    /// MRA loss (eq. 13): for each target relation r, its edges predicted from
    /// the other relations' embeddings fused by the r-MRA layer (eq. 11-12).
    fn mra(&self, e: &Tensor, s: &Sample) -> Result<Option<Tensor>> {
        if self.relations() < 2 {
            return Ok(None);
        }
        per_relation(s, |r, t| {
            let ex = vec![r as u32; t.0.len()];
            link_loss(t, |items| {
                self.fuse(&e.index_select(&idx(items)?, 1)?, Some(&ex))
            })
        })
    }

    /// The pre-training loss of eq. 14 on one sample, with its parts.
    fn pretrain_loss(
        &self,
        z: &Tensor,
        x: &Tensor,
        s: &Sample,
        cfg: &MpkgConfig,
    ) -> Result<(Tensor, [f32; 4])> {
        let e = self.encode(z)?;
        let mut parts = [0f32; 4];
        let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        let on = |t: Task| !cfg.without.contains(&t);
        let terms: [(Task, f32, Option<Tensor>); 4] = [
            (
                Task::Kr,
                cfg.alpha,
                if on(Task::Kr) { self.kr(&e, s)? } else { None },
            ),
            (
                Task::Fr,
                cfg.beta,
                if on(Task::Fr) {
                    Some(self.fr(&e, x, s)?)
                } else {
                    None
                },
            ),
            (
                Task::Hnr,
                cfg.theta,
                if on(Task::Hnr) {
                    self.hnr(&e, s)?
                } else {
                    None
                },
            ),
            (
                Task::Mra,
                cfg.gamma,
                if on(Task::Mra) {
                    self.mra(&e, s)?
                } else {
                    None
                },
            ),
        ];
        for (k, (_, w, t)) in terms.into_iter().enumerate() {
            if let Some(t) = t {
                parts[k] = t.to_scalar::<f32>()?;
                total = (total + (t * w as f64)?)?;
            }
        }
        Ok((total, parts))
    }

    /// Pre-trains the encoder and all ToA layers (eq. 14) on `z` = S^M X
    /// ([R, N, d_in]) and `x` ([N, d_in]).
    pub fn pretrain(
        &self,
        z: &Tensor,
        x: &Tensor,
        graph: &TrainGraph,
        cfg: &MpkgConfig,
    ) -> Result<Vec<[f32; 4]>> {
        let vars = vec![
            self.proj.clone(),
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
            self.dec_w.clone(),
            self.dec_b.clone(),
        ];
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed);
        let mut curve = Vec::new();
        let bar = progress(cfg.pretrain_steps, "pre-training");
        for step in 0..cfg.pretrain_steps {
            bar.inc(1);
            let s = graph.sample(cfg.batch, &mut rng);
            let (loss, parts) = self.pretrain_loss(z, x, &s, cfg)?;
            opt.backward_step(&loss)?;
            if step % 25 == 0 || step + 1 == cfg.pretrain_steps {
                tracing::info!(
                    step,
                    total = cfg.pretrain_steps,
                    kr = parts[0],
                    fr = parts[1],
                    hnr = parts[2],
                    mra = parts[3],
                    "pre-training"
                );
                curve.push(parts);
            }
        }
        Ok(curve)
    }

    /// Fine-tunes the MRA self-excitation layers and the item bias with BPR
    /// (eq. 15-16) on `user_items` (graph node indexes), with `e` the frozen
    /// relation embeddings [R, N, d] and `bias` the bias features [N, F].
    pub fn finetune(
        &self,
        e: &Tensor,
        bias: &Tensor,
        user_items: &[Vec<u32>],
        run: FinetuneRun,
        cfg: &MpkgConfig,
    ) -> Result<Vec<f32>> {
        let e = e.detach();
        let (_, n, _) = e.dims3()?;
        let vars = vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
            self.bias_w.clone(),
        ];
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: run.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        let (steps, mut rng) = (run.steps, ChaCha8Rng::seed_from_u64(run.seed));
        let pairs: Vec<(u32, u32)> = user_items
            .iter()
            .enumerate()
            .filter(|(_, its)| its.len() >= 2)
            .flat_map(|(u, its)| its.iter().map(move |&i| (u as u32, i)))
            .collect();
        if pairs.is_empty() {
            return Err(TrainError::Data(
                "no user with two or more items to fine-tune on".into(),
            ));
        }
        let mut curve = Vec::new();
        let bar = progress(steps, "fine-tuning");
        for step in 0..steps {
            bar.inc(1);
            let b = cfg.batch.min(pairs.len());
            let mut a = vec![0f32; b * n];
            let (mut pos, mut neg, mut inv) = (
                Vec::with_capacity(b),
                Vec::with_capacity(b),
                Vec::with_capacity(b),
            );
            for row in 0..b {
                let (u, i) = pairs[rng.random_range(0..pairs.len())];
                let its = &user_items[u as usize];
                for &k in its {
                    a[row * n + k as usize] = 1.0;
                }
                let j = loop {
                    let j = rng.random_range(0..n as u32);
                    if its.binary_search(&j).is_err() || its.len() >= n {
                        break j;
                    }
                };
                pos.push(i);
                neg.push(j);
                inv.push(1.0 / (its.len() - 1) as f32);
            }
            let emra = self.fuse(&e, None)?; // [N, d]
            let item_bias = bias
                .matmul(&self.bias_w.as_tensor().unsqueeze(1)?)?
                .squeeze(1)?; // [N]
            let a = Tensor::from_vec(a, (b, n), &Device::Cpu)?;
            let (pi, ni) = (idx(&pos)?, idx(&neg)?);
            let ep = emra.index_select(&pi, 0)?;
            // Leave-one-out mean of the user's items (eq. 15 without the scored item).
            let eu = (a.matmul(&emra)? - &ep)?.broadcast_mul(&Tensor::from_vec(
                inv,
                (b, 1),
                &Device::Cpu,
            )?)?;
            let en = emra.index_select(&ni, 0)?;
            let sp = ((&eu * &ep)?.sum(1)? + item_bias.index_select(&pi, 0)?)?;
            let sn = ((&eu * &en)?.sum(1)? + item_bias.index_select(&ni, 0)?)?;
            let loss = softplus(&(sn - sp)?)?.mean_all()?;
            opt.backward_step(&loss)?;
            if step % 25 == 0 || step + 1 == steps {
                let l = loss.to_scalar::<f32>()?;
                tracing::info!(step, total = steps, bpr = l, "fine-tuning");
                curve.push(l);
            }
        }
        Ok(curve)
    }

    /// The weights as named tensors (safetensors checkpoint).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        [
            ("proj", &self.proj),
            ("mra_w1", &self.w1),
            ("mra_b1", &self.b1),
            ("mra_w2", &self.w2),
            ("mra_b2", &self.b2),
            ("fr_dec_w", &self.dec_w),
            ("fr_dec_b", &self.dec_b),
            ("bias_w", &self.bias_w),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.as_tensor().clone()))
        .collect()
    }

    /// Saves the checkpoint.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.tensors(), path)?;
        Ok(())
    }

    /// Loads a checkpoint written by [`Mpkg::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)?;
        let get = |k: &str| -> Result<Var> {
            let v = t
                .get(k)
                .ok_or_else(|| TrainError::Data(format!("{}: no tensor `{k}`", path.display())))?;
            Ok(Var::from_tensor(v)?)
        };
        Ok(Self {
            proj: get("proj")?,
            w1: get("mra_w1")?,
            b1: get("mra_b1")?,
            w2: get("mra_w2")?,
            b2: get("mra_b2")?,
            dec_w: get("fr_dec_w")?,
            dec_b: get("fr_dec_b")?,
            bias_w: get("bias_w")?,
        })
    }

    /// Copies the fine-tunable layers (for per-scenario adaptation from a common start).
    pub fn clone_weights(&self) -> Result<Self> {
        let c = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?)?) };
        Ok(Self {
            proj: c(&self.proj)?,
            w1: c(&self.w1)?,
            b1: c(&self.b1)?,
            w2: c(&self.w2)?,
            b2: c(&self.b2)?,
            dec_w: c(&self.dec_w)?,
            dec_b: c(&self.dec_b)?,
            bias_w: c(&self.bias_w)?,
        })
    }

    /// `W_r` as ndarray [R, d_in, d].
    pub fn proj_array(&self) -> Result<Array3<f32>> {
        to_array3(self.proj.as_tensor())
    }

    /// Writes `item_projection.onnx` and `item_fusion.onnx` (the fine-tuned
    /// MRA layer) into `dir`.
    pub fn export_onnx(&self, dir: &Path) -> Result<()> {
        use super::export;
        let ex = |e: export::Error| TrainError::Export(e.to_string());
        let w1 = to_array3(self.w1.as_tensor())?;
        let b1 = to_array2(self.b1.as_tensor())?;
        let w2 = to_array2(self.w2.as_tensor())?;
        let b2 = ndarray::Array1::from(self.b2.as_tensor().to_vec1::<f32>()?);
        let proj = export::item_projection_model(self.proj_array()?.view()).map_err(ex)?;
        let fusion =
            export::item_fusion_model(w1.view(), b1.view(), w2.view(), b2.view()).map_err(ex)?;
        for (name, bytes) in [
            (export::PROJECTION_FILE, proj),
            (export::FUSION_FILE, fusion),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|source| TrainError::Io {
                path: p.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Item bias weights.
    pub fn bias_weights(&self) -> Result<Vec<f32>> {
        Ok(self.bias_w.as_tensor().to_vec1::<f32>()?)
    }

    /// Fused item embeddings of propagated relation embeddings `e` [N, R, d]
    /// (the `item_fusion` model), as ndarray.
    pub fn fuse_array(&self, e: ArrayView3<'_, f32>) -> Result<Array2<f32>> {
        let (n, r, d) = e.dim();
        let t = Tensor::from_slice(
            e.as_standard_layout().as_slice().unwrap_or(&[]),
            (n, r, d),
            &Device::Cpu,
        )?;
        let out = self.fuse(&t.transpose(0, 1)?.contiguous()?, None)?;
        to_array2(&out)
    }
}

/// ndarray [R, N, d] from a tensor.
pub fn to_array3(t: &Tensor) -> Result<Array3<f32>> {
    let (a, b, c) = t.dims3()?;
    Array3::from_shape_vec((a, b, c), t.flatten_all()?.to_vec1::<f32>()?)
        .map_err(|e| TrainError::Data(e.to_string()))
}

/// ndarray [N, d] from a tensor.
pub fn to_array2(t: &Tensor) -> Result<Array2<f32>> {
    let (a, b) = t.dims2()?;
    Array2::from_shape_vec((a, b), t.flatten_all()?.to_vec1::<f32>()?)
        .map_err(|e| TrainError::Data(e.to_string()))
}

/// A tensor from an ndarray view.
pub fn from_array2(a: ArrayView2<'_, f32>) -> Result<Tensor> {
    let a = a.as_standard_layout();
    Ok(Tensor::from_slice(
        a.as_slice().unwrap_or(&[]),
        a.dim(),
        &Device::Cpu,
    )?)
}

/// A tensor [R, N, k] from per-relation [N, k] arrays.
pub fn stack_relations(per_relation: &[Array2<f32>]) -> Result<Tensor> {
    let views: Vec<_> = per_relation
        .iter()
        .map(|a| a.view().insert_axis(Axis(0)))
        .collect();
    let s = ndarray::concatenate(Axis(0), &views).map_err(|e| TrainError::Data(e.to_string()))?;
    let s = s.as_standard_layout();
    Ok(Tensor::from_slice(
        s.as_slice().unwrap_or(&[]),
        s.dim(),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny graph: 8 nodes, 3 relations.
    fn tiny() -> (Mpkg, MpkgConfig, Tensor, Tensor, TrainGraph) {
        let cfg = MpkgConfig {
            dim: 4,
            hidden: 3,
            batch: 6,
            seed: 7,
            ..Default::default()
        };
        let (n, d_in, r) = (8usize, 5usize, 3usize);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = Tensor::from_vec(
            (0..n * d_in)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect::<Vec<_>>(),
            (n, d_in),
            &Device::Cpu,
        )
        .unwrap();
        let z = Tensor::from_vec(
            (0..r * n * d_in)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect::<Vec<_>>(),
            (r, n, d_in),
            &Device::Cpu,
        )
        .unwrap();
        let rel = |pairs: &[(u32, u32)]| -> Vec<Vec<u32>> {
            let mut v = vec![Vec::new(); n];
            for &(a, b) in pairs {
                v[a as usize].push(b);
                v[b as usize].push(a);
            }
            v
        };
        let graph = TrainGraph::new(
            n,
            vec![
                rel(&[(0, 1), (1, 2), (2, 3)]),
                rel(&[(4, 5), (5, 6), (0, 7)]),
                rel(&[(3, 4), (6, 7)]),
            ],
        );
        (Mpkg::new(r, d_in, &cfg).unwrap(), cfg, z, x, graph)
    }

    /// Compares candle's gradient of `loss` w.r.t. a few entries of `var`
    /// with central finite differences (f32, so a loose tolerance).
    fn check_grad(var: &Var, loss: &dyn Fn() -> Tensor, what: &str) {
        let grads = loss().backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let eps = 1e-2f32;
        let mut checked = 0;
        for k in (0..base.len()).step_by((base.len() / 6).max(1)) {
            let set = |delta: f32| {
                let mut v = base.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss().to_scalar::<f32>().unwrap()
            };
            let numeric = (set(eps) - set(-eps)) / (2.0 * eps);
            set(0.0);
            let tol = 2e-2 * (1.0 + numeric.abs().max(g[k].abs()));
            assert!(
                (numeric - g[k]).abs() < tol,
                "{what}[{k}]: autodiff {} vs finite difference {numeric}",
                g[k]
            );
            checked += 1;
        }
        assert!(checked >= 3, "{what}: checked {checked} entries");
        assert!(
            g.iter().any(|v| v.abs() > 1e-6),
            "{what}: all-zero gradient"
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (m, cfg, z, x, graph) = tiny();
        let s = graph.sample(cfg.batch, &mut ChaCha8Rng::seed_from_u64(3));
        check_grad(
            &m.proj,
            &|| m.kr(&m.encode(&z).unwrap(), &s).unwrap().unwrap(),
            "KR/proj",
        );
        check_grad(
            &m.proj,
            &|| m.hnr(&m.encode(&z).unwrap(), &s).unwrap().unwrap(),
            "HNR/proj",
        );
        check_grad(
            &m.proj,
            &|| m.fr(&m.encode(&z).unwrap(), &x, &s).unwrap(),
            "FR/proj",
        );
        check_grad(
            &m.dec_w,
            &|| m.fr(&m.encode(&z).unwrap(), &x, &s).unwrap(),
            "FR/dec_w",
        );
        check_grad(
            &m.w1,
            &|| m.mra(&m.encode(&z).unwrap(), &s).unwrap().unwrap(),
            "MRA/w1",
        );
        check_grad(
            &m.w2,
            &|| m.mra(&m.encode(&z).unwrap(), &s).unwrap().unwrap(),
            "MRA/w2",
        );
        check_grad(
            &m.proj,
            &|| m.mra(&m.encode(&z).unwrap(), &s).unwrap().unwrap(),
            "MRA/proj",
        );
    }

    #[test]
    fn fusion_weights_are_a_softmax_and_exclusion_masks_a_relation() {
        let (m, _, z, _, _) = tiny();
        let e = m.encode(&z).unwrap();
        let w = candle_nn::ops::softmax(&m.excitation(&e).unwrap(), D::Minus1).unwrap();
        for row in w.to_vec2::<f32>().unwrap() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // Excluding relation 0 for every item equals fusing relations 1..R with
        // the softmax renormalised over them.
        let ex = vec![0u32; 8];
        let masked = m.fuse(&e, Some(&ex)).unwrap().to_vec2::<f32>().unwrap();
        let s = m.excitation(&e).unwrap().to_vec2::<f32>().unwrap();
        let ev = to_array3(&e).unwrap();
        for n in 0..8 {
            let z: f32 = (1..3).map(|r| s[n][r].exp()).sum();
            for k in 0..4 {
                let want: f32 = (1..3).map(|r| s[n][r].exp() / z * ev[[r, n, k]]).sum();
                assert!((masked[n][k] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn training_is_deterministic_for_a_seed() {
        let run = || {
            let (m, mut cfg, z, x, graph) = tiny();
            cfg.pretrain_steps = 5;
            m.pretrain(&z, &x, &graph, &cfg).unwrap();
            m.proj
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn pretraining_lowers_the_loss() {
        let (m, mut cfg, z, x, graph) = tiny();
        cfg.pretrain_steps = 150;
        cfg.lr = 0.02;
        let curve = m.pretrain(&z, &x, &graph, &cfg).unwrap();
        let (first, last) = (curve[0], curve[curve.len() - 1]);
        assert!(
            last[0] < first[0] && last[1] < first[1],
            "{first:?} -> {last:?}"
        );
    }

    #[test]
    fn finetuning_needs_users_with_two_items() {
        let (m, cfg, z, _, _) = tiny();
        let e = m.encode(&z).unwrap();
        let bias = Tensor::zeros((8, BIAS_FEATURES), DType::F32, &Device::Cpu).unwrap();
        let err = m
            .finetune(
                &e,
                &bias,
                &[vec![1]],
                FinetuneRun {
                    steps: 3,
                    lr: 0.01,
                    seed: 1,
                },
                &cfg,
            )
            .unwrap_err();
        assert!(err.to_string().contains("two or more"));
        let curve = m
            .finetune(
                &e,
                &bias,
                &[vec![0, 1, 2], vec![4, 5]],
                FinetuneRun {
                    steps: 3,
                    lr: 0.01,
                    seed: 1,
                },
                &cfg,
            )
            .unwrap();
        assert!(curve.iter().all(|l| l.is_finite()));
    }

    /// The exported ONNX graphs, run by ONNX Runtime, compute what candle
    /// computes: the projection (eq. 1's X W_r) and the MRA fusion (eq. 11).
    #[test]
    fn onnx_export_matches_candle() {
        let (m, _, _, _, _) = tiny();
        let dir = tempfile::tempdir().unwrap();
        m.export_onnx(dir.path()).unwrap();
        let lib =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/text/ort_dylib_path");
        let dylib = std::fs::read_to_string(&lib)
            .unwrap_or_else(|_| panic!("{} missing: run onnx/setup.sh", lib.display()));
        let models = crate::infer::item::ItemModels::load(&crate::infer::item::ItemModelsConfig {
            model_dir: dir.path().to_path_buf(),
            intra_threads: 1,
            ort_dylib: Some(dylib.trim().into()),
        })
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = Array2::from_shape_fn((11, 5), |_| rng.random::<f32>() - 0.5);
        let onnx_p = models.project(x.view()).unwrap(); // [N, R, d]
        let z = stack_relations(&vec![x.clone(); 3]).unwrap();
        let candle_p = to_array3(&m.encode(&z).unwrap()).unwrap(); // [R, N, d]
        let max = onnx_p
            .indexed_iter()
            .map(|((n, r, k), v)| (v - candle_p[[r, n, k]]).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-5, "projection differs by {max}");
        let (onnx_e, onnx_w) = models.fuse(onnx_p.view()).unwrap();
        let candle_e = m.fuse_array(onnx_p.view()).unwrap();
        let max = (&onnx_e - &candle_e)
            .iter()
            .fold(0f32, |a, v| a.max(v.abs()));
        assert!(max <= 1e-5, "fusion differs by {max}");
        assert!(onnx_w
            .rows()
            .into_iter()
            .all(|r| (r.sum() - 1.0).abs() < 1e-5));
    }
}
