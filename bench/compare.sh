#!/usr/bin/env bash
# Runs the same `qosmos bench` scenarios against Mosquitto and against `qosmos broker`, on
# this machine, and prints a side-by-side table: msgs/s, latency p50/p99, losses and each
# broker's peak memory (VmHWM), with the qosmos/Mosquitto ratio.
#
# Usage: bench/compare.sh [--quick] [--only mosquitto|qosmos] [--nodelay] [--out DIR] [--no-build]
#                         [--bin PATH] [--idle-only]
#        bench/compare.sh --durable [--quick] [--out DIR] [--no-build] [--bin PATH]
#                         [--brokers "B ..."] [--shapes "S ..."] [--qos "Q ..."]
#
#   --quick      QoS 0/1/2 x {fan-in, fan-in-5k, fan-out, pairs, steady} at 64 B only, 1/5 of
#                the messages, 2,000 idle connections instead of 10,000.
#   --only B     run one broker only (the other's columns stay empty).
#   --nodelay    add `set_tcp_nodelay true` to Mosquitto's config (its default is false:
#                Nagle's algorithm then adds ~40 ms to deliveries at low rates).
#   --out DIR    where logs and results.tsv go (default: a new directory under /tmp).
#   --no-build   use target/release/qosmos as it is.
#   --bin PATH   use this qosmos binary (broker and bench) instead, e.g. an older build to
#                compare against; implies --no-build.
#   --idle-only  only the idle-connections part.
#   --durable    durability instead: QoS 1 and 2 with persistent sessions (--session-expiry)
#                against qosmos in memory, qosmos --data-dir with --fsync always|batch|never,
#                and Mosquitto with persistence true; msgs/s and the ratio to in-memory.
#   --brokers, --shapes, --qos   with --durable, run only these (space-separated) brokers
#                (qosmos qosmos-always qosmos-batch qosmos-never mosquitto-persist), shapes
#                (fan-in pairs steady) and QoS levels (1 2), e.g. for a before/after run.
#
# Every broker is started fresh for every scenario, on a free loopback port, so each peak
# memory figure belongs to one scenario. Mosquitto runs with its defaults except
# `allow_anonymous true` and `persistence false` (notably max_inflight_messages 20,
# max_queued_messages 1000: past that queue Mosquitto drops messages, which shows as "lost").
# The bench and the broker share this machine's cores; compare ratios, not absolutes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
ONLY=both
OUT=""
BUILD=1
DURABLE=0
MOSQUITTO_EXTRA=""
BIN=""
IDLE_ONLY=0
SEL_BROKERS=""
SEL_SHAPES=""
SEL_QOS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --only)
            ONLY="${2:-}"
            shift
            ;;
        --only=*) ONLY="${1#--only=}" ;;
        --out)
            OUT="${2:-}"
            shift
            ;;
        --out=*) OUT="${1#--out=}" ;;
        --no-build) BUILD=0 ;;
        --bin)
            BIN="${2:-}"
            BUILD=0
            shift
            ;;
        --bin=*)
            BIN="${1#--bin=}"
            BUILD=0
            ;;
        --idle-only) IDLE_ONLY=1 ;;
        --nodelay) MOSQUITTO_EXTRA="set_tcp_nodelay true" ;;
        --durable) DURABLE=1 ;;
        --brokers)
            SEL_BROKERS="${2:-}"
            shift
            ;;
        --shapes)
            SEL_SHAPES="${2:-}"
            shift
            ;;
        --qos)
            SEL_QOS="${2:-}"
            shift
            ;;
        -h | --help)
            sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "compare.sh: unknown argument $1 (try --help)" >&2
            exit 2
            ;;
    esac
    shift
done
case "$ONLY" in
    both) BROKERS="mosquitto qosmos" ;;
    mosquitto | qosmos) BROKERS="$ONLY" ;;
    *)
        echo "compare.sh: --only takes mosquitto or qosmos, not '$ONLY'" >&2
        exit 2
        ;;
esac
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/qosmos-compare.XXXXXX)
mkdir -p "$OUT"

MOSQUITTO=$(command -v mosquitto || true)
[ -n "$MOSQUITTO" ] || [ ! -x /usr/sbin/mosquitto ] || MOSQUITTO=/usr/sbin/mosquitto
if [[ " $BROKERS " == *" mosquitto "* ]] && [ -z "$MOSQUITTO" ]; then
    echo "compare.sh: mosquitto not found (apt-get install mosquitto)" >&2
    exit 2
fi

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p qosmos)
fi
[ -n "$BIN" ] || BIN="$ROOT/target/release/qosmos"
[ -x "$BIN" ] || {
    echo "compare.sh: $BIN missing (drop --no-build, or check --bin)" >&2
    exit 2
}

# 10,000 idle connections need 10,000 descriptors on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

BROKER_PID=""
cleanup() {
    if [ -n "$BROKER_PID" ]; then
        kill "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p
    while :; do
        # Below the usual ephemeral range (32768-60999), which the bench's own client
        # sockets use.
        p=$((10000 + RANDOM % 20000))
        port_open "$p" || {
            echo "$p"
            return
        }
    done
}

# start_broker KIND: starts it on a free port; sets BROKER_PID and PORT. Retries on another
# port if the first one was taken in the meantime.
start_broker() {
    local attempt
    for attempt in 1 2 3; do
        PORT=$(free_port)
        case "$1" in
            mosquitto)
                printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n%s\n' \
                    "$PORT" "$MOSQUITTO_EXTRA" >"$OUT/mosquitto.conf"
                "$MOSQUITTO" -c "$OUT/mosquitto.conf" >>"$OUT/mosquitto.log" 2>&1 &
                ;;
            qosmos)
                "$BIN" broker --mqtt "127.0.0.1:$PORT" --log-level warn >>"$OUT/qosmos-broker.log" 2>&1 &
                ;;
            qosmos-always | qosmos-batch | qosmos-never)
                # A fresh data directory per run.
                rm -rf "$OUT/data-$1"
                "$BIN" broker --mqtt "127.0.0.1:$PORT" --log-level warn --data-dir "$OUT/data-$1" \
                    --fsync "${1#qosmos-}" >>"$OUT/qosmos-broker.log" 2>&1 &
                ;;
            mosquitto-persist)
                rm -rf "$OUT/mosquitto-data"
                mkdir -p "$OUT/mosquitto-data"
                printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\n%s\n' \
                    "$PORT" "$OUT/mosquitto-data" "$MOSQUITTO_EXTRA" >"$OUT/mosquitto.conf"
                "$MOSQUITTO" -c "$OUT/mosquitto.conf" >>"$OUT/mosquitto.log" 2>&1 &
                ;;
        esac
        BROKER_PID=$!
        for _ in $(seq 200); do
            port_open "$PORT" && return 0
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.05
        done
        stop_broker
        echo "compare.sh: $1 did not start on port $PORT (attempt $attempt)" >&2
    done
    echo "compare.sh: giving up on $1 (see $OUT/$1*.log)" >&2
    exit 1
}

stop_broker() {
    cleanup
    BROKER_PID=""
}

# status_kb FIELD: a /proc/PID/status field of the broker, in kB.
status_kb() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$BROKER_PID/status" 2>/dev/null || echo 0; }

# field JSON KEY: a number from a one-line JSON object.
field() { sed -E "s/.*\"$2\":(-?[0-9.]+).*/\\1/;t;s/.*/-/" <<<"$1"; }

if [ "$QUICK" = 1 ]; then
    QOSES="0 1 2"
    PAYLOADS="64"
    SHAPES="fan-in fan-in-5k fan-out pairs steady"
    SCALE=5
    IDLE=2000
else
    QOSES="0 1 2"
    PAYLOADS="64 4096"
    SHAPES="fan-in fan-in-5k fan-out pairs steady"
    SCALE=1
    IDLE=10000
fi

# Deliveries per run, chosen so each run takes a few seconds on a 2-core machine.
deliveries() { # QOS PAYLOAD
    local d
    case "$1" in
        0) d=500000 ;;
        1) d=200000 ;;
        2) d=100000 ;;
    esac
    [ "$2" -le 1024 ] || d=$((d / 4))
    echo $((d / SCALE))
}

shape_args() { # SHAPE DELIVERIES
    case "$1" in
        fan-in) echo "--publishers 20 --subscribers 1 --topics 20 --wildcard --messages $(($2 / 20))" ;;
        # The same fan-in at an offered 5,000 msgs/s in total for 4 s, below what either
        # broker sustains: latency at equal load (the saturated fan-in compares queues).
        fan-in-5k) echo "--publishers 20 --subscribers 1 --topics 20 --wildcard --rate 5000 --messages 1000" ;;
        fan-out) echo "--publishers 1 --subscribers 100 --messages $(($2 / 100))" ;;
        pairs) echo "--publishers 100 --subscribers 100 --topics 100 --messages $(($2 / 100))" ;;
        # Latency below saturation: 10 pairs at 5,000 msgs/s in total for 3 s (0.6 s quick).
        steady) echo "--publishers 10 --subscribers 10 --topics 10 --rate 5000 --messages $((1500 / SCALE))" ;;
    esac
}

BENCH_EXTRA=""
if [ "$DURABLE" = 1 ]; then
    # Persistent sessions, so that a durable broker stores every message and QoS 2 stage.
    BROKERS="qosmos qosmos-always qosmos-batch qosmos-never mosquitto-persist"
    [ -n "$MOSQUITTO" ] || BROKERS="qosmos qosmos-always qosmos-batch qosmos-never"
    QOSES="1 2"
    PAYLOADS="64"
    SHAPES="fan-in pairs steady"
    BENCH_EXTRA="--session-expiry 3600"
    [ -z "$SEL_BROKERS" ] || BROKERS="$SEL_BROKERS"
    [ -z "$SEL_SHAPES" ] || SHAPES="$SEL_SHAPES"
    [ -z "$SEL_QOS" ] || QOSES="$SEL_QOS"
fi

RESULTS="$OUT/results.tsv"
printf 'broker\tscenario\tqos\tpayload\tmsgs_per_sec\tp50_ms\tp99_ms\tlost\tpeak_rss_kb\n' >"$RESULTS"

run_scenario() { # BROKER SHAPE QOS PAYLOAD
    local b=$1 shape=$2 qos=$3 payload=$4 json hwm args
    args=$(shape_args "$shape" "$(deliveries "$qos" "$payload")")
    start_broker "$b"
    # shellcheck disable=SC2086
    json=$("$BIN" bench --broker "mqtt://127.0.0.1:$PORT" --qos "$qos" --payload "$payload" \
        $args $BENCH_EXTRA --timeout 5 --json 2>>"$OUT/bench-$b.log" | tail -1) || json="{}"
    hwm=$(status_kb VmHWM)
    stop_broker
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$b" "$shape" "$qos" "$payload" \
        "$(field "$json" msgs_per_sec)" "$(field "$json" p50_ms)" "$(field "$json" p99_ms)" \
        "$(field "$json" lost)" "$hwm" >>"$RESULTS"
    printf '  %-9s %-8s QoS %s %5s B: %s msgs/s, p50 %s ms, p99 %s ms, lost %s, peak RSS %s kB\n' \
        "$b" "$shape" "$qos" "$payload" "$(field "$json" msgs_per_sec)" "$(field "$json" p50_ms)" \
        "$(field "$json" p99_ms)" "$(field "$json" lost)" "$hwm" >&2
}

run_idle() { # BROKER
    local b=$1 base hwm json connected
    start_broker "$b"
    sleep 0.2
    base=$(status_kb VmRSS)
    json=$("$BIN" bench --broker "mqtt://127.0.0.1:$PORT" --idle-connections "$IDLE" --hold 3 \
        --timeout 30 2>>"$OUT/bench-$b.log" | tail -1) || json="{}"
    hwm=$(status_kb VmHWM)
    stop_broker
    connected=$(field "$json" connected)
    local per="-"
    if [ "$connected" != "-" ] && [ "$connected" -gt 0 ]; then
        per=$(awk -v h="$hwm" -v b="$base" -v n="$connected" 'BEGIN { printf "%.2f", (h - b) / n }')
    fi
    printf '%s\tidle-%s\t-\t-\t%s\t-\t-\t%s\t%s\n' "$b" "$IDLE" "$per" \
        "$((IDLE - ${connected/-/0}))" "$hwm" >>"$RESULTS"
    printf '  %-9s %s idle connections: %s connected, RSS %s -> %s kB, %s kB per connection\n' \
        "$b" "$IDLE" "$connected" "$base" "$hwm" "$per" >&2
}

echo "results: $OUT" >&2
[ "$IDLE_ONLY" = 0 ] || QOSES=""
for qos in $QOSES; do
    for payload in $PAYLOADS; do
        for shape in $SHAPES; do
            for b in $BROKERS; do
                run_scenario "$b" "$shape" "$qos" "$payload"
            done
        done
    done
done
if [ "$DURABLE" = 1 ]; then
    # One row per scenario: msgs/s (lost) per broker, and each durable qosmos over in-memory.
    awk -F'\t' '
    NR == 1 { next }
    {
        key = $2 "\t" $3 "\t" $4
        if (!(key in seen)) { seen[key] = 1; order[n++] = key }
        v[$1, key] = $5; l[$1, key] = $8
    }
    function r(a, b) { return (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
    END {
        split("qosmos qosmos-always qosmos-batch qosmos-never mosquitto-persist", bs, " ")
        print "| scenario | QoS | qosmos in memory | --fsync always | --fsync batch | --fsync never | Mosquitto persistence true | always / memory | batch / memory | never / memory |"
        print "|---|---|---|---|---|---|---|---|---|---|"
        for (i = 0; i < n; i++) {
            k = order[i]; split(k, p, "\t")
            line = "| " p[1] " | " p[2]
            for (j = 1; j <= 5; j++) {
                c = v[bs[j], k]
                if (l[bs[j], k] ~ /^[1-9]/) c = c " (lost " l[bs[j], k] ")"
                line = line " | " c
            }
            for (j = 2; j <= 4; j++) line = line " | " r(v[bs[j], k], v["qosmos", k])
            print line " |"
        }
    }' "$RESULTS" | tee "$OUT/table.md"
    exit 0
fi

for b in $BROKERS; do
    run_idle "$b"
done

# The side-by-side table (Markdown). For idle rows, msgs/s holds kB per connection and lost
# the connections that failed.
awk -F'\t' '
function r(a, b) { return (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
NR == 1 { next }
{
    key = $2 "\t" $3 "\t" $4
    if (!(key in seen)) { seen[key] = 1; order[n++] = key }
    v[$1, key, "rate"] = $5; v[$1, key, "p50"] = $6; v[$1, key, "p99"] = $7
    v[$1, key, "lost"] = $8; v[$1, key, "rss"] = $9
}
END {
    print "| scenario | QoS | payload | Mosquitto msgs/s | p50 ms | p99 ms | lost | peak RSS MB | qosmos msgs/s | p50 ms | p99 ms | lost | peak RSS MB | msgs/s ratio | RSS ratio |"
    print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for (i = 0; i < n; i++) {
        k = order[i]; split(k, p, "\t")
        line = "| " p[1] " | " p[2] " | " p[3]
        for (j = 0; j < 2; j++) {
            b = (j == 0) ? "mosquitto" : "qosmos"
            rss = v[b, k, "rss"]
            rssmb = (rss ~ /^[0-9]+$/) ? sprintf("%.1f", rss / 1024) : ""
            line = line " | " v[b, k, "rate"] " | " v[b, k, "p50"] " | " v[b, k, "p99"] " | " v[b, k, "lost"] " | " rssmb
        }
        line = line " | " r(v["qosmos", k, "rate"], v["mosquitto", k, "rate"]) " | " r(v["qosmos", k, "rss"], v["mosquitto", k, "rss"]) " |"
        print line
    }
}' "$RESULTS" | tee "$OUT/table.md"
echo "(idle rows: the msgs/s column is broker kB per idle connection; lost is connections that failed)"
