#!/usr/bin/env bash
# Orders benchmark: POST -> store's ack, the seed's stack (Flask + Flask-MQTT + Mosquitto)
# next to `qosmos serve` + `qosmos store`, same load generator, same machine.
#
# Usage: bench/orders/run.sh [--quick] [--only seed|qosmos] [--variants] [--tmpfs] [--out DIR] [--no-build]
#                            [--baseline BIN] [--stages] [--rates LIST] [--conns "N ..."] [--rate-conns N]
#
#   --quick     fewer orders (about a minute in all instead of several)
#   --only S    run one stack only
#   --variants  also measure the seed app's max throughput under waitress, the Flask
#               development server and gunicorn with 2 worker processes
#   --tmpfs     put both stacks' databases, broker persistence and store journals on
#               /dev/shm (a diagnostic: fsync becomes free, what is left is CPU)
#   --out DIR   where logs and results.jsonl go (default: a new directory under /tmp)
#   --no-build  use target/release/qosmos as it is
#   --baseline BIN  also run the qosmos scenarios with another build of qosmos (e.g. one
#               from before a change), labelled qosmos-baseline/*, in the same run
#   --stages    log every order's stages in the qosmos runs (RUST_LOG=info,
#               qosmos_orders::stage=debug) and write, per scenario, stages.txt: where
#               the time went, step by step (stages.py); the logging costs some CPU
#   --rates L   only these scenarios, e.g. "r1000" or "max r1000" (default: max r100 r1000)
#   --conns L   keep-alive connections per load process (2 processes), the same for
#               every stack. A list (default "4 8 16 32") runs the max scenario once per
#               value (labels seed/max-c16, ...) and takes each stack's best as its max:
#               a closed loop measures connections / round trip, so a stack's capacity is
#               its peak over the concurrency (see README, "Max at each stack's best
#               concurrency").
#   --rate-conns N  keep-alive connections per load process in the rate scenarios
#               (default 8)
#   --rounds N  run the max scenarios N times (default 1), the stacks' order alternated
#               round by round (labels seed/max@2, qosmos/max@2, ...); the table adds the
#               median of each stack's max and of the per-round ratios, since one run's
#               max moves by about a tenth on a shared machine
#   --py-load   drive both stacks with load.py (Python) instead of the Rust generator
#               (target/release/examples/orders_load, built here; same body, ack check
#               and output, a fraction of the CPU)
#
# Every scenario starts its stack fresh (new database, new broker) on free loopback
# ports and stops it afterwards; each process also runs under `timeout`, so nothing
# outlives the script. Scenarios, each with S=4 stores:
#   max      as many orders/s as 2 load processes x C keep-alive connections get through,
#            for each C of --conns; a stack's max is its best
#   r1000    1,000 orders/s offered (open loop) for D seconds
#   r100     100 orders/s offered for D seconds
# Needs: mosquitto (Debian), python3 with .venv from .ci/requirements.txt + gunicorn
# waitress (created here if missing; VENV=DIR uses another virtualenv).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
QUICK=0
ONLY=both
VARIANTS=0
OUT=""
BUILD=1
TMPFS=0
BASELINE=""
STAGES=0
RATES="max r100 r1000"
CONNS="4 8 16 32"
RATE_CONNS=8
PYLOAD=0
ROUNDS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --only) ONLY="${2:-}"; shift ;;
        --variants) VARIANTS=1 ;;
        --out) OUT="${2:-}"; shift ;;
        --no-build) BUILD=0 ;;
        --tmpfs) TMPFS=1 ;;
        --baseline) BASELINE="${2:-}"; shift ;;
        --stages) STAGES=1 ;;
        --rates) RATES="${2:-}"; shift ;;
        --conns) CONNS="${2:-}"; shift ;;
        --rate-conns) RATE_CONNS="${2:-}"; shift ;;
        --py-load) PYLOAD=1 ;;
        --rounds) ROUNDS="${2:-}"; shift ;;
        -h|--help) sed -n '2,46p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case "$ONLY" in both|seed|qosmos) ;; *) echo "run.sh: --only seed|qosmos" >&2; exit 2 ;; esac
case "$ROUNDS" in ''|*[!0-9]*|0) echo "run.sh: --rounds takes a positive number, not '$ROUNDS'" >&2; exit 2 ;; esac
read -r -a CONNS_LIST <<< "$CONNS"
[ ${#CONNS_LIST[@]} -gt 0 ] || { echo "run.sh: --conns takes one or more positive numbers" >&2; exit 2; }
for c in "${CONNS_LIST[@]}" "$RATE_CONNS"; do
    case "$c" in *[!0-9]*|0*) echo "run.sh: --conns and --rate-conns take positive numbers, not '$c'" >&2; exit 2 ;; esac
done

OUT=${OUT:-$(mktemp -d /tmp/qosmos-orders-bench.XXXXXX)}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
DATA_ROOT="$OUT"
if [ "$TMPFS" = 1 ]; then DATA_ROOT=$(mktemp -d /dev/shm/qosmos-orders-bench.XXXXXX); fi
STORES=4
if [ "$QUICK" = 1 ]; then
    SECS=3; N_MAX_SEED=600; N_MAX_QOSMOS=4000
else
    SECS=8; N_MAX_SEED=2000; N_MAX_QOSMOS=15000
fi

VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$ROOT/.ci/requirements.txt" gunicorn waitress
fi
PY="$VENV/bin/python"
QOSMOS="$ROOT/target/release/qosmos"
LOADGEN="$ROOT/target/release/examples/orders_load"
if [ "$ONLY" != seed ]; then
    if [ "$BUILD" = 1 ]; then (cd "$ROOT" && cargo build --release -p qosmos); fi
    [ -x "$QOSMOS" ] || { echo "run.sh: $QOSMOS missing (cargo build --release -p qosmos)" >&2; exit 1; }
fi
if [ "$PYLOAD" = 0 ]; then
    if [ "$BUILD" = 1 ]; then (cd "$ROOT" && cargo build --release -p qosmos-orders --example orders_load); fi
    [ -x "$LOADGEN" ] || { echo "run.sh: $LOADGEN missing (cargo build --release -p qosmos-orders --example orders_load)" >&2; exit 1; }
    LOAD=("$LOADGEN")
else
    LOAD=("$PY" "$HERE/load.py")
fi

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_all
    if [ "$TMPFS" = 1 ]; then rm -rf "$DATA_ROOT"; fi
}
trap cleanup EXIT

wait_http() { # url, seconds
    local i
    for i in $(seq 1 $(($2 * 10))); do
        curl -fs -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "run.sh: $1 not ready after $2 s" >&2
    return 1
}

MAXLIFE=600 # no process started here lives longer than this (seconds)

# start_seed DIR SERVER: Mosquitto + the Flask app under SERVER + $STORES store agents
start_seed() {
    local dir=$1 server=$2 mport hport ack="acks/+" data
    data="$DATA_ROOT/${dir#"$OUT"/}"
    mkdir -p "$data"
    mport=$(free_port); hport=$(free_port)
    cat > "$dir/mosquitto.conf" <<EOF
listener $mport 127.0.0.1
allow_anonymous true
persistence true
persistence_location $data/
max_queued_messages 0
set_tcp_nodelay true
EOF
    timeout $MAXLIFE mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
    PIDS+=($!)
    sleep 0.3
    [ "$server" = gunicorn2 ] && ack='$share/seed/acks/+'
    export MQTT_HOST=127.0.0.1 MQTT_PORT=$mport ORDERS_DB="$data/orders.sqlite3" ACK_TOPIC="$ack" PORT=$hport
    case "$server" in
        gunicorn)  # what a Flask team deploys: gunicorn, threaded worker; one process,
                   # since Flask-MQTT holds one MQTT connection per process
            (cd "$HERE/seed_stack" && exec timeout $MAXLIFE "$VENV/bin/gunicorn" -w 1 -k gthread --threads 8 \
                -b 127.0.0.1:$hport app:app) > "$dir/app.log" 2>&1 & ;;
        gunicorn2) # two processes (2 cores), acks through a shared subscription
            (cd "$HERE/seed_stack" && exec timeout $MAXLIFE "$VENV/bin/gunicorn" -w 2 -k gthread --threads 8 \
                -b 127.0.0.1:$hport app:app) > "$dir/app.log" 2>&1 & ;;
        waitress)
            (cd "$HERE/seed_stack" && exec timeout $MAXLIFE "$VENV/bin/waitress-serve" --threads 8 \
                --listen 127.0.0.1:$hport app:app) > "$dir/app.log" 2>&1 & ;;
        dev)       # `app.run(threaded=True)`, the Flask development server
            (cd "$HERE/seed_stack" && exec timeout $MAXLIFE "$PY" app.py) > "$dir/app.log" 2>&1 & ;;
    esac
    PIDS+=($!)
    local s
    for s in $(seq 0 $((STORES - 1))); do
        timeout $MAXLIFE "$PY" "$HERE/seed_stack/store.py" --store-id store-$s --port $mport \
            > "$dir/store-$s.out" 2> "$dir/store-$s.err" &
        PIDS+=($!)
    done
    wait_http "http://127.0.0.1:$hport/healthz" 20
    sleep 0.5 # store agents subscribed
    URL="http://127.0.0.1:$hport"
}

start_qosmos() { # DIR [BIN]
    local dir=$1 bin=${2:-$QOSMOS} mport hport data
    data="$DATA_ROOT/${dir#"$OUT"/}"
    mkdir -p "$data"
    mport=$(free_port); hport=$(free_port)
    local log=info
    [ "$STAGES" = 1 ] && log="info,qosmos_orders::stage=debug"
    RUST_LOG=$log timeout $MAXLIFE "$bin" serve --http 127.0.0.1:$hport --mqtt 127.0.0.1:$mport \
        --data-dir "$data/serve" > "$dir/serve.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$hport/healthz" 20
    local s
    for s in $(seq 0 $((STORES - 1))); do
        RUST_LOG=$log timeout $MAXLIFE "$bin" store --store-id store-$s --broker mqtt://127.0.0.1:$mport \
            --data-dir "$data/store-$s" > "$dir/store-$s.out" 2> "$dir/store-$s.err" &
        PIDS+=($!)
    done
    sleep 1 # store agents subscribed
    URL="http://127.0.0.1:$hport"
}

# scenario STACK LABEL ORDERS RATE [CONNS]
scenario() {
    local stack=$1 label=$2 n=$3 rate=$4 conns=${5:-$RATE_CONNS} dir timeout_s name
    name=${label#*/}
    name=${name%@*}
    case " $RATES " in *" ${name%-c*} "*) ;; *) return 0 ;; esac
    dir="$OUT/$label"
    mkdir -p "$dir"
    case "$stack" in
        qosmos) start_qosmos "$dir" ;;
        baseline) start_qosmos "$dir" "$BASELINE" ;;
        *) start_seed "$dir" "$stack" ;;
    esac
    timeout_s=$((n / 50 + 60))
    echo "== $label: $n orders, rate ${rate:-max}, $STORES stores, 2 x $conns connections" >&2
    timeout $((timeout_s + 60)) "${LOAD[@]}" --url "$URL" --orders "$n" --stores $STORES \
        --rate "$rate" --conns "$conns" --procs 2 --timeout $timeout_s \
        --store-out "$dir/store-*.out" --label "$label" --dump "$dir/orders.jsonl" \
        >> "$RESULTS" 2> >(tee "$dir/load.log" >&2) || true
    stop_all
    if [ "$STAGES" = 1 ] && [ -f "$dir/serve.log" ]; then
        "$PY" "$HERE/stages.py" "$dir/orders.jsonl" "$dir/serve.log" "$dir"/store-*.err \
            > "$dir/stages.txt" 2>&1 || true
        echo "-- $label: where the time went" >&2
        cat "$dir/stages.txt" >&2
    fi
}

# max_at STACK LABEL ORDERS: the max scenario at each --conns value (one label if one value)
max_at() {
    local stack=$1 label=$2 n=$3 round="" c
    case "$label" in *@*) round="@${label#*@}"; label=${label%@*} ;; esac
    if [ ${#CONNS_LIST[@]} = 1 ]; then
        scenario "$stack" "$label$round" "$n" 0 "${CONNS_LIST[0]}"
        return
    fi
    for c in "${CONNS_LIST[@]}"; do scenario "$stack" "$label-c$c$round" "$n" 0 "$c"; done
}

if [ "$ONLY" != qosmos ]; then
    max_at gunicorn seed/max $N_MAX_SEED
    scenario gunicorn seed/r100 $((100 * SECS)) 100
    scenario gunicorn seed/r1000 $((1000 * SECS)) 1000
    if [ "$VARIANTS" = 1 ]; then
        max_at waitress seed-waitress/max $N_MAX_SEED
        max_at gunicorn2 seed-gunicorn-w2/max $N_MAX_SEED
        max_at dev seed-devserver/max $N_MAX_SEED
    fi
fi
if [ "$ONLY" != seed ]; then
    max_at qosmos qosmos/max $N_MAX_QOSMOS
    scenario qosmos qosmos/r100 $((100 * SECS)) 100
    scenario qosmos qosmos/r1000 $((1000 * SECS)) 1000
    if [ -n "$BASELINE" ]; then
        max_at baseline qosmos-baseline/max $N_MAX_QOSMOS
        scenario baseline qosmos-baseline/r100 $((100 * SECS)) 100
        scenario baseline qosmos-baseline/r1000 $((1000 * SECS)) 1000
    fi
fi

# More rounds of the max scenarios, the stacks' order alternated (qosmos first in even rounds).
max_round() { # K
    local k=$1
    if [ "$ONLY" != qosmos ]; then max_at gunicorn "seed/max@$k" $N_MAX_SEED; fi
    if [ "$ONLY" != seed ]; then
        max_at qosmos "qosmos/max@$k" $N_MAX_QOSMOS
        if [ -n "$BASELINE" ]; then max_at baseline "qosmos-baseline/max@$k" $N_MAX_QOSMOS; fi
    fi
}
for k in $(seq 2 "$ROUNDS"); do
    if [ $((k % 2)) = 0 ] && [ "$ONLY" = both ]; then
        # qosmos (and the baseline) first, then the seed
        ONLY=qosmos max_round "$k"
        ONLY=seed max_round "$k"
    else
        max_round "$k"
    fi
done

"$PY" "$HERE/table.py" "$RESULTS"
echo "logs and results: $OUT" >&2
