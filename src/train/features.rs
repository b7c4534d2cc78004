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

/// Signed feature hashing of each item's KG (relation, tail) and (inverse
/// relation, head) pairs into `dim` buckets, L2-normalised per item. Items
/// without a linked entity get a zero row.
pub fn kg_bag(ds: &Dataset, dim: usize) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((ds.n_items(), dim));
    if dim == 0 {
        return out;
    }
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
                let h = fnv1a(&[dir, rel, ds.entities.id(other)]);
                let (bucket, sign) = (
                    (h % dim as u64) as usize,
                    if h >> 63 == 0 { 1.0 } else { -1.0 },
                );
                for &i in items {
                    out[[i, bucket]] += sign;
                }
            }
        }
    }
    for mut row in out.rows_mut() {
        let n = row.dot(&row).sqrt();
        if n > 0.0 {
            row /= n;
        }
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
