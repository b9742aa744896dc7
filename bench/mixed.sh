#!/usr/bin/env bash
# bench/mixed.sh: the mixed cell, this build against fe3ff0d (the build before fragments),
# paired and interleaved, both processes sharing every core as in `run`.
#
#   bench/pinned.sh prepare   # this tree's binaries and fe3ff0d's, into bench/pinned-bin/
#   bench/mixed.sh            # ROUNDS (3) rounds, about 40 s each on 2 cores: result lines to
#                             # $OUT/mixed.txt (OUT=/tmp), then a table on stdout
#
# Each round, for 10 callers of 200 KiB and then of 4 MiB beside 1,000 small callers (towerpc
# raw service, 1 s warm-up, 4 s window), runs fe3ff0d, this build, and this build with its small
# callers capped (`--rate`) at the small calls/s fe3ff0d made just before. Closed loop, the two
# builds split the CPU differently between small and big calls (fe3ff0d's big writes hold the
# small calls up); at equal small work they compare on the big calls alone.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${PINNED_BIN:-pinned-bin}
OUT=${OUT:-/tmp}
ROUNDS=${ROUNDS:-3}
RESULTS=$OUT/mixed.txt
[ -x "$BIN/old/towerpc_client" ] && [ -x "$BIN/head/towerpc_client" ] || {
  echo "no binaries in $BIN: run bench/pinned.sh prepare first" >&2
  exit 1
}
: >"$RESULTS"

# cell ROUND LABEL DIR SIZE RATE: one run; prints the small calls/s
cell() {
  local round=$1 label=$2 dir=$3 size=$4 rate=$5
  local addr=127.0.0.1:$((7100 + RANDOM % 800)) out spid extra=()
  # fe3ff0d's client predates `--rate`: passed only when there is a cap.
  [ "$rate" -gt 0 ] && extra=(--rate "$rate")
  "$dir/towerpc_server" "$addr" raw &
  spid=$!
  sleep 0.4
  out=$(timeout 60 "$dir/towerpc_client" --addr "$addr" --conc 1000 --payload small \
    --warmup 1 --dur 4 --server-pid "$spid" --label "$label" --big 10 --big-size "$size" \
    "${extra[@]}" 2>/dev/null || true)
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  echo "$out" | sed "s/^/round=$round size=$size build=$label /" >>"$RESULTS"
  echo "$out" | grep RESULT | grep -o ' cps=[0-9]*' | cut -d= -f2 || true
}

for round in $(seq "$ROUNDS"); do
  for size in 204800 4194304; do
    old=$(cell "$round" old "$BIN/old" "$size" 0)
    cell "$round" head "$BIN/head" "$size" 0 >/dev/null
    cell "$round" head-at-old-rate "$BIN/head" "$size" "${old:-0}" >/dev/null
  done
done

# The table: big MB/s and small calls/s per build, and this build's MB/s ÷ fe3ff0d's.
awk '
  / BIG / { for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            key = f["round"] " " f["size"]; mb[key, f["build"]] = f["mb_per_s"] }
  / RESULT / { for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
               key = f["round"] " " f["size"]; cps[key, f["build"]] = f["cps"]
               p99[key, f["build"]] = f["p99_us"]; if (!(key in seen)) { seen[key] = 1; order[n++] = key } }
  END {
    print "| round | big | fe3ff0d MB/s | small calls/s | this build MB/s | ÷ fe3ff0d | small calls/s | small p99 µs | at fe3ff0d'"'"'s small calls/s: MB/s | ÷ fe3ff0d |"
    print "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for (k = 0; k < n; k++) {
      key = order[k]; split(key, rs, " ")
      o = mb[key, "old"]; h = mb[key, "head"]; r = mb[key, "head-at-old-rate"]
      printf "| %s | %d KiB | %.1f | %d | %.1f | %.2f | %d | %d | %.1f | %.2f |\n", rs[1], rs[2] / 1024,
        o, cps[key, "old"], h, (o > 0 ? h / o : 0), cps[key, "head"], p99[key, "head"], r, (o > 0 ? r / o : 0)
    }
  }' "$RESULTS"
