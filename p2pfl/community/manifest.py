"""Community manifests: what a community shares and how, signed by its founder's node key.

A founder writes a *draft* (TOML: name, description, admission, ``[model]`` factory, inputs,
classes, shared, ``[policy]`` protocol, delta, b, merge); ``create_manifest`` validates it,
computes the schema of the shared part and signs the result. The signed manifest travels as
TOML (``Manifest.to_toml``); ``load_manifest`` trusts nothing in it: every field is checked
for type, size and range, and the signature must match the founder key it names. The
community id is a hash of the signed fields, so two different communities never share an id.

Loading never builds the model (a model factory is code; a manifest from a peer must not run
any): a node compares the manifest's schema with its own model instead.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import functools
import hashlib
import tomllib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.crypto.serialization import deserialize_public_key

from p2pfl.errors import P2pflError
from p2pfl.learning.params import ParamSchema, ParamSpec
from p2pfl.peers import peer_id_of
from p2pfl.protocol.config import PROTOCOLS, parse_protocol
from p2pfl.spec import SpecError, finite_number, parse_spec, whole_number

MANIFEST_FORMAT = "p2pfl-manifest-v1"
MANIFEST_DOMAIN = MANIFEST_FORMAT.encode()
"""Prefix of the signed bytes, so a manifest signature can never pass for anything else."""
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

_ED25519_KEY_PREFIX = b"\x08\x01\x12\x20"
"""Protobuf header of a serialized libp2p Ed25519 public key (type 1, 32 bytes)."""
_SIGNATURE_BYTES = 64

_SIGNED_KEYS = (
    "name",
    "description",
    "model",
    "input_shape",
    "classes",
    "shared",
    "schema",
    "protocol",
    "admission",
    "founder",
    "founder_key",
    "created",
)
_FILE_KEYS = frozenset({"format", *_SIGNED_KEYS, "signature"})
_DRAFT_KEYS = {
    "": ("name", "description", "admission", "model", "policy"),
    "model": ("factory", "inputs", "classes", "shared"),
    "policy": ("protocol", "delta", "b", "merge"),
}


class CommunityError(P2pflError, ValueError):
    """A problem with a manifest, invite, token or membership; the message names the problem
    and the fix."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A community, as signed by its founder."""

    name: str
    description: str
    model: str
    """Model spec for ``p2pfl.models.build_model`` (e.g. ``mlp:hidden=64``)."""
    input_shape: tuple[int, ...]
    classes: int
    shared: tuple[str, ...]
    """Name globs of the shared parameters; every other parameter stays private."""
    schema: ParamSchema
    """Names, shapes and dtypes of the shared part, in model order."""
    protocol: str
    """Sync policy, a spec for ``p2pfl.protocol.config.parse_protocol`` (merge rule included)."""
    admission: str
    """``open`` (anyone with the manifest) or ``invite`` (an invite from the founder)."""
    founder: str
    """Peer id of the founder."""
    founder_key: bytes
    """The founder's serialized public key; it signed the manifest."""
    created: int
    """Unix seconds."""
    signature: bytes

    @functools.cached_property
    def id(self) -> str:
        """32 hex chars of sha256 over the signed bytes (computed once per manifest)."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()[:32]

    def signed_bytes(self) -> bytes:
        """The canonical bytes the founder signs: a domain prefix, then msgpack of every field
        but the signature, in a fixed order."""
        body = [
            self.name,
            self.description,
            self.model,
            list(self.input_shape),
            self.classes,
            list(self.shared),
            [[p.name, list(p.shape), p.dtype] for p in self.schema.params],
            self.protocol,
            self.admission,
            self.founder,
            self.founder_key,
            self.created,
        ]
        return MANIFEST_DOMAIN + msgpack.packb(body, use_bin_type=True)

    def to_toml(self) -> str:
        """The signed manifest file: TOML, binary fields in base64."""
        lines = [
            "# p2pfl community manifest, signed by its founder. Do not edit: any change breaks",
            "# the signature and every node will refuse the file.",
            f"# community id {self.id}",
            f"format = {toml_string(MANIFEST_FORMAT)}",
            f"name = {toml_string(self.name)}",
            f"description = {toml_string(self.description)}",
            f"model = {toml_string(self.model)}",
            f"input_shape = {_toml_ints(self.input_shape)}",
            f"classes = {self.classes}",
            f"shared = [{', '.join(toml_string(g) for g in self.shared)}]",
            f"protocol = {toml_string(self.protocol)}",
            f"admission = {toml_string(self.admission)}",
            f"founder = {toml_string(self.founder)}",
            f"founder_key = {toml_string(_b64(self.founder_key))}",
            f"created = {self.created}  # {format_time(self.created)}",
            f"signature = {toml_string(_b64(self.signature))}",
        ]
        for p in self.schema.params:
            lines += [
                "",
                "[[schema]]",
                f"name = {toml_string(p.name)}",
                f"shape = {_toml_ints(p.shape)}",
                f"dtype = {toml_string(p.dtype)}",
            ]
        return "\n".join(lines) + "\n"


def format_time(unix_seconds: int) -> str:
    """``2025-01-31 12:00 UTC``."""
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def create_manifest(draft_text: str, source: str, key_pair: KeyPair, now: int) -> Manifest:
    """Validate the draft manifest ``draft_text`` (read from ``source``), compute the schema of
    its shared part and sign it with ``key_pair`` (the founder's node key)."""
    from p2pfl.community.sharing import SharingError, shared_part
    from p2pfl.models import build_model, local_parameters

    draft = _parse_toml(draft_text, source, "draft manifest")
    _check_keys(draft, "", source)
    model_table = _table(draft, "model", source, required=True)
    policy = _table(draft, "policy", source, required=False)
    _check_keys(model_table, "model", source)
    _check_keys(policy, "policy", source)

    def field(table: Mapping[str, Any], section: str, key: str, check: Callable[[Any], Any]) -> Any:
        return _field(table, key, check, source, section)

    name = field(draft, "", "name", _name)
    description = field(draft, "", "description", _description) if "description" in draft else ""
    admission = field(draft, "", "admission", _admission) if "admission" in draft else "invite"
    factory = field(model_table, "model", "factory", _spec_text)
    inputs = field(model_table, "model", "inputs", _shape)
    classes = field(model_table, "model", "classes", whole_number(1, MAX_CLASSES))
    shared = field(model_table, "model", "shared", _globs)
    protocol = _draft_protocol(policy, source)
    try:
        module = build_model(factory, inputs, classes, seed=0)
    except Exception as exc:  # a user factory may raise anything; report it, not a traceback
        raise CommunityError(
            f"{source}: model.factory {factory!r} cannot be built for inputs={list(inputs)}, "
            f"classes={classes}: {exc}"
        ) from None
    try:
        local = local_parameters(module, parse_protocol(protocol).local)
        part = shared_part(ParamSchema.from_module(module), shared, local)
    except SharingError as exc:
        raise CommunityError(f"{source}: model.shared: {exc}; fix the glob") from None
    unsigned = Manifest(
        name=name,
        description=description,
        model=factory,
        input_shape=inputs,
        classes=classes,
        shared=shared,
        schema=part.schema,
        protocol=protocol,
        admission=admission,
        founder=peer_id_of(key_pair.public_key),
        founder_key=key_pair.public_key.serialize(),
        created=now,
        signature=b"",
    )
    signature = key_pair.private_key.sign(unsigned.signed_bytes())
    signed = dataclasses.replace(unsigned, signature=signature)
    return load_manifest(signed.to_toml(), source)  # what we write is exactly what nodes accept


def load_manifest(text: str, source: str) -> Manifest:
    """Parse the signed manifest ``text`` (read from ``source``) and verify it: well-formed
    fields, founder == peer id of founder_key, and a signature that matches."""
    data = _parse_toml(text, source, "signed manifest")
    if data.get("format") != MANIFEST_FORMAT:
        raise CommunityError(
            f"{source}: not a p2pfl signed manifest (format must be {MANIFEST_FORMAT!r}); "
            "a draft is signed with `p2pfl community create`"
        )
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise CommunityError(
            f"{source}: unknown key(s) {unknown} in a signed manifest; "
            "get the original file from the founder"
        )

    def field(key: str, check: Callable[[Any], Any]) -> Any:
        return _field(data, key, check, source)

    manifest = Manifest(
        name=field("name", _name),
        description=field("description", _description),
        model=field("model", _spec_text),
        input_shape=field("input_shape", _shape),
        classes=field("classes", whole_number(1, MAX_CLASSES)),
        shared=field("shared", _globs),
        schema=field("schema", _schema),
        protocol=field("protocol", _spec_text),
        admission=field("admission", _admission),
        founder=field("founder", _peer_id_text),
        founder_key=field("founder_key", _base64_key),
        created=field("created", whole_number(0, MAX_TIME)),
        signature=field("signature", _base64_signature),
    )
    verify_manifest(manifest, source)
    return manifest


def verify_manifest(manifest: Manifest, source: str) -> None:
    """Check the founder, the signature and the fields' meaning of a parsed manifest."""
    key = founder_public_key(manifest, source)
    if peer_id_of(key) != manifest.founder:
        raise CommunityError(
            f"{source}: founder {manifest.founder} is not the owner of founder_key; the manifest "
            "was altered after signing; get the original from the founder"
        )
    if not verify_signature(key, manifest.signed_bytes(), manifest.signature):
        raise CommunityError(
            f"{source}: manifest {manifest.name!r} signature does not match: it was altered "
            "after signing; get the original from the founder"
        )
    try:
        config = parse_protocol(manifest.protocol)
    except SpecError as exc:
        raise CommunityError(f"{source}: protocol: {exc}") from None
    if config.kind == "none":
        raise CommunityError(f"{source}: protocol 'none' shares nothing; the manifest is unusable")
    if manifest.schema.numel > MAX_PARAMS:
        raise CommunityError(
            f"{source}: the shared schema has {manifest.schema.numel:,} parameters, more than "
            f"{MAX_PARAMS:,}; the manifest is unusable"
        )
    for glob in manifest.shared:
        if not any(fnmatch.fnmatchcase(name, glob) for name in manifest.schema.names):
            raise CommunityError(f"{source}: shared glob {glob!r} matches no schema entry")
    for name in manifest.schema.names:
        if not any(fnmatch.fnmatchcase(name, glob) for glob in manifest.shared):
            raise CommunityError(f"{source}: schema entry {name!r} matches no shared glob")


def founder_public_key(manifest: Manifest, source: str) -> PublicKey:
    """The founder's public key (Ed25519, the node key type), parsed once per key."""
    try:
        return _ed25519_key(manifest.founder_key)
    except ValueError:
        raise CommunityError(
            f"{source}: founder_key is not an Ed25519 libp2p public key; the manifest was "
            "altered after signing; get the original from the founder"
        ) from None


@functools.lru_cache(maxsize=256)
def _ed25519_key(data: bytes) -> PublicKey:
    if len(data) != len(_ED25519_KEY_PREFIX) + 32 or not data.startswith(_ED25519_KEY_PREFIX):
        raise ValueError("not an Ed25519 key")
    try:
        return deserialize_public_key(data)
    except Exception as exc:  # libp2p raises protobuf/nacl/crypto errors on bad keys
        raise ValueError(str(exc)) from None


def verify_signature(key: PublicKey, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``key``'s signature of ``data``; never raises (nacl raises on
    malformed signatures)."""
    try:
        return bool(key.verify(data, signature))
    except Exception:  # a malformed signature is a failed check, whatever the library raises
        return False


# -- draft parsing -----------------------------------------------------------------------------


def _parse_toml(text: str, source: str, what: str) -> dict[str, Any]:
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


def _check_keys(table: Mapping[str, Any], section: str, source: str) -> None:
    allowed = _DRAFT_KEYS[section]
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        where = f"[{section}]" if section else "top level"
        raise CommunityError(
            f"{source}: unknown key {_key(section, unknown[0])!r}; allowed keys at the "
            f"{where}: {', '.join(allowed)}"
        )


def _table(draft: Mapping[str, Any], key: str, source: str, required: bool) -> dict[str, Any]:
    if key not in draft:
        if required:
            raise CommunityError(f"{source}: missing table [{key}]; see examples/community")
        return {}
    value = draft[key]
    if not isinstance(value, dict):
        raise CommunityError(f"{source}: {key} must be a table [{key}], got {value!r}")
    return value


def _key(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _draft_protocol(policy: Mapping[str, Any], source: str) -> str:
    """The protocol spec of a draft's [policy]: ``protocol`` plus ``delta``, ``b``, ``merge``
    folded in, with the merge rule always written out."""
    text = _field(policy, "protocol", _spec_text, source, "policy") if "protocol" in policy else ""
    try:
        spec = parse_spec(text or "dynamic", PROTOCOLS)
    except SpecError as exc:
        raise CommunityError(f"{source}: policy.protocol: {exc}") from None
    if spec.kind == "none":
        raise CommunityError(
            f"{source}: policy.protocol 'none' shares nothing; choose dynamic, periodic:b=B, "
            "gossip:b=B or continuous"
        )
    args = dict(spec.args)
    extra = {
        "delta": lambda v: repr(finite_number()(v)),
        "b": lambda v: str(whole_number(1, 2**31)(v)),
        "merge": _text(20),
    }
    for key, convert in extra.items():
        if key not in policy:
            continue
        if key in args:
            raise CommunityError(
                f"{source}: policy.{key} is given twice (in policy.protocol and as a key); keep one"
            )
        args[key] = _field(policy, key, convert, source, "policy")
    args.setdefault("merge", "uniform")
    protocol = spec.kind + ":" + ",".join(f"{k}={v}" for k, v in args.items())
    try:
        parse_protocol(protocol)
    except SpecError as exc:
        raise CommunityError(f"{source}: policy: {exc}") from None
    return protocol


# -- field checks (each raises ValueError with the problem; _field adds source and key) ------


def _field(
    table: Mapping[str, Any],
    key: str,
    check: Callable[[Any], Any],
    source: str,
    section: str = "",
) -> Any:
    if key not in table:
        raise CommunityError(f"{source}: missing key {_key(section, key)!r}")
    try:
        return check(table[key])
    except ValueError as exc:
        raise CommunityError(f"{source}: {_key(section, key)}: {exc}") from None


def _text(max_chars: int, multiline: bool = False) -> Callable[[Any], str]:
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


def _name(value: Any) -> str:
    text = _text(MAX_NAME_CHARS)(value)
    if not text.strip():
        raise ValueError("must not be empty; give the community a short name")
    return text


_description = _text(MAX_DESCRIPTION_CHARS, multiline=True)


def _spec_text(value: Any) -> str:
    text = _text(MAX_SPEC_CHARS)(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _peer_id_text(value: Any) -> str:
    text = _text(MAX_PEER_ID_CHARS)(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def _admission(value: Any) -> str:
    if value not in ADMISSIONS:
        raise ValueError(f"must be one of {', '.join(map(repr, ADMISSIONS))}, got {value!r}")
    return value


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_NDIM:
        raise ValueError(f"must be a list of 1 to {MAX_NDIM} positive whole numbers, e.g. [64]")
    return tuple(whole_number(1, MAX_PARAMS)(d) for d in value)


def _globs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_GLOBS:
        raise ValueError(f'must be a list of 1 to {MAX_GLOBS} parameter name globs, e.g. ["fc1.*"]')
    globs = tuple(_text(MAX_PARAM_NAME_CHARS)(g) for g in value)
    if any(not g for g in globs):
        raise ValueError("a glob is empty")
    if len(set(globs)) != len(globs):
        raise ValueError("a glob is listed twice")
    return globs


def _schema(value: Any) -> ParamSchema:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SCHEMA_ENTRIES:
        raise ValueError(f"must be 1 to {MAX_SCHEMA_ENTRIES} [[schema]] tables")
    specs = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"name", "shape", "dtype"}:
            raise ValueError("every [[schema]] table has exactly the keys name, shape, dtype")
        name = _text(MAX_PARAM_NAME_CHARS)(entry["name"])
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


def _base64_key(value: Any) -> bytes:
    data = _base64_bytes(value, 64)
    try:
        _ed25519_key(data)
    except ValueError:
        raise ValueError("is not an Ed25519 libp2p public key") from None
    return data


def _base64_signature(value: Any) -> bytes:
    data = _base64_bytes(value, _SIGNATURE_BYTES)
    if len(data) != _SIGNATURE_BYTES:
        raise ValueError(f"must be {_SIGNATURE_BYTES} bytes, got {len(data)}")
    return data


# -- TOML output -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
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


def _toml_ints(values: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"
