"""Model architectures named by a spec: ``logistic``, ``mlp:hidden=64x32``, ``cnn``,
``cnn-bn``, ``pkg.mod:fn``.

``mlp`` alone has one hidden layer of 64 (on digits: 64-64-10, 4,810 parameters). ``cnn-bn``
is ``cnn`` with a BatchNorm after each convolution (on digits 8x8: 6,186 parameters plus
96 running statistics per node).

Every model takes flat input ``[batch, prod(input_shape)]`` and returns logits
``[batch, num_classes]``. Built-in models are ``nn.Sequential`` stacks (no Dropout) whose
last layer is named ``head``, so a community can keep it private.

``local_parameters(model, "bn")`` names what a protocol's ``local=bn`` keeps on the node
(FedBN): the affine weight and bias of every BatchNorm layer.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections import OrderedDict

import torch
from torch import nn

from p2pfl.spec import SpecError, parse_spec, positive_int

MODEL_KINDS = ("logistic", "mlp", "cnn", "cnn-bn")


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build the model ``spec`` names, initialised from ``seed`` (same seed, same weights),
    and check that it maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
    model = _build(spec, input_shape, num_classes, seed)
    _check_output(spec, model, input_shape, num_classes)
    return model


def _check_output(
    spec: str, model: nn.Module, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """Run the model once on a zero batch of the data's shape (in eval mode, so no state
    such as BatchNorm statistics changes) and refuse a model that does not fit the data."""
    features = math.prod(input_shape)
    fix = (
        f"the model must take [batch, {features}] inputs and return [batch, {num_classes}] "
        "logits for this data"
    )
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, features))
    except Exception as exc:
        raise SpecError(
            f"{spec!r}: the model fails on input of shape [2, {features}] "
            f"({type(exc).__name__}: {exc}); {fix}"
        ) from None
    finally:
        model.train(training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise SpecError(f"{spec!r}: the model returned {shape} for 2 samples; {fix}")


def _build(spec: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    kind = spec.strip().partition(":")[0].strip().lower()
    if kind not in MODEL_KINDS and ":" in spec and "=" not in spec:
        return _from_factory(spec.strip(), input_shape, num_classes, seed)
    if kind not in MODEL_KINDS:
        raise SpecError(
            f"{spec!r}: unknown model {kind!r}; choose one of: {', '.join(MODEL_KINDS)}, "
            "or module:function for your own factory"
        )
    parsed = parse_spec(spec, MODEL_KINDS)
    features = math.prod(input_shape)
    torch.manual_seed(seed)
    if parsed.kind == "logistic":
        parsed.check_keys([])
        return nn.Sequential(OrderedDict(head=nn.Linear(features, num_classes)))
    if parsed.kind == "mlp":
        parsed.check_keys(["hidden"])
        hidden = parsed.take("hidden", _widths, default=(64,))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, width in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(features, width)
            layers[f"act{i}"] = nn.ReLU()
            features = width
        layers["head"] = nn.Linear(features, num_classes)
        return nn.Sequential(layers)
    parsed.check_keys([])
    if len(input_shape) != 3:
        raise SpecError(
            f"{spec!r}: cnn needs image-shaped input (channels, height, width), got "
            f"{input_shape}; use mlp or logistic for this dataset"
        )
    channels = input_shape[0]
    norm = parsed.kind == "cnn-bn"
    layers = OrderedDict(unflatten=nn.Unflatten(1, input_shape))
    for i, (n_in, n_out) in enumerate(((channels, 16), (16, 32)), start=1):
        layers[f"conv{i}"] = nn.Conv2d(n_in, n_out, kernel_size=3, padding=1)
        if norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(n_out)
        layers[f"act{i}"] = nn.ReLU()
    layers["pool"] = nn.AdaptiveAvgPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(32 * 2 * 2, num_classes)
    return nn.Sequential(layers)


def local_parameters(model: nn.Module, local: str) -> list[str]:
    """Names of the parameters ``local=`` keeps on the node: for ``bn`` the affine weight
    and bias of every BatchNorm layer (their running statistics are buffers, which never
    leave a node anyway); nothing for ``""``."""
    if not local:
        return []
    if local != "bn":
        raise ValueError(f"local={local!r}: only local=bn is known")
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, _ in module.named_parameters(recurse=False)
    ]


def _widths(raw: str) -> tuple[int, ...]:
    """Parse hidden layer widths such as ``64x32``."""
    return tuple(positive_int(part) for part in raw.lower().split("x"))


def _from_factory(
    spec: str, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Module:
    """Call the user factory ``module:function`` as ``factory(input_shape=, num_classes=)``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            f"{spec!r}: cannot import module {module_name!r} ({exc}); "
            "check the name and that its directory is on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module itself fails while being imported
        raise SpecError(
            f"{spec!r}: importing module {module_name!r} failed ({type(exc).__name__}: {exc}); "
            "fix the module"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"{spec!r}: module {module_name!r} has no function {attr!r}")
    try:
        inspect.signature(factory).bind(input_shape=input_shape, num_classes=num_classes)
    except (TypeError, ValueError):
        raise SpecError(
            f"{spec!r}: {attr} must accept the keyword arguments input_shape and num_classes, "
            f"e.g. def {attr}(input_shape, num_classes): ..."
        ) from None
    torch.manual_seed(seed)
    try:
        model = factory(input_shape=input_shape, num_classes=num_classes)
    except Exception as exc:
        raise SpecError(
            f"{spec!r}: {attr}(input_shape={input_shape}, num_classes={num_classes}) raised "
            f"{type(exc).__name__}: {exc}; fix the factory"
        ) from None
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"{spec!r}: {attr}(input_shape=..., num_classes=...) returned "
            f"{type(model).__name__}, expected a torch.nn.Module"
        )
    return model
