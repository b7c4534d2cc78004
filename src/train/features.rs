//! Universal item features X (MPKG §4.1): the text vector of an item's title
//! and description, concatenated with a fixed-size hashed bag of its KG
//! (relation, entity) pairs, so an item without text (or a dataset without
//! text) still has features.

use ndarray::{concatenate, Array2, ArrayView2, Axis};

use crate::dataset::Dataset;

/// FNV-1a: stable across runs and platforms, unlike `std`'s hasher.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The category labels of every dataset item: one label per KG (relation,
/// tail) pair of its entity (`+relation=tail`) and per (inverse relation,
/// head) pair (`-relation=head`). The same labels travel in the `categories`
/// of item events (`thaw replay`), so the engine hashes what training hashed.
pub fn item_categories(ds: &Dataset) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); ds.n_items()];
    let mut entity_items: std::collections::HashMap<u32, Vec<usize>> = Default::default();
    for (i, e) in ds.item_entity.iter().enumerate() {
        if let Some(e) = e {
            entity_items.entry(*e).or_default().push(i);
        }
    }
    for t in &ds.triples {
        let rel = ds.relations.id(t.relation);
        for (ent, other, dir) in [(t.head, t.tail, "+"), (t.tail, t.head, "-")] {
            if let Some(items) = entity_items.get(&ent) {
                let label = format!("{dir}{rel}={}", ds.entities.id(other));
                for &i in items {
                    out[i].push(label.clone());
                }
            }
        }
    }
    out
}

/// Signed feature hashing of category labels into `dim` buckets,
/// L2-normalised; no labels (or `dim` 0) give a zero row.
pub fn category_bag<S: AsRef<str>>(labels: &[S], dim: usize) -> Vec<f32> {
    let mut row = vec![0f32; dim];
    if dim == 0 {
        return row;
    }
    for label in labels {
        let h = fnv1a(&[label.as_ref()]);
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        row[(h % dim as u64) as usize] += sign;
    }
    let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        row.iter_mut().for_each(|x| *x /= n);
    }
    row
}

/// The hashed KG bag of every dataset item ([`category_bag`] of
/// [`item_categories`]).
pub fn kg_bag(ds: &Dataset, dim: usize) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((ds.n_items(), dim));
    for (i, labels) in item_categories(ds).iter().enumerate() {
        out.row_mut(i)
            .assign(&ndarray::ArrayView1::from(&category_bag(labels, dim)));
    }
    out
}

/// X = [text | kg bag]. `text` has one row per dataset item (or is absent).
pub fn item_features(
    ds: &Dataset,
    text: Option<ArrayView2<'_, f32>>,
    kg_dim: usize,
) -> Array2<f32> {
    let bag = kg_bag(ds, kg_dim);
    match text {
        Some(t) => concatenate(Axis(1), &[t, bag.view()]).expect("same number of rows"),
        None => bag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_is_stable() {
        assert_eq!(fnv1a(&["a", "b"]), fnv1a(&["a", "b"]));
        assert_ne!(fnv1a(&["ab", ""]), fnv1a(&["a", "b"]));
    }
}
