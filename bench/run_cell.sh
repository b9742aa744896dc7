#!/usr/bin/env bash
# run_cell.sh SYSTEM PAYLOAD CONC [WARMUP] [DUR] [EXTRA CLIENT ARGS...]
#   SYSTEM:  raw | towerpc | towerpc-raw | towerpc-zstd | tarpc | tonic | gorpc | gorpc-nocomp
#   PAYLOAD: small | 1k | 1k-random ; CONC: callers sharing one connection.
# Starts a fresh server on a random loopback port, runs the client, stops the server by its PID,
# and prints the client's RESULT line (and BIG line for the mixed workload).
#   raw:          the hand-written tokio floor (raw_server + raw_client)
#   towerpc:      towerpc_server ADDR PAYLOAD (Dispatcher, route "echo" typed for the payload)
#   towerpc-raw:  towerpc_server ADDR raw (tower::service_fn echoing the body bytes)
#   towerpc-zstd: towerpc with zstd stream compression offered by the client
#   gorpc[-nocomp]: gorpcecho (built from gorpc/ where Go is installed, see README.md),
#                 GOMAXPROCS=2; -nocomp = DisableCompression=true
set -u
sys=$1; pl=$2; c=$3; wu=${4:-2}; du=${5:-8}
shift $(( $# < 5 ? $# : 5 ))
extra=("$@")
B=${TARGET_DIR:-$(dirname "$0")/target}/release
addr=127.0.0.1:$((7100 + RANDOM % 800))
copt=()
srvpl=$pl
[ "$pl" = 1k-random ] && srvpl=1k
case "$sys" in
  towerpc)      srv=("$B/towerpc_server" "$addr" "$srvpl"); cli=("$B/towerpc_client") ;;
  towerpc-raw)  srv=("$B/towerpc_server" "$addr" raw);   cli=("$B/towerpc_client") ;;
  towerpc-zstd) srv=("$B/towerpc_server" "$addr" "$srvpl"); cli=("$B/towerpc_client"); copt=(--compression zstd) ;;
  gorpc)        srv=("$B/gorpcecho" -mode server -addr "$addr"); cli=("$B/gorpcecho" -mode client) ;;
  gorpc-nocomp) srv=("$B/gorpcecho" -mode server -addr "$addr"); cli=("$B/gorpcecho" -mode client); copt=(-nocompress) ;;
  *)            srv=("$B/${sys}_server" "$addr");         cli=("$B/${sys}_client") ;;
esac
if [ ! -x "${srv[0]}" ]; then
  echo "SKIP $sys: ${srv[0]} is not built" >&2
  exit 0
fi
# The host's steal over the cell (/proc/stat: time the hypervisor gave this machine's CPUs to
# others), appended to the RESULT line: a cell the host starved says little about the systems.
cpu_times() { awk '/^cpu /{ t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t; exit }' /proc/stat; }
read -r steal0 total0 < <(cpu_times)
steal_pct() {
  local steal1 total1
  read -r steal1 total1 < <(cpu_times)
  awk -v s=$((steal1 - steal0)) -v t=$((total1 - total0)) 'BEGIN { printf "%.1f", (t > 0 ? 100 * s / t : 0) }'
}
case "$sys" in
  gorpc*)
    [ "$pl" = 1k-random ] && { copt+=(-random); pl=1k; }
    export GOMAXPROCS=2
    "${srv[@]}" & spid=$!
    sleep 0.4
    out=$(timeout 120 "${cli[@]}" -addr "$addr" -conc "$c" -payload "$pl" -warmup "$wu" -dur "$du" -server-pid "$spid" -label "$sys" "${copt[@]}")
    ;;
  *)
    "${srv[@]}" & spid=$!
    sleep 0.4
    out=$(timeout 120 "${cli[@]}" --addr "$addr" --conc "$c" --payload "$pl" --warmup "$wu" --dur "$du" --server-pid "$spid" --label "$sys" "${copt[@]}" "${extra[@]}")
    ;;
esac
st=$(steal_pct)
echo "$out" | sed "/RESULT/s/\$/ steal_pct=$st/"
kill "$spid"; wait "$spid" 2>/dev/null
exit 0
