#!/usr/bin/env python3
"""Capture real MQTT 3.1.1 and 5.0 packets from independent implementations.

Starts a private Mosquitto broker on a free loopback port, puts a recording TCP proxy
in front of it (one proxy per client, so every byte is attributed to the program that
wrote it), drives scenarios with paho-mqtt and mosquitto_pub / mosquitto_sub, splits
each direction's byte stream into MQTT packets by their fixed header, and writes

    crates/qosmos-mqtt/tests/captures/v311.txt
    crates/qosmos-mqtt/tests/captures/v5.txt

one packet per line: `<source> <direction> <PACKET_TYPE> <hex>`. The run fails unless
every control packet type of each version appears at least once.

Only AUTH is not captured: Mosquitto without an auth plugin never sends or accepts it,
so one AUTH exchange is built by hand from the spec layout and labelled `handmade`.

Regenerate (needs `mosquitto`, `mosquitto-clients` and paho-mqtt 2.x):

    python3 -m venv /tmp/capvenv && /tmp/capvenv/bin/pip install 'paho-mqtt>=2,<3'
    /tmp/capvenv/bin/python tools/capture/capture.py

(`.ci/run` builds `.venv` with paho-mqtt too: `.venv/bin/python tools/capture/capture.py`.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError:  # pragma: no cover - a usage error, not a bug
    sys.exit(
        "capture.py needs paho-mqtt 2.x: python3 -m venv /tmp/capvenv && "
        "/tmp/capvenv/bin/pip install 'paho-mqtt>=2,<3', then run it with /tmp/capvenv/bin/python"
    )

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "crates" / "qosmos-mqtt" / "tests" / "captures"

# Everything waits with a deadline: a capture run must never hang.
WAIT = 10.0
PROC_TIMEOUT = 20

PACKET_NAMES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "AUTH",
}
REQUIRED = {
    "v311": [n for t, n in sorted(PACKET_NAMES.items()) if n != "AUTH"],
    "v5": [n for _, n in sorted(PACKET_NAMES.items())],
}


class CaptureError(Exception):
    pass


# --------------------------------------------------------------------------------------
# Framing


def split_packets(buf: bytearray) -> list[bytes]:
    """Remove and return every complete MQTT packet at the front of `buf`."""
    out = []
    while len(buf) >= 2:
        remaining, multiplier, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return out  # length not complete yet
            b = buf[i]
            remaining += (b & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise CaptureError(f"malformed remaining length in {bytes(buf[:8]).hex()}")
        total = i + remaining
        if len(buf) < total:
            return out
        out.append(bytes(buf[:total]))
        del buf[:total]
    return out


def connect_version(packet: bytes) -> str:
    """The protocol level of a CONNECT packet: 'v311' (4) or 'v5' (5)."""
    # fixed header, then protocol name (u16 length + "MQTT"), then the level byte.
    i = 1
    while packet[i] & 0x80:
        i += 1
    i += 1
    name_len = int.from_bytes(packet[i : i + 2], "big")
    level = packet[i + 2 + name_len]
    return {4: "v311", 5: "v5"}.get(level, f"level{level}")


# --------------------------------------------------------------------------------------
# Recording proxy


@dataclass
class Record:
    seq: int
    version: str
    source: str
    direction: str
    data: bytes
    tag: str = ""  # which proxy saw it

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.data[0] >> 4, f"RESERVED{self.data[0] >> 4}")


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.records: list[Record] = []
        self.errors: list[str] = []

    def add(self, version: str, source: str, direction: str, data: bytes, tag: str) -> None:
        with self.cond:
            self.records.append(Record(len(self.records), version, source, direction, data, tag))
            self.cond.notify_all()

    def count(self, tag: str, direction: str, name: str) -> int:
        return sum(
            1
            for r in self.records
            if r.tag == tag and r.direction == direction and r.name == name
        )

    def wait_for(self, tag: str, direction: str, name: str, n: int = 1, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count(tag, direction, name) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CaptureError(f"timed out waiting for {n} x {direction} {name} on {tag}")
                self.cond.wait(left)


class Proxy:
    """A TCP proxy for one client program: every byte it forwards is recorded.

    c2s packets are attributed to `source`, s2c packets to `mosquitto-broker`.
    """

    def __init__(self, recorder: Recorder, source: str, version: str, upstream_port: int, tag: str):
        self.recorder, self.source, self.version = recorder, source, version
        self.upstream_port, self.tag = upstream_port, tag
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=WAIT)
            upstream.settimeout(None)
            client.settimeout(None)
            self.sockets += [client, upstream]
            for src, dst, direction in ((client, upstream, "c2s"), (upstream, client, "s2c")):
                t = threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = bytearray()
        source = self.source if direction == "c2s" else "mosquitto-broker"
        forward = True
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                buf += chunk
                for pkt in split_packets(buf):
                    if direction == "c2s" and pkt[0] >> 4 == 1:
                        seen = connect_version(pkt)
                        if seen != self.version:
                            self.recorder.errors.append(
                                f"{self.tag}: expected {self.version}, client sent CONNECT {seen}"
                            )
                    self.recorder.add(self.version, source, direction, pkt, self.tag)
                if forward:
                    try:
                        dst.sendall(chunk)
                    except OSError:
                        forward = False  # the receiver left; keep recording what is sent
        except (OSError, CaptureError) as e:
            if not self.closing.is_set() and not isinstance(e, (ConnectionResetError, BrokenPipeError)):
                self.recorder.errors.append(f"{self.tag} {direction}: {e!r}")
        finally:
            if buf:
                self.recorder.errors.append(f"{self.tag} {direction}: {len(buf)} trailing bytes")
            # Half-close only: the other direction may still carry packets that the peer
            # sends after this side stopped (e.g. UNSUBACK to a client that already left).
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.closing.set()
        self.listener.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=2)


# --------------------------------------------------------------------------------------
# The broker


@dataclass
class Broker:
    open_port: int  # anonymous clients welcome
    closed_port: int  # anonymous clients refused: gives a refusing CONNACK
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> Broker:
    open_port, closed_port = free_port(), free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        "per_listener_settings true\n"
        "persistence false\n"
        "log_dest stderr\n"
        "log_type all\n"
        f"listener {open_port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"listener {closed_port} 127.0.0.1\n"
        "allow_anonymous false\n"
    )
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CaptureError(f"mosquitto exited early:\n{log.read_text()}")
        try:
            for p in (open_port, closed_port):
                socket.create_connection(("127.0.0.1", p), timeout=0.5).close()
            return Broker(open_port, closed_port, proc, log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise CaptureError("mosquitto did not start listening")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


# --------------------------------------------------------------------------------------
# Scenario helpers


class Session:
    """Shared state of one capture run: the broker, the recorder, every proxy opened."""

    def __init__(self, broker: Broker, recorder: Recorder):
        self.broker, self.recorder = broker, recorder
        self.proxies: list[Proxy] = []
        self.procs: list[subprocess.Popen] = []
        self.counter = 0

    def proxy(self, source: str, version: str, closed: bool = False) -> Proxy:
        self.counter += 1
        upstream = self.broker.closed_port if closed else self.broker.open_port
        p = Proxy(self.recorder, source, version, upstream, f"{source}-{version}-{self.counter}")
        self.proxies.append(p)
        return p

    def wait(self, proxy: Proxy, direction: str, name: str, n: int = 1, timeout: float = WAIT) -> None:
        self.recorder.wait_for(proxy.tag, direction, name, n, timeout)

    def spawn(self, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str]) -> None:
        proc = self.spawn(argv)
        try:
            out, err = proc.communicate(timeout=PROC_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise CaptureError(f"timed out: {' '.join(argv)}")
        if proc.returncode != 0:
            raise CaptureError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode(errors='replace')}")

    def finish(self, proc: subprocess.Popen, what: str) -> None:
        try:
            _, err = proc.communicate(timeout=PROC_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise CaptureError(f"timed out: {what}")
        if proc.returncode != 0:
            raise CaptureError(f"{what} exited {proc.returncode}: {err.decode(errors='replace')}")

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        for p in self.proxies:
            p.close()


def paho_client(version: str, client_id: str, clean_session: bool | None = None, manual_ack: bool = False) -> mqtt.Client:
    protocol = mqtt.MQTTv5 if version == "v5" else mqtt.MQTTv311
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session if version == "v311" else None,
        protocol=protocol,
        manual_ack=manual_ack,
    )
    return c


def props(packet_type: int, **values) -> Properties:
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def paho_connect(s: Session, c: mqtt.Client, proxy: Proxy, keepalive: int = 60, **kw) -> None:
    c.connect("127.0.0.1", proxy.port, keepalive=keepalive, **kw)
    c.loop_start()
    s.wait(proxy, "s2c", "CONNACK")


def paho_stop(c: mqtt.Client, proxy: Proxy, s: Session, **kw) -> None:
    c.disconnect(**kw)
    s.wait(proxy, "c2s", "DISCONNECT")
    c.loop_stop()


# --------------------------------------------------------------------------------------
# Scenarios


def scenario_paho(s: Session, v: str) -> None:
    """paho as subscriber and publisher: every packet type of a clean exchange."""
    v5 = v == "v5"

    # Subscriber: credentials, a will, a short keepalive so that PINGREQ/PINGRESP happen.
    sub_proxy = s.proxy("paho", v)
    sub = paho_client(v, f"cap-paho-sub-{v}", clean_session=False)
    sub.username_pw_set("alice", "s3cret")
    will_props = (
        props(
            PacketTypes.WILLMESSAGE,
            WillDelayInterval=0,
            ContentType="text/plain",
            PayloadFormatIndicator=1,
            MessageExpiryInterval=120,
            ResponseTopic="cap/will/reply",
            CorrelationData=b"will-1",
            UserProperty=[("origin", "paho-will")],
        )
        if v5
        else None
    )
    sub.will_set("cap/will/paho-sub", b"subscriber gone", qos=1, retain=False, properties=will_props)
    connect_kw = {}
    if v5:
        connect_kw["clean_start"] = True
        connect_kw["properties"] = props(
            PacketTypes.CONNECT,
            SessionExpiryInterval=300,
            ReceiveMaximum=20,
            MaximumPacketSize=65536,
            TopicAliasMaximum=5,
            RequestResponseInformation=1,
            RequestProblemInformation=1,
            UserProperty=[("app", "qosmos-capture")],
        )
    paho_connect(s, sub, sub_proxy, keepalive=1, **connect_kw)

    if v5:
        sub.subscribe(
            [
                ("cap/paho/+/q0", SubscribeOptions(qos=0)),
                ("cap/paho/q1", SubscribeOptions(qos=1, noLocal=True)),
                ("cap/paho/q2", SubscribeOptions(qos=2, retainAsPublished=True)),
                ("cap/paho/retained/#", SubscribeOptions(qos=1, retainHandling=1)),
                ("cap/will/#", SubscribeOptions(qos=1, retainHandling=2)),
            ],
            properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42, UserProperty=[("k", "v")]),
        )
    else:
        sub.subscribe(
            [
                ("cap/paho/+/q0", 0),
                ("cap/paho/q1", 1),
                ("cap/paho/q2", 2),
                ("cap/paho/retained/#", 1),
                ("cap/will/#", 1),
            ]
        )
    s.wait(sub_proxy, "s2c", "SUBACK")
    # Keepalive of 1 s with nothing to send: paho pings.
    s.wait(sub_proxy, "s2c", "PINGRESP", timeout=5)

    # Publisher: QoS 0, 1, 2, retained, v5 properties, topic alias.
    pub_proxy = s.proxy("paho", v)
    pub = paho_client(v, f"cap-paho-pub-{v}", clean_session=True)
    paho_connect(s, pub, pub_proxy)
    pp = {}
    if v5:
        pp = dict(
            properties=props(
                PacketTypes.PUBLISH,
                PayloadFormatIndicator=1,
                MessageExpiryInterval=3600,
                ContentType="application/json",
                ResponseTopic="cap/paho/replies",
                CorrelationData=b"\x00order-17",
                UserProperty=[("store", "s-1"), ("store", "s-2")],
            )
        )
    infos = [
        pub.publish("cap/paho/a/q0", b"hello at qos 0", qos=0, **pp),
        pub.publish("cap/paho/q1", b'{"id":"o-1"}', qos=1, **pp),
        pub.publish("cap/paho/q2", b'{"id":"o-2"}', qos=2, **pp),
        pub.publish("cap/paho/retained/x", b"kept", qos=1, retain=True),
        pub.publish("cap/paho/q2", bytes(range(256)), qos=2),  # binary payload
    ]
    for info in infos:
        info.wait_for_publish(timeout=WAIT)
        if not info.is_published():
            raise CaptureError("paho publish not acknowledged")
    if v5:
        # First use of an alias carries topic + alias; the second only the alias.
        i1 = pub.publish("cap/paho/q1", b"alias set", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
        i1.wait_for_publish(timeout=WAIT)
        i2 = pub.publish("", b"alias used", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
        i2.wait_for_publish(timeout=WAIT)
    s.wait(sub_proxy, "c2s", "PUBCOMP", n=2)  # both QoS 2 deliveries finished at the subscriber

    # Clear the retained message (empty retained payload).
    pub.publish("cap/paho/retained/x", b"", qos=1, retain=True).wait_for_publish(timeout=WAIT)

    if v5:
        sub.unsubscribe(["cap/paho/+/q0", "cap/nothing/here"], properties=props(PacketTypes.UNSUBSCRIBE, UserProperty=[("why", "done")]))
    else:
        sub.unsubscribe(["cap/paho/+/q0", "cap/nothing/here"])
    s.wait(sub_proxy, "s2c", "UNSUBACK")

    # A second subscriber receives the retained message and the first subscriber's will.
    w_proxy = s.proxy("paho", v)
    watcher = paho_client(v, f"cap-paho-watch-{v}", clean_session=True)
    paho_connect(s, watcher, w_proxy)
    pub.publish("cap/paho/retained/y", b"retained for the watcher", qos=2, retain=True).wait_for_publish(timeout=WAIT)
    watcher.subscribe([("cap/paho/retained/#", 2), ("cap/will/#", 1)])
    s.wait(w_proxy, "s2c", "SUBACK")
    s.wait(w_proxy, "c2s", "PUBCOMP")  # retained QoS 2 message delivered
    pub.publish("cap/paho/retained/y", b"", qos=0, retain=True)

    if v5:
        # Reason 0x04 "disconnect with will message" plus properties: the broker sends the will.
        paho_stop(
            sub,
            sub_proxy,
            s,
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"),
            properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0, ReasonString="capture done"),
        )
        s.wait(w_proxy, "s2c", "PUBLISH", n=2)  # retained + will
    else:
        # 3.1.1 has no such reason: drop the connection without DISCONNECT to fire the will.
        sub._sock.close()  # noqa: SLF001 - simulating a crashed client is the point
        sub.loop_stop()
        s.wait(w_proxy, "s2c", "PUBLISH", n=2)

    # Reconnect the persistent subscriber (v311): CONNACK with session present = 1.
    if not v5:
        again_proxy = s.proxy("paho", v)
        again = paho_client(v, f"cap-paho-sub-{v}", clean_session=False)
        paho_connect(s, again, again_proxy)
        paho_stop(again, again_proxy, s)

    scenario_paho_dup(s, v, pub)
    paho_stop(watcher, w_proxy, s)
    paho_stop(pub, pub_proxy, s)


def scenario_paho_dup(s: Session, v: str, pub: mqtt.Client) -> None:
    """A QoS 1 delivery left unacknowledged across a reconnect: redelivered with DUP=1."""
    v5 = v == "v5"
    session_kw = {"clean_start": True, "properties": props(PacketTypes.CONNECT, SessionExpiryInterval=60)} if v5 else {}
    p1 = s.proxy("paho", v)
    c1 = paho_client(v, f"cap-paho-dup-{v}", clean_session=False, manual_ack=True)  # never acks
    c1.reconnect_delay_set(30, 60)
    paho_connect(s, c1, p1, **session_kw)
    c1.subscribe("cap/paho/dup", qos=1)
    s.wait(p1, "s2c", "SUBACK")
    pub.publish("cap/paho/dup", b"ack me later", qos=1).wait_for_publish(timeout=WAIT)
    s.wait(p1, "s2c", "PUBLISH")
    c1._sock.close()  # noqa: SLF001 - drop the connection with the PUBLISH unacknowledged
    c1.loop_stop()

    p2 = s.proxy("paho", v)
    c2 = paho_client(v, f"cap-paho-dup-{v}", clean_session=False)
    paho_connect(s, c2, p2, **({"clean_start": False} if v5 else {}))
    s.wait(p2, "c2s", "PUBACK")
    if not any(r.tag == p2.tag and r.name == "PUBLISH" and r.data[0] & 0x08 for r in s.recorder.records):
        raise CaptureError("the broker did not redeliver with DUP=1")
    paho_stop(c2, p2, s, **({"properties": props(PacketTypes.DISCONNECT, SessionExpiryInterval=0)} if v5 else {}))


def scenario_paho_v5_broker_disconnect(s: Session) -> None:
    """v5 odds and ends: session takeover, a DISCONNECT sent by the broker, assigned ids."""
    # Same client id twice: the second CONNACK has session present = 1. Mosquitto 2.0.11
    # closes the first connection without sending DISCONNECT 0x8E (Session taken over).
    p1, p2 = s.proxy("paho", "v5"), s.proxy("paho", "v5")
    c1 = paho_client("v5", "cap-paho-takeover")
    c1.reconnect_delay_set(30, 60)  # do not fight back for the id
    paho_connect(s, c1, p1, clean_start=True, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=10))
    c2 = paho_client("v5", "cap-paho-takeover")
    paho_connect(s, c2, p2, clean_start=False)
    c1.loop_stop()
    paho_stop(c2, p2, s)

    # A topic alias above the broker's Topic Alias Maximum (10): the broker sends
    # DISCONNECT 0x94 (Topic Alias invalid) and closes.
    p4 = s.proxy("paho", "v5")
    c4 = paho_client("v5", "cap-paho-bad-alias")
    c4.reconnect_delay_set(30, 60)
    paho_connect(s, c4, p4)
    c4.publish("cap/paho/alias", b"alias out of range", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=11))
    s.wait(p4, "s2c", "DISCONNECT")
    c4.loop_stop()

    # An empty client id: a v5 broker assigns one in CONNACK.
    p3 = s.proxy("paho", "v5")
    c3 = paho_client("v5", "")
    paho_connect(s, c3, p3, clean_start=True)
    paho_stop(c3, p3, s)


def scenario_refused(s: Session, v: str) -> None:
    """An anonymous client on the closed listener: a refusing CONNACK."""
    proxy = s.proxy("paho", v, closed=True)
    c = paho_client(v, f"cap-paho-refused-{v}", clean_session=True)
    c.reconnect_delay_set(30, 60)
    c.connect("127.0.0.1", proxy.port, keepalive=30)
    c.loop_start()
    s.wait(proxy, "s2c", "CONNACK")
    c.loop_stop()
    c.disconnect()


def scenario_mosquitto_clients(s: Session, v: str) -> None:
    """mosquitto_sub and mosquitto_pub, both with v5 properties where the version has them."""
    V = "mqttv5" if v == "v5" else "mqttv311"
    v5 = v == "v5"

    sub_proxy = s.proxy("mosquitto_sub", v)
    sub_cmd = [
        "mosquitto_sub", "-V", V, "-h", "127.0.0.1", "-p", str(sub_proxy.port),
        "-i", f"cap-msub-{v}", "-u", "bob", "-P", "hunter2", "-k", "5",
        "-t", "cap/mosq/#", "-t", "cap/mosq/+/q2", "-t", "cap/+/alpha", "-q", "2",
        "-C", "5", "-W", "15",
        "--will-topic", "cap/will/msub", "--will-payload", "msub gone", "--will-qos", "2", "--will-retain",
    ]
    if v5:
        sub_cmd += [
            "-D", "connect", "session-expiry-interval", "60",
            "-D", "connect", "receive-maximum", "10",
            "-D", "connect", "user-property", "tool", "mosquitto_sub",
            "-D", "will", "content-type", "text/plain",
            "-D", "will", "will-delay-interval", "0",
            "-D", "subscribe", "subscription-identifier", "7",
            "-D", "subscribe", "user-property", "kind", "test",
            "-D", "disconnect", "session-expiry-interval", "0",
        ]
    sub = s.spawn(sub_cmd)
    s.wait(sub_proxy, "s2c", "SUBACK")
    # keepalive 5 s (mosquitto_sub's minimum), nothing to send yet: it pings.
    s.wait(sub_proxy, "s2c", "PINGRESP", timeout=9)

    pub_proxy = s.proxy("mosquitto_pub", v)
    base = ["mosquitto_pub", "-V", V, "-h", "127.0.0.1", "-p", str(pub_proxy.port), "-u", "carol", "-P", "pw"]
    extra = []
    if v5:
        extra = [
            "-D", "publish", "content-type", "application/json",
            "-D", "publish", "correlation-data", "order-42",
            "-D", "publish", "response-topic", "cap/mosq/replies",
            "-D", "publish", "user-property", "store", "s-9",
            "-D", "publish", "message-expiry-interval", "600",
            "-D", "publish", "payload-format-indicator", "1",
        ]
    for qos, topic, msg in (("0", "cap/mosq/q0", "zero"), ("1", "cap/mosq/q1", '{"id":1}'), ("2", "cap/mosq/x/q2", '{"id":2}')):
        s.run(base + ["-i", f"cap-mpub-{v}-q{qos}", "-q", qos, "-t", topic, "-m", msg] + extra)
    s.run(
        base
        + ["-i", f"cap-mpub-{v}-retain", "-q", "1", "-r", "-t", "cap/mosq/retained", "-m", "kept"]
        + (["-D", "connect", "session-expiry-interval", "30"] if v5 else [])
    )
    s.run(base + ["-i", f"cap-mpub-{v}-alpha", "-q", "2", "-t", "cap/z/alpha", "-m", "alpha"])
    s.finish(sub, "mosquitto_sub")

    # Remove the retained message again, and unsubscribe with mosquitto_sub -U.
    s.run(base + ["-i", f"cap-mpub-{v}-clear", "-q", "0", "-r", "-n", "-t", "cap/mosq/retained"])
    unsub_proxy = s.proxy("mosquitto_sub", v)
    s.run(
        [
            "mosquitto_sub", "-V", V, "-h", "127.0.0.1", "-p", str(unsub_proxy.port),
            "-i", f"cap-msub-unsub-{v}", "-c", "-t", "cap/mosq/#", "-U", "cap/mosq/#", "-U", "cap/other",
            "-E", "-q", "1",
        ]
        + (["-x", "60"] if v5 else [])
    )


def handmade_auth() -> list[Record]:
    """AUTH (v5 only), built from MQTT 5.0 section 3.15, since Mosquitto never sends it.

    c2s: reason 0x18 Continue authentication, Authentication Method "SCRAM-SHA-1",
         Authentication Data "client-first".
    s2c: reason 0x00 Success, Authentication Method "SCRAM-SHA-1", Reason String "ok".
    """

    def utf8(s: str) -> bytes:
        b = s.encode()
        return len(b).to_bytes(2, "big") + b

    def packet(reason: int, props: bytes) -> bytes:
        body = bytes([reason]) + encode_varint(len(props)) + props
        return bytes([0xF0]) + encode_varint(len(body)) + body

    c2s = packet(0x18, b"\x15" + utf8("SCRAM-SHA-1") + b"\x16" + utf8("client-first"))
    s2c = packet(0x00, b"\x15" + utf8("SCRAM-SHA-1") + b"\x1f" + utf8("ok"))
    return [Record(-1, "v5", "handmade", "c2s", c2s), Record(-1, "v5", "handmade", "s2c", s2c)]


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --------------------------------------------------------------------------------------
# Output


def tool_versions() -> tuple[str, str]:
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10)
    first = (mosq.stdout or mosq.stderr).splitlines()[0].strip()
    return first, f"paho-mqtt {paho.mqtt.__version__}"


def write_file(path: Path, version: str, records: list[Record], versions: tuple[str, str]) -> dict[str, int]:
    seen: set[str] = set()
    lines: list[str] = []
    counts: dict[str, int] = {}
    for r in records:
        line = f"{r.source} {r.direction} {r.name} {r.data.hex()}"
        if line in seen:
            continue
        seen.add(line)
        lines.append(line)
        counts[r.name] = counts.get(r.name, 0) + 1
    label = "MQTT 3.1.1" if version == "v311" else "MQTT 5.0"
    header = [
        f"# {label} packets captured from independent implementations, one per line:",
        "#   <source> <direction> <PACKET_TYPE> <hex bytes of the whole packet>",
        "# source: paho | mosquitto_pub | mosquitto_sub | mosquitto-broker | handmade",
        "# direction: c2s (client to broker) | s2c (broker to client). Identical lines are removed.",
        f"# Produced by tools/capture/capture.py through a recording TCP proxy in front of {versions[0]},",
        f"# with clients {versions[1]} and mosquitto_pub/mosquitto_sub of the same Mosquitto package.",
        "# Only lines with source `handmade` were not captured (Mosquitto has no AUTH without a plugin).",
        "# Regenerate: python3 -m venv /tmp/capvenv && /tmp/capvenv/bin/pip install 'paho-mqtt>=2,<3'",
        "#             /tmp/capvenv/bin/python tools/capture/capture.py",
    ]
    path.write_text("\n".join(header + lines) + "\n")
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    args = ap.parse_args()
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install mosquitto mosquitto-clients")

    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="qosmos-capture-") as tmp:
        broker = start_broker(Path(tmp))
        session = Session(broker, recorder)
        # Nothing here may outlive the run, whatever happens.
        watchdog = threading.Timer(240, lambda: (os.killpg(broker.proc.pid, signal.SIGKILL), os._exit(3)))
        watchdog.daemon = True
        watchdog.start()
        try:
            for v in ("v311", "v5"):
                scenario_paho(session, v)
                scenario_refused(session, v)
                scenario_mosquitto_clients(session, v)
            scenario_paho_v5_broker_disconnect(session)
            time.sleep(0.3)  # let the last close propagate through the proxies
        except CaptureError as e:
            print(f"capture failed: {e}\n--- mosquitto log (tail) ---", file=sys.stderr)
            print("\n".join(broker.log.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
            for proc in session.procs:
                if proc.poll() is not None and proc.returncode != 0 and proc.stderr and not proc.stderr.closed:
                    err = proc.stderr.read().decode(errors="replace")
                    print(f"--- {proc.args[0]} exited {proc.returncode}: {err}", file=sys.stderr)
            return 1
        finally:
            session.close()
            stop_process(broker.proc)
            watchdog.cancel()

    if recorder.errors:
        print("capture failed:\n  " + "\n  ".join(recorder.errors), file=sys.stderr)
        return 1

    versions = tool_versions()
    records = sorted(recorder.records, key=lambda r: r.seq)
    args.out.mkdir(parents=True, exist_ok=True)
    ok = True
    for v in ("v311", "v5"):
        recs = [r for r in records if r.version == v]
        if v == "v5":
            recs += handmade_auth()
        counts = write_file(args.out / f"{v}.txt", v, recs, versions)
        missing = [n for n in REQUIRED[v] if n not in counts]
        summary = ", ".join(f"{n} {counts[n]}" for n in REQUIRED[v] if n in counts)
        print(f"{v}: {sum(counts.values())} packets: {summary}")
        if missing:
            print(f"{v}: MISSING {', '.join(missing)}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
