"""The seed stack's store: a paho-mqtt agent for one store.

Subscribes ``orders/{id}`` at QoS 2 with a persistent session (fixed client id, clean
session off, so QoS 2 orders published while it is away are kept by the broker), prints
each order JSON as one line on stdout (like ``qosmos store``) and publishes
``{"order_id", "status": "accepted"}`` to ``acks/{id}`` at QoS 2.

Unlike ``qosmos store`` it keeps no journal: no fsync per order, and a redelivery after
its own restart would be handled again. It stops on SIGTERM/SIGINT or after --max-seconds.

Usage: store.py --store-id ID [--host 127.0.0.1] [--port 1883] [--max-seconds 3600]
"""

import argparse
import json
import signal
import sys
import threading

import paho.mqtt.client as mqtt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store-id", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--max-seconds", type=float, default=3600)
    a = ap.parse_args()

    sid = a.store_id
    stop = threading.Event()
    out = sys.stdout

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe("orders/" + sid, qos=2)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        for rc in reason_codes:
            if rc.value != 2:
                print("store %s: broker granted %s, asked QoS 2" % (sid, rc), file=sys.stderr)

    def on_message(client, userdata, msg):
        try:
            order = json.loads(msg.payload)
            oid = order["id"]
        except (ValueError, KeyError, TypeError):
            print("store %s: bad order payload" % sid, file=sys.stderr)
            return
        out.write(msg.payload.decode() + "\n")
        out.flush()
        client.publish(
            "acks/" + sid,
            json.dumps({"order_id": oid, "status": "accepted"}, separators=(",", ":")),
            qos=2,
        )

    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="seed-store-" + sid, clean_session=False
    )
    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect(a.host, a.port, keepalive=30)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    c.loop_start()
    stop.wait(a.max_seconds)
    c.loop_stop()
    c.disconnect()


if __name__ == "__main__":
    main()
