#!/usr/bin/env python3
"""A minimal federation peer over plain ws:// (BINDING_NONE), written from SPEC.md alone.

  peer.py send   --url ws://127.0.0.1:7701 --key alpha.key --from alice --to bob@beta TEXT
  peer.py listen --url ws://127.0.0.1:7701 --key beta.key --count 1

`send` prints the message id (hex) once the relay has accepted it; on Rejected it prints the
error code name and exits 1. `listen` prints one JSON line per message (id, from, to, lane,
text) and acknowledges it once printed (printing is taking custody, for a command-line tool).
Other failures (handshake refused, timeout) exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

import relayfed as rf
from relayfed import pb, ProtocolError

AGENT = "relayfed-py/0.1"
RETRYABLE = (pb.ERROR_CODE_BUSY, pb.ERROR_CODE_RATE_LIMITED, pb.ERROR_CODE_FLOW_CONTROL,
             pb.ERROR_CODE_SHUTTING_DOWN, pb.ERROR_CODE_INTERNAL)
FATAL_HANDSHAKE = (pb.ERROR_CODE_AUTH_FAILED, pb.ERROR_CODE_UNSUPPORTED_VERSION,
                   pb.ERROR_CODE_MALFORMED_FRAME, pb.ERROR_CODE_UNEXPECTED_FRAME,
                   pb.ERROR_CODE_FRAME_TOO_LARGE, pb.ERROR_CODE_KEY_REVOKED)


def log(*parts) -> None:
    print("peer:", *parts, file=sys.stderr, flush=True)


class Refused(Exception):
    """The other side sent Goaway (or we did, on a fatal error)."""

    def __init__(self, code: int, reason: str, reconnect_after_ms: int = 0, ours=False):
        who = "we closed" if ours else "relay said goaway"
        super().__init__(f"{who}: {rf.code_name(code)} {reason}".rstrip())
        self.code, self.reason, self.reconnect_after_ms = code, reason, reconnect_after_ms


class Deadline(Exception):
    """The command's --timeout passed. (Not TimeoutError: that is an OSError, which
    means a lost connection here.)"""


class Session:
    """One connection carrying one session (section 2.1)."""

    def __init__(self, ws, key: rf.KeyFile):
        self.ws, self.key = ws, key
        self.pending: list = []  # decoded frames not yet handed out
        self.max_frame = rf.HANDSHAKE_MAX_FRAME
        self.welcome = None
        self.limits: dict[str, int] = {}
        self.directory: dict[str, tuple[int, set[bytes]]] = {}
        self.last_sent = self.last_received = time.monotonic()
        self.goaway = None  # the relay's Goaway, once received

    # -- frames in and out --

    async def send(self, *frames) -> None:
        # Several frames may share one WebSocket message (section 2.3.2 rule 2).
        await self.ws.send(b"".join(rf.encode(f) for f in frames))
        self.last_sent = time.monotonic()

    async def fail(self, code: int, reason: str) -> None:
        """Fatal error detected here: Goaway, then close with 4000 + code (section 2.3.3)."""
        try:
            await self.send(pb.Frame(goaway=pb.Goaway(code=code, reason=reason)))
            await self.ws.close(4000 + code, reason[:100])
        except ConnectionClosed:
            pass
        raise Refused(code, reason, ours=True)

    async def goodbye(self) -> None:
        """We end the session ourselves (section 8.7 rule 5)."""
        try:
            await self.send(pb.Frame(goaway=pb.Goaway(
                code=pb.ERROR_CODE_SHUTTING_DOWN, reason="done")))
            await self.ws.close(4000 + pb.ERROR_CODE_SHUTTING_DOWN, "done")
        except ConnectionClosed:
            pass

    async def recv(self, timeout: float | None = None):
        """The next frame, or None on timeout."""
        while not self.pending:
            try:
                data = await asyncio.wait_for(self.ws.recv(), timeout)
            except asyncio.TimeoutError:
                return None
            except ConnectionClosed:
                if self.goaway is not None:  # the relay closed after its Goaway, as announced
                    g = self.goaway
                    raise Refused(g.code, g.reason, g.reconnect_after_ms) from None
                raise
            self.last_received = time.monotonic()
            if isinstance(data, str):
                await self.fail(pb.ERROR_CODE_MALFORMED_FRAME, "text WebSocket message")
            try:
                at = 0
                while at < len(data):
                    body, at = rf.next_frame(data, at, self.max_frame)
                    frame = rf.parse_frame(body)
                    self.pending.append(frame)
                    if frame.WhichOneof("kind") == "welcome":
                        # Frames after Welcome, even in the same WebSocket message (the relay
                        # does batch them), are under the session's limit (section 4.2).
                        self.max_frame = min(frame.welcome.limits.max_frame_bytes
                                             or rf.DEFAULT_MAX_FRAME, rf.ABSOLUTE_MAX_FRAME)
            except ProtocolError as e:
                await self.fail(e.code, e.reason)
        return self.pending.pop(0)

    # -- handshake (section 5) --

    async def handshake(self, receive_window: int) -> None:
        if self.ws.subprotocol != rf.SUBPROTOCOL:
            await self.ws.close()
            raise Refused(pb.ERROR_CODE_UNSUPPORTED_VERSION, "relay did not select relay-fed.v1")
        binding_kind, binding = pb.BINDING_NONE, bytes(32)  # plain ws:// (section 5.3)
        client_nonce = os.urandom(32)
        peer = self.key.peer
        await self.send(pb.Frame(hello=pb.Hello(
            versions=[rf.VERSION], peer=peer, client_nonce=client_nonce, agent=AGENT)))

        c = (await self._expect("challenge")).challenge
        # The client's checks, in the order of section 5.6.
        if c.version != rf.VERSION:
            await self.fail(pb.ERROR_CODE_UNSUPPORTED_VERSION, f"version {c.version}")
        if c.binding != binding_kind:
            await self.fail(pb.ERROR_CODE_AUTH_FAILED,
                            f"binding {c.binding} is not BINDING_NONE on plain ws://")
        if rf.is_weak_key(c.relay_key):
            await self.fail(pb.ERROR_CODE_AUTH_FAILED, "relay_key is not a valid key")
        if c.relay_key != self.key.relay_key:
            await self.fail(pb.ERROR_CODE_AUTH_FAILED, "relay_key is not the pinned key")
        if len(c.relay_nonce) != 32:
            await self.fail(pb.ERROR_CODE_MALFORMED_FRAME, "relay_nonce is not 32 bytes")
        if len(c.relay_signature) != 64:
            await self.fail(pb.ERROR_CODE_AUTH_FAILED, "relay_signature is not 64 bytes")
        tbs = rf.challenge_tbs(binding, client_nonce, c.relay_nonce, c.version, peer)
        if not rf.verify(c.relay_key, tbs, c.relay_signature):
            await self.fail(pb.ERROR_CODE_AUTH_FAILED, "relay_signature does not verify")

        atbs = rf.auth_tbs(binding, client_nonce, c.relay_nonce, c.version, peer,
                           c.relay_key, self.key.public)
        await self.send(pb.Frame(auth=pb.Auth(
            public_key=self.key.public, signature=rf.sign(self.key.seed, atbs),
            receive_window=receive_window)))

        w = (await self._expect("welcome")).welcome
        self.welcome = w
        self.limits = {name: getattr(w.limits, name) or default
                       for name, default in rf.LIMIT_DEFAULTS.items()}
        self.directory = {p.peer: (p.role, set(p.keys)) for p in w.directory}
        log(f"session {w.session_id.hex()} as {peer} ({pb.Role.Name(w.role)}) with relay "
            f"{c.relay_id!r}, window {self.limits['receive_window']}")

    async def _expect(self, kind: str):
        frame = await self.recv(timeout=10)  # handshake timeout of the same order (5.9)
        if frame is None:
            await self.ws.close()
            raise Refused(pb.ERROR_CODE_HANDSHAKE_TIMEOUT, f"no {kind} within 10 s", ours=True)
        got = frame.WhichOneof("kind")
        if got == "goaway":  # refused: read the code, close without answering (5.1 rule 3)
            await self.ws.close()
            g = frame.goaway
            raise Refused(g.code, g.reason, g.reconnect_after_ms)
        if got != kind:
            await self.fail(pb.ERROR_CODE_UNEXPECTED_FRAME, f"expected {kind}, got {got}")
        return frame

    # -- session-level housekeeping shared by both commands --

    async def next_event(self, deadline: float | None):
        """The next frame that is not housekeeping (Ping is answered here, unknown kinds are
        ignored, a Ping is sent when idle). None once the deadline has passed."""
        idle = self.limits["idle_timeout_ms"] / 1000
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            if now - self.last_received > idle:
                await self.ws.close()
                raise ConnectionError("nothing received for idle_timeout_ms")
            wait = max(0.0, self.last_sent + idle / 3 - now)
            if deadline is not None:
                wait = min(wait, deadline - now)
            frame = await self.recv(timeout=wait)
            if frame is None:
                if time.monotonic() - self.last_sent >= idle / 3:
                    await self.send(pb.Frame(ping=pb.Ping(nonce=random.getrandbits(63))))
                continue
            kind = frame.WhichOneof("kind")
            if kind == "ping":
                await self.send(pb.Frame(pong=pb.Pong(nonce=frame.ping.nonce)))
            elif kind in (None, "pong"):
                pass  # unknown kinds are ignored after the handshake (section 4.4 rule 3)
            elif kind in ("hello", "challenge", "auth", "welcome"):
                await self.fail(pb.ERROR_CODE_UNEXPECTED_FRAME, f"{kind} after the handshake")
            elif kind == "goaway":
                # Section 8.7: send no new work, but keep reading: the relay still answers
                # what it received before (and we still Ack), then it closes.
                self.goaway = frame.goaway
                log(f"relay sent goaway {rf.code_name(frame.goaway.code)}: draining")
            else:
                return frame


async def open_session(url: str, key: rf.KeyFile, receive_window: int) -> Session:
    ws = await connect(url, subprotocols=[rf.SUBPROTOCOL], max_size=rf.ABSOLUTE_MAX_FRAME + 4,
                       proxy=None, ping_interval=None, open_timeout=10)
    session = Session(ws, key)
    try:
        await session.handshake(receive_window)
    except BaseException:
        await ws.close()
        raise
    return session


async def with_reconnects(deadline: float | None, body):
    """Runs body() again after disconnects, with backoff (section 8.8)."""
    delay = 0.0
    while True:
        try:
            return await body()
        except Refused as e:
            if e.code in FATAL_HANDSHAKE:
                raise
            log(f"{e}; reconnecting")
            delay = max(delay, e.reconnect_after_ms / 1000)
        except (ConnectionClosed, ConnectionError, OSError, InvalidHandshake,
                asyncio.TimeoutError) as e:
            log(f"connection lost ({type(e).__name__}: {e}); reconnecting")
        delay = min(max(delay * 2, random.uniform(0.1, 1.0)), 5.0)
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise Deadline("deadline passed while reconnecting")
        await asyncio.sleep(delay)


# --- send ----------------------------------------------------------------------------------


def make_deliver(key: rf.KeyFile, sender: str, to: str, lane: int, ttl_s: int, text: str,
                 content_type: str):
    env = pb.Envelope(id=os.urandom(16), to=to, lane=lane,
                      created_at_ms=int(time.time() * 1000), ttl_s=ttl_s,
                      content_type=content_type, payload=text.encode("utf-8"))
    setattr(env, "from", sender)
    env_bytes = env.SerializeToString()  # encoded once; these exact bytes are signed and sent
    signature = rf.sign(key.seed, rf.message_tbs(env_bytes))
    deliver = pb.Deliver(envelope=env_bytes, signature=signature, signer=key.public)
    # Section 6.2: decode our own envelope once and check it as the relay will.
    own = rf.Registry({key.peer: (pb.ROLE_PLATFORM, {key.public}),
                       env.to.partition("@")[2]: (pb.ROLE_PLATFORM, set())})
    rf.check_deliver(deliver, key.peer, own, rf.DEFAULT_MAX_PAYLOAD)
    return env.id, pb.Frame(deliver=deliver)


async def cmd_send(args, key: rf.KeyFile) -> int:
    sender = args.sender if "@" in args.sender else f"{args.sender}@{key.peer}"
    lane = {"chat": pb.LANE_CHAT, "call": pb.LANE_CALL}[args.lane]
    try:
        msg_id, frame = make_deliver(key, sender, args.to, lane, args.ttl, args.text,
                                     args.content_type)
    except ProtocolError as e:
        print(rf.code_name(e.code))
        log(f"not sent: {e}")
        return 1
    deadline = time.monotonic() + args.timeout

    async def attempt():
        # receive_window 1: this command takes no deliveries, it holds at most one un-acked.
        session = await open_session(args.url, key, receive_window=1)
        try:
            await session.send(frame)  # same id on every attempt (section 8.1 rule 1)
            while True:
                event = await session.next_event(deadline)
                if event is None:
                    raise Deadline("no answer from the relay in time")
                kind = event.WhichOneof("kind")
                if kind == "accepted" and event.accepted.id == msg_id and not event.accepted.receipt:
                    a = event.accepted
                    log(f"accepted, expires_at_ms {a.expires_at_ms}"
                        + (" (duplicate)" if a.duplicate else ""))
                    await session.goodbye()
                    return 0
                if kind == "rejected" and event.rejected.id == msg_id and not event.rejected.receipt:
                    r = event.rejected
                    if r.code in (pb.ERROR_CODE_BUSY, pb.ERROR_CODE_RATE_LIMITED,
                                  pb.ERROR_CODE_FLOW_CONTROL):
                        wait = (r.retry_after_ms or 1000) / 1000
                        log(f"{rf.code_name(r.code)}: resending in {wait:.1f} s")
                        if time.monotonic() + wait >= deadline:
                            raise Deadline(f"{rf.code_name(r.code)} until the deadline")
                        await asyncio.sleep(wait)
                        if session.goaway is None:  # after a Goaway: on the next session
                            await session.send(frame)
                        continue
                    print(rf.code_name(r.code), flush=True)
                    log(f"rejected: {rf.code_name(r.code)} {r.detail}")
                    await session.goodbye()
                    return 1
                if kind == "rejected" and not event.rejected.id:
                    log(f"rejected without an id: {rf.code_name(event.rejected.code)} "
                        f"{event.rejected.detail}")
                # Deliveries to us are not acknowledged: we do not take custody here.
        finally:
            await session.ws.close()

    code = await with_reconnects(deadline, attempt)
    if code == 0:
        print(msg_id.hex(), flush=True)
    return code


# --- listen --------------------------------------------------------------------------------


async def cmd_listen(args, key: rf.KeyFile) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    seen: set[tuple[str, bytes]] = set()  # (origin platform, id): deduplication (6.6 rule 2)
    refreshed: set[bytes] = set()  # unknown signers we already opened a new session for
    state = {"printed": 0}

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    async def attempt():
        session = await open_session(args.url, key, receive_window=args.window)
        campaigns: dict[bytes, tuple] = {}  # campaign_id -> (envelope, ok), this session only
        try:
            while args.count == 0 or state["printed"] < args.count:
                frame = await session.next_event(deadline)
                if frame is None:
                    raise Deadline(f"{state['printed']} of {args.count} messages in time")
                kind = frame.WhichOneof("kind")
                if kind == "deliver":
                    d = frame.deliver
                    result = verify_deliver(session, d)
                    if result == "unknown-signer" and d.signer not in refreshed:
                        # The directory may be stale (6.7 rule 3): refresh it before deciding.
                        refreshed.add(d.signer)
                        log("unknown signer: opening a new session for a fresh directory")
                        await session.goodbye()
                        return None
                    if isinstance(result, str):
                        log(f"message with tag {d.tag} not shown: {result}")
                    else:
                        env = result
                        origin = getattr(env, "from").partition("@")[2]
                        if (origin, env.id) in seen:
                            log(f"duplicate {env.id.hex()} (tag {d.tag}) acknowledged again")
                        else:
                            seen.add((origin, env.id))
                            emit({"type": "message", "id": env.id.hex(),
                                  "from": getattr(env, "from"), "to": env.to,
                                  "lane": pb.Lane.Name(env.lane).removeprefix("LANE_").lower(),
                                  "text": env.payload.decode("utf-8", "replace"),
                                  "content_type": env.content_type,
                                  "created_at_ms": env.created_at_ms, "tag": d.tag})
                            state["printed"] += 1
                    await session.send(pb.Frame(ack=pb.Ack(tags=[d.tag])))
                elif kind == "receipt":
                    r = frame.receipt
                    emit({"type": "receipt", "id": r.id.hex(), "from": getattr(r, "from"),
                          "to": r.to, "kind": pb.ReceiptKind.Name(r.kind), "tag": r.tag})
                    await session.send(pb.Frame(ack=pb.Ack(tags=[r.tag])))
                elif kind == "expired":
                    e = frame.expired
                    emit({"type": "expired", "id": e.id.hex(), "to": e.to, "tag": e.tag})
                    await session.send(pb.Frame(ack=pb.Ack(tags=[e.tag])))
                elif kind == "bulk_deliver":
                    b = frame.bulk_deliver
                    if b.envelope:
                        campaigns[b.campaign_id] = verify_bulk(session, b)
                    elif b.campaign_id not in campaigns:  # section 9.8 rule 2
                        await session.fail(pb.ERROR_CODE_UNKNOWN_CAMPAIGN,
                                           "BulkDeliver by reference to an unknown campaign")
                    env = campaigns[b.campaign_id]
                    if isinstance(env, str):
                        log(f"campaign {b.campaign_id.hex()} not shown: {env}")
                    else:
                        emit({"type": "bulk", "campaign_id": b.campaign_id.hex(),
                              "id": env.id.hex(), "from": getattr(env, "from"),
                              "text": env.payload.decode("utf-8", "replace"),
                              "recipients": list(b.recipients), "tag": b.tag})
                    await session.send(pb.Frame(ack=pb.Ack(tags=[b.tag])))
                else:
                    log(f"ignored {kind}")
            await session.goodbye()
            return 0
        finally:
            await session.ws.close()

    while True:
        result = await with_reconnects(deadline, attempt)
        if result is not None:
            return result


def verify_deliver(session: Session, d):
    """Section 6.7 rules 3 and 4: the Envelope, or why it must not be shown."""
    env = pb.Envelope()
    try:
        env.ParseFromString(d.envelope)
    except Exception as e:  # noqa: BLE001
        return f"undecodable envelope ({e})"
    sender = rf.parse_address(getattr(env, "from"))
    if sender is None or rf.parse_address(env.to) is None or len(env.id) != 16:
        return "invalid envelope"
    if env.lane not in (pb.LANE_CALL, pb.LANE_CHAT):
        return f"lane {env.lane}"
    role, keys = session.directory.get(sender[1], (None, set()))
    if d.signer not in keys:
        return "unknown-signer"
    if not rf.verify(d.signer, rf.message_tbs(d.envelope), d.signature):
        return "bad signature"
    return env


def verify_bulk(session: Session, b):
    env = pb.Envelope()
    try:
        env.ParseFromString(b.envelope)
    except Exception as e:  # noqa: BLE001
        return f"undecodable envelope ({e})"
    sender = rf.parse_address(getattr(env, "from"))
    if sender is None:
        return "invalid from"
    role, keys = session.directory.get(sender[1], (None, set()))
    if role != pb.ROLE_BROADCASTER or b.signer not in keys:
        return "signer is not a key of the broadcaster"
    if not rf.verify(b.signer, rf.message_tbs(b.envelope), b.signature):
        return "bad signature"
    return env


# --- command line --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--url", default="ws://127.0.0.1:7701/", help="ws://host:port[/path]")
        p.add_argument("--key", required=True, help="key file (SPEC.md appendix B)")
        p.add_argument("--relay-key", help="relay public key to pin (hex), if the key file "
                       "has no relay_key line")

    s = sub.add_parser("send", help="send one message, print its id once accepted")
    common(s)
    s.add_argument("--from", dest="sender", required=True, help="user, or user@platform")
    s.add_argument("--to", required=True, help="user@platform")
    s.add_argument("--lane", choices=["chat", "call"], default="chat")
    s.add_argument("--ttl", type=int, default=0, help="seconds; 0 = the lane's default")
    s.add_argument("--content-type", default="text/plain")
    s.add_argument("--timeout", type=float, default=30, help="seconds until giving up")
    s.add_argument("text")

    li = sub.add_parser("listen", help="print messages as JSON lines and acknowledge them")
    common(li)
    li.add_argument("--count", type=int, default=0, help="exit after N messages; 0 = never")
    li.add_argument("--window", type=int, default=64, help="receive window to ask for")
    li.add_argument("--timeout", type=float, default=0, help="seconds; 0 = wait forever")

    args = parser.parse_args(argv)
    if not args.url.startswith("ws://"):
        parser.error("only plain ws:// is implemented (wss:// and QUIC need the TLS exporter)")
    try:
        key = rf.KeyFile.load(args.key)
    except (OSError, ValueError) as e:
        parser.error(f"{args.key}: {e}")
    if args.relay_key:
        key.relay_key = bytes.fromhex(args.relay_key)
    if key.relay_key is None:
        # On plain ws:// there is no certificate: the pinned key is the only way to
        # authenticate the relay (sections 2.1 rule 5, 3.5).
        parser.error("no relay key to pin: add relay_key to the key file or pass --relay-key")

    run = cmd_send if args.command == "send" else cmd_listen
    try:
        return asyncio.run(run(args, key))
    except Refused as e:
        log(str(e))
        return 2
    except Deadline as e:
        log(f"timeout: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
