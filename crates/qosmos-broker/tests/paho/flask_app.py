"""The seed's Flask app, with the real Flask-MQTT from PyPI, pointed at a test broker.

Usage: flask_app.py PORT [QOS]

As in the seed (seed/000_66fc3e2343d1dbdd.txt), it calls mqtt.subscribe(topic="TEST", qos=2)
once, right after Mqtt(app). It does not serve HTTP (app.run() is not what is being tested);
it stays up, printing one JSON line per event, until stdin is closed:
  {"event": "versions", "flask_mqtt", "paho_mqtt", "flask"}
  {"event": "subscribe_called", "result", "topics": {topic: qos}}   Flask-MQTT's own record
  {"event": "connected", "n", "rc"}      each CONNACK (Flask-MQTT re-subscribes on each)
  {"event": "disconnected", "rc"}
  {"event": "message", "topic", "payload", "qos"}
"""

import json
import sys
import threading
from importlib.metadata import version

from flask import Flask
from flask_mqtt import Mqtt

port = int(sys.argv[1])
qos = int(sys.argv[2]) if len(sys.argv) > 2 else 2
out_lock = threading.Lock()


def emit(**kw):
    with out_lock:
        print(json.dumps(kw), flush=True)


emit(
    event="versions",
    flask_mqtt=version("Flask-MQTT"),
    paho_mqtt=version("paho-mqtt"),
    flask=version("Flask"),
)

app = Flask(__name__)
app.config["MQTT_BROKER_URL"] = "127.0.0.1"
app.config["MQTT_BROKER_PORT"] = port
app.config["MQTT_KEEPALIVE"] = 30
app.config["MQTT_CLIENT_ID"] = "flask-seed"

# Mqtt() then init_app(app) (Flask's app-factory form) rather than the seed's Mqtt(app): the
# same code runs, but the handlers below are in place before the connection is made, so the
# first CONNACK is not missed.
mqtt = Mqtt()
connections = 0


@mqtt.on_connect()
def on_connect(client, userdata, flags, rc):
    global connections
    connections += 1
    emit(event="connected", n=connections, rc=int(rc))


@mqtt.on_disconnect()
def on_disconnect(client, userdata, rc):
    emit(event="disconnected", rc=int(rc))


@mqtt.on_message()
def on_message(client, userdata, message):
    emit(
        event="message",
        topic=message.topic,
        payload=message.payload.decode(errors="replace"),
        qos=message.qos,
    )


mqtt.init_app(app)  # connects and starts paho's network thread

# The seed's call: topic and QoS as keyword arguments, right after connecting.
result, mid = mqtt.subscribe(topic="TEST", qos=qos)
emit(
    event="subscribe_called",
    result=int(result),
    topics={t: tq.qos for t, tq in mqtt.topics.items()},
)

sys.stdin.read()
mqtt._disconnect()
emit(event="done", connections=connections)
