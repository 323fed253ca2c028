#!/usr/bin/env bash
# `make profile ONLY=<scenario>`: runs one `relay-bench` scenario and records
# the relay under load with `perf`. Prints where the relay's CPU goes, by
# thread and by function, into target/bench/profile-<scenario>.txt, and a
# flamegraph (target/bench/profile-<scenario>.svg) when inferno is installed
# (`cargo install inferno`).
#
#   PROFILE_RELAY=N     profile the N-th relay the scenario starts (default 1;
#                       `query` starts the plain relay first, then the one with
#                       the MLS gateway, so PROFILE_RELAY=2 profiles that one)
#   PROFILE_SECONDS=S   how long to record (default 5)
set -euo pipefail

scenario=${1:-ingest}
nth=${PROFILE_RELAY:-1}
seconds=${PROFILE_SECONDS:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/bench/profile-$scenario"
mkdir -p "$root/target/bench"
command -v perf >/dev/null || { echo "error: perf is not installed (linux-tools / linux-perf)"; exit 1; }

"$root/target/release/relay-bench" "$scenario" >"$out.bench.log" 2>&1 &
bench=$!
# The scenario's relays and clients are its children; a killed relay-bench
# cannot drop them, so they are ended first.
stop_bench() {
    pkill -P "$bench" 2>/dev/null || true
    kill "$bench" 2>/dev/null || true
}
trap stop_bench EXIT

# The scenario's relays are children of relay-bench; wait for the N-th.
seen=()
pid=""
for _ in $(seq 1 3000); do
    for p in $(pgrep -P "$bench" -f wasm-relay || true); do
        [[ " ${seen[*]} " == *" $p "* ]] || seen+=("$p")
    done
    if [ "${#seen[@]}" -ge "$nth" ]; then pid=${seen[$((nth - 1))]}; break; fi
    kill -0 "$bench" 2>/dev/null || break
    sleep 0.1
done
[ -n "$pid" ] || { echo "error: relay $nth of scenario '$scenario' never started"; cat "$out.bench.log"; exit 1; }

# Let the load ramp up, then record.
sleep 2
# --no-inline: resolving inlined frames runs addr2line, which can stall for
# minutes on a release binary with debug info.
report=--no-inline
perf record -q -F 499 --call-graph dwarf,16384 -o "$out.perf.data" -p "$pid" -- sleep "$seconds" 2>/dev/null
# `head` closes the reports' pipes early; that is not a failure.
set +o pipefail
{
    echo "# relay $nth of 'relay-bench $scenario', ${seconds}s, pid $pid"
    echo "## CPU by thread"
    perf report -i "$out.perf.data" $report --no-children -g none --sort comm --stdio 2>/dev/null | grep -E '^ +[0-9]'
    echo "## hottest functions (self time)"
    perf report -i "$out.perf.data" $report --no-children -g none --sort comm,symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9]' | head -40 | cut -c1-150
    echo "## inclusive time (with callees)"
    perf report -i "$out.perf.data" $report --children --sort symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9]' | grep -v inlined | head -60 | cut -c1-150
} >"$out.txt"
if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
    perf script -i "$out.perf.data" $report 2>/dev/null | inferno-collapse-perf | inferno-flamegraph >"$out.svg"
    echo "flamegraph: $out.svg"
fi
# The recording is all this needs; the scenario's own figures are not.
stop_bench
wait "$bench" 2>/dev/null || true
trap - EXIT
sed -n '1,30p' "$out.txt"
echo "profile: $out.txt (perf data: $out.perf.data)"
