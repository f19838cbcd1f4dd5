"""The seed's order service, done the way the seed's team did it, configured so it works.

A Flask app with Flask-MQTT (which drives paho-mqtt underneath) talking to a local
Mosquitto:

* ``POST /api/orders`` with ``{"store_id", "items", "note"?}``: validates the body, stores
  the order in SQLite (WAL, ``synchronous=FULL``: the commit is fsynced before the answer,
  the same durability qosmos promises for its ``201``), publishes the order JSON at QoS 2
  to ``orders/{store_id}`` and answers ``201`` with the order plus ``"status"``.
* subscribes ``acks/+`` at QoS 2 (through Flask-MQTT >= 1.1, which keeps the QoS per topic:
  the seed's bug is fixed there) and records each ack: status ``accepted`` (or
  ``rejected``) with a wall-clock timestamp, in the same database, committed the same way.
* ``GET /api/orders/{id}``: the order with ``"status"`` and ``"history": [{"status", "at"}]``
  (RFC 3339, microseconds), like qosmos; plus ``"acks"``, how many acks arrived for it.

What it does not do (qosmos does): no outbox. If the process dies between the commit
and the publish, or while paho still holds the message in memory, the order is stored
but never sent; there is no redispatch of unacknowledged orders and no idempotency key.

Environment: ``MQTT_HOST`` (127.0.0.1), ``MQTT_PORT`` (1883), ``ORDERS_DB``
(./seed-orders.sqlite3), ``ACK_TOPIC`` (``acks/+``; with several worker processes use a
shared subscription such as ``$share/seed/acks/+`` so each ack is handled by one worker).
Each worker process gets its own MQTT connection (Flask-MQTT connects when the app is
created), so do not use gunicorn's ``--preload``.
"""

import json
import os
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timezone

from flask import Flask, jsonify, request
from flask_mqtt import Mqtt

DB_PATH = os.environ.get("ORDERS_DB", "seed-orders.sqlite3")
ACK_TOPIC = os.environ.get("ACK_TOPIC", "acks/+")

app = Flask(__name__)
app.config["MQTT_BROKER_URL"] = os.environ.get("MQTT_HOST", "127.0.0.1")
app.config["MQTT_BROKER_PORT"] = int(os.environ.get("MQTT_PORT", "1883"))
app.config["MQTT_KEEPALIVE"] = 30
app.config["MQTT_CLIENT_ID"] = "seed-app-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
app.config["MQTT_CLEAN_SESSION"] = True

_local = threading.local()


def db():
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(DB_PATH, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        _local.conn = conn
    return conn


def init_db():
    conn = db()
    conn.execute(
        """CREATE TABLE IF NOT EXISTS orders (
             id TEXT PRIMARY KEY,
             store_id TEXT NOT NULL,
             body TEXT NOT NULL,
             status TEXT NOT NULL,
             received_at TEXT NOT NULL,
             acked_at TEXT,
             acks INTEGER NOT NULL DEFAULT 0
           )"""
    )
    conn.execute("CREATE INDEX IF NOT EXISTS orders_status ON orders(status)")


def now_rfc3339():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


init_db()
mqtt = Mqtt(app)
granted = {}


@mqtt.on_connect()
def on_connect(client, userdata, flags, rc):
    app.logger.info("mqtt connected rc=%s", rc)


@mqtt.on_subscribe()
def on_subscribe(client, userdata, mid, granted_qos):
    granted[mid] = granted_qos
    if any(q != 2 for q in granted_qos):
        app.logger.warning("broker granted QoS %s for %s, asked 2", granted_qos, ACK_TOPIC)


@mqtt.on_message()
def on_ack(client, userdata, message):
    # Runs on paho's network thread (Flask-MQTT's loop_start).
    try:
        ack = json.loads(message.payload)
        order_id = ack["order_id"]
        status = ack.get("status", "accepted")
    except (ValueError, KeyError, TypeError):
        app.logger.warning("bad ack on %s", message.topic)
        return
    db().execute(
        "UPDATE orders SET acks = acks + 1,"
        " acked_at = CASE WHEN acked_at IS NULL THEN ? ELSE acked_at END,"
        " status = CASE WHEN status = 'received' THEN ? ELSE status END"
        " WHERE id = ?",
        (now_rfc3339(), status, order_id),
    )


mqtt.subscribe(ACK_TOPIC, qos=2)


def bad(field, msg, code=422):
    return jsonify({"error": "%s: %s" % (field, msg)}), code


@app.post("/api/orders")
def create_order():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return bad("body", "must be a JSON object", 400)
    store_id = body.get("store_id")
    if (
        not isinstance(store_id, str)
        or not 1 <= len(store_id) <= 64
        or not all(c.isascii() and (c.isalnum() or c in "_-") for c in store_id)
    ):
        return bad("store_id", "1 to 64 characters from [A-Za-z0-9_-]")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        return bad("items", "at least one item")
    for i, it in enumerate(items):
        if (
            not isinstance(it, dict)
            or not isinstance(it.get("sku"), str)
            or not isinstance(it.get("qty"), int)
            or isinstance(it.get("qty"), bool)
            or it["qty"] < 1
        ):
            return bad("items[%d]" % i, "needs a sku and a positive integer qty")
    order = {"id": uuid.uuid4().hex, "store_id": store_id, "items": items}
    if body.get("note") is not None:
        order["note"] = str(body["note"])
    order["created_at"] = now_rfc3339()
    payload = json.dumps(order, separators=(",", ":"))
    db().execute(
        "INSERT INTO orders (id, store_id, body, status, received_at) VALUES (?, ?, ?, 'received', ?)",
        (order["id"], store_id, payload, order["created_at"]),
    )
    mqtt.publish("orders/" + store_id, payload, qos=2)
    out = dict(order, status="received")
    return jsonify(out), 201, {"Location": "/api/orders/" + order["id"]}


def row_to_json(row):
    oid, store_id, body, status, received_at, acked_at, acks = row
    order = json.loads(body)
    order["status"] = status
    history = [{"status": "received", "at": received_at}]
    if acked_at:
        history.append({"status": status, "at": acked_at})
    order["history"] = history
    order["acks"] = acks
    return order


COLS = "id, store_id, body, status, received_at, acked_at, acks"


@app.get("/api/orders/<oid>")
def get_order(oid):
    row = db().execute("SELECT %s FROM orders WHERE id = ?" % COLS, (oid,)).fetchone()
    if row is None:
        return jsonify({"error": "order not found"}), 404
    return jsonify(row_to_json(row))


@app.get("/api/orders")
def list_orders():
    sql, args = "SELECT %s FROM orders" % COLS, []
    conds = []
    if request.args.get("status"):
        conds.append("status = ?")
        args.append(request.args["status"])
    if request.args.get("store_id"):
        conds.append("store_id = ?")
        args.append(request.args["store_id"])
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    sql += " ORDER BY received_at DESC LIMIT ?"
    args.append(min(int(request.args.get("limit", "100")), 1000))
    return jsonify([row_to_json(r) for r in db().execute(sql, args)])


@app.get("/healthz")
def healthz():
    return ("ok", 200) if mqtt.connected else ("mqtt not connected", 503)


if __name__ == "__main__":
    # The Flask development server (threaded), for the "dev server" variant.
    from werkzeug.serving import WSGIRequestHandler

    WSGIRequestHandler.protocol_version = "HTTP/1.1"  # keep-alive
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
