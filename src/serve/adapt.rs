//! Native adaptation of a user from their interactions, and top-K scoring.
//!
//! A user starts as the mean of their items' embeddings (MPKG eq. 15), then
//! takes a few gradient steps of BPR (eq. 16) on their items against the rest
//! of the catalogue, as MetaKG's local update (eq. 21) adapts a user from a
//! support set. The gradient is taken over every negative item at once rather
//! than a sampled few: no random draw depends on the order items were
//! assigned slots in, so two engines that saw the same events in a different
//! order land on the same user (to float rounding), which is what makes a
//! replay after a crash converge to the state of an uninterrupted run. Above
//! [`AdaptConfig::max_positives`] only the most recent items count, which
//! bounds the work per step at `max_positives × N × d`.
//!
//! Score of item `i` for user `u`: `u · e_i + b_i`, the bias `b` learned from
//! observable popularity (see `crate::train::bias_features`).

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use serde::{Deserialize, Serialize};

/// Settings of the per-user adaptation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptConfig {
    /// Gradient steps after the mean (0: the mean of eq. 15 alone).
    pub steps: usize,
    /// Learning rate of each step.
    pub lr: f32,
    /// L2 pull towards the starting mean (keeps a user with one item near it).
    pub l2: f32,
    /// Most recent items used as positives (and in the mean).
    pub max_positives: usize,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            steps: 3,
            lr: 0.5,
            l2: 0.1,
            max_positives: 64,
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The adapted user vector.
///
/// `emb` holds one row per slot, `bias` one value per slot, `active[s]` says
/// whether slot `s` is a rankable item (free slots and items not yet
/// described are not), and `items` are the user's items, oldest first.
/// Returns `None` when the user has no active item.
pub fn adapt_user(
    emb: ArrayView2<'_, f32>,
    bias: ArrayView1<'_, f32>,
    active: &[bool],
    items: &[u32],
    cfg: &AdaptConfig,
) -> Option<Array1<f32>> {
    let start = items.len().saturating_sub(cfg.max_positives.max(1));
    let mut pos: Vec<u32> = items[start..]
        .iter()
        .copied()
        .filter(|&i| active.get(i as usize).copied().unwrap_or(false))
        .collect();
    pos.sort_unstable();
    pos.dedup();
    if pos.is_empty() {
        return None;
    }
    let d = emb.ncols();
    let mut mean = Array1::<f32>::zeros(d);
    for &i in &pos {
        mean += &emb.row(i as usize);
    }
    mean /= pos.len() as f32;
    if cfg.steps == 0 {
        return Some(mean);
    }
    // Negatives: every active item the user has not interacted with.
    let mut is_pos = vec![false; emb.nrows()];
    for &i in items {
        if let Some(p) = is_pos.get_mut(i as usize) {
            *p = true;
        }
    }
    let neg: Vec<usize> = (0..emb.nrows())
        .filter(|&j| active.get(j).copied().unwrap_or(false) && !is_pos[j])
        .collect();
    if neg.is_empty() {
        return Some(mean);
    }
    let e_neg = emb.select(ndarray::Axis(0), &neg);
    let b_neg: Array1<f32> = neg.iter().map(|&j| bias[j]).collect();
    let pos_idx: Vec<usize> = pos.iter().map(|&i| i as usize).collect();
    let e_pos = emb.select(ndarray::Axis(0), &pos_idx);
    let b_pos: Array1<f32> = pos_idx.iter().map(|&i| bias[i]).collect();
    let pairs = (pos.len() * neg.len()) as f32;
    let mut u = mean.clone();
    for _ in 0..cfg.steps {
        let s_pos = e_pos.dot(&u) + &b_pos; // [P]
        let s_neg = e_neg.dot(&u) + &b_neg; // [Nn]
                                            // w[p, j] = σ(s_neg[j] − s_pos[p]) = −∂ log σ(s_pos − s_neg) / ∂ margin.
        let mut w = Array2::<f32>::zeros((pos.len(), neg.len()));
        for (p, mut row) in w.rows_mut().into_iter().enumerate() {
            let sp = s_pos[p];
            row.iter_mut()
                .zip(s_neg.iter())
                .for_each(|(x, &sn)| *x = sigmoid(sn - sp));
        }
        // ∂L/∂u of L = −mean log σ(s_pos − s_neg): Σ_pj w (e_j − e_p) / pairs.
        let toward_neg = w.sum_axis(ndarray::Axis(0)).dot(&e_neg);
        let away_pos = w.sum_axis(ndarray::Axis(1)).dot(&e_pos);
        let grad = (toward_neg - away_pos) / pairs + (&u - &mean) * cfg.l2;
        u.scaled_add(-cfg.lr, &grad);
    }
    Some(u)
}

/// The mean BPR loss of `u` on the user's items against every other active
/// item (for tests and diagnostics).
pub fn bpr_loss(
    emb: ArrayView2<'_, f32>,
    bias: ArrayView1<'_, f32>,
    active: &[bool],
    items: &[u32],
    u: ArrayView1<'_, f32>,
) -> f32 {
    let scores = emb.dot(&u) + bias;
    let mut is_pos = vec![false; emb.nrows()];
    items.iter().for_each(|&i| is_pos[i as usize] = true);
    let (mut sum, mut n) = (0f64, 0usize);
    for &i in items {
        for j in 0..emb.nrows() {
            if active[j] && !is_pos[j] {
                sum -= (sigmoid(scores[i as usize] - scores[j]) as f64).ln();
                n += 1;
            }
        }
    }
    (sum / n.max(1) as f64) as f32
}

/// The `k` best active slots for `u` by `u · e + b`, excluding `exclude`
/// (sorted or not), best first; ties go to the lower slot.
pub fn top_k(
    emb: ArrayView2<'_, f32>,
    bias: ArrayView1<'_, f32>,
    active: &[bool],
    u: ArrayView1<'_, f32>,
    exclude: &[u32],
    k: usize,
) -> Vec<(u32, f32)> {
    let scores = emb.dot(&u) + bias;
    let mut skip = vec![false; emb.nrows()];
    for &i in exclude {
        if let Some(s) = skip.get_mut(i as usize) {
            *s = true;
        }
    }
    let mut cand: Vec<(u32, f32)> = scores
        .iter()
        .enumerate()
        .filter(|&(i, s)| active.get(i).copied().unwrap_or(false) && !skip[i] && s.is_finite())
        .map(|(i, &s)| (i as u32, s))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if cand.len() > k {
        cand.select_nth_unstable_by(k, order);
        cand.truncate(k);
    }
    cand.sort_unstable_by(order);
    cand
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, d: usize, seed: u64) -> (Array2<f32>, Array1<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let e = Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0f32));
        let b = Array1::from_shape_fn(n, |_| rng.random_range(-0.5..0.5f32));
        (e, b)
    }

    #[test]
    fn no_steps_is_the_mean_of_active_items() {
        let (e, b) = random(10, 4, 1);
        let mut active = vec![true; 10];
        active[3] = false;
        let cfg = AdaptConfig {
            steps: 0,
            ..Default::default()
        };
        let u = adapt_user(e.view(), b.view(), &active, &[1, 3, 5], &cfg).unwrap();
        let want = (&e.row(1) + &e.row(5)) / 2.0;
        assert!(u.iter().zip(want.iter()).all(|(a, b)| (a - b).abs() < 1e-6));
        assert!(adapt_user(e.view(), b.view(), &active, &[3], &cfg).is_none());
    }

    #[test]
    fn steps_lower_the_bpr_loss() {
        let (e, b) = random(200, 8, 2);
        let active = vec![true; 200];
        let items = [4u32, 17, 99];
        let mean = adapt_user(
            e.view(),
            b.view(),
            &active,
            &items,
            &AdaptConfig {
                steps: 0,
                ..Default::default()
            },
        )
        .unwrap();
        let cfg = AdaptConfig {
            steps: 20,
            l2: 0.0,
            ..Default::default()
        };
        let u = adapt_user(e.view(), b.view(), &active, &items, &cfg).unwrap();
        let before = bpr_loss(e.view(), b.view(), &active, &items, mean.view());
        let after = bpr_loss(e.view(), b.view(), &active, &items, u.view());
        assert!(after < before - 0.05, "{before} -> {after}");
    }

    /// The gradient of the closed form against finite differences of the loss.
    #[test]
    fn one_step_follows_the_loss_gradient() {
        let (e, b) = random(30, 5, 3);
        let active = vec![true; 30];
        let items = [2u32, 7];
        let zero = AdaptConfig {
            steps: 0,
            ..Default::default()
        };
        let mean = adapt_user(e.view(), b.view(), &active, &items, &zero).unwrap();
        let lr = 1e-2;
        let one = AdaptConfig {
            steps: 1,
            lr,
            l2: 0.0,
            max_positives: 64,
        };
        let u = adapt_user(e.view(), b.view(), &active, &items, &one).unwrap();
        for k in 0..5 {
            let h = 1e-3;
            let mut p = mean.clone();
            p[k] += h;
            let mut m = mean.clone();
            m[k] -= h;
            let g = (bpr_loss(e.view(), b.view(), &active, &items, p.view())
                - bpr_loss(e.view(), b.view(), &active, &items, m.view()))
                / (2.0 * h);
            let step = (mean[k] - u[k]) / lr;
            assert!((g - step).abs() < 2e-3, "dim {k}: fd {g} vs {step}");
        }
    }

    #[test]
    fn top_k_excludes_and_orders() {
        let (e, b) = random(50, 4, 4);
        let mut active = vec![true; 50];
        active[10] = false;
        let u = e.row(0).to_owned();
        let top = top_k(e.view(), b.view(), &active, u.view(), &[0, 1], 5);
        assert_eq!(top.len(), 5);
        assert!(top.iter().all(|&(i, _)| i != 0 && i != 1 && i != 10));
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        let scores = e.dot(&u) + &b;
        let best = (2..50)
            .filter(|&i| i != 10)
            .max_by(|&a, &c| scores[a].total_cmp(&scores[c]))
            .unwrap();
        assert_eq!(top[0].0 as usize, best);
        assert_eq!(
            top_k(e.view(), b.view(), &active, u.view(), &[], 100).len(),
            49
        );
    }
}
