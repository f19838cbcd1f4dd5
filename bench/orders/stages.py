#!/usr/bin/env python3
"""Where an order's time goes: joins load.py's --dump with the stage events of the logs.

    stages.py DUMP.jsonl SERVE.log STORE-*.err ...

DUMP is `load.py --dump` (per order: the slot in the schedule, the send, the service's
`received`/`dispatched`/`accepted` history times). The logs are the stderr of `qosmos
serve` and of the `qosmos store` agents run with
`RUST_LOG=info,qosmos_orders::stage=debug`: one line per stage per order (see
`qosmos_orders::STAGE_TARGET`), with tracing's microsecond UTC timestamps. Every time is
the same machine's wall clock.

The way of one order, in order (each step's time is the difference of two of these):

    send           load.py writes the POST
    received       the writer applies the create (history `received`; the batch's commit
                   follows)
    committed      serve: the create's commit returned (HTTP answers 201)
    publish        serve: the dispatcher sends the QoS 2 PUBLISH to the embedded broker
    order_in       store: the order arrived (broker: PUBLISH stored and synced, the
                   subscriber's packet id synced, delivered)
    synced         store: its journal line is on disk (the group's fdatasync)
    ack_in         serve: the ack arrived (store: ack PUBLISH; broker: stored, synced,
                   delivered)
    accepted       the writer applies the ack (history `accepted`: the latency's end)
    ack_committed  (after the end) the ack's commit returned

Prints, per step, p50 / p90 / p99 / max over all orders, and the mean of each step over
the slowest 1% of orders (by send -> accepted), i.e. what the tail is made of.
"""

import json
import re
import sys
from datetime import datetime

LINE = re.compile(
    r'^(\S+Z)\s+DEBUG\s.*?order_id=(\S+)\s+stage="?(\w+)"?'
)
STEPS = [
    ("send", "received", "HTTP + wait for the writer"),
    ("received", "committed", "create commit (fsync)"),
    ("committed", "publish", "feed -> dispatcher"),
    ("publish", "order_in", "broker -> store (order)"),
    ("order_in", "synced", "store journal sync"),
    ("synced", "ack_in", "ack: store -> broker -> serve"),
    ("ack_in", "accepted", "ack applied by the writer"),
    ("send", "accepted", "TOTAL (latency)"),
    ("accepted", "ack_committed", "(after) ack commit"),
    ("publish", "pubcomp", "(aside) publish -> PUBCOMP"),
]


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def pct(xs, p):
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    orders = {}
    with open(sys.argv[1]) as fh:
        for ln in fh:
            r = json.loads(ln)
            if r.get("id") and r.get("acked"):
                orders[r["id"]] = {
                    "send": r["send"],
                    "received": r["received"],
                    "accepted": r["acked"],
                }
    for path in sys.argv[2:]:
        with open(path, errors="replace") as fh:
            for ln in fh:
                m = LINE.match(ln)
                if not m:
                    continue
                o = orders.get(m.group(2))
                if o is not None and m.group(3) not in o:
                    o[m.group(3)] = ts(m.group(1))
    full = [o for o in orders.values() if all(k in o for a, b, _ in STEPS for k in (a, b))]
    print("%d orders acked, %d with every stage" % (len(orders), len(full)))
    if not full:
        return
    full.sort(key=lambda o: o["accepted"] - o["send"])
    tail = full[-max(1, len(full) // 100):]
    print("%-34s %8s %8s %8s %8s %12s" % ("step (ms)", "p50", "p90", "p99", "max", "slowest 1%"))
    for a, b, name in STEPS:
        d = [(o[b] - o[a]) * 1000 for o in full]
        t = sum((o[b] - o[a]) * 1000 for o in tail) / len(tail)
        print("%-34s %8.2f %8.2f %8.2f %8.2f %12.2f" % (name, pct(d, 50), pct(d, 90), pct(d, 99), max(d), t))


if __name__ == "__main__":
    main()
