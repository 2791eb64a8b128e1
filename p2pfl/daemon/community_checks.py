"""Start-up checks of a node's communities: the node's model must have exactly the parameters
each community's manifest describes, and a node in communities runs no whole-model protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2pfl.community import CommunityError
from p2pfl.community.manifest import Manifest
from p2pfl.community.sharing import SharedPart, SharingError, shared_part
from p2pfl.community.store import Membership
from p2pfl.daemon.config import ConfigError, NodeConfig
from p2pfl.learning.params import ParamSchema
from p2pfl.models import build_model, local_parameters
from p2pfl.protocol.config import parse_protocol


def _local_parameters(manifest: Manifest) -> list[str]:
    """What the community's ``local=`` keeps on every member (e.g. BatchNorm's affine
    parameters), named on the manifest's own model."""
    local = parse_protocol(manifest.protocol).local
    if not local:
        return []
    model = build_model(manifest.model, manifest.input_shape, manifest.classes, seed=0)
    return local_parameters(model, local)


def check_model(schema: ParamSchema, membership: Membership, model_spec: str) -> SharedPart:
    """The node's shared part for ``membership``; raise CommunityError if the node's model does
    not have exactly the parameters the community's manifest describes."""
    manifest = membership.manifest
    label = f"community {manifest.name!r} ({manifest.id[:12]})"
    fix = (
        f"run the node with the community's model: --model {manifest.model!r} on data with "
        f"inputs {list(manifest.input_shape)} and {manifest.classes} classes, or leave it with "
        f"`p2pfl community leave {manifest.id[:12]}`"
    )
    try:
        part = shared_part(schema, manifest.shared, _local_parameters(manifest))
    except SharingError as exc:
        raise CommunityError(
            f"{label} shares {list(manifest.shared)}, but this node's model "
            f"({model_spec!r}) does not fit: {exc}; {fix}"
        ) from None
    if part.schema != manifest.schema:
        raise CommunityError(
            f"{label} shares {_describe(manifest.schema)}, but this node's model "
            f"({model_spec!r}) has {_describe(part.schema)} under {list(manifest.shared)}; {fix}"
        )
    return part


def check_whole_model_protocol(config: NodeConfig, memberships: Sequence[Membership]) -> None:
    """Refuse a whole-model protocol on a node in communities: it would send every parameter,
    private ones included, to every connected peer."""
    if memberships and config.protocol_config.kind != "none":
        names = ", ".join(repr(m.manifest.name) for m in memberships)
        raise ConfigError(
            f"this node is a member of {names} but its whole-model protocol is "
            f"{config.protocol!r}, which would send every parameter (private ones included) to "
            f'every connected peer; set protocol = "none" in {config.home / "config.toml"} '
            "(or start with --protocol none), or leave the communities with "
            "`p2pfl community leave`"
        )


def _describe(schema: ParamSchema) -> str:
    return ", ".join(f"{p.name} {list(p.shape)} {p.dtype}" for p in schema.params) or "nothing"
