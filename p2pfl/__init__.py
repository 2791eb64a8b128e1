"""p2pfl: peer-to-peer decentralized learning with dynamic averaging."""

__version__ = "0.1.0"
