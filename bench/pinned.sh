#!/usr/bin/env bash
# bench/pinned.sh: the server and the client each on cores of its own, as on two machines.
#
#   bench/pinned.sh prepare   # build this tree's bench binaries, and towerpc's from before
#                             # fragments (fe3ff0d), into bench/pinned-bin/ (needs git, cargo)
#   bench/pinned.sh run       # the cells below: result lines to $OUT/pinned.txt (OUT=/tmp),
#                             # tables to $OUT/pinned.md (pinned_table.py, where python3 is)
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
#             build against fe3ff0d (before fragments), two rounds.
#   one:      one caller, towerpc against the floor, three rounds.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${PINNED_BIN:-pinned-bin}

prepare() {
  cargo build --release --quiet --bin towerpc_server --bin towerpc_client --bin raw_server --bin raw_client
  mkdir -p "$BIN/head" "$BIN/old"
  cp target/release/{towerpc,raw}_{server,client} "$BIN/head/"
  # The old build does not change: built once.
  [ -x "$BIN/old/towerpc_client" ] && { du -sh "$BIN"; return; }
  local wt
  wt=$(mktemp -d)
  git worktree add --quiet --detach "$wt" fe3ff0d
  (cd "$wt/bench" && CARGO_TARGET_DIR="$wt/target" cargo build --release --quiet \
    --bin towerpc_server --bin towerpc_client)
  cp "$wt"/target/release/towerpc_{server,client} "$BIN/old/"
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
  WARMUP=${WARMUP:-1} DUR=${DUR:-4}
  RESULTS=${OUT:-/tmp}/pinned.txt
  {
    echo "# machine: $n cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
    echo "# date: $(date -u +%Y-%m-%dT%H:%MZ) warmup=$WARMUP dur=$DUR server=$lo client=$hi"
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
      cell server-cores "$BIN/head" "0-$((s - 1))" "$hi" "$sys" small 10000 --conns 8
    done
  done
  for ROUND in 1 2; do
    for build in head old; do
      cell "mixed-$build" "$BIN/$build" "$lo" "$hi" towerpc-raw small 1000 --big 0
      cell "mixed-$build" "$BIN/$build" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 204800
      cell "mixed-$build" "$BIN/$build" "$lo" "$hi" towerpc-raw small 1000 --big 10 --big-size 4194304
    done
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

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
