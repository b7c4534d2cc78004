//! Baselines every thaw model is measured against.
//!
//! - `pop`: training interactions per item.
//! - `itemknn`: item-item cosine over users; a user's score for item j is the
//!   sum of sim(i, j) over their items i, keeping each item's top neighbours.
//! - `bpr`: matrix factorisation with the BPR loss (Rendle et al. 2009), 64
//!   dimensions and an item bias, epochs chosen on `valid/`.
//! - `kgknn`: item-item cosine over shared KG (relation, entity) pairs,
//!   IDF-weighted, so a new item has neighbours from its first event.
//! - `contentknn`: cosine of text-encoder item vectors (all-MiniLM-L6-v2 over
//!   the item's text columns; `--model-dir` names the encoder folder, default
//!   `models/text`).
//! - `scenariopop` (aware mode only): popularity over the support sets of the
//!   user's own scenario.
//!
//! Neighbourhood sizes of the kNN models are chosen on `valid/` too.

use ndarray::{Array1, Array2, ArrayViewMut2, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{valid_ndcg, EvalError, FitContext, Recommender, Result, TrainSet};

pub use super::registry::{fit, Fitted, ModelName};

/// Scores that do not depend on the user (popularity).
pub(super) struct ItemScores(pub(super) Vec<f32>);

impl Recommender for ItemScores {
    fn score(&self, _users: &[u32], mut out: ArrayViewMut2<'_, f32>) {
        let row = ndarray::ArrayView1::from(&self.0[..]);
        for mut r in out.rows_mut() {
            r.assign(&row);
        }
    }
}

// ---------------------------------------------------------------- kNN

/// Sparse item features: per item, (feature, weight) pairs.
type Features = Vec<Vec<(u32, f32)>>;

/// Item features = the users who interacted with it (binary).
pub(super) fn interaction_features(train: &TrainSet) -> Features {
    let mut f = vec![Vec::new(); train.n_items];
    for (u, its) in train.user_items.iter().enumerate() {
        for &i in its {
            f[i as usize].push((u as u32, 1.0));
        }
    }
    f
}

/// Item features = (relation, other entity) pairs of its linked KG entity, in
/// both directions, weighted by IDF over items. A pair shared by one item
/// only says nothing about similarity and is dropped.
pub(super) fn kg_features(ds: &crate::dataset::Dataset) -> Features {
    use std::collections::HashMap;
    let n_rel = ds.relations.len() as u64;
    // entity -> items linked to it
    let mut entity_items: HashMap<u32, Vec<u32>> = HashMap::new();
    for (i, e) in ds.item_entity.iter().enumerate() {
        if let Some(e) = e {
            entity_items.entry(*e).or_default().push(i as u32);
        }
    }
    // feature key: (relation or its inverse, other entity)
    let mut raw: Vec<Vec<u64>> = vec![Vec::new(); ds.n_items()];
    for t in &ds.triples {
        if let Some(items) = entity_items.get(&t.head) {
            for &i in items {
                raw[i as usize].push(t.relation as u64 + (t.tail as u64) * 2 * n_rel);
            }
        }
        if let Some(items) = entity_items.get(&t.tail) {
            for &i in items {
                raw[i as usize].push(n_rel + t.relation as u64 + (t.head as u64) * 2 * n_rel);
            }
        }
    }
    let mut df: HashMap<u64, u32> = HashMap::new();
    for r in &mut raw {
        r.sort_unstable();
        r.dedup();
        for &k in r.iter() {
            *df.entry(k).or_default() += 1;
        }
    }
    let n_linked = raw.iter().filter(|r| !r.is_empty()).count().max(1) as f32;
    let mut ids: HashMap<u64, u32> = HashMap::new();
    raw.into_iter()
        .map(|r| {
            r.into_iter()
                .filter(|k| df[k] > 1)
                .map(|k| {
                    let next = ids.len() as u32;
                    let id = *ids.entry(k).or_insert(next);
                    (id, (n_linked / df[&k] as f32).ln())
                })
                .collect()
        })
        .collect()
}

/// Keeps the `k` highest-similarity neighbours, sorted by similarity (ties:
/// lower index first).
fn keep_top(row: &mut Vec<(u32, f32)>, k: usize) {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if row.len() > k {
        row.select_nth_unstable_by(k, order);
        row.truncate(k);
    }
    row.sort_unstable_by(order);
}

/// Each item's `k` most similar items by cosine over sparse features.
pub(super) fn neighbours(features: &Features, k: usize) -> Vec<Vec<(u32, f32)>> {
    let n = features.len();
    let n_feat = features
        .iter()
        .flat_map(|f| f.iter().map(|(id, _)| *id as usize + 1))
        .max()
        .unwrap_or(0);
    let mut inverted: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_feat];
    for (i, f) in features.iter().enumerate() {
        for &(id, w) in f {
            inverted[id as usize].push((i as u32, w));
        }
    }
    let norm: Vec<f32> = features
        .iter()
        .map(|f| f.iter().map(|(_, w)| w * w).sum::<f32>().sqrt())
        .collect();
    let mut acc = vec![0f32; n];
    let mut touched = Vec::new();
    let mut out = Vec::with_capacity(n);
    for (i, f) in features.iter().enumerate() {
        for &(id, w) in f {
            for &(j, wj) in &inverted[id as usize] {
                if acc[j as usize] == 0.0 {
                    touched.push(j);
                }
                acc[j as usize] += w * wj;
            }
        }
        let mut row: Vec<(u32, f32)> = touched
            .iter()
            .filter(|&&j| j as usize != i)
            .map(|&j| (j, acc[j as usize] / (norm[i] * norm[j as usize]).max(1e-12)))
            .collect();
        for &j in &touched {
            acc[j as usize] = 0.0;
        }
        touched.clear();
        keep_top(&mut row, k);
        out.push(row);
    }
    out
}

/// Each item's `k` most similar items by cosine of dense vectors (rows of
/// `v`; zero rows have no neighbours). Blocked matrix products, a partial
/// selection per row.
pub(super) fn dense_neighbours(v: &Array2<f32>, k: usize) -> Vec<Vec<(u32, f32)>> {
    let mut unit = v.clone();
    for mut r in unit.rows_mut() {
        let n = r.dot(&r).sqrt();
        if n > 0.0 {
            r /= n;
        }
    }
    let n = unit.nrows();
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(256) {
        let block = unit.slice(ndarray::s![start..(start + 256).min(n), ..]);
        let sims = block.dot(&unit.t());
        for (off, row) in sims.rows().into_iter().enumerate() {
            let i = start + off;
            let mut cand: Vec<(u32, f32)> = row
                .iter()
                .enumerate()
                .filter(|&(j, &s)| j != i && s > 0.0)
                .map(|(j, &s)| (j as u32, s))
                .collect();
            keep_top(&mut cand, k);
            out.push(cand);
        }
    }
    out
}

/// kNN scorer: a user's score for item j sums sim(i, j) over their items i.
struct Knn {
    nbrs: Vec<Vec<(u32, f32)>>,
    user_items: Vec<Vec<u32>>,
}

impl Recommender for Knn {
    fn score(&self, users: &[u32], mut out: ArrayViewMut2<'_, f32>) {
        for (mut row, &u) in out.rows_mut().into_iter().zip(users) {
            for &i in &self.user_items[u as usize] {
                for &(j, s) in &self.nbrs[i as usize] {
                    row[j as usize] += s;
                }
            }
        }
    }
}

/// Neighbourhood sizes tried on `valid/`.
const KNN_SIZES: [usize; 5] = [10, 25, 50, 100, 400];

/// Fits a kNN model whose neighbour lists come from `nbrs(train, dataset, k)`,
/// choosing k on `valid/`.
pub(super) fn fit_knn(
    ctx: &FitContext<'_>,
    model: ModelName,
    nbrs: impl Fn(&TrainSet, &crate::dataset::Dataset, usize) -> Result<Vec<Vec<(u32, f32)>>>,
) -> Result<Fitted> {
    let (k, valid_scores) = match ctx.valid {
        Some(valid) => {
            let vtrain = TrainSet::from_split(valid, ctx.train.user_items.len(), ctx.train.n_items);
            let all = nbrs(
                &vtrain,
                ctx.dataset,
                *KNN_SIZES.iter().max().unwrap_or(&100),
            )?;
            let mut best = (KNN_SIZES[0], f64::NEG_INFINITY);
            let mut tried = serde_json::Map::new();
            for &k in &KNN_SIZES {
                let rec = Knn {
                    nbrs: all.iter().map(|r| r[..r.len().min(k)].to_vec()).collect(),
                    user_items: vtrain.user_items.clone(),
                };
                let s = valid_ndcg(&rec, valid, &vtrain, ctx.k);
                tried.insert(k.to_string(), json!(s));
                if s > best.1 {
                    best = (k, s);
                }
            }
            (best.0, serde_json::Value::Object(tried))
        }
        None => {
            tracing::warn!(model = model.name(), "no valid/ split: using 50 neighbours");
            (50, json!(null))
        }
    };
    Ok(Fitted {
        rec: Box::new(Knn {
            nbrs: nbrs(ctx.train, ctx.dataset, k)?,
            user_items: ctx.train.user_items.clone(),
        }),
        params: json!({"neighbours": k, "valid_ndcg_by_neighbours": valid_scores}),
    })
}

// ---------------------------------------------------------------- BPR

/// BPR-MF settings. Fixed, except the epoch count which `valid/` chooses.
#[derive(Debug, Clone)]
struct BprConfig {
    dim: usize,
    lr: f32,
    reg: f32,
    init_std: f32,
    max_epochs: usize,
    check_every: usize,
    patience: usize,
}

impl Default for BprConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            lr: 0.05,
            reg: 0.002,
            init_std: 0.1,
            max_epochs: 120,
            check_every: 5,
            patience: 4,
        }
    }
}

/// Matrix factorisation: score = p_u · q_i + b_i (BPR here; MetaKG's e⋆
/// scores with a zero bias).
pub struct Mf {
    /// User vectors, one row per dense user index.
    pub users: Array2<f32>,
    /// Item vectors, one row per dense item index.
    pub items: Array2<f32>,
    /// Item biases.
    pub bias: Array1<f32>,
}

impl Recommender for Mf {
    fn score(&self, users: &[u32], mut out: ArrayViewMut2<'_, f32>) {
        let idx: Vec<usize> = users.iter().map(|&u| u as usize).collect();
        let p = self.users.select(Axis(0), &idx);
        ndarray::linalg::general_mat_mul(1.0, &p, &self.items.t(), 0.0, &mut out);
        out += &self.bias;
    }
}

impl Mf {
    fn new(n_users: usize, n_items: usize, cfg: &BprConfig, rng: &mut ChaCha8Rng) -> Self {
        let mut normal = |n: usize| -> Array2<f32> {
            Array2::from_shape_fn((n, cfg.dim), |_| {
                crate::train::mpkg::gaussian(rng, cfg.init_std)
            })
        };
        Self {
            users: normal(n_users),
            items: normal(n_items),
            bias: Array1::zeros(n_items),
        }
    }

    /// One epoch of SGD over every training pair in random order, one sampled
    /// negative each (BPR eq. 4-5 of Rendle et al.).
    fn epoch(
        &mut self,
        train: &TrainSet,
        pairs: &mut [(u32, u32)],
        cfg: &BprConfig,
        rng: &mut ChaCha8Rng,
    ) {
        pairs.shuffle(rng);
        let n = train.n_items as u32;
        let d = cfg.dim;
        let mut pu_old = vec![0f32; d];
        for &(u, i) in pairs.iter() {
            let seen = &train.user_items[u as usize];
            if seen.len() >= n as usize {
                continue;
            }
            let j = loop {
                let j = rng.random_range(0..n);
                if seen.binary_search(&j).is_err() {
                    break j;
                }
            };
            let (u, i, j) = (u as usize, i as usize, j as usize);
            let x = {
                let p = self.users.row(u);
                let (qi, qj) = (self.items.row(i), self.items.row(j));
                self.bias[i] - self.bias[j] + (0..d).map(|f| p[f] * (qi[f] - qj[f])).sum::<f32>()
            };
            let g = 1.0 / (1.0 + x.exp()); // sigmoid(-x)
            let (lr, reg) = (cfg.lr, cfg.reg);
            pu_old.copy_from_slice(self.users.row(u).as_slice().expect("contiguous"));
            for (f, &pf) in pu_old.iter().enumerate() {
                let (qi, qj) = (self.items[[i, f]], self.items[[j, f]]);
                self.users[[u, f]] += lr * (g * (qi - qj) - reg * pf);
                self.items[[i, f]] += lr * (g * pf - reg * qi);
                self.items[[j, f]] += lr * (-g * pf - reg * qj);
            }
            self.bias[i] += lr * (g - reg * self.bias[i]);
            self.bias[j] += lr * (-g - reg * self.bias[j]);
        }
    }
}

fn train_bpr(train: &TrainSet, epochs: usize, cfg: &BprConfig, seed: u64) -> Mf {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut mf = Mf::new(train.user_items.len(), train.n_items, cfg, &mut rng);
    let mut pairs = train.pairs();
    for _ in 0..epochs {
        mf.epoch(train, &mut pairs, cfg, &mut rng);
    }
    mf
}

pub(super) fn fit_bpr(ctx: &FitContext<'_>) -> Result<Fitted> {
    let cfg = BprConfig::default();
    let valid = ctx.valid.ok_or_else(|| EvalError::Model {
        model: "bpr".into(),
        reason: "chooses its epoch count on the split's valid/ folder, which is missing".into(),
    })?;
    let vtrain = TrainSet::from_split(valid, ctx.train.user_items.len(), ctx.train.n_items);
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed);
    let mut mf = Mf::new(vtrain.user_items.len(), vtrain.n_items, &cfg, &mut rng);
    let mut pairs = vtrain.pairs();
    let (mut best_epochs, mut best, mut since) = (0, f64::NEG_INFINITY, 0);
    let mut curve = serde_json::Map::new();
    for epoch in 1..=cfg.max_epochs {
        mf.epoch(&vtrain, &mut pairs, &cfg, &mut rng);
        if epoch % cfg.check_every == 0 {
            let s = valid_ndcg(&mf, valid, &vtrain, ctx.k);
            curve.insert(epoch.to_string(), json!(s));
            if s > best {
                (best, best_epochs, since) = (s, epoch, 0);
            } else {
                since += 1;
                if since >= cfg.patience {
                    break;
                }
            }
        }
    }
    let mf = train_bpr(ctx.train, best_epochs.max(1), &cfg, ctx.seed);
    Ok(Fitted {
        rec: Box::new(mf),
        params: json!({
            "dim": cfg.dim, "lr": cfg.lr, "reg": cfg.reg, "epochs": best_epochs,
            "valid_ndcg_by_epoch": curve,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in ModelName::ALL {
            assert_eq!(m.name().parse::<ModelName>().unwrap(), m);
        }
        let err = "nope".parse::<ModelName>().unwrap_err();
        assert!(err.contains("pop, itemknn"), "{err}");
    }

    #[test]
    fn cosine_neighbours_by_hand() {
        // item 0: users {0,1}; item 1: users {0,1}; item 2: users {1,2}; item 3: {3}
        let f: Features = vec![
            vec![(0, 1.0), (1, 1.0)],
            vec![(0, 1.0), (1, 1.0)],
            vec![(1, 1.0), (2, 1.0)],
            vec![(3, 1.0)],
        ];
        let n = neighbours(&f, 10);
        assert_eq!(n[0].len(), 2);
        assert_eq!(n[0][0].0, 1);
        assert!((n[0][0].1 - 1.0).abs() < 1e-6);
        assert!((n[0][1].1 - 0.5).abs() < 1e-6);
        assert!(n[3].is_empty(), "no shared feature, no neighbour");
        let n1 = neighbours(&f, 1);
        assert_eq!(n1[2].len(), 1);
    }

    #[test]
    fn bpr_learns_a_block_structure() {
        // Two user groups, each liking one half of the items; held-out pairs of
        // the right half must outrank the other half after training.
        let (n_users, n_items) = (40, 20);
        let user_items: Vec<Vec<u32>> = (0..n_users)
            .map(|u| {
                let half = if u < 20 { 0..10 } else { 10..20 };
                half.filter(|i| (i + u) % 3 != 0)
                    .map(|i| i as u32)
                    .collect()
            })
            .collect();
        let train = TrainSet {
            n_items,
            user_items,
        };
        let mf = train_bpr(&train, 60, &BprConfig::default(), 1);
        let mut out = Array2::zeros((2, n_items));
        mf.score(&[0, 39], out.view_mut());
        let mean =
            |r: usize, a: usize, b: usize| out.row(r).slice(ndarray::s![a..b]).mean().unwrap();
        assert!(mean(0, 0, 10) > mean(0, 10, 20) + 0.5);
        assert!(mean(1, 10, 20) > mean(1, 0, 10) + 0.5);
    }

    #[test]
    fn knn_scores_sum_neighbour_similarities() {
        let rec = Knn {
            nbrs: vec![vec![(1, 0.5), (2, 0.25)], vec![(2, 1.0)], vec![]],
            user_items: vec![vec![0, 1]],
        };
        let mut out = Array2::zeros((1, 3));
        rec.score(&[0], out.view_mut());
        assert_eq!(out.row(0).to_vec(), vec![0.0, 0.5, 1.25]);
    }
}
