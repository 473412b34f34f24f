#!/usr/bin/env python3
"""Checks federation-spec/vectors/*.json (and the worked examples of SPEC.md) with an
implementation written from SPEC.md alone. Exits non-zero on any mismatch."""

from __future__ import annotations

import json
import sys

import relayfed as rf
from relayfed import pb

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    if not ok:
        failures.append(what)
        print(f"FAIL {what}", file=sys.stderr)
    return ok


def load(name: str) -> dict:
    with open(rf.VECTORS_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def roundtrip(name: str, hex_text: str, view: dict | None, max_frame=rf.ABSOLUTE_MAX_FRAME):
    """Framing, decode, re-encode byte for byte, and the JSON view both ways."""
    wire = bytes.fromhex(hex_text)
    try:
        [body] = rf.split_frames(wire, max_frame)
        frame = rf.parse_frame(body)
    except (rf.ProtocolError, ValueError) as e:
        check(False, f"{name}: does not decode: {e}")
        return None
    check(rf.encode(frame) == wire, f"{name}: re-encoding differs")
    if view is not None:
        built = rf.from_json(pb.Frame(), view)
        check(built == frame, f"{name}: JSON view differs from the decoded frame")
        check(rf.encode(built) == wire, f"{name}: frame built from JSON encodes differently")
    return frame


def check_keys(keys: dict) -> dict[str, bytes]:
    seeds = {}
    for name, k in keys.items():
        seed, public = bytes.fromhex(k["seed"]), bytes.fromhex(k["public"])
        check(rf.public_key(seed) == public, f"key {name}: public key does not match seed")
        check(not rf.is_weak_key(public), f"key {name}: weak")
        seeds[public] = seed
    return seeds


def check_signed(v: dict, frame, seeds: dict[str, bytes]) -> None:
    name = v["name"]
    inner = getattr(frame, frame.WhichOneof("kind"))
    envelope, signature, signer = inner.envelope, inner.signature, inner.signer
    check(signature.hex() == v["signature"], f"{name}: signature field")
    check(signer.hex() == v["signer"], f"{name}: signer field")
    # The envelope: its JSON view, and the bytes a standard encoder writes for it.
    env = pb.Envelope()
    env.ParseFromString(envelope)
    built = rf.from_json(pb.Envelope(), v["envelope"])
    check(built == env, f"{name}: envelope JSON view differs")
    check(built.SerializeToString() == envelope, f"{name}: envelope re-encodes differently")
    # A few fields through the JSON view explicitly.
    check(getattr(env, "from") == v["envelope"]["from"], f"{name}: envelope.from")
    check(env.id.hex() == v["envelope"]["id"], f"{name}: envelope.id")
    check(pb.Lane.Name(env.lane) == v["envelope"]["lane"], f"{name}: envelope.lane")
    # What is signed, the signature, and determinism.
    tbs = rf.message_tbs(envelope)
    check(tbs.hex() == v["signed_bytes"], f"{name}: signed_bytes")
    check(rf.verify(signer, tbs, signature), f"{name}: signature does not verify")
    check(not rf.verify(signer, tbs + b"x", signature), f"{name}: verifies other bytes")
    seed = seeds.get(signer)
    if check(seed is not None, f"{name}: signer is none of the test keys"):
        check(rf.sign(seed, tbs) == signature, f"{name}: re-signing gives other bytes")


def check_frames() -> tuple[int, dict]:
    data = load("frames")
    seeds = check_keys(data["keys"])
    kinds = set()
    for v in data["vectors"]:
        frame = roundtrip(v["name"], v["hex"], v["frame"])
        if frame is None:
            continue
        kind = frame.WhichOneof("kind")
        kinds.add(kind)
        check(kind == next(iter(v["frame"]["kind"])), f"{v['name']}: kind")
        if "signed_bytes" in v:
            check_signed(v, frame, seeds)
    every = {f.name for f in pb.Frame.DESCRIPTOR.oneofs_by_name["kind"].fields}
    handshake_kinds = {"hello", "challenge", "auth", "welcome"}  # in handshake.json
    missing = every - kinds - handshake_kinds
    check(not missing, f"frames.json has no vector for {sorted(missing)}")
    return len(data["vectors"]), data


def check_negative(frames: dict) -> int:
    data = load("negative")
    keys = frames["keys"]
    registry = rf.Registry({
        name: (pb.Role.Value(k["role"]), {bytes.fromhex(k["public"])})
        for name, k in keys.items() if k["role"] != "ROLE_UNSPECIFIED"
    })
    max_payload = data["max_payload_bytes"]
    for v in data["vectors"]:
        name, wire, want = v["name"], bytes.fromhex(v["hex"]), v["error"]
        got = None
        try:
            if v["check"] == "stream":
                # A byte stream during the handshake: every frame it holds, whole.
                for body in rf.split_frames(wire, rf.HANDSHAKE_MAX_FRAME):
                    rf.parse_frame(body)
            else:
                [body] = rf.split_frames(wire, rf.DEFAULT_MAX_FRAME)
                frame = rf.parse_frame(body)
                kind = frame.WhichOneof("kind")
                if v["check"] == "hello":
                    rf.check_hello(frame)
                elif v["check"] == "deliver":
                    check(kind == "deliver", f"{name}: not a deliver")
                    rf.check_deliver(frame.deliver, "alpha", registry, max_payload)
                elif v["check"] == "receipt":
                    check(kind == "receipt", f"{name}: not a receipt")
                    rf.check_receipt(frame.receipt, "alpha", registry)
                elif v["check"] == "campaign_begin":
                    check(kind == "campaign_begin", f"{name}: not a campaign_begin")
                    rf.check_campaign_begin(frame.campaign_begin, "news", registry, max_payload)
                else:
                    check(False, f"{name}: unknown check {v['check']!r}")
                    continue
        except rf.ProtocolError as e:
            got = rf.code_name(e.code)
        check(got == want, f"{name}: expected {want}, got {got or 'no error'}")
        if v["check"] == "stream" and got in ("ERROR_CODE_FRAME_TOO_LARGE",):
            # Refused at the framing layer, from the 4 length bytes alone (section 4.2 rule 3).
            try:
                rf.split_frames(wire[:4], rf.HANDSHAKE_MAX_FRAME)
                check(False, f"{name}: the length prefix alone is not refused")
            except rf.ProtocolError as e:
                check(e.code == pb.ERROR_CODE_FRAME_TOO_LARGE, f"{name}: prefix alone")
    return len(data["vectors"])


def check_handshake() -> None:
    data = load("handshake")
    check_keys(data["keys"])
    frames = {}
    for v in data["frames"]:
        frames[v["name"]] = roundtrip(v["name"], v["hex"], v["frame"], rf.HANDSHAKE_MAX_FRAME)
    if any(f is None for f in frames.values()):
        return
    hello, challenge = frames["hello"].hello, frames["challenge"].challenge
    auth, welcome = frames["auth"].auth, frames["welcome"].welcome
    binding = bytes.fromhex(data["binding"])
    keys = {n: (bytes.fromhex(k["seed"]), bytes.fromhex(k["public"]))
            for n, k in data["keys"].items()}
    check(rf.check_hello(frames["hello"]) is None, "handshake: hello checks")
    check(hello.client_nonce.hex() == data["client_nonce"], "handshake: client_nonce")
    check(challenge.relay_nonce.hex() == data["relay_nonce"], "handshake: relay_nonce")
    check(challenge.version in hello.versions, "handshake: version")
    check(challenge.binding == pb.BINDING_TLS_EXPORTER, "handshake: binding kind")
    check(challenge.relay_key == keys["relay"][1], "handshake: relay_key")

    ctbs = rf.challenge_tbs(binding, hello.client_nonce, challenge.relay_nonce,
                            challenge.version, hello.peer)
    check(len(ctbs) == 124 + len(hello.peer), "handshake: challenge_tbs length")
    check(ctbs.hex() == data["challenge_signed_bytes"], "handshake: challenge_signed_bytes")
    check(rf.verify(challenge.relay_key, ctbs, challenge.relay_signature),
          "handshake: relay signature does not verify")
    check(rf.sign(keys["relay"][0], ctbs) == challenge.relay_signature,
          "handshake: re-signing challenge_tbs gives other bytes")

    atbs = rf.auth_tbs(binding, hello.client_nonce, challenge.relay_nonce, challenge.version,
                       hello.peer, challenge.relay_key, auth.public_key)
    check(len(atbs) == 183 + len(hello.peer), "handshake: auth_tbs length")
    check(atbs.hex() == data["auth_signed_bytes"], "handshake: auth_signed_bytes")
    check(auth.public_key == keys[hello.peer][1], "handshake: auth public_key")
    check(rf.verify(auth.public_key, atbs, auth.signature), "handshake: auth signature")
    check(rf.sign(keys[hello.peer][0], atbs) == auth.signature,
          "handshake: re-signing auth_tbs gives other bytes")
    # The wrong context must not verify (section 5.4: distinct contexts).
    check(not rf.verify(auth.public_key, ctbs, auth.signature), "handshake: cross-context")

    check(len(welcome.session_id) == 16, "handshake: session_id")
    check(welcome.role == pb.ROLE_PLATFORM, "handshake: welcome role")
    directory = {p.peer: set(p.keys) for p in welcome.directory}
    check(auth.public_key in directory.get("alpha", set()), "handshake: directory")


def check_spec_examples() -> int:
    """The worked examples in SPEC.md sections 4.6, 5.10 and 6.3, rebuilt from their inputs."""
    n = 0

    def same(name, got: bytes, want_hex: str):
        nonlocal n
        n += 1
        check(got.hex() == want_hex.replace(" ", ""), f"SPEC.md {name}")

    same("4.6 Ping", rf.encode(pb.Frame(ping=pb.Ping(nonce=1))), "0000000462020801")
    same("4.6 StreamInit", rf.encode(pb.Frame(stream_init=pb.StreamInit(lane=pb.LANE_BULK))),
         "000000047a020803")
    same("4.6 Ack", rf.encode(pb.Frame(ack=pb.Ack(tags=[1, 2, 3]))), "0000000742050a03010203")
    same("4.3 Credit{0}", rf.encode(pb.Frame(credit=pb.Credit(receive_window=0)))[4:], "5a00")

    relay_seed, alpha_seed = bytes([1]) * 32, bytes([2]) * 32
    relay_key, alpha_key = rf.public_key(relay_seed), rf.public_key(alpha_seed)
    same("5.10 relay key", relay_key,
         "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c")
    same("5.10 alpha key", alpha_key,
         "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394")
    cn, rn, binding = bytes(range(32)), bytes(range(32, 64)), bytes(32)
    same("5.10 Hello", rf.encode(pb.Frame(hello=pb.Hello(
        versions=[1], peer="alpha", client_nonce=cn, agent="example-py/0.1"))),
        "0000003e 0a3c 0a0101 1205616c706861"
        "1a20 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "220e 6578616d706c652d70792f302e31")
    ctbs = rf.challenge_tbs(binding, cn, rn, 1, "alpha")
    same("5.10 challenge_tbs", ctbs,
         "72656c61792d6665642f7631206368616c6c656e6765 00"
         "0000000000000000000000000000000000000000000000000000000000000000"
         "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
         "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
         "00000001 05 616c706861")
    same("5.10 Challenge", rf.encode(pb.Frame(challenge=pb.Challenge(
        version=1, relay_id="relay-1", relay_nonce=rn, relay_key=relay_key,
        relay_signature=rf.sign(relay_seed, ctbs), binding=pb.BINDING_NONE))),
        "00000096 129301 0801 120772656c61792d31"
        "1a20 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
        "2220 8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
        "2a40 58cf9339916f3221522b814d8f7c24c0c9f3c0dd324cf08674e892b191286706"
        "f1e7f31e8a0456960f647bb7c1b21e590d4bb8126edfb4542ce4a45b4be7ec0f"
        "3002")
    atbs = rf.auth_tbs(binding, cn, rn, 1, "alpha", relay_key, alpha_key)
    same("5.10 auth_tbs length", len(atbs).to_bytes(1, "big"), "bc")  # 188
    same("5.10 Auth", rf.encode(pb.Frame(auth=pb.Auth(
        public_key=alpha_key, signature=rf.sign(alpha_seed, atbs), receive_window=1024))),
        "00000069 1a67"
        "0a20 8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
        "1240 438d93d9fc5aac0841dc3b531868da19d4b356647560652489155871750e0095"
        "ced93a8c7a7229f47c6d4ea1139380f0c1dae14e54f7579d0182005c1fc79100"
        "188008")

    env = pb.Envelope(id=bytes(range(1, 17)), to="bob@beta", lane=pb.LANE_CHAT,
                      created_at_ms=1767225600000, ttl_s=0, content_type="text/plain",
                      payload=b"hi")
    setattr(env, "from", "alice@alpha")
    env_bytes = env.SerializeToString()
    same("6.3 envelope", env_bytes,
         "0a10 0102030405060708090a0b0c0d0e0f10   120b 616c69636540616c706861"
         "1a08 626f624062657461   2002   2880d0eab6b733   3a0a 746578742f706c61696e   4202 6869"
         .replace(" ", ""))
    sig = rf.sign(alpha_seed, rf.message_tbs(env_bytes))
    same("6.3 signature", sig,
         "db31541b47b4400ac5ac7b46972d427788d3030ffecc9495a3bdb0c8ff270c8c"
         "a6728b6385910953aa111b2aaaecf8af1edb2478c73f0b210e29292bd3d3f509")
    same("6.3 Deliver", rf.encode(pb.Frame(deliver=pb.Deliver(
        envelope=env_bytes, signature=sig, signer=alpha_key))),
        "000000ab 2aa801 0a42" + env_bytes.hex() + "1240" + sig.hex()
        + "1a20 8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394")
    return n


def main() -> int:
    positive, frames = check_frames()
    negative = check_negative(frames)
    before = len(failures)
    check_handshake()
    status = "ok" if len(failures) == before else "FAILED"
    examples = check_spec_examples()
    print(f"vectors: {positive} positive, {negative} negative, handshake {status}; "
          f"SPEC.md examples: {examples}")
    if failures:
        print(f"{len(failures)} mismatch(es)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
