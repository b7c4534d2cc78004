//! The fresh-item score: how a ranking reaches items that arrived after the
//! model was trained, from their first interactions.
//!
//! An item is *fresh* when the model saw no interaction with it in training
//! (MPKG's zero-shot items, §4.3; in production, items that arrived since the
//! last retrain). Its *fresh popularity* is `ln(1 + n_i)`, `n_i` the users
//! who interacted with it since it arrived: the streaming counterpart of
//! popularity within a scenario, which an engine knows as events arrive.
//! Stale items have fresh popularity 0.
//!
//! The score adds `w · s_u · p_i`, `s_u` the share of the user's items that are
//! fresh: a user whose interactions go to new items is shown the new items
//! that others take up, and a user who never touches new items is not. The
//! same function ranks in `thaw eval` and in the engine, so the two agree.

use ndarray::{ArrayView1, ArrayViewMut1};

/// Name of the file in a model folder listing the external ids of the items
/// the model was trained with interactions, one per line.
pub const TRAINED_ITEMS_FILE: &str = "trained_items.txt";

/// Fresh popularity of one item: `ln(1 + users)` when `fresh`, else 0.
pub fn fresh_popularity(fresh: bool, users: f32) -> f32 {
    if fresh {
        users.max(0.0).ln_1p()
    } else {
        0.0
    }
}

/// Adds `weight · s_u · pop[i]` to `scores[i]` for every item, `s_u` the share
/// of `items` (the user's items, indexes into `pop`) with positive fresh
/// popularity. Indexes outside `pop` count as stale; a weight of 0 or a user
/// without items adds nothing.
pub fn add_fresh_scores(
    weight: f32,
    pop: ArrayView1<'_, f32>,
    items: &[u32],
    mut scores: ArrayViewMut1<'_, f32>,
) {
    if weight == 0.0 || items.is_empty() {
        return;
    }
    let fresh = items
        .iter()
        .filter(|&&i| pop.get(i as usize).is_some_and(|&p| p > 0.0))
        .count();
    if fresh == 0 {
        return;
    }
    let a = weight * fresh as f32 / items.len() as f32;
    scores.zip_mut_with(&pop, |s, &p| *s += a * p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    #[test]
    fn stale_items_and_users_without_fresh_items_get_nothing() {
        assert_eq!(fresh_popularity(false, 9.0), 0.0);
        assert!((fresh_popularity(true, 1.0) - 2f32.ln()).abs() < 1e-7);
        let pop = Array1::from(vec![0.0, 1.0, 2.0, 0.0]);
        let mut s = Array1::<f32>::zeros(4);
        add_fresh_scores(3.0, pop.view(), &[0, 3], s.view_mut());
        assert_eq!(s.to_vec(), vec![0.0; 4], "a user of stale items only");
        add_fresh_scores(0.0, pop.view(), &[1], s.view_mut());
        assert_eq!(s.to_vec(), vec![0.0; 4], "weight 0");
        add_fresh_scores(3.0, pop.view(), &[], s.view_mut());
        assert_eq!(s.to_vec(), vec![0.0; 4], "no items");
    }

    #[test]
    fn the_score_is_weight_times_fresh_share_times_popularity() {
        let pop = Array1::from(vec![0.0, 1.0, 2.0, 0.0]);
        let mut s = Array1::from(vec![1.0, 1.0, 1.0, 1.0]);
        // Items 0 (stale), 1 (fresh), 3 (stale) and 99 (unknown, stale): share 1/4.
        add_fresh_scores(4.0, pop.view(), &[0, 1, 3, 99], s.view_mut());
        assert_eq!(s.to_vec(), vec![1.0, 2.0, 3.0, 1.0]);
    }
}
