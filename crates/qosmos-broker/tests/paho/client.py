"""A paho-mqtt client driven by a JSON plan, for the broker's interop tests.

Usage: client.py '<plan JSON>'

The plan:
  {"port": 1883, "version": 311 | 5, "client_id": "", "clean": true, "keepalive": 60,
   "connect_props": {"SessionExpiryInterval": 60, ...},      # MQTT 5.0 CONNECT properties
   "will": {"topic", "payload", "qos", "retain", "props"},
   "steps": [ ...one object per step, run in order... ]}

Steps (each leaves one entry in the result's "steps"):
  {"sub": [[filter, qos] | [filter, {"qos", "no_local", "rap", "rh"}], ...], "props": {...}}
                                        -> {"granted": [reason code per filter]}
  {"unsub": [filter, ...]}              -> {"reason_codes": [...]} (5.0) or {}
  {"pub": topic, "payload": "text", "qos": 0, "retain": false, "props": {...}}
                                        -> {"rc": PUBACK/PUBREC reason code (5.0), else 0}
  {"expect": n, "timeout": s}           waits until n messages in total were received
  {"quiet": s}                          just waits s seconds (to show that nothing arrives)
  {"event": name}                       prints {"event": name} as its own line at once
  {"wait_stdin": true}                  waits until stdin is closed
  {"wait_line": true}                   waits for one line on stdin (the test's go-ahead)
  {"await_disconnect": s}               waits until the broker closed the connection
  {"disconnect": {"rc": 0, "props": {...}}}  a normal DISCONNECT
  {"abort": true}                       ends the process without DISCONNECT (socket closed
                                        by the OS): the broker sees a lost connection

Properties are given by paho's names (e.g. "MessageExpiryInterval", "UserProperty":
[[k, v]], "CorrelationData": "text"). The last stdout line is the result:
  {"connack": {"session_present", "rc", "props"}, "steps": [...], "messages": [...],
   "disconnects": [{"rc", "props"}]}
Exit status 1 (with {"error": ...} as the last line) when a step fails.
"""

import base64
import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 15.0


class Failure(Exception):
    pass


def props_from(kind, d):
    if not d:
        return None
    p = Properties(kind)
    for k, v in d.items():
        if k == "UserProperty":
            v = [tuple(x) for x in v]
        elif k == "CorrelationData":
            v = v.encode()
        setattr(p, k, v)
    return p


def props_to(p):
    if p is None:
        return {}
    d = p.json()
    if "CorrelationData" in d:
        d["CorrelationData"] = bytes.fromhex(d["CorrelationData"]).decode(errors="replace")
    if "UserProperty" in d:
        d["UserProperty"] = [list(x) for x in d["UserProperty"]]
    if "SubscriptionIdentifier" in d and not isinstance(d["SubscriptionIdentifier"], list):
        d["SubscriptionIdentifier"] = [d["SubscriptionIdentifier"]]
    return d


def rc_value(rc):
    return rc if isinstance(rc, int) else rc.value


def payload_text(b):
    try:
        return b.decode()
    except UnicodeDecodeError:
        return "b64:" + base64.b64encode(b).decode()


class Runner:
    def __init__(self, plan):
        self.plan = plan
        self.v5 = plan.get("version", 311) == 5
        self.cond = threading.Condition()
        self.connack = None
        self.messages = []
        self.disconnects = []
        self.subacks = {}
        self.unsubacks = {}
        self.pubacks = {}
        kwargs = dict(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=plan.get("client_id", ""),
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if not self.v5:
            kwargs["clean_session"] = plan.get("clean", True)
        self.c = mqtt.Client(**kwargs)
        self.c.on_connect = self.on_connect
        self.c.on_message = self.on_message
        self.c.on_disconnect = self.on_disconnect
        self.c.on_subscribe = self.on_subscribe
        self.c.on_unsubscribe = self.on_unsubscribe
        self.c.on_publish = self.on_publish
        will = plan.get("will")
        if will:
            self.c.will_set(
                will["topic"],
                will.get("payload", ""),
                will.get("qos", 0),
                will.get("retain", False),
                props_from(PacketTypes.WILLMESSAGE, will.get("props")),
            )

    # callbacks (paho's network thread)
    def on_connect(self, c, userdata, flags, rc, props):
        with self.cond:
            self.connack = {
                "session_present": bool(flags.session_present),
                "rc": rc_value(rc),
                "props": props_to(props),
            }
            self.cond.notify_all()

    def on_message(self, c, userdata, m):
        with self.cond:
            self.messages.append(
                {
                    "topic": m.topic,
                    "payload": payload_text(m.payload),
                    "qos": m.qos,
                    "retain": bool(m.retain),
                    "dup": bool(m.dup),
                    "props": props_to(getattr(m, "properties", None)) if self.v5 else {},
                }
            )
            self.cond.notify_all()

    def on_disconnect(self, c, userdata, flags, rc, props):
        with self.cond:
            self.disconnects.append({"rc": rc_value(rc), "props": props_to(props)})
            self.cond.notify_all()

    def on_subscribe(self, c, userdata, mid, rcs, props):
        with self.cond:
            self.subacks[mid] = [rc_value(r) for r in rcs]
            self.cond.notify_all()

    def on_unsubscribe(self, c, userdata, mid, rcs, props):
        with self.cond:
            self.unsubacks[mid] = [rc_value(r) for r in rcs]
            self.cond.notify_all()

    def on_publish(self, c, userdata, mid, rc, props):
        with self.cond:
            self.pubacks[mid] = rc_value(rc)
            self.cond.notify_all()

    def wait(self, what, pred, timeout=TIMEOUT):
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise Failure("timed out waiting for " + what)

    def run(self):
        p = self.plan
        kwargs = {}
        if self.v5:
            kwargs["clean_start"] = p.get("clean", True)
            kwargs["properties"] = props_from(PacketTypes.CONNECT, p.get("connect_props"))
        self.c.connect("127.0.0.1", p["port"], p.get("keepalive", 60), **kwargs)
        self.c.loop_start()
        self.wait("CONNACK", lambda: self.connack is not None or self.disconnects)
        if self.connack is None or self.connack["rc"] != 0:
            raise Failure("connection refused: %r %r" % (self.connack, self.disconnects))
        results = []
        for step in p.get("steps", []):
            results.append(self.step(step))
            if step.get("abort"):
                break
        return results

    def step(self, s):
        if "sub" in s:
            subs = []
            for f, o in s["sub"]:
                if isinstance(o, int):
                    o = {"qos": o}
                if self.v5:
                    subs.append(
                        (
                            f,
                            SubscribeOptions(
                                qos=o.get("qos", 0),
                                noLocal=o.get("no_local", False),
                                retainAsPublished=o.get("rap", False),
                                retainHandling=o.get("rh", 0),
                            ),
                        )
                    )
                else:
                    subs.append((f, o.get("qos", 0)))
            rc, mid = self.c.subscribe(subs, properties=props_from(PacketTypes.SUBSCRIBE, s.get("props")))
            if rc != 0:
                raise Failure("subscribe failed: %d" % rc)
            self.wait("SUBACK", lambda: mid in self.subacks)
            return {"granted": self.subacks[mid]}
        if "unsub" in s:
            rc, mid = self.c.unsubscribe(s["unsub"])
            self.wait("UNSUBACK", lambda: mid in self.unsubacks)
            return {"reason_codes": self.unsubacks[mid]}
        if "pub" in s:
            info = self.c.publish(
                s["pub"],
                s.get("payload", ""),
                s.get("qos", 0),
                s.get("retain", False),
                props_from(PacketTypes.PUBLISH, s.get("props")),
            )
            if info.rc != 0:
                raise Failure("publish failed: %d" % info.rc)
            info.wait_for_publish(TIMEOUT)
            if not info.is_published():
                raise Failure("publish not acknowledged")
            if s.get("qos", 0) == 0:
                return {"rc": 0}
            self.wait("publish callback", lambda: info.mid in self.pubacks)
            return {"rc": self.pubacks[info.mid]}
        if "expect" in s:
            n = s["expect"]
            self.wait("%d messages" % n, lambda: len(self.messages) >= n, s.get("timeout", TIMEOUT))
            return {"count": len(self.messages)}
        if "quiet" in s:
            time.sleep(s["quiet"])
            return {"count": len(self.messages)}
        if "event" in s:
            print(json.dumps({"event": s["event"]}), flush=True)
            return {}
        if "wait_stdin" in s:
            sys.stdin.read()
            return {}
        if "wait_line" in s:
            sys.stdin.readline()
            return {}
        if "await_disconnect" in s:
            self.wait("the broker to disconnect", lambda: self.disconnects, s["await_disconnect"])
            return {"disconnect": self.disconnects[0]}
        if "disconnect" in s:
            d = s["disconnect"] or {}
            rc = d.get("rc")
            if rc is not None:
                rc = ReasonCode(PacketTypes.DISCONNECT, identifier=rc)
            self.c.disconnect(rc, props_from(PacketTypes.DISCONNECT, d.get("props")))
            self.c.loop_stop()
            return {}
        if "abort" in s:
            return {}
        raise Failure("unknown step %r" % s)


def main():
    plan = json.loads(sys.argv[1])
    r = Runner(plan)
    out = {}
    code = 0
    try:
        out["steps"] = r.run()
    except Failure as e:
        out["error"] = str(e)
        code = 1
    with r.cond:
        out["connack"] = r.connack
        out["messages"] = list(r.messages)
        out["disconnects"] = list(r.disconnects)
    print(json.dumps(out), flush=True)
    # os._exit: no DISCONNECT, no cleanup. After an "abort" step this is what closes the
    # socket; after "disconnect" the DISCONNECT is already out.
    os._exit(code)


if __name__ == "__main__":
    main()
