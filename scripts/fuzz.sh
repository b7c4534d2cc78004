#!/usr/bin/env bash
# The decoder's coverage-guided fuzz target (tests/fuzz, libFuzzer through
# cargo-fuzz), run for FUZZ_SECONDS (default 60). Needs a nightly toolchain
# (rustup's `nightly`; cargo-fuzz's instrumentation flags are nightly-only)
# and installs cargo-fuzz from crates.io if it is missing. Prints the
# executions and crashes, and writes them to $FUZZ_REPORT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (rustup toolchain list); cargo-fuzz needs one" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io" >&2
    cargo install --locked cargo-fuzz
fi
corpus=target/fuzz-corpus/decode
mkdir -p "$corpus" target/fuzz-artifacts
# Seeds: the valid examples of each topic (first byte: the topic, second:
# no key).
n=0
for t in 0:items 1:item-relations 2:interactions; do
    while IFS= read -r line; do
        printf "\\x0${t%%:*}\\xff%s" "$line" > "$corpus/seed-$n"
        n=$((n + 1))
    done < "streams/examples/${t#*:}.valid.jsonl"
done
log=target/fuzz-decode.log
set +e
cargo +nightly fuzz run --fuzz-dir tests/fuzz --sanitizer none decode "$corpus" -- \
    -max_total_time="$seconds" -artifact_prefix=target/fuzz-artifacts/ -print_final_stats=1 2>&1 | tee "$log" | grep -E 'DONE|Done|ERROR|panicked|stat::number_of_executed_units' || true
rc=${PIPESTATUS[0]}
set -e
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
crashes=$(find target/fuzz-artifacts -name 'crash-*' -newer "$corpus/seed-0" | wc -l)
echo "fuzz: ${execs:-0} executions in ${seconds} s, ${crashes} crashes, exit ${rc}"
if [[ -n "${FUZZ_REPORT:-}" ]]; then
    printf '{"target": "decode", "seconds": %s, "executions": %s, "crashes": %s}\n' \
        "$seconds" "${execs:-0}" "$crashes" > "$FUZZ_REPORT"
fi
[[ $rc -eq 0 && $crashes -eq 0 ]]
