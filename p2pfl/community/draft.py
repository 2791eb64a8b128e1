"""Drafts of community manifests: the founder's TOML (name, description, admission,
``[model]`` factory, inputs, classes, shared, ``[policy]`` protocol, delta, b, merge).
``create_manifest`` validates a draft, builds the model once to compute the schema of its
shared part, and signs the result with the founder's node key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from libp2p.crypto.keys import KeyPair

from p2pfl.community import CommunityError
from p2pfl.community.fields import (
    MAX_CLASSES,
    admission_mode,
    community_name,
    description_text,
    glob_list,
    key_name,
    parse_toml,
    read_field,
    shape_dims,
    spec_text,
    text_check,
)
from p2pfl.community.manifest import Manifest, sign_manifest
from p2pfl.learning.params import ParamSchema
from p2pfl.protocol.config import PROTOCOLS, parse_protocol
from p2pfl.spec import SpecError, finite_number, parse_spec, whole_number

_DRAFT_KEYS = {
    "": ("name", "description", "admission", "model", "policy"),
    "model": ("factory", "inputs", "classes", "shared"),
    "policy": ("protocol", "delta", "b", "merge"),
}


def create_manifest(draft_text: str, source: str, key_pair: KeyPair, now: int) -> Manifest:
    """Validate the draft manifest ``draft_text`` (read from ``source``), compute the schema of
    its shared part and sign it with ``key_pair`` (the founder's node key)."""
    from p2pfl.community.sharing import SharingError, shared_part
    from p2pfl.models import build_model, local_parameters

    draft = parse_toml(draft_text, source, "draft manifest")
    _check_keys(draft, "", source)
    model_table = _table(draft, "model", source, required=True)
    policy = _table(draft, "policy", source, required=False)
    _check_keys(model_table, "model", source)
    _check_keys(policy, "policy", source)

    def field(table: Mapping[str, Any], section: str, key: str, check: Callable[[Any], Any]) -> Any:
        return read_field(table, key, check, source, section)

    name = field(draft, "", "name", community_name)
    description = (
        field(draft, "", "description", description_text) if "description" in draft else ""
    )
    admission = field(draft, "", "admission", admission_mode) if "admission" in draft else "invite"
    factory = field(model_table, "model", "factory", spec_text)
    inputs = field(model_table, "model", "inputs", shape_dims)
    classes = field(model_table, "model", "classes", whole_number(1, MAX_CLASSES))
    shared = field(model_table, "model", "shared", glob_list)
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
    return sign_manifest(
        key_pair,
        source,
        name=name,
        description=description,
        model=factory,
        input_shape=inputs,
        classes=classes,
        shared=shared,
        schema=part.schema,
        protocol=protocol,
        admission=admission,
        created=now,
    )


def _check_keys(table: Mapping[str, Any], section: str, source: str) -> None:
    allowed = _DRAFT_KEYS[section]
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        where = f"[{section}]" if section else "top level"
        raise CommunityError(
            f"{source}: unknown key {key_name(section, unknown[0])!r}; allowed keys at the "
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


def _draft_protocol(policy: Mapping[str, Any], source: str) -> str:
    """The protocol spec of a draft's [policy]: ``protocol`` plus ``delta``, ``b``, ``merge``
    folded in, with the merge rule always written out."""
    text = (
        read_field(policy, "protocol", spec_text, source, "policy") if "protocol" in policy else ""
    )
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
        "merge": text_check(20),
    }
    for key, convert in extra.items():
        if key not in policy:
            continue
        if key in args:
            raise CommunityError(
                f"{source}: policy.{key} is given twice (in policy.protocol and as a key); keep one"
            )
        args[key] = read_field(policy, key, convert, source, "policy")
    args.setdefault("merge", "uniform")
    protocol = spec.kind + ":" + ",".join(f"{k}={v}" for k, v in args.items())
    try:
        parse_protocol(protocol)
    except SpecError as exc:
        raise CommunityError(f"{source}: policy: {exc}") from None
    return protocol
