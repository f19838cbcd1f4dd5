#!/usr/bin/env python3
"""Side-by-side table from run.sh's results.jsonl (one load.py JSON object per line)."""

import json
import sys


def median(values):
    """The median, rounded to 0.1; None for no values."""
    v = sorted(values)
    if not v:
        return None
    m = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return round(m, 1)


def max_rounds(rows, seed, q):
    """(seed, qosmos) max orders/s per round: round 1 is `*/max`, round k `*/max@k`."""
    out = []
    k = 1
    while True:
        suffix = "" if k == 1 else "@%d" % k
        s, x = rows.get(seed + "/max" + suffix), rows.get(q + "/max" + suffix)
        if s is None and x is None:
            return out
        out.append(((s or {}).get("orders_per_sec"), (x or {}).get("orders_per_sec")))
        k += 1


def main(path):
    rows = {}
    for ln in open(path):
        ln = ln.strip()
        if ln.startswith("{"):
            r = json.loads(ln)
            rows[r["label"]] = r

    def get(label, key):
        return rows.get(label, {}).get(key)

    def fmt(v, suffix=""):
        return "-" if v is None else ("%s%s" % (v, suffix))

    seed, q = "seed", "qosmos"
    lines = [
        "| measure | seed stack (Flask+Flask-MQTT+Mosquitto, gunicorn) | qosmos serve + store | ratio |",
        "|---|---|---|---|",
    ]

    def ratio(a, b, inverse=False):
        if not a or not b:
            return "-"
        return "%.1f×" % ((a / b) if not inverse else (b / a))

    a, b = get(seed + "/max", "orders_per_sec"), get(q + "/max", "orders_per_sec")
    lines.append("| max orders/s (POST → ack recorded) | %s | %s | %s |" % (fmt(a), fmt(b), ratio(b, a)))
    rounds = max_rounds(rows, seed, q)
    if len(rounds) > 1:
        both = [(s, x) for s, x in rounds if s and x]
        ratios = ", ".join("%.1f×" % (x / s) for s, x in both)
        lines.append("| max orders/s, median of %d rounds (per-round ratios: %s) | %s | %s | %s |" % (
            len(rounds), ratios or "-", fmt(median([s for s, _ in rounds if s])),
            fmt(median([x for _, x in rounds if x])),
            "-" if not both else "%.1f×" % median([x / s for s, x in both])))
    for rate in ("r1000", "r100"):
        for key, name in (("orders_per_sec", "achieved orders/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                          ("post_rtt_p99_ms", "POST round trip p99 ms")):
            a, b = get(seed + "/" + rate, key), get(q + "/" + rate, key)
            r = ratio(a, b) if key.endswith("_ms") else ratio(b, a)
            lines.append("| %s at %s/s offered: %s | %s | %s | %s |" % (
                "", rate[1:], name, fmt(a), fmt(b), r))
    for key, name in (("lost", "lost (all runs)"), ("dup", "handled twice (all runs)")):
        tot = {}
        for stack in (seed, q):
            vals = [r.get(key) for lbl, r in rows.items() if lbl.split("/")[0] == stack]
            tot[stack] = sum(v or 0 for v in vals) if vals else None
        lines.append("| %s | %s | %s | |" % (name, fmt(tot[seed]), fmt(tot[q])))
    print("\n".join(l.replace("|  at", "| at") for l in lines))
    print()
    print("| run | orders | acked | lost | dup | orders/s | POST/s | p50 ms | p99 ms | max ms | POST rtt p50/p99 ms | server recv→ack p50/p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lbl, r in rows.items():
        print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s |" % (
            lbl, r["orders"], r["acked"], r["lost"], fmt(r.get("dup")), fmt(r["orders_per_sec"]),
            fmt(r["post_rate"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["max_ms"]),
            fmt(r["post_rtt_p50_ms"]), fmt(r["post_rtt_p99_ms"]), fmt(r["server_p50_ms"]),
            fmt(r["server_p99_ms"])))


if __name__ == "__main__":
    main(sys.argv[1])
