//! ONNX export of the item model (MPKG): the two graphs ONNX Runtime serves.
//!
//! MPKG eq. 1, `E_r = S_r^M X W_r`, is linear, so serving computes it as
//! `S_r^M (X W_r)`: [`item_projection_model`] is the `X W_r` part for every
//! relation at once (`features [N, d_in] → projected [N, R, d]`), and the graph
//! stage propagates the d-dim rows in Rust (`crate::graph`).
//!
//! MPKG eq. 11, the ToA self-excitation layer of the MRA task, fuses an item's
//! propagated per-relation vectors `e_{n,r}` into one embedding:
//!
//! ```text
//! s_{n,r} = relu(e_{n,r} · W1_r + b1_r) · w2_r + b2_r      two FC layers per relation
//! a_{n,·} = softmax_r(s_{n,·})                             over all R relations
//! e_n     = Σ_r a_{n,r} e_{n,r}
//! ```
//!
//! [`item_fusion_model`] is that layer (`propagated [N, R, d] → embedding [N, d],
//! relation_weights [N, R]`). [`projection_reference`] and [`fusion_reference`]
//! are the same arithmetic in plain ndarray: the tests of `crate::infer::item`
//! hold ONNX Runtime to them within 1e-5.
//!
//! The graphs are written with `onnx-protobuf` (no Python): IR version
//! [`IR_VERSION`], default-domain opset [`OPSET_VERSION`]. The batch dimension is
//! the symbolic `items`; every other dimension is fixed by the weights.

use ndarray::{s, Array2, Array3, ArrayView1, ArrayView2, ArrayView3, Axis};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::{
    type_proto, AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use protobuf::{EnumOrUnknown, MessageField};

/// ONNX IR version of the exported models (8: ONNX 1.10+, every ONNX Runtime
/// since 1.10 reads it).
pub const IR_VERSION: i64 = 8;
/// Default-domain opset of the exported models. 17 is at least 13, where
/// `ReduceSum` and `Squeeze` take their axes as an input and `Softmax` works on
/// one axis instead of flattening.
pub const OPSET_VERSION: i64 = 17;

/// File name of the projection graph in a model folder.
pub const PROJECTION_FILE: &str = "item_projection.onnx";
/// File name of the fusion graph in a model folder.
pub const FUSION_FILE: &str = "item_fusion.onnx";

/// Input of the projection graph: item features, float32 `[N, d_in]`.
pub const FEATURES: &str = "features";
/// Output of the projection graph: `X W_r` per relation, float32 `[N, R, d]`.
pub const PROJECTED: &str = "projected";
/// Input of the fusion graph: propagated per-relation vectors, float32 `[N, R, d]`.
pub const PROPAGATED: &str = "propagated";
/// Output of the fusion graph: item embeddings, float32 `[N, d]`.
pub const EMBEDDING: &str = "embedding";
/// Output of the fusion graph: the softmax weight of each relation, float32 `[N, R]`.
pub const RELATION_WEIGHTS: &str = "relation_weights";
/// Name of the dynamic batch dimension (items) in both graphs.
pub const ITEMS_DIM: &str = "items";

/// Producer name written into the models.
const PRODUCER: &str = "thaw";

/// Errors of the ONNX export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A weight array does not have the shape the others imply.
    #[error("weight `{name}` has shape {got:?}, expected {expected}")]
    Shape {
        /// The weight's name (`proj_w`, `mra_w1`, ...).
        name: &'static str,
        /// Its actual shape.
        got: Vec<usize>,
        /// The shape it should have, in terms of R, d_in, d, h.
        expected: String,
    },
    /// A weight array has a zero dimension, so the graph would be degenerate.
    #[error("weight `{name}` has shape {got:?}: every dimension must be at least 1")]
    Empty {
        /// The weight's name.
        name: &'static str,
        /// Its shape.
        got: Vec<usize>,
    },
    /// A weight contains NaN or an infinity.
    #[error("weight `{name}` has a non-finite value at flat index {index}")]
    NonFinite {
        /// The weight's name.
        name: &'static str,
        /// Row-major index of the first bad value.
        index: usize,
    },
    /// A dimension does not fit ONNX's `i64`.
    #[error("dimension {0} does not fit an ONNX dimension (i64)")]
    TooLarge(usize),
    /// Serialising the protobuf failed.
    #[error("encoding the ONNX model: {0}")]
    Encode(#[from] protobuf::Error),
}

/// Result of the ONNX export.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The projection graph of MPKG eq. 1 (`X W_r` for every relation r), as ONNX
/// model bytes.
///
/// `proj_w` is `[R, d_in, d]`. The graph takes `features` float32 `[N, d_in]`
/// (N the dynamic `items`) and gives `projected` float32 `[N, R, d]` with
/// `projected[n, r, :] = features[n, :] · proj_w[r]`: one `MatMul` with the
/// weights laid out as `[d_in, R·d]` (column `r·d + k` is `proj_w[r, :, k]`),
/// then a `Reshape` to `[-1, R, d]`.
pub fn item_projection_model(proj_w: ArrayView3<f32>) -> Result<Vec<u8>> {
    check_nonempty("proj_w", proj_w.shape())?;
    check_finite("proj_w", proj_w.iter())?;
    let (relations, d_in, dim) = proj_w.dim();

    // [R, d_in, d] -> [d_in, R, d]: row i is then, flattened, column block r·d + k.
    let stacked = proj_w.permuted_axes([1, 0, 2]);
    let weight = tensor_f32(
        "proj_w_stacked",
        &[d_in, relations * dim],
        stacked.iter().copied(),
    )?;
    let shape = tensor_i64(
        "projected_shape",
        &[3],
        vec![-1, to_i64(relations)?, to_i64(dim)?],
    )?;

    let graph = GraphProto {
        name: "thaw_item_projection".into(),
        doc_string: "MPKG eq. 1: X W_r for every relation r".into(),
        node: vec![
            node(
                "MatMul",
                "project",
                &[FEATURES, "proj_w_stacked"],
                &["projected_flat"],
                vec![],
            ),
            node(
                "Reshape",
                "split_relations",
                &["projected_flat", "projected_shape"],
                &[PROJECTED],
                vec![],
            ),
        ],
        initializer: vec![weight, shape],
        input: vec![value_info(FEATURES, &[Dim::Items, Dim::Fixed(d_in)])?],
        output: vec![value_info(
            PROJECTED,
            &[Dim::Items, Dim::Fixed(relations), Dim::Fixed(dim)],
        )?],
        ..GraphProto::default()
    };
    encode(graph)
}

/// The fusion graph of MPKG eq. 11 (the self-excitation layer over all
/// relations), as ONNX model bytes.
///
/// Weights: `mra_w1 [R, d, h]`, `mra_b1 [R, h]`, `mra_w2 [R, h]`, `mra_b2 [R]`.
/// The graph takes `propagated` float32 `[N, R, d]` and gives `embedding`
/// `[N, d]` and `relation_weights` `[N, R]` (each row sums to 1). It computes the
/// R small MLPs as batched `MatMul`s over a `[R, N, d]` transpose, `Softmax`
/// over the relation axis, then `Mul` + `ReduceSum` for the weighted sum.
pub fn item_fusion_model(
    mra_w1: ArrayView3<f32>,
    mra_b1: ArrayView2<f32>,
    mra_w2: ArrayView2<f32>,
    mra_b2: ArrayView1<f32>,
) -> Result<Vec<u8>> {
    let (relations, dim, hidden) = check_fusion_weights(mra_w1, mra_b1, mra_w2, mra_b2)?;

    let initializer = vec![
        tensor_f32("mra_w1", &[relations, dim, hidden], mra_w1.iter().copied())?,
        // Biases carry a broadcast axis for N; w2 is a column per relation.
        tensor_f32("mra_b1", &[relations, 1, hidden], mra_b1.iter().copied())?,
        tensor_f32("mra_w2", &[relations, hidden, 1], mra_w2.iter().copied())?,
        tensor_f32("mra_b2", &[relations, 1, 1], mra_b2.iter().copied())?,
        tensor_i64("relation_axis", &[1], vec![1])?,
        tensor_i64("last_axis", &[1], vec![2])?,
    ];
    let perm = || vec![attr_ints("perm", vec![1, 0, 2])];
    let node = vec![
        // [N, R, d] -> [R, N, d], so MatMul batches over relations.
        node(
            "Transpose",
            "by_relation",
            &[PROPAGATED],
            &["by_relation"],
            perm(),
        ),
        node(
            "MatMul",
            "fc1",
            &["by_relation", "mra_w1"],
            &["fc1_out"],
            vec![],
        ),
        node(
            "Add",
            "fc1_bias",
            &["fc1_out", "mra_b1"],
            &["fc1_biased"],
            vec![],
        ),
        node("Relu", "fc1_relu", &["fc1_biased"], &["hidden"], vec![]),
        node("MatMul", "fc2", &["hidden", "mra_w2"], &["fc2_out"], vec![]),
        node(
            "Add",
            "fc2_bias",
            &["fc2_out", "mra_b2"],
            &["scores_by_relation"],
            vec![],
        ),
        // [R, N, 1] -> [N, R, 1]
        node(
            "Transpose",
            "by_item",
            &["scores_by_relation"],
            &["scores"],
            perm(),
        ),
        node(
            "Softmax",
            "excitation",
            &["scores"],
            &["weights"],
            vec![attr_int("axis", 1)],
        ),
        node(
            "Mul",
            "weigh",
            &[PROPAGATED, "weights"],
            &["weighted"],
            vec![],
        ),
        node(
            "ReduceSum",
            "sum_relations",
            &["weighted", "relation_axis"],
            &[EMBEDDING],
            vec![attr_int("keepdims", 0)],
        ),
        node(
            "Squeeze",
            "weights_matrix",
            &["weights", "last_axis"],
            &[RELATION_WEIGHTS],
            vec![],
        ),
    ];

    let graph = GraphProto {
        name: "thaw_item_fusion".into(),
        doc_string: "MPKG eq. 11: self-excitation over relations (ToA, MRA)".into(),
        node,
        initializer,
        input: vec![value_info(
            PROPAGATED,
            &[Dim::Items, Dim::Fixed(relations), Dim::Fixed(dim)],
        )?],
        output: vec![
            value_info(EMBEDDING, &[Dim::Items, Dim::Fixed(dim)])?,
            value_info(RELATION_WEIGHTS, &[Dim::Items, Dim::Fixed(relations)])?,
        ],
        ..GraphProto::default()
    };
    encode(graph)
}

/// MPKG eq. 1's projection in ndarray, the arithmetic of
/// [`item_projection_model`]: `out[n, r, :] = features[n, :] · proj_w[r]`.
///
/// # Panics
///
/// If `features` has not `d_in` (= `proj_w.dim().1`) columns.
pub fn projection_reference(features: ArrayView2<f32>, proj_w: ArrayView3<f32>) -> Array3<f32> {
    let (relations, d_in, dim) = proj_w.dim();
    assert_eq!(
        features.ncols(),
        d_in,
        "features have {} columns, proj_w takes d_in = {d_in}",
        features.ncols()
    );
    let mut out = Array3::<f32>::zeros((features.nrows(), relations, dim));
    for (r, w) in proj_w.outer_iter().enumerate() {
        out.slice_mut(s![.., r, ..]).assign(&features.dot(&w));
    }
    out
}

/// MPKG eq. 11 in ndarray, the arithmetic of [`item_fusion_model`]: returns
/// `(embedding [N, d], relation_weights [N, R])`.
///
/// # Panics
///
/// If the weights' shapes disagree with each other or with `propagated`
/// (`[N, R, d]` against `mra_w1 [R, d, h]`, `mra_b1 [R, h]`, `mra_w2 [R, h]`,
/// `mra_b2 [R]`).
pub fn fusion_reference(
    propagated: ArrayView3<f32>,
    mra_w1: ArrayView3<f32>,
    mra_b1: ArrayView2<f32>,
    mra_w2: ArrayView2<f32>,
    mra_b2: ArrayView1<f32>,
) -> (Array2<f32>, Array2<f32>) {
    let (items, relations, dim) = propagated.dim();
    let hidden = mra_w1.dim().2;
    assert_eq!(
        mra_w1.dim(),
        (relations, dim, hidden),
        "mra_w1 vs propagated [N, R, d] = {:?}",
        propagated.dim()
    );
    assert_eq!(mra_b1.dim(), (relations, hidden), "mra_b1 vs mra_w1");
    assert_eq!(mra_w2.dim(), (relations, hidden), "mra_w2 vs mra_w1");
    assert_eq!(mra_b2.len(), relations, "mra_b2 vs mra_w1");

    // Scores s[n, r], relation by relation: each is a 2-layer MLP on [N, d].
    let mut weights = Array2::<f32>::zeros((items, relations));
    for r in 0..relations {
        let mut hid = propagated
            .slice(s![.., r, ..])
            .dot(&mra_w1.index_axis(Axis(0), r));
        hid += &mra_b1.row(r);
        hid.mapv_inplace(|v| v.max(0.0));
        let score = hid.dot(&mra_w2.row(r)) + mra_b2[r];
        weights.column_mut(r).assign(&score);
    }
    // Softmax over relations, shifted by the row maximum as ONNX Runtime does.
    for mut row in weights.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row /= sum;
    }
    let mut embedding = Array2::<f32>::zeros((items, dim));
    for (r, w) in weights.columns().into_iter().enumerate() {
        let w = w.insert_axis(Axis(1));
        embedding += &(&propagated.slice(s![.., r, ..]) * &w);
    }
    (embedding, weights)
}

/// Checks the four MRA weights against each other; returns `(R, d, h)`.
fn check_fusion_weights(
    mra_w1: ArrayView3<f32>,
    mra_b1: ArrayView2<f32>,
    mra_w2: ArrayView2<f32>,
    mra_b2: ArrayView1<f32>,
) -> Result<(usize, usize, usize)> {
    check_nonempty("mra_w1", mra_w1.shape())?;
    let (relations, dim, hidden) = mra_w1.dim();
    let expect = |name: &'static str, got: &[usize], want: &[usize], expected: &str| {
        if got == want {
            Ok(())
        } else {
            Err(Error::Shape {
                name,
                got: got.to_vec(),
                expected: format!(
                    "{expected} = {want:?} (from mra_w1 [R, d, h] = {:?})",
                    mra_w1.shape()
                ),
            })
        }
    };
    expect("mra_b1", mra_b1.shape(), &[relations, hidden], "[R, h]")?;
    expect("mra_w2", mra_w2.shape(), &[relations, hidden], "[R, h]")?;
    expect("mra_b2", mra_b2.shape(), &[relations], "[R]")?;
    check_finite("mra_w1", mra_w1.iter())?;
    check_finite("mra_b1", mra_b1.iter())?;
    check_finite("mra_w2", mra_w2.iter())?;
    check_finite("mra_b2", mra_b2.iter())?;
    Ok((relations, dim, hidden))
}

/// Rejects a weight with a zero dimension.
fn check_nonempty(name: &'static str, shape: &[usize]) -> Result<()> {
    if shape.contains(&0) {
        return Err(Error::Empty {
            name,
            got: shape.to_vec(),
        });
    }
    Ok(())
}

/// Rejects a weight with NaN or an infinity (row-major order).
fn check_finite<'a>(name: &'static str, values: impl Iterator<Item = &'a f32>) -> Result<()> {
    for (index, value) in values.enumerate() {
        if !value.is_finite() {
            return Err(Error::NonFinite { name, index });
        }
    }
    Ok(())
}

fn to_i64(n: usize) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::TooLarge(n))
}

fn dims_i64(dims: &[usize]) -> Result<Vec<i64>> {
    dims.iter().map(|&d| to_i64(d)).collect()
}

/// A float32 initializer; `data` in row-major order of `dims`.
fn tensor_f32(name: &str, dims: &[usize], data: impl Iterator<Item = f32>) -> Result<TensorProto> {
    Ok(TensorProto {
        name: name.into(),
        dims: dims_i64(dims)?,
        data_type: DataType::FLOAT as i32,
        float_data: data.collect(),
        ..TensorProto::default()
    })
}

/// An int64 initializer.
fn tensor_i64(name: &str, dims: &[usize], data: Vec<i64>) -> Result<TensorProto> {
    Ok(TensorProto {
        name: name.into(),
        dims: dims_i64(dims)?,
        data_type: DataType::INT64 as i32,
        int64_data: data,
        ..TensorProto::default()
    })
}

/// One dimension of a graph input or output.
#[derive(Clone, Copy)]
enum Dim {
    /// The dynamic batch dimension, named [`ITEMS_DIM`].
    Items,
    /// A dimension fixed by the weights.
    Fixed(usize),
}

/// A float32 tensor input or output declaration.
fn value_info(name: &str, dims: &[Dim]) -> Result<ValueInfoProto> {
    let dim = dims
        .iter()
        .map(|&d| {
            let value = match d {
                Dim::Items => dimension::Value::DimParam(ITEMS_DIM.into()),
                Dim::Fixed(n) => dimension::Value::DimValue(to_i64(n)?),
            };
            Ok(Dimension {
                value: Some(value),
                ..Dimension::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tensor = type_proto::Tensor {
        elem_type: DataType::FLOAT as i32,
        shape: MessageField::some(TensorShapeProto {
            dim,
            ..TensorShapeProto::default()
        }),
        ..type_proto::Tensor::default()
    };
    Ok(ValueInfoProto {
        name: name.into(),
        type_: MessageField::some(TypeProto {
            value: Some(type_proto::Value::TensorType(tensor)),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    })
}

/// A default-domain node.
fn node(
    op_type: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op_type.into(),
        name: name.into(),
        input: inputs.iter().map(|s| (*s).into()).collect(),
        output: outputs.iter().map(|s| (*s).into()).collect(),
        attribute,
        ..NodeProto::default()
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::INT),
        i,
        ..AttributeProto::default()
    }
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::INTS),
        ints,
        ..AttributeProto::default()
    }
}

/// Wraps `graph` in a model (IR [`IR_VERSION`], opset [`OPSET_VERSION`]) and
/// serialises it.
fn encode(graph: GraphProto) -> Result<Vec<u8>> {
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET_VERSION,
            ..OperatorSetIdProto::default()
        }],
        producer_name: PRODUCER.into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: MessageField::some(graph),
        ..ModelProto::default()
    };
    Ok(model.write_to_bytes()?)
}

#[cfg(test)]
mod tests {
    use ndarray::{array, Array1};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random3(rng: &mut ChaCha8Rng, shape: (usize, usize, usize)) -> Array3<f32> {
        Array3::from_shape_simple_fn(shape, || rng.random_range(-1.0f32..1.0))
    }

    fn random2(rng: &mut ChaCha8Rng, shape: (usize, usize)) -> Array2<f32> {
        Array2::from_shape_simple_fn(shape, || rng.random_range(-1.0f32..1.0))
    }

    #[test]
    fn projection_reference_is_a_matmul_per_relation() {
        // R = 2, d_in = 2, d = 1: relation 0 sums the features, relation 1 subtracts.
        let proj_w = array![[[1.0f32], [1.0]], [[1.0], [-1.0]]];
        let features = array![[3.0f32, 2.0], [0.5, 4.0]];
        let out = projection_reference(features.view(), proj_w.view());
        assert_eq!(out, array![[[5.0f32], [1.0]], [[4.5], [-3.5]]]);
    }

    #[test]
    fn fusion_reference_matches_eq_11_by_hand() {
        // R = 2, d = 1, h = 1: s_r = relu(e_r w1_r + b1_r) w2_r + b2_r.
        let w1 = array![[[2.0f32]], [[1.0]]];
        let b1 = array![[0.0f32], [-10.0]];
        let w2 = array![[1.0f32], [5.0]];
        let b2 = array![0.0f32, 1.0];
        let propagated = array![[[1.0f32], [3.0]]];
        // s_0 = relu(2) * 1 + 0 = 2; s_1 = relu(3 - 10) * 5 + 1 = 1.
        let (embedding, weights) = fusion_reference(
            propagated.view(),
            w1.view(),
            b1.view(),
            w2.view(),
            b2.view(),
        );
        let a0 = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((weights[[0, 0]] - a0).abs() < 1e-6, "{weights}");
        assert!((weights[[0, 1]] - (1.0 - a0)).abs() < 1e-6, "{weights}");
        let want = a0 * 1.0 + (1.0 - a0) * 3.0;
        assert!((embedding[[0, 0]] - want).abs() < 1e-6, "{embedding}");
    }

    #[test]
    fn fusion_reference_weights_are_a_distribution_and_embeddings_a_convex_mix() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (r, d, h, n) = (4, 3, 6, 9);
        let propagated = random3(&mut rng, (n, r, d));
        let w1 = random3(&mut rng, (r, d, h));
        let b1 = random2(&mut rng, (r, h));
        let w2 = random2(&mut rng, (r, h));
        let b2 = Array1::from_shape_simple_fn(r, || rng.random_range(-1.0f32..1.0));
        let (embedding, weights) = fusion_reference(
            propagated.view(),
            w1.view(),
            b1.view(),
            w2.view(),
            b2.view(),
        );
        assert_eq!(embedding.dim(), (n, d));
        assert_eq!(weights.dim(), (n, r));
        for (i, row) in weights.rows().into_iter().enumerate() {
            assert!((row.sum() - 1.0).abs() < 1e-6, "row {i}: {row}");
            assert!(row.iter().all(|&w| w > 0.0));
            for k in 0..d {
                let column = propagated.slice(s![i, .., k]);
                let lo = column.fold(f32::INFINITY, |m, &v| m.min(v));
                let hi = column.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let e = embedding[[i, k]];
                assert!(lo - 1e-6 <= e && e <= hi + 1e-6, "{e} not in [{lo}, {hi}]");
            }
        }
    }

    #[test]
    fn the_models_encode_their_interface_and_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let proj_w = random3(&mut rng, (3, 7, 4));
        let bytes = item_projection_model(proj_w.view()).unwrap();
        let model = ModelProto::parse_from_bytes(&bytes).unwrap();
        assert_eq!(model.ir_version, IR_VERSION);
        assert_eq!(model.opset_import[0].version, OPSET_VERSION);
        let graph = model.graph.as_ref().unwrap();
        assert_eq!(graph.input[0].name, FEATURES);
        assert_eq!(graph.output[0].name, PROJECTED);
        let stacked = graph
            .initializer
            .iter()
            .find(|t| t.name == "proj_w_stacked")
            .unwrap();
        assert_eq!(stacked.dims, [7, 12]);
        // Column r·d + k of row i is proj_w[r, i, k].
        for (r, i, k) in [(0, 0, 0), (1, 3, 2), (2, 6, 3)] {
            assert_eq!(stacked.float_data[i * 12 + r * 4 + k], proj_w[[r, i, k]]);
        }

        let w1 = random3(&mut rng, (3, 4, 5));
        let bytes = item_fusion_model(
            w1.view(),
            random2(&mut rng, (3, 5)).view(),
            random2(&mut rng, (3, 5)).view(),
            Array1::zeros(3).view(),
        )
        .unwrap();
        let graph = ModelProto::parse_from_bytes(&bytes).unwrap().graph.unwrap();
        assert_eq!(graph.input[0].name, PROPAGATED);
        let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outputs, [EMBEDDING, RELATION_WEIGHTS]);
    }

    #[test]
    fn mismatched_weights_are_rejected_with_their_names() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let w1 = random3(&mut rng, (3, 4, 5));
        let b1 = random2(&mut rng, (3, 5));
        let w2 = random2(&mut rng, (3, 5));
        let b2 = Array1::<f32>::zeros(3);
        assert!(item_fusion_model(w1.view(), b1.view(), w2.view(), b2.view()).is_ok());

        let bad_b1 = random2(&mut rng, (3, 4));
        let bad_w2 = random2(&mut rng, (2, 5));
        let bad_b2 = Array1::<f32>::zeros(4);
        let cases = [
            item_fusion_model(w1.view(), bad_b1.view(), w2.view(), b2.view()),
            item_fusion_model(w1.view(), b1.view(), bad_w2.view(), b2.view()),
            item_fusion_model(w1.view(), b1.view(), w2.view(), bad_b2.view()),
        ];
        for (result, name) in cases.into_iter().zip(["mra_b1", "mra_w2", "mra_b2"]) {
            let err = result.unwrap_err();
            assert!(
                matches!(err, Error::Shape { name: n, .. } if n == name),
                "{err}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }

        let empty = Array3::<f32>::zeros((3, 0, 4));
        let err = item_projection_model(empty.view()).unwrap_err();
        assert!(matches!(err, Error::Empty { name: "proj_w", .. }), "{err}");
        let mut nan = random3(&mut rng, (2, 2, 2));
        nan[[1, 0, 1]] = f32::NAN;
        let err = item_projection_model(nan.view()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    name: "proj_w",
                    index: 5
                }
            ),
            "{err}"
        );
    }
}
