"""Model specs: built-in architectures, seeded init, user factories and errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from p2pfl.models import build_model
from p2pfl.spec import SpecError


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_64_64_10_on_digits_has_4810_parameters():
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    assert _count(model) == (64 * 64 + 64) + (64 * 10 + 10) == 4810
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    two_hidden = build_model("mlp:hidden=64x64", (1, 8, 8), 10, seed=0)
    assert _count(two_hidden) == 4810 + 64 * 64 + 64


def test_mlp_hidden_widths_and_head_name():
    model = build_model("mlp:hidden=32x16x8", (20,), 3, seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [32, 16, 8, 3]
    assert {name for name, _ in model.named_parameters()} >= {"head.weight", "head.bias"}


def test_logistic_and_cnn_shapes():
    logistic = build_model("logistic", (1, 8, 8), 10, seed=0)
    assert _count(logistic) == 650
    cnn = build_model("cnn", (1, 8, 8), 10, seed=0)
    assert cnn(torch.randn(4, 64)).shape == (4, 10)
    colour = build_model("cnn", (3, 6, 6), 5, seed=0)
    assert colour(torch.randn(2, 108)).shape == (2, 5)


def test_only_plain_layers():
    allowed = (
        nn.Sequential,
        nn.Linear,
        nn.Conv2d,
        nn.ReLU,
        nn.Flatten,
        nn.Unflatten,
        nn.AdaptiveAvgPool2d,
    )
    for spec in ("logistic", "mlp", "cnn"):
        model = build_model(spec, (1, 8, 8), 10, seed=0)
        assert all(isinstance(m, allowed) for m in model.modules())


def test_same_seed_same_init():
    a, b, c = (build_model("mlp:hidden=16", (8,), 2, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


@pytest.mark.parametrize(
    "spec", ["resnet", "mlp:hidden=64xx", "mlp:hidden=0", "mlp:width=3", "logistic:x=1", ""]
)
def test_bad_specs(spec):
    with pytest.raises(SpecError):
        build_model(spec, (64,), 10, seed=0)


def test_cnn_needs_image_input():
    with pytest.raises(SpecError, match="image-shaped"):
        build_model("cnn", (64,), 10, seed=0)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(input_shape, num_classes):
                return nn.Linear(input_shape[0], num_classes)

            def broken(input_shape, num_classes):
                return "not a module"

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_factories"
    sys.modules.pop("my_factories", None)


def test_user_factory(factory_module):
    model = build_model(f"{factory_module}:tiny", (6,), 3, seed=1)
    again = build_model(f"{factory_module}:tiny", (6,), 3, seed=1)
    assert isinstance(model, nn.Linear) and model.out_features == 3
    assert torch.equal(model.weight, again.weight)


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("my_factories:broken", "expected a torch.nn.Module"),
        ("my_factories:missing", "has no function"),
        ("my_factories:NOT_CALLABLE", "has no function"),
        ("no_such_module_xyz:make", "cannot import module"),
    ],
)
def test_user_factory_errors(factory_module, target, fragment):
    with pytest.raises(SpecError, match=fragment):
        build_model(target, (6,), 3, seed=0)
