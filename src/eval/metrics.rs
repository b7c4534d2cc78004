//! Ranking metrics over a full catalogue: a bounded-heap top-K, Recall@K,
//! NDCG@K, MRR, and percentile-bootstrap confidence intervals over users.
//!
//! Ties are broken *pessimistically* in evaluation: at equal scores, every
//! non-query item ranks above a query item (and lower item indexes first within
//! each group). A model that outputs a constant therefore scores zero instead of
//! whatever the index order happens to favour. NaN scores rank last.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A candidate in a ranking: its score, then a tie-break rank (higher wins), then
/// its index (lower wins).
#[derive(Debug, Clone, Copy)]
struct Cand {
    score: f32,
    tie: u8,
    item: u32,
}

impl Cand {
    fn key_cmp(&self, other: &Self) -> Ordering {
        let a = if self.score.is_nan() {
            f32::NEG_INFINITY
        } else {
            self.score
        };
        let b = if other.score.is_nan() {
            f32::NEG_INFINITY
        } else {
            other.score
        };
        a.total_cmp(&b)
            .then(self.tie.cmp(&other.tie))
            .then(other.item.cmp(&self.item))
    }
}

/// Heap order is reversed so the `BinaryHeap` keeps the *worst* kept candidate on top.
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        other.key_cmp(self)
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Cand {}

/// Top-`k` items of `scores` by descending score (ties: lower index first),
/// skipping items for which `excluded` is true. A bounded heap: O(n log k).
pub fn top_k(scores: &[f32], k: usize, excluded: impl Fn(u32) -> bool) -> Vec<(u32, f32)> {
    top_k_by(scores, k, excluded, |_| 0)
        .into_iter()
        .map(|c| (c.item, c.score))
        .collect()
}

fn top_k_by(
    scores: &[f32],
    k: usize,
    excluded: impl Fn(u32) -> bool,
    tie: impl Fn(u32) -> u8,
) -> Vec<Cand> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(k + 1);
    for (i, &score) in scores.iter().enumerate() {
        let item = i as u32;
        if excluded(item) {
            continue;
        }
        let c = Cand {
            score,
            tie: tie(item),
            item,
        };
        if heap.len() < k {
            heap.push(c);
        } else if let Some(worst) = heap.peek() {
            if c.key_cmp(worst) == Ordering::Greater {
                heap.pop();
                heap.push(c);
            }
        }
    }
    let mut out = heap.into_vec();
    out.sort_by(|a, b| b.key_cmp(a));
    out
}

/// One user's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UserMetrics {
    /// Query items in the top K, over the query size.
    pub recall: f64,
    /// DCG@K with binary gains over the ideal DCG of min(query size, K) hits.
    pub ndcg: f64,
    /// 1 / rank of the best-ranked query item in the full ranking (0 if none
    /// can be ranked).
    pub mrr: f64,
}

/// Metrics of one user: `scores` over all items, `excluded` items (training
/// items and support set) are not ranked, `query` holds the hidden items.
///
/// A query item that is also excluded can never be retrieved but still counts
/// in the query size: a split that leaks its query into training is penalised,
/// not rewarded. Duplicate query items count once.
pub fn user_metrics(
    scores: &[f32],
    excluded: impl Fn(u32) -> bool,
    query: &[u32],
    k: usize,
) -> UserMetrics {
    let mut q: Vec<u32> = query
        .iter()
        .copied()
        .filter(|&i| (i as usize) < scores.len())
        .collect();
    q.sort_unstable();
    q.dedup();
    if q.is_empty() {
        return UserMetrics::default();
    }
    let is_query = |i: u32| q.binary_search(&i).is_ok();
    // tie: non-query items (1) beat query items (0) at equal scores.
    let tie = |i: u32| u8::from(!is_query(i));
    let top = top_k_by(scores, k, &excluded, tie);
    let mut hits = 0usize;
    let mut dcg = 0.0;
    for (rank, c) in top.iter().enumerate() {
        if is_query(c.item) {
            hits += 1;
            dcg += 1.0 / ((rank + 2) as f64).log2();
        }
    }
    let idcg: f64 = (0..q.len().min(k))
        .map(|r| 1.0 / ((r + 2) as f64).log2())
        .sum();
    // MRR over the full ranking: rank of the best query item = 1 + number of
    // ranked items that beat it.
    let best = q
        .iter()
        .filter(|&&i| !excluded(i))
        .map(|&i| Cand {
            score: scores[i as usize],
            tie: 0,
            item: i,
        })
        .max_by(|a, b| a.key_cmp(b));
    let mrr = match best {
        None => 0.0,
        Some(b) => {
            let ahead = (0..scores.len() as u32)
                .filter(|&j| !excluded(j))
                .filter(|&j| {
                    Cand {
                        score: scores[j as usize],
                        tie: tie(j),
                        item: j,
                    }
                    .key_cmp(&b)
                        == Ordering::Greater
                })
                .count();
            1.0 / (ahead + 1) as f64
        }
    };
    UserMetrics {
        recall: hits as f64 / q.len() as f64,
        ndcg: if idcg > 0.0 { dcg / idcg } else { 0.0 },
        mrr,
    }
}

/// A 95% interval `[low, high]`.
pub type Interval = [f64; 2];

/// Mean and 95% percentile-bootstrap interval of per-user values, resampling
/// users with replacement `resamples` times (seeded). Empty input gives zeros.
pub fn bootstrap_mean(values: &[f64], resamples: usize, seed: u64) -> (f64, Interval) {
    if values.is_empty() {
        return (0.0, [0.0, 0.0]);
    }
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |p: f64| means[((p * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (mean, [at(0.025), at(0.975)])
}

/// Aggregated metrics of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioMetrics {
    /// Query users scored.
    pub users: usize,
    /// Mean Recall@K.
    pub recall: f64,
    /// Mean NDCG@K.
    pub ndcg: f64,
    /// Mean reciprocal rank.
    pub mrr: f64,
    /// 95% bootstrap intervals over users.
    pub ci95: Intervals,
}

/// 95% intervals of the three metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intervals {
    /// Of Recall@K.
    pub recall: Interval,
    /// Of NDCG@K.
    pub ndcg: Interval,
    /// Of MRR.
    pub mrr: Interval,
}

impl ScenarioMetrics {
    /// Aggregates per-user metrics with bootstrap intervals (1,000 resamples).
    pub fn from_users(per_user: &[UserMetrics], seed: u64) -> Self {
        let col = |f: fn(&UserMetrics) -> f64| per_user.iter().map(f).collect::<Vec<f64>>();
        let (recall, r_ci) = bootstrap_mean(&col(|m| m.recall), 1000, seed);
        let (ndcg, n_ci) = bootstrap_mean(&col(|m| m.ndcg), 1000, seed);
        let (mrr, m_ci) = bootstrap_mean(&col(|m| m.mrr), 1000, seed);
        Self {
            users: per_user.len(),
            recall,
            ndcg,
            mrr,
            ci95: Intervals {
                recall: r_ci,
                ndcg: n_ci,
                mrr: m_ci,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_computed_case() {
        // Items 0..6; ranking by score: 5 (0.9), 2 (0.8), 0 (0.7), 4 (0.6), 1 (0.5), 3 (0.1)
        let scores = [0.7, 0.5, 0.8, 0.1, 0.6, 0.9];
        let m = user_metrics(&scores, |_| false, &[2, 4], 3);
        // top3 = [5, 2, 0]: one hit at rank 2.
        assert!(close(m.recall, 0.5));
        let dcg = 1.0 / 3f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2();
        assert!(close(m.ndcg, dcg / idcg));
        assert!(close(m.mrr, 0.5));
    }

    #[test]
    fn excluded_items_are_not_ranked() {
        let scores = [0.7, 0.5, 0.8, 0.1, 0.6, 0.9];
        // exclude 5: top3 = [2, 0, 4] → both hits at ranks 1 and 3.
        let m = user_metrics(&scores, |i| i == 5, &[2, 4], 3);
        assert!(close(m.recall, 1.0));
        let dcg = 1.0 + 1.0 / 4f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2();
        assert!(close(m.ndcg, dcg / idcg));
        assert!(close(m.mrr, 1.0));
    }

    #[test]
    fn ties_rank_query_items_last() {
        // All scores equal: every non-query item beats the query items.
        let scores = [1.0; 5];
        let m = user_metrics(&scores, |_| false, &[0, 1], 3);
        assert!(close(m.recall, 0.0), "a constant model must not score");
        // ranking: 2, 3, 4, then 0 (rank 4), 1.
        assert!(close(m.mrr, 0.25));
        // A strictly higher score still wins.
        let scores = [1.0, 2.0, 1.0, 1.0, 1.0];
        let m = user_metrics(&scores, |_| false, &[0, 1], 3);
        assert!(close(m.recall, 0.5));
        assert!(close(m.mrr, 1.0));
    }

    #[test]
    fn query_item_in_support_counts_as_a_miss() {
        let scores = [0.9, 0.8, 0.7, 0.6];
        // Item 0 is a query item but excluded (in support): it cannot be hit.
        let m = user_metrics(&scores, |i| i == 0, &[0, 1], 2);
        assert!(close(m.recall, 0.5));
        assert!(close(m.mrr, 1.0), "item 1 is first among ranked items");
        let idcg = 1.0 + 1.0 / 3f64.log2();
        assert!(close(m.ndcg, 1.0 / idcg));
    }

    #[test]
    fn k_larger_than_catalogue() {
        let scores = [0.3, 0.2, 0.1];
        let m = user_metrics(&scores, |i| i == 1, &[2], 20);
        assert!(close(m.recall, 1.0));
        // ranked: 0, 2 → hit at rank 2; ideal DCG over min(1, 20) = 1 hit.
        assert!(close(m.ndcg, 1.0 / 3f64.log2()));
        assert!(close(m.mrr, 0.5));
    }

    #[test]
    fn duplicates_and_nan() {
        let scores = [f32::NAN, 0.1, 0.2];
        let m = user_metrics(&scores, |_| false, &[0, 0], 2);
        assert!(close(m.recall, 0.0), "NaN ranks last");
        assert!(close(m.mrr, 1.0 / 3.0));
        assert_eq!(
            user_metrics(&scores, |_| false, &[], 2),
            UserMetrics::default()
        );
    }

    #[test]
    fn top_k_is_sorted_and_bounded() {
        let scores: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let top = top_k(&scores, 5, |i| i % 2 == 0);
        assert_eq!(top.len(), 5);
        let mut all: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(i, &s)| (i as u32, s))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(top, all[..5].to_vec());
        // Ties at serving time: lower index first.
        assert_eq!(
            top_k(&[1.0, 1.0, 1.0], 2, |_| false),
            vec![(0, 1.0), (1, 1.0)]
        );
        assert!(top_k(&[1.0], 0, |_| false).is_empty());
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean() {
        let values: Vec<f64> = (0..200).map(|i| (i % 10) as f64 / 10.0).collect();
        let (mean, [lo, hi]) = bootstrap_mean(&values, 1000, 1);
        assert!(close(mean, 0.45));
        assert!(lo < mean && mean < hi, "{lo} {mean} {hi}");
        // Standard error ≈ 0.287/sqrt(200) ≈ 0.0203: interval ≈ ±0.04.
        assert!((hi - lo) > 0.05 && (hi - lo) < 0.11, "{lo} {hi}");
        let (m, ci) = bootstrap_mean(&[0.3; 5], 100, 1);
        assert!(close(m, 0.3) && close(ci[0], 0.3) && close(ci[1], 0.3));
    }
}
