"""The node daemon: drives one protocol core on trio + libp2p (transport, identity, control)."""
