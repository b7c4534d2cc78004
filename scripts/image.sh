#!/usr/bin/env bash
# `make image`: stages thaw's container image into target/image/rootfs (the
# release binary with its debug info stripped, the shared libraries `ldd`
# finds for it and for ONNX Runtime, ONNX Runtime from the PyPI wheel, the
# text encoder, CA roots, a passwd naming the non-root user) and builds the
# Dockerfile (FROM scratch: see its header) as IMAGE (default thaw:<crate
# version>). Needs `make build models`; starts Docker if needed
# (scripts/ensure-docker.sh).
#
# Env: IMAGE, THAW_BIN (default target/release/thaw).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
image="${IMAGE:-thaw:$version}"
bin="${THAW_BIN:-${CARGO_TARGET_DIR:-target}/release/thaw}"
text="models/text"
die() { echo "image: $*" >&2; exit 1; }
[ -x "$bin" ] || die "no $bin: run \`make build\`"
[ -s "$text/text_encoder.onnx" ] && [ -s "$text/tokenizer.json" ] && [ -s "$text/ort_dylib_path" ] \
  || die "no text encoder in $text: run \`make models\`"
ort="$(cat "$text/ort_dylib_path")"
[ -f "$ort" ] || die "ONNX Runtime library $ort (from $text/ort_dylib_path) is missing: run \`make models\`"
./scripts/ensure-docker.sh

t0=$(date +%s%N)
ctx="${CARGO_TARGET_DIR:-target}/image"
rm -rf "$ctx"
fs="$ctx/rootfs"
mkdir -p "$fs/usr/local/bin" "$fs/opt/thaw/lib" "$fs/opt/thaw/models/text" "$fs/etc/ssl/certs" "$fs/tmp" "$fs/lib" "$fs/lib64"
objcopy --strip-debug "$bin" "$fs/usr/local/bin/thaw"
cp "$ort" "$fs/opt/thaw/lib/"
ln -s "$(basename "$ort")" "$fs/opt/thaw/lib/libonnxruntime.so"
cp "$text/text_encoder.onnx" "$text/tokenizer.json" "$fs/opt/thaw/models/text/"

# The shared libraries, at the paths the loader looks them up by (ldd's).
# A library ldd cannot resolve is an error here, not at the container's start.
for f in "$bin" "$ort"; do
  if ldd "$f" | grep -q 'not found'; then ldd "$f" >&2; die "$f has unresolved libraries"; fi
  ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r lib; do
  mkdir -p "$fs$(dirname "$lib")"
  cp -L "$lib" "$fs$lib"
done
interp="$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
[ -f "$fs$interp" ] || die "the program interpreter $interp was not staged"

cp -L /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/"
mkdir -p "$fs/usr/lib/ssl"
ln -s /etc/ssl/certs/ca-certificates.crt "$fs/usr/lib/ssl/cert.pem"
ln -s /etc/ssl/certs "$fs/usr/lib/ssl/certs"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$fs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$fs/etc/group"
printf 'hosts: files dns\npasswd: files\ngroup: files\n' > "$fs/etc/nsswitch.conf"
chmod 1777 "$fs/tmp"
staged=$(du -sm "$fs" | cut -f1)

# The classic builder: BuildKit needs the buildx plugin, which Debian's
# docker.io lacks; the Dockerfile needs nothing of BuildKit's.
DOCKER_BUILDKIT=0 docker build --quiet -f Dockerfile -t "$image" "$ctx" >"$ctx/build.log" 2>&1 \
  || { cat "$ctx/build.log" >&2; die "docker build failed"; }
t1=$(date +%s%N)
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "image: $image built in $(( (t1 - t0) / 1000000 )) ms; $(( size / 1048576 )) MiB (staged ${staged} MiB)"
