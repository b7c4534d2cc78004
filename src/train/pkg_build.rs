//! Building the product knowledge graph of a dataset (MPKG §4.1).
//!
//! Relations:
//! - `co_interacted`: each item linked to its `neighbours` most similar items
//!   by cosine over the users who interacted with both (at least
//!   `min_co_users` shared users), from training interactions only;
//! - `co_liked`: the same over interactions rated at least `like_threshold`
//!   (when the dataset has a `rating` column: weights and play counts are
//!   not ratings);
//! - `kg:<relation>` for the `kg_relations` most frequent KG relations: two
//!   items are linked when their entities share a tail through that relation;
//!   tails shared by more than `max_tail_items` items are skipped as
//!   uninformative (a genre or a country links half the catalogue).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::graph::Pkg;

/// Settings of the PKG construction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PkgConfig {
    /// Co-interaction neighbours kept per item (10: sparse enough that three
    /// hops stay local, dense enough to reach beyond direct neighbours).
    pub neighbours: usize,
    /// Least shared users for a co-interaction edge (2: one shared user is noise).
    pub min_co_users: usize,
    /// Rating at or above which an interaction counts as a like (4 of 5).
    pub like_threshold: f32,
    /// Most frequent KG relations turned into item-item relations (4).
    pub kg_relations: usize,
    /// Tails shared by more items than this are skipped (50).
    pub max_tail_items: usize,
}

impl Default for PkgConfig {
    fn default() -> Self {
        Self {
            neighbours: 10,
            min_co_users: 2,
            like_threshold: 4.0,
            kg_relations: 4,
            max_tail_items: 50,
        }
    }
}

/// The relation names a dataset gives under `cfg` (fixed at training time).
pub fn relation_names(ds: &Dataset, cfg: &PkgConfig) -> Vec<String> {
    let mut names = vec!["co_interacted".to_string()];
    if ds.rated && ds.interactions.iter().any(|i| i.value.is_some()) {
        names.push("co_liked".into());
    }
    names.extend(
        top_kg_relations(ds, cfg)
            .into_iter()
            .map(|r| format!("kg:{}", ds.relations.id(r))),
    );
    names
}

fn top_kg_relations(ds: &Dataset, cfg: &PkgConfig) -> Vec<u32> {
    let mut count: HashMap<u32, usize> = HashMap::new();
    let linked: std::collections::HashSet<u32> = ds.item_entity.iter().flatten().copied().collect();
    for t in &ds.triples {
        if linked.contains(&t.head) {
            *count.entry(t.relation).or_default() += 1;
        }
    }
    let mut v: Vec<(u32, usize)> = count.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter()
        .take(cfg.kg_relations)
        .map(|(r, _)| r)
        .collect()
}

/// Builds the PKG over `items` (dense dataset indexes present in the graph;
/// every other item is absent, e.g. zero-shot items during training), with
/// co-interaction relations from `user_items` (training interactions only).
///
/// Graph slot `k` holds dataset item `items[k]`; the returned map gives the
/// slot of a dataset item.
pub fn build_pkg(
    ds: &Dataset,
    cfg: &PkgConfig,
    items: &[u32],
    user_items: &[Vec<u32>],
) -> crate::graph::Result<(Pkg, HashMap<u32, u32>)> {
    let names = relation_names(ds, cfg);
    let mut pkg = Pkg::new(names.iter().map(String::as_str))?;
    pkg.reserve(items.len());
    let mut slot = HashMap::with_capacity(items.len());
    for &i in items {
        slot.insert(i, pkg.add_item(ds.items.id(i)));
    }
    let rating: HashMap<(u32, u32), f32> = ds
        .interactions
        .iter()
        .filter_map(|x| x.value.map(|v| ((x.user, x.item), v)))
        .collect();
    let mut add_knn = |r: usize, lists: Vec<Vec<u32>>| -> crate::graph::Result<()> {
        for (i, nbrs) in co_neighbours(&lists, ds.n_items(), cfg)
            .into_iter()
            .enumerate()
        {
            let Some(&a) = slot.get(&(i as u32)) else {
                continue;
            };
            for j in nbrs {
                if let Some(&b) = slot.get(&j) {
                    pkg.add_edge(r, a, b)?;
                }
            }
        }
        Ok(())
    };
    add_knn(0, user_items.to_vec())?;
    let mut r = 1;
    if names.get(1).is_some_and(|n| n == "co_liked") {
        let liked: Vec<Vec<u32>> = user_items
            .iter()
            .enumerate()
            .map(|(u, its)| {
                its.iter()
                    .copied()
                    .filter(|&i| {
                        rating
                            .get(&(u as u32, i))
                            .is_some_and(|&v| v >= cfg.like_threshold)
                    })
                    .collect()
            })
            .collect();
        add_knn(1, liked)?;
        r = 2;
    }
    // KG relations: items sharing a tail entity through the relation.
    let mut entity_slots: HashMap<u32, Vec<u32>> = HashMap::new();
    for &i in items {
        if let Some(e) = ds.item_entity[i as usize] {
            entity_slots.entry(e).or_default().push(slot[&i]);
        }
    }
    for (k, rel) in top_kg_relations(ds, cfg).into_iter().enumerate() {
        let mut by_tail: HashMap<u32, Vec<u32>> = HashMap::new();
        for t in ds.triples.iter().filter(|t| t.relation == rel) {
            if let Some(slots) = entity_slots.get(&t.head) {
                by_tail.entry(t.tail).or_default().extend_from_slice(slots);
            }
        }
        let mut tails: Vec<_> = by_tail.into_iter().collect();
        tails.sort_by_key(|(t, _)| *t);
        for (_, mut group) in tails {
            group.sort_unstable();
            group.dedup();
            if group.len() < 2 || group.len() > cfg.max_tail_items {
                continue;
            }
            for (x, &a) in group.iter().enumerate() {
                for &b in &group[x + 1..] {
                    pkg.add_edge(r + k, a, b)?;
                }
            }
        }
    }
    Ok((pkg, slot))
}

/// Per item, its `cfg.neighbours` most similar items by cosine over users
/// (at least `cfg.min_co_users` shared users).
fn co_neighbours(user_items: &[Vec<u32>], n_items: usize, cfg: &PkgConfig) -> Vec<Vec<u32>> {
    let mut item_users: Vec<Vec<u32>> = vec![Vec::new(); n_items];
    for (u, its) in user_items.iter().enumerate() {
        for &i in its {
            item_users[i as usize].push(u as u32);
        }
    }
    let mut co = vec![0u32; n_items];
    let mut touched = Vec::new();
    let mut out = vec![Vec::new(); n_items];
    for i in 0..n_items {
        for &u in &item_users[i] {
            for &j in &user_items[u as usize] {
                if j as usize != i {
                    if co[j as usize] == 0 {
                        touched.push(j);
                    }
                    co[j as usize] += 1;
                }
            }
        }
        let ni = item_users[i].len() as f32;
        let mut cand: Vec<(u32, f32)> = touched
            .iter()
            .filter(|&&j| co[j as usize] as usize >= cfg.min_co_users)
            .map(|&j| {
                (
                    j,
                    co[j as usize] as f32 / (ni * item_users[j as usize].len() as f32).sqrt(),
                )
            })
            .collect();
        for &j in &touched {
            co[j as usize] = 0;
        }
        touched.clear();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out[i] = cand
            .into_iter()
            .take(cfg.neighbours)
            .map(|(j, _)| j)
            .collect();
    }
    out
}
