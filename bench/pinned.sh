#!/usr/bin/env bash
# bench/pinned.sh: the server and the client each on cores of its own, as on two machines.
#
#   bench/pinned.sh prepare   # build this tree's bench binaries, and towerpc's from before
#                             # fragments (fe3ff0d), into bench/pinned-bin/ (needs git, cargo)
#   bench/pinned.sh run       # the cells below: result lines to $OUT/pinned.txt (OUT=/tmp),
#                             # tables to $OUT/pinned.md (pinned_table.py, where python3 is)
#   bench/pinned.sh spin      # the reader spin on and off (see `spin` below): $OUT/spin.txt
#
# `run` needs only the binaries and taskset: the server is pinned to the first half of the
# machine's cores and the client to the second (one core each on two cores), and each runtime
# starts one worker per core it may use. `bench/run` leaves both processes free to share every
# core, as a user's test on one machine would; here neither takes CPU from the other, so the
# figures say what each side's own cores give (about 3 minutes on 2 cores). On a machine lent
# by the device tool: carry `bench/pinned-bin` and run `bash bench/pinned.sh run`; $OUT comes
# back.
#   scaling:  towerpc and the floor, small payload, 1,000 and 10,000 callers over 1, 4 and 8
#             connections (the client's `Builder::connections`; the floor's callers spread
#             over as many), then, where there are cores enough, the server on 2, 4 and 8
#             cores with 10,000 callers over 8 connections.
#   mixed:    1,000 small callers alone and beside 10 callers of 200 KiB and of 4 MiB, this
#             build against fe3ff0d (before fragments), and beside 10 downloading 4 MiB replies
#             (this build), three rounds; the small calls' quantiles (TAILS) with each.
#   one:      one caller, towerpc against the floor, three rounds.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${PINNED_BIN:-pinned-bin}

prepare() {
  cargo build --release --quiet --bin towerpc_server --bin towerpc_client --bin raw_server --bin raw_client
  mkdir -p "$BIN/head" "$BIN/old"
  cp target/release/{towerpc,raw}_{server,client} "$BIN/head/"
  # fe3ff0d's library under this tree's harness (`bench/` copied over that tree's; the feature
  # `before-spin` leaves out the spin settings it lacks): both builds run the same workload,
  # the big bytes sent up included. Its own target folder, so this tree's binaries stay.
  local wt old_target=$PWD/target/before-fragments
  wt=$(mktemp -d)
  git worktree add --quiet --detach "$wt" fe3ff0d
  rm -rf "$wt/bench"
  mkdir -p "$wt/bench"
  cp -r src proto Cargo.toml Cargo.lock build.rs "$wt/bench/"
  (cd "$wt/bench" && CARGO_TARGET_DIR="$old_target" cargo build --release --quiet \
    --features before-spin --bin towerpc_server --bin towerpc_client)
  cp "$old_target"/release/towerpc_{server,client} "$BIN/old/"
  git worktree remove --force "$wt"
  du -sh "$BIN"
}

# cell LABEL DIR SERVER_CPUS CLIENT_CPUS SYSTEM PAYLOAD CONC [CLIENT ARGS...]
cell() {
  local label=$1 dir=$2 scpu=$3 ccpu=$4 sys=$5 pl=$6 conc=$7
  shift 7
  local addr=127.0.0.1:$((7100 + RANDOM % 800)) srv cli
  case "$sys" in
    raw) srv=("$dir/raw_server" "$addr"); cli="$dir/raw_client" ;;
    towerpc) srv=("$dir/towerpc_server" "$addr" "$pl"); cli="$dir/towerpc_client" ;;
    towerpc-raw) srv=("$dir/towerpc_server" "$addr" raw); cli="$dir/towerpc_client" ;;
  esac
  taskset -c "$scpu" "${srv[@]}" &
  local spid=$!
  sleep 0.4
  timeout 60 taskset -c "$ccpu" "$cli" --addr "$addr" --conc "$conc" --payload "$pl" \
    --warmup "$WARMUP" --dur "$DUR" --server-pid "$spid" --label "$sys" "$@" 2>/dev/null \
    | sed "s/^/kind=$label round=$ROUND scpu=$scpu ccpu=$ccpu /" | tee -a "$RESULTS" || true
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
}

run() {
  local n half
  n=$(nproc)
  half=$((n / 2))
  local lo="0-$((half - 1))" hi="$half-$((n - 1))"
  # With SMT, split by physical core, so the two sides never share one (its sibling threads
  # may be numbered far apart).
  if command -v lscpu >/dev/null; then
    read -r lo hi < <(lscpu -p=CPU,CORE | awk -F, '!/^#/ { core[$1] = $2; if (!($2 in seen)) { seen[$2] = 1; cores[nc++] = $2 } }
      END { for (i = 0; i < nc; i++) half_of[cores[i]] = (i < nc / 2) ? 0 : 1
            for (c = 0; c in core; c++) list[half_of[core[c]]] = list[half_of[core[c]]] (list[half_of[core[c]]] == "" ? "" : ",") c
            print list[0], list[1] }')
  fi
  WARMUP=${WARMUP:-1} DUR=${DUR:-4}
  export TAILS=1
  RESULTS=${OUT:-/tmp}/pinned.txt
  {
    echo "# machine: $n cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
    echo "# date: $(date -u +%Y-%m-%dT%H:%MZ) warmup=$WARMUP dur=$DUR server=$lo client=$hi"
    echo "# topology (CPU,CORE,SOCKET): $(lscpu -p=CPU,CORE,SOCKET 2>/dev/null | grep -v '^#' | tr '\n' ' ')"
  } > "$RESULTS"
  ROUND=1
  for conc in 1000 10000; do
    for k in 1 4 8; do
      for sys in raw towerpc; do
        cell scaling "$BIN/head" "$lo" "$hi" "$sys" small "$conc" --conns "$k"
      done
    done
  done
  for s in 2 4 8; do
    [ "$s" -le "$half" ] || continue
    for sys in raw towerpc; do
      cell server-cores "$BIN/head" "$(echo "$lo" | cut -d, -f1-"$s")" "$hi" "$sys" small 10000 --conns 8
    done
  done
  for ROUND in 1 2 3; do
    for build in head old; do
      cell "mixed-$build" "$BIN/$build" "$lo" "$hi" towerpc-raw small 1000 --big 0
      cell "mixed-$build" "$BIN/$build" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 204800
      cell "mixed-$build" "$BIN/$build" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 4194304
    done
    # Downloads (fe3ff0d's client has no --big-dir): this build only.
    cell mixed-head "$BIN/head" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 4194304 --big-dir down
  done
  for ROUND in 1 2 3; do
    for sys in raw towerpc; do
      cell one "$BIN/head" "$lo" "$hi" "$sys" small 1
    done
  done
  if command -v python3 >/dev/null; then
    python3 pinned_table.py "$RESULTS" > "${RESULTS%.txt}.md"
  fi
}

# threads PID: each of the process's threads' CPU ticks (utime + stime) over the next second,
# the busiest first: how many threads a cell keeps busy.
threads() {
  local pid=$1 t a b
  declare -A before
  for t in /proc/"$pid"/task/*; do
    before[$t]=$(awk '{ print $14 + $15 }' "$t/stat" 2>/dev/null)
  done
  sleep 1
  for t in "${!before[@]}"; do
    b=$(awk '{ print $14 + $15 }' "$t/stat" 2>/dev/null) || continue
    a=${before[$t]}
    echo $((b - a))
  done | sort -rn | tr '\n' ' '
}

# spin: the reader spin on many cores. One caller, 10, 100 and 1,000 (one connection), the
# floor against towerpc with its spin (client `reply_spin`, server `read_spin`) on (the
# default), off on both sides (SPIN_US=0), and on with two worker threads a side
# (TOKIO_WORKER_THREADS=2); three rounds (two for 10 and 1,000). For one caller, each process's busiest threads'
# CPU ticks over a second of the window (THREADS lines). Then the mixed 4 MiB cell at equal
# small work: fe3ff0d, this build, and this build capped (`--rate`) at fe3ff0d's small
# calls/s, two rounds.
spin() {
  local n half
  n=$(nproc)
  half=$((n / 2))
  local lo="0-$((half - 1))" hi="$half-$((n - 1))"
  WARMUP=${WARMUP:-1} DUR=${DUR:-4}
  RESULTS=${OUT:-/tmp}/spin.txt
  {
    echo "# machine: $n cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
    echo "# date: $(date -u +%Y-%m-%dT%H:%MZ) warmup=$WARMUP dur=$DUR server=$lo client=$hi"
  } > "$RESULTS"
  local conc variant
  for ROUND in 1 2 3; do
    for conc in 1 10 100 1000; do
      [ "$ROUND" = 3 ] && [ "$conc" != 1 ] && [ "$conc" != 100 ] && continue
      cell spin-floor "$BIN/head" "$lo" "$hi" raw small "$conc"
      for variant in default off two-workers; do
        case $variant in
          default) unset SPIN_US TOKIO_WORKER_THREADS ;;
          off) export SPIN_US=0; unset TOKIO_WORKER_THREADS ;;
          two-workers) unset SPIN_US; export TOKIO_WORKER_THREADS=2 ;;
        esac
        if [ "$conc" = 1 ] && [ "$ROUND" = 1 ]; then
          (sleep $((${WARMUP%.*} + 1)); for p in $(pgrep -f "^$BIN/head/towerpc_(server|client)"); do
            echo "THREADS variant=$variant pid=$p $(tr '\0' ' ' < /proc/"$p"/cmdline | cut -c1-40): $(threads "$p")" >> "$RESULTS" &
          done; wait) &
        fi
        cell "spin-$variant" "$BIN/head" "$lo" "$hi" towerpc small "$conc"
        wait
      done
      unset SPIN_US TOKIO_WORKER_THREADS
    done
  done
  local old
  for ROUND in 1 2; do
    old=$(cell rate-old "$BIN/old" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 4194304 \
      | grep RESULT | grep -o ' cps=[0-9]*' | cut -d= -f2)
    cell rate-head "$BIN/head" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 4194304 >/dev/null
    cell rate-head-at-old "$BIN/head" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 4194304 \
      --rate "${old:-0}" >/dev/null
  done
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  spin) spin ;;
  *) echo "usage: $0 prepare|run|spin" >&2; exit 2 ;;
esac
