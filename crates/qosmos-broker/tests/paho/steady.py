"""A well-behaved paho-mqtt client that publishes to itself at QoS 2 until told to stop.

Usage: steady.py PORT VERSION(311|5) CLIENT_ID

Subscribes to steady/CLIENT_ID at QoS 2, prints {"event": "ready"}, then publishes numbered
QoS 2 messages every 10 ms until stdin is closed. Then it waits for every message to come
back and prints {"sent", "received", "missing", "duplicates", "disconnects", "granted"}. Exits
1 if anything was lost, duplicated, or the connection dropped.
"""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

port, version, client_id = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
topic = "steady/" + client_id
lock = threading.Condition()
received = []
disconnects = []
granted = []
connected = threading.Event()

c = mqtt.Client(
    callback_api_version=CallbackAPIVersion.VERSION2,
    client_id=client_id,
    protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311,
    reconnect_on_failure=False,
)


def on_connect(c, u, flags, rc, props):
    if rc == 0:
        connected.set()


def on_message(c, u, m):
    with lock:
        received.append((int(m.payload), m.qos))
        lock.notify_all()


def on_subscribe(c, u, mid, rcs, props):
    with lock:
        granted.extend(r.value for r in rcs)
        lock.notify_all()


def on_disconnect(c, u, flags, rc, props):
    with lock:
        disconnects.append(rc.value if hasattr(rc, "value") else rc)
        lock.notify_all()


c.on_connect = on_connect
c.on_message = on_message
c.on_subscribe = on_subscribe
c.on_disconnect = on_disconnect
c.connect("127.0.0.1", port, 30)
c.loop_start()
if not connected.wait(10):
    print(json.dumps({"error": "no CONNACK"}), flush=True)
    sys.exit(1)
c.subscribe(topic, 2)
with lock:
    lock.wait_for(lambda: granted, 10)
print(json.dumps({"event": "ready"}), flush=True)

stop = threading.Event()


def watch_stdin():
    sys.stdin.read()
    stop.set()


threading.Thread(target=watch_stdin, daemon=True).start()
sent = 0
infos = []
while not stop.is_set() and not disconnects:
    infos.append(c.publish(topic, str(sent), 2))
    sent += 1
    time.sleep(0.01)

for info in infos:
    info.wait_for_publish(10)
with lock:
    lock.wait_for(lambda: len(received) >= sent or disconnects, 10)
    got = [n for n, _ in received]
    out = {
        "sent": sent,
        "received": len(got),
        "missing": sorted(set(range(sent)) - set(got)),
        "duplicates": sorted({n for n in got if got.count(n) > 1}),
        "below_qos2": [n for n, q in received if q != 2],
        "disconnects": list(disconnects),
        "granted": list(granted),
    }
c.disconnect()
c.loop_stop()
ok = (
    sent > 0
    and not out["missing"]
    and not out["duplicates"]
    and not out["below_qos2"]
    and not out["disconnects"]
    and out["granted"] == [2]
)
print(json.dumps(out), flush=True)
sys.exit(0 if ok else 1)
