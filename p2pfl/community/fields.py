"""The values of community manifests and drafts: their limits, their checks and their TOML
text. Each check raises ValueError naming the problem; ``read_field`` reads a key of a table
with a check and turns its ValueError into a ``CommunityError`` naming the source and key."""

from __future__ import annotations

import base64
import binascii
import tomllib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from p2pfl.community import CommunityError
from p2pfl.community.keys import SIGNATURE_BYTES, ed25519_public_key
from p2pfl.learning.params import ParamSchema, ParamSpec
from p2pfl.spec import whole_number

ADMISSIONS = ("open", "invite")
DTYPES = ("float16", "bfloat16", "float32", "float64")

MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 2000
MAX_SPEC_CHARS = 500
MAX_PARAM_NAME_CHARS = 200
MAX_PEER_ID_CHARS = 128
MAX_GLOBS = 64
MAX_SCHEMA_ENTRIES = 4096
MAX_NDIM = 8
MAX_PARAMS = 2**31
MAX_CLASSES = 2**20
MAX_MANIFEST_CHARS = 1024 * 1024
MAX_TIME = 253_402_300_799
"""Unix seconds of 9999-12-31 23:59:59 UTC, the last time ``datetime`` can show."""


def format_time(unix_seconds: int) -> str:
    """``2025-01-31 12:00 UTC``."""
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def parse_toml(text: str, source: str, what: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise CommunityError(f"{source}: a {what} must be text")
    if len(text) > MAX_MANIFEST_CHARS:
        raise CommunityError(
            f"{source}: {len(text):,} characters, more than the {MAX_MANIFEST_CHARS:,} a "
            f"{what} may have"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CommunityError(f"{source}: not valid TOML ({exc}); fix the {what}") from None
    except RecursionError:
        raise CommunityError(f"{source}: TOML nested too deeply for a {what}") from None


def key_name(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def read_field(
    table: Mapping[str, Any],
    key: str,
    check: Callable[[Any], Any],
    source: str,
    section: str = "",
) -> Any:
    if key not in table:
        raise CommunityError(f"{source}: missing key {key_name(section, key)!r}")
    try:
        return check(table[key])
    except ValueError as exc:
        raise CommunityError(f"{source}: {key_name(section, key)}: {exc}") from None


def text_check(max_chars: int, multiline: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        if len(value) > max_chars:
            raise ValueError(f"{len(value)} characters, at most {max_chars} allowed")
        allowed = "\n\t" if multiline else ""
        if any(not c.isprintable() and c not in allowed for c in value):
            raise ValueError("contains control characters; remove them")
        return value

    return check


def community_name(value: Any) -> str:
    text = text_check(MAX_NAME_CHARS)(value)
    if not text.strip():
        raise ValueError("must not be empty; give the community a short name")
    return text


description_text = text_check(MAX_DESCRIPTION_CHARS, multiline=True)


def spec_text(value: Any) -> str:
    text = text_check(MAX_SPEC_CHARS)(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def peer_id_text(value: Any) -> str:
    text = text_check(MAX_PEER_ID_CHARS)(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def admission_mode(value: Any) -> str:
    if value not in ADMISSIONS:
        raise ValueError(f"must be one of {', '.join(map(repr, ADMISSIONS))}, got {value!r}")
    return value


def shape_dims(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_NDIM:
        raise ValueError(f"must be a list of 1 to {MAX_NDIM} positive whole numbers, e.g. [64]")
    return tuple(whole_number(1, MAX_PARAMS)(d) for d in value)


def glob_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_GLOBS:
        raise ValueError(f'must be a list of 1 to {MAX_GLOBS} parameter name globs, e.g. ["fc1.*"]')
    globs = tuple(text_check(MAX_PARAM_NAME_CHARS)(g) for g in value)
    if any(not g for g in globs):
        raise ValueError("a glob is empty")
    if len(set(globs)) != len(globs):
        raise ValueError("a glob is listed twice")
    return globs


def schema_table(value: Any) -> ParamSchema:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SCHEMA_ENTRIES:
        raise ValueError(f"must be 1 to {MAX_SCHEMA_ENTRIES} [[schema]] tables")
    specs = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"name", "shape", "dtype"}:
            raise ValueError("every [[schema]] table has exactly the keys name, shape, dtype")
        name = text_check(MAX_PARAM_NAME_CHARS)(entry["name"])
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise ValueError(f"shape of {name!r} must be a list of at most {MAX_NDIM} sizes")
        dims = tuple(whole_number(1, MAX_PARAMS)(d) for d in shape)
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"dtype of {name!r} must be one of {', '.join(DTYPES)}")
        specs.append(ParamSpec(name, dims, entry["dtype"]))
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("a parameter name appears twice")
    return ParamSchema(tuple(specs))


def _base64_bytes(value: Any, max_bytes: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * max_bytes:
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def base64_key(value: Any) -> bytes:
    data = _base64_bytes(value, 64)
    try:
        ed25519_public_key(data)
    except ValueError:
        raise ValueError("is not an Ed25519 libp2p public key") from None
    return data


def base64_signature(value: Any) -> bytes:
    data = _base64_bytes(value, SIGNATURE_BYTES)
    if len(data) != SIGNATURE_BYTES:
        raise ValueError(f"must be {SIGNATURE_BYTES} bytes, got {len(data)}")
    return data


# -- TOML output -------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def toml_string(text: str) -> str:
    """A TOML basic string (quotes, backslashes and control characters escaped)."""
    out = ['"']
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def toml_ints(values: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"
