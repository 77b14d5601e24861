"""The wire format of docs/protocol.md: version, error codes, HMAC signing, envelope framing.

Shared by the daemon and the Python client; needs only msgpack and the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Optional

import msgpack

PROTOCOL_VERSION = "1.2"
PROTOCOL_MAJOR = PROTOCOL_VERSION.split(".")[0]
SIGNATURE_SCHEME = "hmac-sha256"
SIGNATURE_HEX_CHARS = 64
KEY_HEX_CHARS = 64

MESSAGE_TYPES = ("hello", "infill", "feedback", "cancel", "status", "profiles", "shutdown")

ERROR_CODES = (
    "bad_message", "bad_signature", "unsupported_version", "unknown_type", "invalid_field",
    "too_large", "busy", "timeout", "cancelled", "not_found", "shutting_down", "internal",
)
MALFORMED_CODES = ("bad_message", "bad_signature", "unsupported_version", "unknown_type", "invalid_field", "too_large")
"""The codes of a message the daemon cannot take as written (`status` counts them as messages_rejected)."""


class ProtocolError(Exception):
    """A request the daemon answers with an error reply: a stable code, a message, a field path."""

    def __init__(self, code: str, message: str, field: Optional[str] = None):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


def new_key() -> str:
    """A fresh signing key: 64 lowercase hex characters (256 random bits)."""
    return secrets.token_hex(KEY_HEX_CHARS // 2)


def sign(key: str, body: bytes) -> bytes:
    """The signature frame of a body: HMAC-SHA256 keyed by the key's ASCII text, as lowercase hex."""
    return hmac.new(key.encode("ascii"), body, hashlib.sha256).hexdigest().encode("ascii")


def signature_matches(key: str, body: bytes, signature: bytes) -> bool:
    return len(signature) == SIGNATURE_HEX_CHARS and hmac.compare_digest(sign(key, body), signature)


def pack(envelope: dict) -> bytes:
    return msgpack.packb(envelope, use_bin_type=True)


def unpack(body: bytes) -> Any:
    """Decode one complete msgpack object (callers bound its size first); trailing or missing
    bytes are bad_message. Map keys may be any type: validation rejects non-string keys by name."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as error:  # msgpack raises many types for malformed input
        raise ProtocolError("bad_message", f"body is not one complete msgpack value ({error})") from None


def signed_frames(key: str, envelope: dict) -> list[bytes]:
    """[signature, body] for a request or reply envelope."""
    body = pack(envelope)
    return [sign(key, body), body]


def request_envelope(request_id: str, message_type: str, content: dict) -> dict:
    return {"protocol": PROTOCOL_VERSION, "id": request_id, "type": message_type, "content": content}


def reply_envelope(request_id: Optional[str], message_type: Optional[str], content: Optional[dict] = None,
                   error: Optional[ProtocolError] = None, warnings: tuple[str, ...] = ()) -> dict:
    envelope = {
        "protocol": PROTOCOL_VERSION,
        "id": request_id,
        "type": f"{message_type}_reply" if message_type in MESSAGE_TYPES else "error",
        "ok": error is None,
        "warnings": list(warnings),
    }
    if error is None:
        envelope["content"] = content if content is not None else {}
    else:
        envelope["error"] = error.as_dict()
    return envelope


def event_envelope(message_type: str, content: dict) -> dict:
    return {"protocol": PROTOCOL_VERSION, "type": message_type, "content": content}


def version_compatible(version: str) -> bool:
    """Same major version as ours: minor versions only add optional things."""
    major, _, minor = version.partition(".")
    return major == PROTOCOL_MAJOR and minor.isdigit() and major.isdigit()


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may hold (docs/protocol.md section 8)."""

    max_message_bytes: int = 8 * 1024 * 1024
    max_tracks: int = 64
    max_notes: int = 100_000
    max_range_qn: float = 256.0
    max_position_qn: float = 1_000_000.0
    max_candidates: int = 8
    max_tempo_changes: int = 10_000
    max_timeout_ms: int = 600_000

    def as_dict(self) -> dict:
        return dict(self.__dict__)
