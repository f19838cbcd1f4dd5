#!/usr/bin/env bash
# cpu_per_order.sh BIN LOADGEN OUTDIR [perf]: where the CPU goes at max (branch orders4).
#
# Starts BIN serve + 4 BIN store agents (data under OUTDIR, deleted first), runs LOADGEN
# (target/release/examples/orders_load) closed loop, 2 x 8 connections, N orders (default
# 20,000), and reads /proc in a steady window (0.6 s to 2.6 s after the load started): CPU
# per acknowledged order (acks counted from serve's /metrics) of serve, of its threads, of the
# agents (together) and of the generator, and how busy the whole machine was. Prints one
# JSON line. "run_orders_s" is the generator's own orders/s over the whole run (as run.sh).
#
# Optional, in that window: `perf` as 4th argument records serve (PERF_SCOPE=-a: the
# machine; PERF_AGENTS=1: the agents too; PERF_F Hz), PSTAT=1 counts events per thread
# (PSTAT_EV, default syscalls and context switches), STRACE=COMM strace -c's those threads.
# Diagnostics: SERVE_ENV / AGENT_ENV (environment), AGENT_DATA=DIR (agents' journals
# elsewhere, e.g. /dev/shm), BROKER_SHM=1 / ORDERS_SHM=1 (serve's broker or order store on
# /dev/shm), RENICE=COMM [NICEV=-5] (renice serve's threads of that name; needs root).
# A scratch tool: one window of 2 s is noisy; alternate builds, several rounds.
set -euo pipefail
BIN=$1; LOADGEN=$2; OUT=$3; PERF=${4:-}; N=${N:-20000}
PY=${PY:-python3}
rm -rf "$OUT"; mkdir -p "$OUT"
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mport=$(free_port); hport=$(free_port)
if [ -n "${BROKER_SHM:-}" ]; then mkdir -p "$OUT/serve" /dev/shm/o4b; rm -rf /dev/shm/o4b/*; ln -s /dev/shm/o4b "$OUT/serve/broker"; fi
if [ -n "${ORDERS_SHM:-}" ]; then mkdir -p "$OUT/serve" /dev/shm/o4o; rm -rf /dev/shm/o4o/*; ln -s /dev/shm/o4o/orders.db "$OUT/serve/orders.db"; fi
env RUST_LOG=warn ${SERVE_ENV:-} timeout 300 "$BIN" serve --http 127.0.0.1:$hport --mqtt 127.0.0.1:$mport --data-dir "$OUT/serve" > "$OUT/serve.log" 2>&1 &
TS=$!
for i in $(seq 1 100); do curl -fs -o /dev/null http://127.0.0.1:$hport/healthz && break; sleep 0.1; done
SERVE=$(pgrep -P $TS)
APIDS=()
for s in 0 1 2 3; do
  env RUST_LOG=warn ${AGENT_ENV:-} timeout 300 "$BIN" store --store-id store-$s --broker mqtt://127.0.0.1:$mport --data-dir "${AGENT_DATA:-$OUT}/store-$s" > "$OUT/store-$s.out" 2> "$OUT/store-$s.err" &
  APIDS+=($!)
done
sleep 1
if [ -n "${RENICE:-}" ]; then for t in /proc/$SERVE/task/*; do [ "$(cat $t/comm)" = "$RENICE" ] && renice -n ${NICEV:--5} -p ${t##*/} >/dev/null; done; fi
AG=(); for p in "${APIDS[@]}"; do AG+=($(pgrep -P $p)); done
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
acked() { curl -fs http://127.0.0.1:$hport/metrics | awk '$1=="qosmos_orders_acks_recorded_total"{print $2}'; }
snap() { # file
  { echo "acked $(acked)"; echo "wall $(date +%s%N)"; echo "serve $(cpu $SERVE)"; for a in "${AG[@]}"; do echo "agent $(cpu $a)"; done
    echo "gen $(cpu $GEN)"
    echo "sys $(awk '/^cpu /{print $2+$3+$4+$6+$7+$8, $5}' /proc/stat | tr ' ' _)"
    for t in /proc/$SERVE/task/*; do echo "t:$(cat $t/comm|tr ' ' _) $(awk '{print $14+$15}' $t/stat)"; done; } > "$1"
}
"$LOADGEN" --url http://127.0.0.1:$hport --orders $N --stores 4 --rate 0 --conns ${CONNS:-8} --procs 2 --timeout 120 --store-out "$OUT/store-*.out" --label m > "$OUT/res.json" 2> "$OUT/load.log" &
GEN=$!
sleep 0.6
snap "$OUT/before"
if [ -n "${STRACE:-}" ]; then for t in /proc/$SERVE/task/*; do c=$(cat $t/comm); case "$c" in $STRACE) echo "-p ${t##*/}";; esac; done > "$OUT/tids"; timeout -s INT 2 strace -c -S calls $(cat "$OUT/tids") -o "$OUT/strace.txt" >/dev/null 2>&1 || true; elif [ -n "${PSTAT:-}" ]; then perf stat -e ${PSTAT_EV:-raw_syscalls:sys_enter,context-switches} --per-thread -p $SERVE,$(IFS=,; echo "${AG[*]}") -o "$OUT/pstat.txt" -- sleep 2 >/dev/null 2>&1; elif [ -n "$PERF" ]; then perf record -F ${PERF_F:-1999} -g ${PERF_SCOPE:--p $SERVE} ${PERF_AGENTS:+-p $(IFS=,; echo "${AG[*]}")} -o "$OUT/perf.data" -- sleep 2 2>"$OUT/perf.err" >/dev/null; else sleep 2; fi
snap "$OUT/after"
wait $GEN || true
kill -TERM $SERVE "${AG[@]}" 2>/dev/null || true
wait 2>/dev/null || true
$PY - "$OUT" <<'PY'
import sys, json, collections
out = sys.argv[1]
def rd(f):
    d = collections.defaultdict(int); s = None
    for l in open(f):
        k, v = l.split()
        if k == "sys": s = [int(x) for x in v.split("_")]; continue
        d[k] += int(v)
    return d, s
(b, bs), (a, as_) = rd(out+"/before"), rd(out+"/after")
n = a["acked"] - b["acked"]; secs = (a["wall"] - b["wall"]) / 1e9
us = lambda k: round((a[k]-b[k]) / 100 / n * 1e6)
busy = (as_[0]-bs[0]); idle = (as_[1]-bs[1])
r = json.loads(open(out+"/res.json").read().strip().splitlines()[-1])
res = {"window_ord_s": round(n/secs), "run_orders_s": r.get("orders_per_sec"), "lost": r.get("lost"), "dup": r.get("dup"),
       "serve": us("serve"), "agents": us("agent"), "gen": us("gen"), "total": us("serve")+us("agent")+us("gen"),
       "sys_busy_pct": round(100*busy/(busy+idle)), "sys_us_per_order": round(busy/100/n*1e6)}
res["threads"] = {k[2:]: us(k) for k in a if k.startswith("t:") and us(k) > 1}
print(json.dumps(res))
PY
