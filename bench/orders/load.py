#!/usr/bin/env python3
"""Load generator for the orders benchmark: POST N orders, wait for every store's ack.

Works against any service with the qosmos order API (``qosmos serve`` and the seed
stack's Flask app both have it): ``POST /api/orders`` and ``GET /api/orders/{id}``
returning ``"status"`` and ``"history": [{"status", "at"}]``.

How it runs:
  * ``--procs`` worker processes (so the generator itself is not held by one GIL), each an
    asyncio loop with ``--conns`` persistent HTTP/1.1 keep-alive connections (raw asyncio
    streams, no HTTP library on the hot path).
  * Order i goes to store ``{prefix}{i % stores}`` and, with ``--rate R``, is sent no
    earlier than t0 + i/R (an open-loop schedule; if every connection is busy the send
    is late, which shows as an achieved rate below R). ``--rate 0``: as fast as the
    connections allow (closed loop).
  * After its POSTs, each worker reads back its orders with ``GET /api/orders/{id}``
    (oldest first, waiting 200 ms between tries of an order not yet acknowledged) until
    every one is ``accepted``/``rejected`` or ``--timeout`` passes. Polling happens only
    after the worker's POSTs are all sent, and uses the server's own ack timestamps, so
    its pace does not change the numbers below.

What it measures (all wall-clock, one machine, one clock):
  * send      = time.time() just before the POST request is written (client)
  * acked     = the ``at`` of the order's ``accepted`` history entry: when the service
                recorded the store's ack (server)
  * latency   = acked - send, per order: POST + store + MQTT both ways + ack recorded
  * orders/s  = acknowledged orders / (last acked - first send)
  * late      = send - the order's slot in the open-loop schedule (t0 + i/R): how late the
                generator sent it (every connection busy, or its own event loop behind)
  * sched     = acked - slot: the latency counted from the slot instead of the send, so a
                stall that holds every connection is counted for the orders it delayed
                (no "coordinated omission"); equal to latency when nothing is late
  * gen_cpu   = CPU seconds (user + system) used by the generator's worker processes
  * post_rtt  = time.time() when the 201 is read - send (client)
  * server    = accepted.at - received.at from the history (server only)
  * lost      = orders answered 201 but not acknowledged by the deadline (and, with
                --store-out, also those no store printed)
  * dup       = order ids printed more than once by the store agents (--store-out files:
                one order JSON per line on their stdout)

Prints a human summary on stderr and one JSON object on stdout.
"""

import argparse
import asyncio
import glob
import json
import multiprocessing as mp
import os
import sys
import time
from datetime import datetime
from urllib.parse import urlparse


def parse_ts(s):
    """RFC 3339 -> float seconds (fractions kept to the microsecond)."""
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    # split off the offset, trim the fraction to 6 digits
    tz_at = max(s.rfind("+"), s.rfind("-"))
    if tz_at > 10:
        base, tz = s[:tz_at], s[tz_at:]
    else:
        base, tz = s, ""
    if "." in base:
        head, frac = base.split(".", 1)
        base = head + "." + (frac + "000000")[:6]
    return datetime.fromisoformat(base + tz).timestamp()


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.r = self.w = None

    async def open(self):
        self.r, self.w = await asyncio.open_connection(self.host, self.port)

    async def request(self, method, path, body=None):
        for attempt in range(3):
            if self.w is None:
                await self.open()
            head = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, self.host)
            if body is not None:
                head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            msg = (head + "\r\n").encode() + (body or b"")
            try:
                self.w.write(msg)
                hdr = await self.r.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                # the server closed an idle keep-alive connection: reconnect and retry
                # (only before any response byte arrived)
                self.close()
                if method == "POST" and attempt > 0:
                    raise
                continue
            lines = hdr.decode("latin-1").split("\r\n")
            code = int(lines[0].split(" ", 2)[1])
            clen, close = 0, False
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    clen = int(v)
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            data = await self.r.readexactly(clen) if clen else b""
            if close or lines[0].startswith("HTTP/1.0"):
                self.close()
            return code, data
        raise ConnectionError("could not send %s %s" % (method, path))

    def close(self):
        if self.w is not None:
            try:
                self.w.close()
            except Exception:
                pass
        self.r = self.w = None


async def worker_main(a, wid, t0):
    u = urlparse(a.url)
    host, port = u.hostname, u.port or 80
    mine = list(range(wid, a.orders, a.procs))
    conns = [Conn(host, port) for _ in range(a.conns)]
    for c in conns:
        await c.open()
    rec = {}  # index -> [send, rtt_end, code, id]
    cpu0 = os.times()
    it = iter(mine)
    deadline = t0 + a.timeout

    async def poster(c):
        for i in it:
            if a.rate > 0:
                d = t0 + i / a.rate - time.time()
                if d > 0:
                    await asyncio.sleep(d)
            body = json.dumps(
                {
                    "store_id": "%s%d" % (a.store_prefix, i % a.stores),
                    "items": [{"sku": "sku-%d" % (i % 97), "qty": 1 + i % 3}],
                    "note": "bench %d" % i,
                },
                separators=(",", ":"),
            ).encode()
            s = time.time()
            try:
                code, data = await c.request("POST", "/api/orders", body)
            except Exception as e:  # noqa: BLE001
                rec[i] = [s, time.time(), -1, None]
                print("POST failed: %r" % e, file=sys.stderr)
                continue
            e = time.time()
            oid = json.loads(data).get("id") if code in (200, 201) else None
            rec[i] = [s, e, code, oid]

    d = time.time() - t0
    if d < 0:
        await asyncio.sleep(-d)
    await asyncio.gather(*(poster(c) for c in conns))
    posts_done = time.time()

    # read back, oldest first
    todo = [i for i in mine if rec[i][3]]
    it2 = iter(todo)
    final = {}

    async def poller(c):
        for i in it2:
            oid = rec[i][3]
            while True:
                try:
                    code, data = await c.request("GET", "/api/orders/" + oid)
                except Exception:
                    code, data = -1, b"{}"
                if code == 200:
                    o = json.loads(data)
                    if o.get("status") in ("accepted", "rejected"):
                        final[i] = o
                        break
                if time.time() > deadline:
                    break
                await asyncio.sleep(0.2)

    await asyncio.gather(*(poller(c) for c in conns))
    for c in conns:
        c.close()
    out = []
    for i in mine:
        s, e, code, oid = rec[i]
        o = final.get(i)
        recv_at = acc_at = disp_at = None
        status = None
        if o is not None:
            status = o["status"]
            for h in o.get("history", []):
                if h["status"] == "received" and recv_at is None:
                    recv_at = parse_ts(h["at"])
                if h["status"] == "dispatched" and disp_at is None:
                    disp_at = parse_ts(h["at"])
                if h["status"] == status:
                    acc_at = parse_ts(h["at"])
        slot = t0 + i / a.rate if a.rate > 0 else s
        out.append((i, s, e, code, oid, status, recv_at, acc_at, (o or {}).get("acks"), slot, disp_at))
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return out, posts_done, cpu


def worker(a, wid, t0, q):
    try:
        q.put((wid, asyncio.run(worker_main(a, wid, t0))))
    except Exception as e:  # noqa: BLE001
        q.put((wid, e))


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--orders", type=int, default=2000)
    ap.add_argument("--stores", type=int, default=4)
    ap.add_argument("--store-prefix", default="store-")
    ap.add_argument("--rate", type=float, default=0, help="orders/s, 0 = as fast as possible")
    ap.add_argument("--conns", type=int, default=8, help="connections per process")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120, help="seconds for the whole run")
    ap.add_argument("--store-out", default="", help="glob of store agents' stdout files")
    ap.add_argument("--label", default="")
    ap.add_argument("--dump", default="", help="write one JSON line per order (times) to this file")
    a = ap.parse_args()

    t0 = time.time() + 0.5
    q = mp.Queue()
    ps = [mp.Process(target=worker, args=(a, w, t0, q), daemon=True) for w in range(a.procs)]
    for p in ps:
        p.start()
    rows, posts_done, gen_cpu = [], 0, 0.0
    for _ in ps:
        wid, res = q.get(timeout=a.timeout + 60)
        if isinstance(res, Exception):
            raise SystemExit("worker %d failed: %r" % (wid, res))
        rows += res[0]
        posts_done = max(posts_done, res[1])
        gen_cpu += res[2]
    for p in ps:
        p.join(5)

    created = [r for r in rows if r[3] in (200, 201)]
    failed = len(rows) - len(created)
    acked = [r for r in created if r[7] is not None]
    first_send = min(r[1] for r in rows)
    last_ack = max((r[7] for r in acked), default=first_send)
    lat = [(r[7] - r[1]) * 1000 for r in acked]
    rtt = [(r[2] - r[1]) * 1000 for r in created]
    srv = [(r[7] - r[6]) * 1000 for r in acked if r[6] is not None]
    late = [(r[1] - r[9]) * 1000 for r in rows]
    sched = [(r[7] - r[9]) * 1000 for r in acked]
    if a.dump:
        with open(a.dump, "w") as fh:
            for r in rows:
                fh.write(json.dumps({"id": r[4], "slot": r[9], "send": r[1], "rtt_end": r[2],
                                     "code": r[3], "received": r[6], "dispatched": r[10],
                                     "acked": r[7]}) + "\n")
    span = last_ack - first_send
    post_span = max(r[2] for r in rows) - first_send
    lost_ids = {r[4] for r in created if r[7] is None}
    dup = None
    printed = None
    if a.store_out:
        counts = {}
        for f in glob.glob(a.store_out):
            with open(f, errors="replace") as fh:
                for ln in fh:
                    try:
                        oid = json.loads(ln)["id"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    counts[oid] = counts.get(oid, 0) + 1
        dup = sum(1 for r in created if counts.get(r[4], 0) > 1)
        printed = sum(1 for r in created if counts.get(r[4], 0) >= 1)
        lost_ids |= {r[4] for r in created if counts.get(r[4], 0) == 0}
    multi_ack = sum(1 for r in acked if (r[8] or 0) > 1)
    res = {
        "label": a.label,
        "orders": a.orders,
        "stores": a.stores,
        "target_rate": a.rate,
        "created": len(created),
        "post_failed": failed,
        "acked": len(acked),
        "lost": len(lost_ids),
        "dup": dup,
        "printed_by_stores": printed,
        "acks_more_than_once": multi_ack,
        "post_rate": round(len(created) / post_span, 1) if post_span > 0 else None,
        "orders_per_sec": round(len(acked) / span, 1) if span > 0 else None,
        "p50_ms": round(pct(lat, 50), 2) if lat else None,
        "p99_ms": round(pct(lat, 99), 2) if lat else None,
        "max_ms": round(max(lat), 2) if lat else None,
        "post_rtt_p50_ms": round(pct(rtt, 50), 2) if rtt else None,
        "post_rtt_p99_ms": round(pct(rtt, 99), 2) if rtt else None,
        "server_p50_ms": round(pct(srv, 50), 2) if srv else None,
        "server_p99_ms": round(pct(srv, 99), 2) if srv else None,
        "late_p50_ms": round(pct(late, 50), 2) if late else None,
        "late_p99_ms": round(pct(late, 99), 2) if late else None,
        "late_max_ms": round(max(late), 2) if late else None,
        "sched_p50_ms": round(pct(sched, 50), 2) if sched else None,
        "sched_p99_ms": round(pct(sched, 99), 2) if sched else None,
        "gen_cpu_s": round(gen_cpu, 2),
        "seconds": round(span, 3),
    }
    print(
        "%s: %d/%d acked, lost %d, dup %s, %.1f orders/s (POSTs at %.1f/s), latency p50 %s ms p99 %s ms"
        " (POST rtt p50 %s p99 %s; server received->accepted p50 %s p99 %s;"
        " sends late p50 %s p99 %s max %s ms, from the schedule p50 %s p99 %s; generator %.2f CPU-s)"
        % (a.label, len(acked), a.orders, res["lost"], dup, res["orders_per_sec"] or 0,
           res["post_rate"] or 0, res["p50_ms"], res["p99_ms"], res["post_rtt_p50_ms"],
           res["post_rtt_p99_ms"], res["server_p50_ms"], res["server_p99_ms"],
           res["late_p50_ms"], res["late_p99_ms"], res["late_max_ms"], res["sched_p50_ms"],
           res["sched_p99_ms"], gen_cpu),
        file=sys.stderr,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
