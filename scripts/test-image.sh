#!/usr/bin/env bash
# `make image-test`: thaw's container image, run the way the Helm chart runs
# it, against a real Kafka-protocol broker and the real Redis.
#
#   1. the image runs as 65532:65532 and holds no trained model;
#   2. `thaw train` in the container (its ONNX Runtime and text encoder), a
#      short run (a few steps: the mechanics, not the quality) writing a
#      model into a host folder;
#   3. `thaw broker` in the container: the embedded broker on a host port;
#   4. `thaw serve` in the container as the chart's Deployment starts it:
#      read-only root, /tmp a tmpfs, thaw.toml rendered by the chart
#      (helm/thaw, the ConfigMap) mounted at /etc/thaw/config, the Redis URL
#      in THAW__REDIS__URL (the chart's Secret reference), the model
#      mounted read-only at /opt/thaw/models/mpkg;
#   5. `thaw replay` in the container: MovieLens-100K with the cold-start
#      split into the broker;
#   then: every item of the dataset has an embedding in Redis, users have
#   lists, thaw:model names the model's version, /readyz is 200, /metrics
#   shows the CPU execution provider, applied events and no dead letters, and SIGTERM
#   (`docker stop`) drains and exits 0 with the offsets committed.
#
# Fails, saying what to run, when a prerequisite is missing (Docker, the
# dataset, the split, Redis). Env: IMAGE (default thaw:<version>), REDIS_URL
# (default redis://127.0.0.1:6379; host networking, so 127.0.0.1 is the
# host's), DATA (data/ml-100k), SPLIT (../shared/eval/ml100k-coldstart).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
image="${IMAGE:-thaw:$version}"
redis_url="${REDIS_URL:-redis://127.0.0.1:6379}"
data="$(realpath -m "${DATA:-data/ml-100k}")"
split="$(realpath -m "${SPLIT:-../shared/eval/ml100k-coldstart}")"
die() { echo "image-test: FAIL: $*" >&2; exit 1; }
t_start=$(date +%s)

[ -s "$data/ml-100k.inter" ] || die "no dataset at $data: run \`make data\`"
[ -s "$split/meta_training.txt" ] || die "no split at $split: it sits in ../shared/eval beside the checkout (or run \`make split\` and set SPLIT=splits/ml100k)"
[ -x .venv/bin/python ] && .venv/bin/python -c 'import helm_python' 2>/dev/null \
  || die "no helm-python-sdk in .venv: run \`make helm-check\` first"
./scripts/ensure-docker.sh || die "no Docker daemon: see above (scripts/ensure-docker.sh)"
docker image inspect "$image" >/dev/null 2>&1 || die "no image $image: run \`make image\`"
./scripts/ensure-redis.sh || die "no Redis at $redis_url: run \`make redis\`"

tag="thaw-image-test-$$"
work="$(mktemp -d /tmp/$tag.XXXX)"
containers=()
cleanup() {
  local rc=$?
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  # The test's keys only (its own prefix).
  redis-cli -u "$redis_url" --scan --pattern "$tag:*" 2>/dev/null | xargs -r -n 500 redis-cli -u "$redis_url" del >/dev/null 2>&1 || true
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker_port=$(free_port)
http_port=$(free_port)
brokers="127.0.0.1:$broker_port"

# 1. The image: non-root, no model inside.
user="$(docker image inspect -f '{{.Config.User}}' "$image")"
[ "$user" = "65532:65532" ] || die "image user is '$user', expected 65532:65532"
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "image-test: $image, user $user, $(( size / 1048576 )) MiB"
docker run --rm --network none "$image" --version >/dev/null \
  || die "the image does not run thaw"

# 2. A model, trained in the container (short: the mechanics, not the quality).
mkdir -p "$work/model" "$work/config"
chmod 777 "$work/model"
t0=$(date +%s)
docker run --rm --network none --read-only --tmpfs /tmp \
  -v "$data:/data/ml-100k:ro" -v "$split:/split:ro" -v "$work/model:/out" "$image" \
  train --dataset /data/ml-100k --split /split --out /out --text-model /opt/thaw/models/text \
  --pretrain-steps 2 --finetune-steps 2 --meta-iterations 1 --kg-relations 0 >"$work/train.log" 2>&1 \
  || { tail -n 30 "$work/train.log" >&2; die "thaw train in the container failed"; }
[ -s "$work/model/model.json" ] || die "thaw train wrote no model.json"
model_version="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$work/model/model.json")"
echo "image-test: model $model_version trained in the container in $(( $(date +%s) - t0 )) s"

# 3. The broker.
broker="$tag-broker"
docker run -d --name "$broker" --network host "$image" broker --listen "$brokers" >/dev/null
containers+=("$broker")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null && break; sleep 0.1; done
(exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null || { docker logs "$broker" >&2; die "the broker does not listen on $brokers"; }

# 4. The engine, configured by the chart.
.venv/bin/python - "$work/config/thaw.toml" "$brokers" "$tag" "$http_port" <<'EOF'
import sys, yaml, helm_python
out, brokers, tag, port = sys.argv[1:]
chart = helm_python.Chart.load("helm/thaw")
values = {
    "config": {
        "kafka": {"brokers": brokers, "group_id": tag},
        "redis": {"prefix": tag},
        "ingest": {"idle_ms": 500},
        "users": {"top_k": 20},
    },
    "redis": {"existingSecret": {"name": "thaw-redis", "key": "url"}},
    "service": {"port": int(port)},
}
chart.validate_schema(values)
cm = yaml.safe_load(chart.render(values, name="thaw", namespace="thaw")["thaw/templates/configmap.yaml"])
open(out, "w").write(cm["data"]["thaw.toml"])
EOF
chmod 644 "$work/config/thaw.toml"
engine="$tag-engine"
docker run -d --name "$engine" --network host --read-only --tmpfs /tmp \
  --tmpfs /var/lib/thaw/snapshots:mode=1777 \
  -e THAW__REDIS__URL="$redis_url" \
  -v "$work/config:/etc/thaw/config:ro" -v "$work/model:/opt/thaw/models/mpkg:ro" \
  "$image" serve --config /etc/thaw/config/thaw.toml >/dev/null
containers+=("$engine")
http="http://127.0.0.1:$http_port"
for _ in $(seq 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$http/readyz")" = 200 ] && break
  [ "$(docker inspect -f '{{.State.Running}}' "$engine")" = true ] || break
  sleep 0.2
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$http/readyz")" = 200 ] \
  || { docker logs "$engine" 2>&1 | tail -n 30 >&2; die "the engine is not ready at $http/readyz"; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "$http/healthz")" = 200 ] || die "/healthz is not 200"

# 5. The replay.
t0=$(date +%s)
docker run --rm --network host -v "$data:/data/ml-100k:ro" -v "$split:/split:ro" \
  -v "$work/model:/opt/thaw/models/mpkg:ro" "$image" \
  replay --dataset /data/ml-100k --split /split --brokers "$brokers" --model-dir /opt/thaw/models/mpkg \
  >"$work/replay.log" 2>&1 || { cat "$work/replay.log" >&2; die "thaw replay in the container failed"; }
events=$(grep -oE '[0-9]+ events' "$work/replay.log" | head -1 | cut -d' ' -f1 || true)

# Wait until the engine counted every replayed event, every item has an
# embedding, every user of the stream a list, and no partition lags.
items_in_data=$(($(wc -l < "$data/ml-100k.item") - 1))
users_in_split=$(cat "$split/meta_training.txt" "$split"/*_support.txt | awk '{print $1}' | sort -u | wc -l)
[ -n "$events" ] || { cat "$work/replay.log" >&2; die "thaw replay did not say how many events it sent"; }
# The sum of the samples of a family whose line matches an extended regex.
metric() { curl -s "$http/metrics" | { grep -E "^$1" || true; } | awk '{s += $NF} END {printf "%d", s}'; }
count() { redis-cli -u "$redis_url" --scan --pattern "$1" | wc -l; }
# Data keys are under the version the marker names: `$tag:model` `root`.
root() { redis-cli -u "$redis_url" hget "$tag:model" root; }
for _ in $(seq 600); do
  counted=$(metric 'thaw_ingest_events_total[{]')
  r=$(root)
  n_items=0 n_recs=0
  if [ -n "$r" ]; then
    n_items=$(count "$r:item:*")
    n_recs=$(count "$r:recs:*")
  fi
  lag=$(metric 'thaw_ingest_consumer_lag_messages[{]')
  [ "$counted" -ge "$events" ] && [ "$n_items" -ge "$items_in_data" ] && [ "$n_recs" -ge "$users_in_split" ] && [ "$lag" = 0 ] && break
  [ "$(docker inspect -f '{{.State.Running}}' "$engine")" = true ] || { docker logs "$engine" 2>&1 | tail -n 30 >&2; die "the engine stopped"; }
  sleep 0.5
done
elapsed=$(( $(date +%s) - t0 ))
curl -s "$http/metrics" > "$work/metrics.txt"
served="$(redis-cli -u "$redis_url" hget "$tag:model" version)"
applied=$(metric 'thaw_ingest_events_total[{][^}]*outcome="applied"')
dead=$(metric 'thaw_ingest_dead_letters_total[{ ]')
text_rows=$(metric 'thaw_infer_batch_rows_sum[{]model="text_encoder"')
echo "image-test: replay and engine done in ${elapsed} s: $counted of $events events counted ($applied applied), $n_items of $items_in_data items embedded, $n_recs of $users_in_split users with a list, $text_rows texts encoded, model '$served'"

[ "$counted" = "$events" ] || die "the engine counted $counted events, the replay sent $events"
[ "$n_recs" = "$users_in_split" ] || die "$n_recs lists in Redis, $users_in_split users in the stream"
[ "$n_items" -ge "$items_in_data" ] || die "$n_items of $items_in_data items have an embedding in Redis"
emb_len=$(redis-cli -u "$redis_url" --no-raw hstrlen "$(redis-cli -u "$redis_url" --scan --pattern "$(root):item:*" | head -1)" emb | tr -dc 0-9)
[ "${emb_len:-0}" -gt 0 ] || die "an item's emb is empty"
[ "$served" = "$model_version" ] || die "thaw:model is '$served', expected the trained model's '$model_version'"
grep -qE '^thaw_infer_provider_info[{]provider="CPUExecutionProvider"[}] 1$' "$work/metrics.txt" \
  || { grep -E '^thaw_infer' "$work/metrics.txt" >&2; die "/metrics does not show ONNX Runtime's CPU provider"; }
[ "$applied" -gt 0 ] || die "no events applied"
[ "$text_rows" -ge "$items_in_data" ] || die "the text encoder embedded $text_rows titles, fewer than $items_in_data items"
[ "$dead" = 0 ] || die "$dead messages dead-lettered"

# SIGTERM: drain, publish, commit, exit 0.
t0=$(date +%s)
docker stop -t 60 "$engine" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$engine")
docker logs "$engine" >"$work/engine.log" 2>&1
[ "$code" = 0 ] || { tail -n 20 "$work/engine.log" >&2; die "the engine exited $code on SIGTERM"; }
grep -q 'offsets committed\|offsets already committed' "$work/engine.log" \
  || { tail -n 20 "$work/engine.log" >&2; die "no commit logged on SIGTERM"; }
grep -q 'snapshot written' "$work/engine.log" && ! grep -q 'snapshot failed\|snapshot folder cannot' "$work/engine.log" \
  || { grep -i snapshot "$work/engine.log" | tail -n 5 >&2; die "no snapshot written into the chart's snapshot folder"; }
echo "image-test: SIGTERM drained, committed and snapshotted in $(( $(date +%s) - t0 )) s"
echo "image-test: ok in $(( $(date +%s) - t_start )) s"
