#!/usr/bin/env bash
# Builds thaw's text encoder artifacts into models/text/ (ignored by git):
#   text_encoder.onnx, tokenizer.json, reference.json, ort_dylib_path
# and the Python venv .venv/ (ignored by git) that builds them.
#
# Idempotent: the venv is reinstalled only when onnx/requirements.txt changes,
# the model rebuilt only when the builder or the requirements change; a second
# run takes about a second. Prints the path of the ONNX Runtime shared library
# that the Rust side loads (also written to models/text/ort_dylib_path).
#
# Env: PYTHON (interpreter for the venv, default python3), THAW_TEXT_MODEL_DIR
# (output folder, default models/text), FORCE=1 (rebuild the model anyway).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
out="${THAW_TEXT_MODEL_DIR:-$root/models/text}"
req="$root/onnx/requirements.txt"
builder="$root/onnx/build_text_encoder.py"
ort_version="1.31.1"

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# 1. the venv
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    echo "setup: creating $venv"
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
req_hash="$(hash_of "$req")"
if [[ "$(cat "$venv/.thaw-requirements.sha256" 2>/dev/null)" != "$req_hash" ]]; then
    echo "setup: installing onnx/requirements.txt"
    # --no-deps: requirements.txt is the full pinned closure (see its header).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req"
    echo "$req_hash" > "$venv/.thaw-requirements.sha256"
fi

# 2. the ONNX Runtime shared library shipped in the onnxruntime wheel
dylib="$("$venv/bin/python" - "$ort_version" <<'EOF'
import pathlib, sys
import onnxruntime
lib = pathlib.Path(onnxruntime.__file__).resolve().parent / "capi" / f"libonnxruntime.so.{sys.argv[1]}"
if not lib.is_file():
    sys.exit(f"setup: {lib} not found in the onnxruntime wheel")
print(lib)
EOF
)"

# 3. the model, its tokenizer and the numpy reference
build_hash="$(hash_of "$req" "$builder")"
stamp="$out/.build.sha256"
if [[ "${FORCE:-0}" == 1 || "$(cat "$stamp" 2>/dev/null)" != "$build_hash" \
      || ! -s "$out/text_encoder.onnx" || ! -s "$out/tokenizer.json" || ! -s "$out/reference.json" ]]; then
    echo "setup: building the text encoder into $out"
    rm -f "$stamp"
    "$venv/bin/python" "$builder" --out "$out"
    echo "$build_hash" > "$stamp"
else
    echo "setup: $out is up to date"
fi
echo "$dylib" > "$out/ort_dylib_path"

# An int8 variant (dynamic quantisation of the MatMul weights, per channel),
# opt-in: 1.4x the titles per second on one core, vectors at cosine ~0.99 of
# the float ones, and contentknn's mean valid NDCG@20 about 10% lower on both
# datasets (benchmarks/README.md). Use it with `model.text_dir` and
# `thaw train --text-model` both pointing at it.
int8="${out}-int8"
if [[ "${FORCE:-0}" == 1 || "$(cat "$int8/.build.sha256" 2>/dev/null)" != "$build_hash" || ! -s "$int8/text_encoder.onnx" ]]; then
    echo "setup: quantising the text encoder into $int8"
    mkdir -p "$int8"
    rm -f "$int8/.build.sha256"
    "$venv/bin/python" - "$out/text_encoder.onnx" "$int8/text_encoder.onnx" <<'EOF'
import logging, sys
logging.getLogger().setLevel(logging.ERROR)
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8,
                 per_channel=True, op_types_to_quantize=["MatMul"])
EOF
    cp "$out/tokenizer.json" "$int8/tokenizer.json"
    echo "$build_hash" > "$int8/.build.sha256"
fi
echo "$dylib" > "$int8/ort_dylib_path"

echo "setup: onnxruntime shared library: $dylib"
echo "setup: for the Rust side, export ORT_DYLIB_PATH=$dylib (or rely on $out/ort_dylib_path)"
