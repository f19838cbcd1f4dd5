"""A paho-mqtt client that outlives broker crashes, for the SIGKILL loop in ../durable.rs.

Usage:
  kill_client.py pub PORT CLIENT_ID QOS PREFIX   publishes PREFIX-0, PREFIX-1, ... to
        kill/PREFIX at QOS with a persistent session (clean_session=False), reconnecting
        whenever the broker goes away; paho resends what was not acknowledged. Prints
        "ack PAYLOAD" once paho reports the publish complete (PUBACK / PUBCOMP), and every 50
        messages also sets the retained message of keep/PREFIX ("ack-retained PAYLOAD"). On a
        line "stop" on stdin it stops publishing, waits for every outstanding publish to
        complete, prints "done" and exits.
  kill_client.py sub PORT CLIENT_ID              subscribes to kill/# at QoS 2 with a
        persistent session and prints "msg TOPIC PAYLOAD" for each message, reconnecting
        whenever the broker goes away; exits on a line "stop" on stdin.
  kill_client.py retained PORT TOPIC_FILTER      connects with a clean session, prints
        "retained TOPIC PAYLOAD" for each retained message, then "done".

Every line is flushed at once: the test reads them as events.
"""

import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

lock = threading.Lock()


def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def client(client_id, clean):
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean,
        protocol=mqtt.MQTTv311,
    )
    c.reconnect_delay_set(min_delay=0.02, max_delay=0.2)
    # Keep every unacknowledged message: nothing is dropped client side.
    c.max_queued_messages_set(0)
    c.max_inflight_messages_set(50)
    return c


def wait_stdin_stop(stop):
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    stop.set()


def publisher(port, client_id, qos, prefix):
    c = client(client_id, False)
    pending = {}  # mid -> line to print when acknowledged
    early = set()  # mids acknowledged before publish() returned them to us
    cond = threading.Condition()
    connected = threading.Event()

    def on_connect(c, userdata, flags, rc, props):
        connected.set()

    def on_publish(c, userdata, mid, rc, props):
        # Called by paho's thread with paho's own lock held: never call into paho under `cond`.
        with cond:
            p = pending.pop(mid, None)
            if p is None:
                early.add(mid)
            cond.notify_all()
        if p is not None:
            say(p)

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect_async("127.0.0.1", port, keepalive=5)
    c.loop_start()
    stop = threading.Event()
    threading.Thread(target=wait_stdin_stop, args=(stop,), daemon=True).start()
    connected.wait(30)
    i = 0
    while not stop.is_set():
        with cond:
            # A window of outstanding publishes, so the broker sees batches.
            while len(pending) >= 40 and not stop.is_set():
                cond.wait(0.1)
        if stop.is_set():
            break
        payload = f"{prefix}-{i}"
        topic = f"kill/{prefix}"
        line = f"ack {payload}"
        retained = i % 50 == 0
        if retained:
            topic = f"keep/{prefix}"
            line = f"ack-retained {payload}"
        info = c.publish(topic, payload, qos=qos, retain=retained)
        with cond:
            if info.mid in early:
                early.discard(info.mid)
                say(line)
            else:
                pending[info.mid] = line
        i += 1
    deadline = time.time() + 60
    with cond:
        while pending and time.time() < deadline:
            cond.wait(0.1)
    say("done" if not pending else f"unfinished {len(pending)}")
    c.disconnect()
    c.loop_stop()


def subscriber(port, client_id):
    c = client(client_id, False)

    def on_connect(c, userdata, flags, rc, props):
        # Subscribed again on every connection: idempotent, and needed only the first time.
        c.subscribe("kill/#", qos=2)

    def on_subscribe(c, userdata, mid, rcs, props):
        say("subscribed")

    def on_message(c, userdata, m):
        say(f"msg {m.topic} {m.payload.decode()}")

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect_async("127.0.0.1", port, keepalive=5)
    c.loop_start()
    stop = threading.Event()
    wait_stdin_stop(stop)
    c.disconnect()
    c.loop_stop()


def retained(port, topic_filter):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    got = threading.Event()

    def on_connect(c, userdata, flags, rc, props):
        c.subscribe(topic_filter, qos=1)

    def on_message(c, userdata, m):
        if m.retain:
            say(f"retained {m.topic} {m.payload.decode()}")

    def on_subscribe(c, userdata, mid, rcs, props):
        got.set()

    c.on_connect = on_connect
    c.on_message = on_message
    c.on_subscribe = on_subscribe
    c.connect("127.0.0.1", port)
    c.loop_start()
    got.wait(15)
    time.sleep(1.0)  # retained messages follow the SUBACK; nothing signals the last one
    say("done")
    c.disconnect()
    c.loop_stop()


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "pub":
        publisher(port, sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif mode == "sub":
        subscriber(port, sys.argv[3])
    elif mode == "retained":
        retained(port, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
