#!/usr/bin/env bash
# bench/mixed.sh: the mixed cell, this build against fe3ff0d (the build before fragments),
# paired and interleaved, both processes sharing every core as in `run`.
#
#   bench/pinned.sh prepare   # this tree's binaries and fe3ff0d's, into bench/pinned-bin/
#   bench/mixed.sh            # ROUNDS (3) rounds, about 90 s each on 2 cores: result lines to
#                             # $OUT/mixed.txt (OUT=/tmp), then a table on stdout
#
# Each round runs the 1,000 small callers alone on both builds, then, for 10 callers of 200 KiB
# and then of 4 MiB beside them (towerpc raw service, 1 s warm-up, 4 s window), in each of DIRS
# (`echo up`: echoes, and requests sent up for a one-byte reply, the workload issue 11 names),
# fe3ff0d, this build, and this build with its small callers capped (`--rate`) at the small
# calls/s fe3ff0d made just before. Closed loop, the two builds split the CPU differently
# between small and big calls (fe3ff0d's big writes hold the small calls up); at equal small
# work they compare on the big calls alone. Both builds run this tree's harness.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${PINNED_BIN:-pinned-bin}
OUT=${OUT:-/tmp}
ROUNDS=${ROUNDS:-3}
DIRS=${DIRS:-echo up}
RESULTS=$OUT/mixed.txt
[ -x "$BIN/old/towerpc_client" ] && [ -x "$BIN/head/towerpc_client" ] || {
  echo "no binaries in $BIN: run bench/pinned.sh prepare first" >&2
  exit 1
}
: >"$RESULTS"

# cell ROUND LABEL BINDIR SIZE WAY RATE: one run (SIZE 0: the small callers alone; WAY: echo,
# up or down); prints the small calls/s
cell() {
  local round=$1 label=$2 dir=$3 size=$4 way=$5 rate=$6
  local addr=127.0.0.1:$((7100 + RANDOM % 800)) out spid extra=()
  [ "$size" -gt 0 ] && extra=(--big 10 --big-size "$size" --big-dir "$way")
  [ "$rate" -gt 0 ] && extra+=(--rate "$rate")
  "$dir/towerpc_server" "$addr" raw &
  spid=$!
  sleep 0.4
  out=$(timeout 60 "$dir/towerpc_client" --addr "$addr" --conc 1000 --payload small \
    --warmup 1 --dur 4 --server-pid "$spid" --label "$label" "${extra[@]}" 2>/dev/null || true)
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  echo "$out" | sed "s/^/round=$round size=$size way=$way build=$label /" >>"$RESULTS"
  echo "$out" | grep RESULT | grep -o ' cps=[0-9]*' | cut -d= -f2 || true
}

for round in $(seq "$ROUNDS"); do
  cell "$round" old "$BIN/old" 0 none 0 >/dev/null
  cell "$round" head "$BIN/head" 0 none 0 >/dev/null
  for way in $DIRS; do
    for size in 204800 4194304; do
      old=$(cell "$round" old "$BIN/old" "$size" "$way" 0)
      cell "$round" head "$BIN/head" "$size" "$way" 0 >/dev/null
      cell "$round" head-at-old-rate "$BIN/head" "$size" "$way" "${old:-0}" >/dev/null
    done
  done
done

# The table: per round and cell, each build's big MB/s, small calls/s and small p99 ÷ its p99
# alone in that round, and this build's MB/s ÷ fe3ff0d's (closed loop, and at equal small work).
awk '
  { delete f; for (i = 1; i <= NF; i++) if (split($i, kv, "=") == 2) f[kv[1]] = kv[2] }
  / BIG / { key = f["round"] " " f["size"] " " f["way"]; mb[key, f["build"]] = f["mb_per_s"] }
  / RESULT / {
    key = f["round"] " " f["size"] " " f["way"]
    cps[key, f["build"]] = f["cps"]; p99[key, f["build"]] = f["p99_us"]
    if (f["size"] == 0) alone[f["round"], f["build"]] = f["p99_us"]
    else if (!(key in seen)) { seen[key] = 1; order[n++] = key }
  }
  END {
    print "| round | big | fe3ff0d MB/s | small calls/s | p99 ÷ alone | this build MB/s | ÷ fe3ff0d | small calls/s | p99 ÷ alone | at fe3ff0d'"'"'s small calls/s: MB/s | ÷ fe3ff0d |"
    print "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for (k = 0; k < n; k++) {
      key = order[k]; split(key, rs, " "); r = rs[1]
      o = mb[key, "old"]; h = mb[key, "head"]; q = mb[key, "head-at-old-rate"]
      oa = alone[r, "old"]; ha = alone[r, "head"]
      printf "| %s | %d KiB %s | %.1f | %d | %.2f | %.1f | %.2f | %d | %.2f | %.1f | %.2f |\n", r, rs[2] / 1024, rs[3],
        o, cps[key, "old"], (oa > 0 ? p99[key, "old"] / oa : 0), h, (o > 0 ? h / o : 0),
        cps[key, "head"], (ha > 0 ? p99[key, "head"] / ha : 0), q, (o > 0 ? q / o : 0)
    }
  }' "$RESULTS"
