#!/usr/bin/env bash
# Sets up the datasets under data/ (ignored: no data in git). Idempotent.
#
#   data/ml-100k         MovieLens-100K with its Freebase KG from the PyPI wheel
#                        recbole==1.2.1 (recbole/dataset_example/ml-100k/), with
#                        its .link repaired: the shipped one is keyed by
#                        MovieLens-1M ids; it is re-keyed to ML-100K ids through
#                        scripts/data/ml100k-to-ml1m.tsv (see scripts/data/README.md)
#                        and kept as ml-100k.link-shipped. A folder set up before
#                        the repair is repaired on the next run.
#   data/lastfm-dbpedia  Last.FM (hetrec-2011) with a DBpedia KG, copied from
#                        ../shared/data/lastfm-dbpedia/ beside the checkout.
#
# Usage: scripts/setup-data.sh [ml100k] [lastfm]   (no argument: both)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT

ml100k() {
  local dest=data/ml-100k
  if [ ! -f "$dest/ml-100k.inter" ] || [ ! -f "$dest/ml-100k.kg" ] ||
    { [ ! -f "$dest/ml-100k.link" ] && [ ! -f "$dest/ml-100k.link-shipped" ]; }; then
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" recbole==1.2.1
    mkdir -p "$dest"
    rm -f "$dest/ml-100k.link-shipped"
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
  fi
  python3 - "$dest" scripts/data/ml100k-to-ml1m.tsv <<'PY'
# Re-keys the shipped ml-100k.link (ML-1M ids) to ML-100K ids. Both files are
# recognised by content, so a folder set up before the repair is repaired and
# a repaired one is left alone.
import hashlib, os, sys
dest, map_path = sys.argv[1], sys.argv[2]
SHIPPED = "524dca2c3d62619688ab99b3ec53ea2acb9b64d38eafec3e02bdd0dc6bb7d948"
REPAIRED = "5881e81e20915377d157269e1c20bc7ca527751322099d592a0a266f7994ee55"
link = os.path.join(dest, "ml-100k.link")
shipped = os.path.join(dest, "ml-100k.link-shipped")

def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def fail(msg):
    sys.exit(f"data: {msg}; remove {dest} and run `make data` again")

if os.path.isfile(link) and sha(link) == REPAIRED:
    print(f"data: {dest} present (KG link repaired)")
    sys.exit(0)
if os.path.isfile(link):
    if sha(link) != SHIPPED:
        fail(f"{link} is neither RecBole's shipped link nor the repaired one")
    os.replace(link, shipped)
elif not os.path.isfile(shipped):
    fail(f"no {link} and no {shipped}")
if sha(shipped) != SHIPPED:
    fail(f"{shipped} is not RecBole's shipped link")

to_100k = {}
with open(map_path) as f:
    header = f.readline().rstrip("\n").split("\t")
    if header != ["ml100k_item_id", "ml1m_movie_id"]:
        sys.exit(f"{map_path}: unexpected header {header}")
    for line in f:
        ml100k, ml1m = line.rstrip("\n").split("\t")
        to_100k.setdefault(ml1m, []).append(ml100k)
with open(shipped) as f:
    head = f.readline()
    rows = []
    for line in f:
        ml1m, entity = line.rstrip("\n").split("\t")
        rows += [(int(i), entity) for i in to_100k.get(ml1m, [])]
rows.sort()
text = head + "".join(f"{i}\t{e}\n" for i, e in rows)
if hashlib.sha256(text.encode()).hexdigest() != REPAIRED:
    fail("the re-keyed link differs from the expected one")
with open(link + ".tmp", "w") as f:
    f.write(text)
os.replace(link + ".tmp", link)
print(f"data: {link} re-keyed to ML-100K ids ({len(rows)} items linked; "
      f"RecBole's file kept as {os.path.basename(shipped)})")
PY
}

lastfm() {
  local src=../shared/data/lastfm-dbpedia dest=data/lastfm-dbpedia
  local files=(lastfm-dbpedia.inter lastfm-dbpedia.item lastfm-dbpedia.kg lastfm-dbpedia.link)
  if [ ! -d "$src" ]; then
    local f complete=1
    for f in "${files[@]}"; do [ -f "$dest/$f" ] || complete=0; done
    if [ "$complete" = 1 ]; then
      echo "data: $dest present ($src not found, not compared)"
      return 0
    fi
    echo "data: Last.FM is expected in $(cd .. && pwd)/shared/data/lastfm-dbpedia/" \
      "(${files[*]}), the shared folder beside this checkout; it is not in git." >&2
    return 1
  fi
  mkdir -p "$dest"
  local f copied=0
  for f in "${files[@]}"; do
    if [ ! -f "$src/$f" ]; then
      echo "data: $src/$f is missing (expected: ${files[*]})" >&2
      return 1
    fi
    if ! cmp -s "$src/$f" "$dest/$f"; then
      cp "$src/$f" "$dest/.$f.tmp"
      mv "$dest/.$f.tmp" "$dest/$f"
      copied=$((copied + 1))
    fi
  done
  if [ "$copied" = 0 ]; then
    echo "data: $dest present"
  else
    echo "data: $copied file(s) of $src -> $dest"
  fi
}

[ $# -gt 0 ] || set -- ml100k lastfm
for d in "$@"; do
  case "$d" in
    ml100k) ml100k ;;
    lastfm) lastfm ;;
    *) echo "usage: $0 [ml100k] [lastfm]" >&2; exit 2 ;;
  esac
done
