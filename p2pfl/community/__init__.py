"""Communities: signed manifests, invites, membership and sharing masks."""
