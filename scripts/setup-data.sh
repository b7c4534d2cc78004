#!/usr/bin/env bash
# Obtains MovieLens-100K with its Freebase KG from the PyPI wheel recbole==1.2.1
# (recbole/dataset_example/ml-100k/) into data/ml-100k. Idempotent; no data in git.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=data/ml-100k
if [ -f "$dest/ml-100k.inter" ] && [ -f "$dest/ml-100k.kg" ]; then
  echo "data: $dest present"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" recbole==1.2.1
mkdir -p "$dest"
python3 - "$tmp"/recbole-1.2.1-*.whl "$dest" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
prefix = "recbole/dataset_example/ml-100k/"
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"{whl}: no {prefix} inside")
    for n in names:
        with open(os.path.join(dest, os.path.basename(n)), "wb") as f:
            f.write(z.read(n))
    print("data:", ", ".join(sorted(os.path.basename(n) for n in names)), "->", dest)
PY
