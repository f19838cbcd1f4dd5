#!/usr/bin/env python3
"""Side-by-side table from run.sh's results.jsonl (one load.py JSON object per line)."""

import json
import re
import sys


def median(values):
    """The median, rounded to 0.1; None for no values."""
    v = sorted(values)
    if not v:
        return None
    m = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return round(m, 1)


MAX_LABEL = re.compile(r"^(?P<stack>[^/]+)/max(?:-c(?P<conns>\d+))?(?:@(?P<round>\d+))?$")


def max_runs(rows):
    """{(stack, round, conns): orders/s} of the max scenarios; conns None when run.sh ran
    one --conns value (labels stack/max, stack/max@k) and C for stack/max-cC[@k]."""
    out = {}
    for label, r in rows.items():
        m = MAX_LABEL.match(label)
        if m and r.get("orders_per_sec") is not None:
            conns = int(m.group("conns")) if m.group("conns") else None
            out[(m.group("stack"), int(m.group("round") or 1), conns)] = r["orders_per_sec"]
    return out


def best(runs, stack, k):
    """A stack's max in round k: its best over the concurrencies run; None if none ran."""
    v = [x for (s, r, _), x in runs.items() if s == stack and r == k]
    return max(v) if v else None


def max_rounds(runs, seed, q):
    """(seed, qosmos) max orders/s per round, each the stack's best over the concurrencies."""
    last = max([r for (_, r, _) in runs] or [0])
    return [(best(runs, seed, k), best(runs, q, k)) for k in range(1, last + 1)]


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

    runs = max_runs(rows)
    conns = sorted({c for (_, _, c) in runs if c is not None})
    what = "max orders/s (POST → ack recorded)"
    if conns:
        what += ", each stack's best of %s load connections" % ", ".join("2×%d" % c for c in conns)
    a, b = best(runs, seed, 1), best(runs, q, 1)
    lines.append("| %s | %s | %s | %s |" % (what, fmt(a), fmt(b), ratio(b, a)))
    rounds = max_rounds(runs, seed, q)
    if len(rounds) > 1:
        both = [(s, x) for s, x in rounds if s and x]
        ratios = ", ".join("%.1f×" % (x / s) for s, x in both)
        lines.append("| max orders/s, median of %d rounds (per-round ratios: %s) | %s | %s | %s |" % (
            len(rounds), ratios or "-", fmt(median([s for s, _ in rounds if s])),
            fmt(median([x for _, x in rounds if x])),
            "-" if not both else "%.1f×" % median([x / s for s, x in both])))
    for c in conns:
        per = [(runs.get((seed, k, c)), runs.get((q, k, c))) for k in range(1, len(rounds) + 1)]
        both = [(s, x) for s, x in per if s and x]
        lines.append("| max orders/s at 2×%d connections%s | %s | %s | %s |" % (
            c, "" if len(per) == 1 else ", median of %d rounds" % len(per),
            fmt(median([s for s, _ in per if s])), fmt(median([x for _, x in per if x])),
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
