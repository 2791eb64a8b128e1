"""What both drivers share: the core's side of a node (``CoreRuntime``) on its model inside a
learner (``NodeModel``), built by ``open_core`` under one set of rules (``rules.py``)."""

from p2pfl.runtime.core_runtime import CoreRuntime, Driver, open_core
from p2pfl.runtime.model import NodeModel
from p2pfl.runtime.rules import WHOLE_MODEL_CHANNEL, core_seed, derive_seed, step_size

__all__ = [
    "WHOLE_MODEL_CHANNEL",
    "CoreRuntime",
    "Driver",
    "NodeModel",
    "core_seed",
    "derive_seed",
    "open_core",
    "step_size",
]
