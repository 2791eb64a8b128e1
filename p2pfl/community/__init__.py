"""Communities: signed manifests, invites, membership and sharing masks."""

from p2pfl.errors import P2pflError


class CommunityError(P2pflError, ValueError):
    """A problem with a manifest, invite, token or membership; the message names the problem
    and the fix."""
