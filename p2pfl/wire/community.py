"""What community peers say to each other: the hello and announcement formats.

Two small protocols carry a community's own traffic (``p2pfl.protocol.admission`` decides on
hellos; ``p2pfl.daemon.communities`` carries them over libp2p, the simulator over its links);
its sync frames travel on the node's one sync protocol (``p2pfl.daemon.sync``):

* hello (``HELLO_PROTOCOL``): ``Hello`` = ``{community, credential, answer, refused}``. A
  credential (``make_credential``) proves membership to the receiver only: its proof is bound
  to the sender's and the receiver's peer ids, which both know from the Noise handshake, so a
  hello is safe to send first and useless to replay. The receiver checks it with the stream's
  authenticated peer id as prover and itself as verifier, admits the peer and answers with its
  own hello (bound to the sender); a refused hello is answered with the reason (``refused``),
  so both sides log it. ``LEFT`` is the refusal of a member that leaves.
* announcements on the gossipsub topic ``topic_of(community)``: ``Announcement`` =
  ``{peer, addrs}``, signed by the publisher. Any subscriber can read them, so they carry
  nothing that admits: only a hello proves membership.

Parsing (``Hello.from_bytes``, ``Announcement.from_bytes``) raises ``WireError`` for anything
malformed, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from p2pfl.wire.codec import WireError

HELLO_PROTOCOL = "/p2pfl/community/hello/1.0.0"
TOPIC_PREFIX = "p2pfl/community/"
ID_BYTES = 16
"""A community id is 16 bytes (32 hex digits): the hash of its signed manifest."""
HELLO_MAX_BYTES = 4096
ANNOUNCEMENT_MAX_BYTES = 2048
MAX_ANNOUNCED_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_REASON_CHARS = 1000
LEFT = "left the community"
"""The refusal a member sends its peers when it leaves."""


def topic_of(community: str) -> str:
    """The gossipsub topic of a community's announcements."""
    return TOPIC_PREFIX + community


@dataclass(frozen=True)
class Hello:
    """A membership claim (``credential``) for ``community``, or a refusal with its reason."""

    community: str
    credential: bytes | None = None
    answer: bool = False
    """True for the reply to a hello (a reply is not answered again)."""
    refused: str | None = None
    """Why the sender refuses the receiver (then ``credential`` is None)."""

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "community": self.community,
                "credential": self.credential,
                "answer": self.answer,
                "refused": self.refused,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Hello:
        """Parse a peer's hello; anything malformed raises WireError."""
        body = _unpack(data, "hello", max_map_len=4)
        if not isinstance(body, dict) or set(body) != {
            "community",
            "credential",
            "answer",
            "refused",
        }:
            raise WireError("hello must be a map of community, credential, answer, refused")
        community, credential = body["community"], body["credential"]
        answer, refused = body["answer"], body["refused"]
        _check_community_id(community, "hello")
        if credential is not None and not isinstance(credential, bytes):
            raise WireError("hello: credential must be bytes or nil")
        if not isinstance(answer, bool):
            raise WireError("hello: answer must be a boolean")
        if refused is not None and (
            not isinstance(refused, str) or len(refused) > MAX_REASON_CHARS
        ):
            raise WireError(
                f"hello: refused must be a reason text (at most {MAX_REASON_CHARS} chars) or nil"
            )
        return cls(community, credential, answer, refused)


@dataclass(frozen=True)
class Announcement:
    """``peer`` says it is a member of the topic's community and listens on ``addrs``; only
    a hello proves it."""

    peer: str
    addrs: tuple[str, ...]

    def to_bytes(self) -> bytes:
        return msgpack.packb({"peer": self.peer, "addrs": list(self.addrs)}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Announcement:
        """Parse an announcement; anything malformed raises WireError."""
        if len(data) > ANNOUNCEMENT_MAX_BYTES:
            raise WireError(f"announcement of {len(data)} bytes (at most {ANNOUNCEMENT_MAX_BYTES})")
        body = _unpack(data, "announcement", max_map_len=2)
        if not isinstance(body, dict) or set(body) != {"peer", "addrs"}:
            raise WireError("announcement must be a map of peer, addrs")
        peer, addrs = body["peer"], body["addrs"]
        if not isinstance(peer, str) or not 0 < len(peer) <= 128:
            raise WireError("announcement: peer must be a peer id")
        if (
            not isinstance(addrs, list)
            or len(addrs) > MAX_ANNOUNCED_ADDRS
            or not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS for a in addrs)
        ):
            raise WireError(f"announcement: addrs must be at most {MAX_ANNOUNCED_ADDRS} addresses")
        return cls(peer, tuple(addrs))


def _unpack(data: bytes, what: str, max_map_len: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=HELLO_MAX_BYTES,
            max_str_len=HELLO_MAX_BYTES,
            max_array_len=MAX_ANNOUNCED_ADDRS,
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError subclasses, TypeError, ...
        raise WireError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def _check_community_id(value: object, where: str) -> None:
    if (
        not isinstance(value, str)
        or len(value) != 2 * ID_BYTES
        or any(c not in "0123456789abcdef" for c in value)
    ):
        raise WireError(f"{where}: community must be a 32-hex-digit community id")
