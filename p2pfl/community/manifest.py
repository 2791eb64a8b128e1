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

import dataclasses
import fnmatch
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair, PublicKey

from p2pfl.community import CommunityError
from p2pfl.community.fields import (
    MAX_CLASSES,
    MAX_PARAMS,
    MAX_TIME,
    admission_mode,
    b64,
    base64_key,
    base64_signature,
    community_name,
    description_text,
    format_time,
    glob_list,
    parse_toml,
    peer_id_text,
    read_field,
    schema_table,
    shape_dims,
    spec_text,
    toml_ints,
    toml_string,
)
from p2pfl.community.keys import ed25519_public_key, verify_signature
from p2pfl.learning.params import ParamSchema
from p2pfl.peers import peer_id_of
from p2pfl.protocol.config import parse_protocol
from p2pfl.spec import SpecError, whole_number

MANIFEST_FORMAT = "p2pfl-manifest-v1"
MANIFEST_DOMAIN = MANIFEST_FORMAT.encode()
"""Prefix of the signed bytes, so a manifest signature can never pass for anything else."""

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
            f"input_shape = {toml_ints(self.input_shape)}",
            f"classes = {self.classes}",
            f"shared = [{', '.join(toml_string(g) for g in self.shared)}]",
            f"protocol = {toml_string(self.protocol)}",
            f"admission = {toml_string(self.admission)}",
            f"founder = {toml_string(self.founder)}",
            f"founder_key = {toml_string(b64(self.founder_key))}",
            f"created = {self.created}  # {format_time(self.created)}",
            f"signature = {toml_string(b64(self.signature))}",
        ]
        for p in self.schema.params:
            lines += [
                "",
                "[[schema]]",
                f"name = {toml_string(p.name)}",
                f"shape = {toml_ints(p.shape)}",
                f"dtype = {toml_string(p.dtype)}",
            ]
        return "\n".join(lines) + "\n"


def sign_manifest(key_pair: KeyPair, source: str, **fields: Any) -> Manifest:
    """The manifest of ``fields`` (every field but founder, founder_key and signature), founded
    and signed by ``key_pair``, checked as nodes check it (``CommunityError`` naming
    ``source`` if it is not valid)."""
    unsigned = Manifest(
        **fields,
        founder=peer_id_of(key_pair.public_key),
        founder_key=key_pair.public_key.serialize(),
        signature=b"",
    )
    signature = key_pair.private_key.sign(unsigned.signed_bytes())
    signed = dataclasses.replace(unsigned, signature=signature)
    return load_manifest(signed.to_toml(), source)  # what we write is exactly what nodes accept


def load_manifest(text: str, source: str) -> Manifest:
    """Parse the signed manifest ``text`` (read from ``source``) and verify it: well-formed
    fields, founder == peer id of founder_key, and a signature that matches."""
    data = parse_toml(text, source, "signed manifest")
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
        return read_field(data, key, check, source)

    manifest = Manifest(
        name=field("name", community_name),
        description=field("description", description_text),
        model=field("model", spec_text),
        input_shape=field("input_shape", shape_dims),
        classes=field("classes", whole_number(1, MAX_CLASSES)),
        shared=field("shared", glob_list),
        schema=field("schema", schema_table),
        protocol=field("protocol", spec_text),
        admission=field("admission", admission_mode),
        founder=field("founder", peer_id_text),
        founder_key=field("founder_key", base64_key),
        created=field("created", whole_number(0, MAX_TIME)),
        signature=field("signature", base64_signature),
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
        return ed25519_public_key(manifest.founder_key)
    except ValueError:
        raise CommunityError(
            f"{source}: founder_key is not an Ed25519 libp2p public key; the manifest was "
            "altered after signing; get the original from the founder"
        ) from None
