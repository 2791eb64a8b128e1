"""Shared test settings: single-threaded torch, as the CLI runs it (small models only lose
from intra-op threads)."""

import torch

torch.set_num_threads(1)
