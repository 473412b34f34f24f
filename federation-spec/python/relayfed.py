"""Federation protocol v1 for Python, written from SPEC.md alone.

Shared by check_vectors.py and peer.py: the generated protobuf classes (compiled from
proto/federation.proto at import time, never committed), framing (section 4), the
handshake transcripts (5.4), message signing (6.2), addresses (3.2, 3.3), key files
(appendix B) and the relay-side checks of sections 5.5, 6.4, 6.9 and 9.2.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HERE = Path(__file__).resolve().parent
SPEC_DIR = HERE.parent
PROTO_DIR = SPEC_DIR / "proto"
VECTORS_DIR = SPEC_DIR / "vectors"


# --- The generated classes ---------------------------------------------------------------


def _generate_pb2(out_dir: str) -> None:
    """Compiles federation.proto into out_dir/federation_pb2.py.

    grpcio-tools (PyPI) bundles protoc, so nothing but pip is needed; a `protoc` on PATH is
    the fallback. Set FEDPB_PROTOC=system to force the latter."""
    args = [f"--proto_path={PROTO_DIR}", f"--python_out={out_dir}", "federation.proto"]
    if os.environ.get("FEDPB_PROTOC") != "system":
        try:
            from grpc_tools import protoc  # type: ignore
        except ImportError:
            protoc = None
        if protoc is not None:
            if protoc.main(["protoc", *args]) != 0:
                raise RuntimeError("grpc_tools.protoc failed on federation.proto")
            return
    exe = shutil.which("protoc")
    if exe is None:
        raise RuntimeError(
            "cannot compile federation.proto: pip install -r requirements.txt (grpcio-tools), "
            "or install protoc"
        )
    subprocess.run([exe, *args], check=True)


def _load_pb2():
    with tempfile.TemporaryDirectory(prefix="fedpb-") as out:
        _generate_pb2(out)
        spec = importlib.util.spec_from_file_location(
            "federation_pb2", os.path.join(out, "federation_pb2.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["federation_pb2"] = module
        spec.loader.exec_module(module)
    return module


pb = _load_pb2()

from google.protobuf.message import DecodeError  # noqa: E402  (after protobuf is known to load)

# --- Constants (appendix D) ---------------------------------------------------------------

VERSION = 1
SUBPROTOCOL = "relay-fed.v1"
HANDSHAKE_MAX_FRAME = 65_536
DEFAULT_MAX_FRAME = 1_048_576
ABSOLUTE_MAX_FRAME = 16_777_216
DEFAULT_MAX_PAYLOAD = 65_536
CTX_CHALLENGE = b"relay-fed/v1 challenge"
CTX_AUTH = b"relay-fed/v1 auth"
CTX_MESSAGE = b"relay-fed/v1 message"
LIMIT_DEFAULTS = {  # appendix D; used when Welcome.limits holds 0 (section 5.8 rule 1)
    "max_frame_bytes": DEFAULT_MAX_FRAME,
    "max_payload_bytes": DEFAULT_MAX_PAYLOAD,
    "max_inflight": 4096,
    "idle_timeout_ms": 60_000,
    "max_chunk_recipients": 10_000,
    "receive_window": 1024,
}


class ProtocolError(Exception):
    """An error with its ErrorCode (section 10)."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(f"{code_name(code)}: {reason}" if reason else code_name(code))
        self.code = code
        self.reason = reason


def code_name(code: int) -> str:
    try:
        return pb.ErrorCode.Name(code)
    except ValueError:
        return f"ERROR_CODE_{code}"


# --- Framing (section 4) ------------------------------------------------------------------


def encode(frame) -> bytes:
    body = frame.SerializeToString()
    return struct.pack(">I", len(body)) + body


def parse_frame(body: bytes):
    frame = pb.Frame()
    try:
        frame.ParseFromString(body)  # upb also refuses invalid UTF-8 in string fields
    except DecodeError as e:
        raise ProtocolError(pb.ERROR_CODE_MALFORMED_FRAME, f"bad protobuf: {e}") from None
    return frame


def next_frame(data: bytes, at: int, max_frame: int) -> tuple[bytes, int]:
    """The frame body starting at `at` and the offset after it (sections 2.3.2, 4.2).

    The length is checked against the limit before any of the body is looked at."""
    if len(data) - at < 4:
        raise ProtocolError(pb.ERROR_CODE_MALFORMED_FRAME, "ends inside a length prefix")
    (n,) = struct.unpack_from(">I", data, at)
    if n > max_frame:
        raise ProtocolError(pb.ERROR_CODE_FRAME_TOO_LARGE, f"length {n} > {max_frame}")
    if len(data) - at - 4 < n:
        raise ProtocolError(pb.ERROR_CODE_MALFORMED_FRAME, "ends inside a frame")
    return data[at + 4 : at + 4 + n], at + 4 + n


def split_frames(data: bytes, max_frame: int) -> list[bytes]:
    """One WebSocket message (or a whole byte stream) -> frame bodies, all under one limit."""
    bodies, at = [], 0
    while at < len(data):
        body, at = next_frame(data, at, max_frame)
        bodies.append(body)
    return bodies


def decode_frames(data: bytes, max_frame: int) -> list:
    return [parse_frame(body) for body in split_frames(data, max_frame)]


# --- ed25519 ------------------------------------------------------------------------------


def public_key(seed: bytes) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def sign(seed: bytes, data: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).sign(data)


def verify(key: bytes, data: bytes, signature: bytes) -> bool:
    if len(key) != 32 or len(signature) != 64 or is_weak_key(key):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(key: bytes):
    """RFC 8032 section 5.1.3; None if the bytes are not a point."""
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    sign_bit = key[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x == 0 and sign_bit:
        return None
    if x & 1 != sign_bit:
        x = _P - x
    return (x, y, 1, (x * y) % _P)


def _double(pt):
    x, y, z, _ = pt
    a, b, c = x * x % _P, y * y % _P, 2 * z * z % _P
    h = (a + b) % _P
    e = (h - (x + y) * (x + y)) % _P
    g = (a - b) % _P
    f = (c + g) % _P
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def is_weak_key(key: bytes) -> bool:
    """True for bytes that are not a canonical point, or a point of small order (3.4 rule 4)."""
    if len(key) != 32:
        return True
    pt = _decode_point(key)
    if pt is None:
        return True
    for _ in range(3):  # [8]P
        pt = _double(pt)
    x, y, z, _ = pt
    return x % _P == 0 and (y - z) % _P == 0


# --- Transcripts and signed strings (sections 5.4, 6.2) ----------------------------------


def challenge_tbs(binding: bytes, client_nonce: bytes, relay_nonce: bytes, version: int,
                  peer: str) -> bytes:
    p = peer.encode("ascii")
    return (CTX_CHALLENGE + b"\x00" + binding + client_nonce + relay_nonce
            + struct.pack(">I", version) + bytes([len(p)]) + p)


def auth_tbs(binding: bytes, client_nonce: bytes, relay_nonce: bytes, version: int, peer: str,
             relay_key: bytes, public: bytes) -> bytes:
    p = peer.encode("ascii")
    return (CTX_AUTH + b"\x00" + binding + client_nonce + relay_nonce
            + struct.pack(">I", version) + bytes([len(p)]) + p + relay_key + public)


def message_tbs(envelope: bytes) -> bytes:
    return CTX_MESSAGE + b"\x00" + envelope


# --- Peer ids and addresses (sections 3.2, 3.3) -------------------------------------------

PEER_ID = re.compile(rb"[a-z0-9][a-z0-9-]{0,31}")
USER = re.compile(rb"[A-Za-z0-9._+=~-]{1,64}")


def is_peer_id(text: str) -> bool:
    return PEER_ID.fullmatch(text.encode("utf-8")) is not None


def parse_address(text: str):
    """(user, platform) or None."""
    raw = text.encode("utf-8")
    if raw.count(b"@") != 1:
        return None
    user, platform = raw.split(b"@")
    if USER.fullmatch(user) is None or PEER_ID.fullmatch(platform) is None:
        return None
    return user.decode(), platform.decode()


# --- Key files (appendix B) ---------------------------------------------------------------


class KeyFile:
    def __init__(self, peer: str, seed: bytes, relay_key: bytes | None):
        self.peer, self.seed, self.relay_key = peer, seed, relay_key
        self.public = public_key(seed)

    @classmethod
    def parse(cls, text: str) -> "KeyFile":
        values = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise ValueError(f"line {number}: expected key = value")
            key, value = (part.strip() for part in line.split("=", 1))
            if key not in ("peer", "secret_key", "public_key", "relay_key"):
                raise ValueError(f"line {number}: unknown key {key!r}")
            values[key] = value  # the last occurrence wins
        for required in ("peer", "secret_key"):
            if required not in values:
                raise ValueError(f"missing {required}")
        if not is_peer_id(values["peer"]):
            raise ValueError(f"peer {values['peer']!r} is not a peer id")

        def hex32(name):
            raw = bytes.fromhex(values[name])
            if len(raw) != 32:
                raise ValueError(f"{name}: expected 64 hex digits")
            return raw

        kf = cls(values["peer"], hex32("secret_key"),
                 hex32("relay_key") if "relay_key" in values else None)
        if "public_key" in values and hex32("public_key") != kf.public:
            raise ValueError("public_key does not match secret_key")
        if kf.relay_key is not None and is_weak_key(kf.relay_key):
            raise ValueError("relay_key is not a valid ed25519 key")
        return kf

    @classmethod
    def load(cls, path) -> "KeyFile":
        return cls.parse(Path(path).read_text(encoding="utf-8"))


# --- Checks a relay makes (and that a receiver can reuse) --------------------------------


def check_hello(frame) -> None:
    """The relay's checks of the first frame of a connection (sections 5.1, 5.2, 5.5)."""
    if frame.WhichOneof("kind") != "hello":
        raise ProtocolError(pb.ERROR_CODE_UNEXPECTED_FRAME, "first frame is not Hello")
    h = frame.hello
    if VERSION not in h.versions:
        raise ProtocolError(pb.ERROR_CODE_UNSUPPORTED_VERSION, f"versions {list(h.versions)}")
    if not is_peer_id(h.peer):
        raise ProtocolError(pb.ERROR_CODE_AUTH_FAILED, "peer is not a peer id")
    if len(h.client_nonce) != 32:
        raise ProtocolError(pb.ERROR_CODE_MALFORMED_FRAME, "client_nonce is not 32 bytes")
    if len(h.agent.encode()) > 64:
        raise ProtocolError(pb.ERROR_CODE_MALFORMED_FRAME, "agent longer than 64 bytes")


class Registry:
    """What the relay knows about peers: id -> (role, set of keys)."""

    def __init__(self, peers: dict[str, tuple[int, set[bytes]]]):
        self.peers = peers

    def role(self, peer: str):
        entry = self.peers.get(peer)
        return entry[0] if entry else None

    def keys(self, peer: str) -> set[bytes]:
        entry = self.peers.get(peer)
        return entry[1] if entry else set()


def _envelope_checks(envelope_bytes: bytes, signature: bytes, signer: bytes, peer: str,
                     max_payload: int):
    """Message checks 1-9 of section 6.4; returns the decoded Envelope."""
    env = pb.Envelope()
    try:
        env.ParseFromString(envelope_bytes)
    except DecodeError as e:
        raise ProtocolError(pb.ERROR_CODE_MALFORMED_FRAME, f"envelope: {e}") from None
    if len(env.id) != 16:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "id is not 16 bytes")
    if len(signature) != 64:
        raise ProtocolError(pb.ERROR_CODE_BAD_SIGNATURE, "signature is not 64 bytes")
    if is_weak_key(signer):
        raise ProtocolError(pb.ERROR_CODE_BAD_SIGNATURE, "signer is not a valid key")
    if env.lane not in (pb.LANE_CALL, pb.LANE_CHAT, pb.LANE_BULK):
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, f"lane {env.lane}")
    sender = parse_address(getattr(env, "from"))
    if sender is None:
        raise ProtocolError(pb.ERROR_CODE_BAD_ADDRESS, "from is not an address")
    if sender[1] != peer:
        raise ProtocolError(pb.ERROR_CODE_SPOOFED_SENDER, "from is not of this peer")
    if len(env.payload) > max_payload:
        raise ProtocolError(pb.ERROR_CODE_PAYLOAD_TOO_LARGE, f"{len(env.payload)} bytes")
    if len(env.content_type.encode()) > 64:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "content_type longer than 64 bytes")
    return env


def _signature_checks(envelope_bytes, signature, signer, origin, registry):
    if signer not in registry.keys(origin):
        raise ProtocolError(pb.ERROR_CODE_BAD_SIGNATURE, "signer is not a key of the origin")
    if not verify(signer, message_tbs(envelope_bytes), signature):
        raise ProtocolError(pb.ERROR_CODE_BAD_SIGNATURE, "signature does not verify")


def check_deliver(d, peer: str, registry: Registry, max_payload: int):
    """Section 6.4 message checks 1-14 for a Deliver from `peer`; returns the Envelope."""
    env = _envelope_checks(d.envelope, d.signature, d.signer, peer, max_payload)
    if parse_address(env.to) is None:
        raise ProtocolError(pb.ERROR_CODE_BAD_ADDRESS, "to is not an address")
    if env.lane == pb.LANE_BULK:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "bulk lane in Deliver")
    if registry.role(parse_address(env.to)[1]) != pb.ROLE_PLATFORM:
        raise ProtocolError(pb.ERROR_CODE_UNKNOWN_DESTINATION, env.to)
    _signature_checks(d.envelope, d.signature, d.signer, peer, registry)
    return env


def check_receipt(r, peer: str, registry: Registry) -> None:
    """Section 6.9 rule 2, in its order."""
    if len(r.id) != 16:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "id is not 16 bytes")
    sender = parse_address(getattr(r, "from"))
    if sender is None:
        raise ProtocolError(pb.ERROR_CODE_BAD_ADDRESS, "from is not an address")
    if sender[1] != peer:
        raise ProtocolError(pb.ERROR_CODE_SPOOFED_SENDER, "from is not of this peer")
    to = parse_address(r.to)
    if to is None:
        raise ProtocolError(pb.ERROR_CODE_BAD_ADDRESS, "to is not an address")
    if r.kind not in (pb.RECEIPT_KIND_DELIVERED, pb.RECEIPT_KIND_READ):
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, f"kind {r.kind}")
    if registry.role(to[1]) is None:
        raise ProtocolError(pb.ERROR_CODE_UNKNOWN_DESTINATION, r.to)


def check_campaign_begin(c, peer: str, registry: Registry, max_payload: int):
    """Section 9.2, in its order (without the quota)."""
    if len(c.campaign_id) != 16:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "campaign_id is not 16 bytes")
    if len(c.label.encode()) > 128:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "label longer than 128 bytes")
    env = _envelope_checks(c.envelope, c.signature, c.signer, peer, max_payload)
    if env.to:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "campaign envelope has a to")
    if env.lane != pb.LANE_BULK:
        raise ProtocolError(pb.ERROR_CODE_INVALID_MESSAGE, "campaign envelope not on bulk")
    _signature_checks(c.envelope, c.signature, c.signer, peer, registry)
    return env


# --- The JSON view of appendix C -----------------------------------------------------------

from google.protobuf.descriptor import FieldDescriptor as _FD  # noqa: E402


def _is_repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29 (`label` is gone in 7)
        return field.is_repeated
    return field.label == _FD.LABEL_REPEATED


def _scalar_from_json(field, value):
    if field.type == _FD.TYPE_BYTES:
        return bytes.fromhex(value)
    if field.type == _FD.TYPE_ENUM:
        return field.enum_type.values_by_name[value].number if isinstance(value, str) else value
    return value


def from_json(message, obj: dict):
    """Fills `message` from the JSON view (bytes as hex, enums by name) and returns it."""
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in obj.items():
        if name == "kind" and "kind" not in fields:  # Frame: {"kind": {"<oneof>": {...}}}
            [(name, value)] = value.items()
        field = fields[name]
        repeated = _is_repeated(field)
        if field.type == _FD.TYPE_MESSAGE:
            if repeated:
                for item in value:
                    from_json(getattr(message, name).add(), item)
            else:
                getattr(message, name).SetInParent()
                from_json(getattr(message, name), value)
        elif repeated:
            getattr(message, name).extend(_scalar_from_json(field, v) for v in value)
        else:
            setattr(message, name, _scalar_from_json(field, value))
    return message
