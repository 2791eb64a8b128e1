"""Datasets: the bundled digits, a synthetic task with concept drift, and user ``.npz`` files.

Every loader returns a :class:`Dataset` with flat float32 features ``[n, prod(input_shape)]``,
int64 labels ``0..num_classes-1`` and a held-out global test set.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from p2pfl.errors import P2pflError
from p2pfl.spec import Spec, SpecError, non_negative_int, parse_spec, positive_int

DATASET_KINDS = ("digits", "synthetic")
DRIFT_KINDS = ("permute", "rotate")
TEST_FRACTION = 0.2


class DataError(P2pflError, ValueError):
    """A data file the user gave cannot be used; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)
class Drift:
    """A change of the task at simulation step ``at_step``.

    ``permute`` maps every label ``y`` to ``permutation[y]``; ``rotate`` relabels each sample
    with the rotated linear boundary ``argmax(x @ weight + bias)``.
    """

    at_step: int
    kind: str
    permutation: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def relabel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Labels of samples ``x`` (old labels ``y``) after the drift."""
        if self.permutation is not None:
            return self.permutation[y]
        assert self.weight is not None and self.bias is not None
        return (x @ self.weight + self.bias).argmax(dim=1)


@dataclass(eq=False)
class Dataset:
    """A classification task: flat float32 features, int64 labels, and a global test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    drift: Drift | None = None

    def drifted(self) -> Dataset:
        """The same samples relabelled as the task is after its drift (which is then spent)."""
        if self.drift is None:
            raise ValueError(f"dataset {self.name!r} has no drift; add drift_at=STEP to its spec")
        return replace(
            self,
            y_train=self.drift.relabel(self.x_train, self.y_train),
            y_test=self.drift.relabel(self.x_test, self.y_test),
            drift=None,
        )


def load_dataset(spec: str, seed: int) -> Dataset:
    """Load ``digits[:drift_at=S]``, ``synthetic:n=,features=,classes=,drift_at=,drift=``
    or a ``.npz`` file with arrays ``x``, ``y`` (optionally ``x_test``, ``y_test``)."""
    if spec.strip().lower().endswith(".npz"):
        return load_npz(Path(spec.strip()), seed)
    parsed = parse_spec(spec, DATASET_KINDS + ("a path ending in .npz",))
    if parsed.kind == "digits":
        return _load_digits(parsed, seed)
    return _make_synthetic(parsed, seed)


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices holding out ``fraction`` of every class."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test.append(members[: round(fraction * len(members))])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _load_digits(spec: Spec, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    spec.check_keys(["drift_at", "drift"])
    drift_at = spec.take("drift_at", non_negative_int)
    kind = spec.take("drift", _drift_kind, default="permute")
    if kind != "permute":
        raise SpecError(
            f"{spec.text!r}: digits supports only drift=permute (rotate needs synthetic)"
        )
    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    train, test = stratified_holdout(y, TEST_FRACTION, seed)
    drift = None if drift_at is None else _permutation_drift(drift_at, 10, seed)
    return _dataset(x[train], y[train], x[test], y[test], 10, (1, 8, 8), "digits", drift)


def _make_synthetic(spec: Spec, seed: int) -> Dataset:
    """Gaussian clusters labelled by their (linear) nearest-mean boundary."""
    spec.check_keys(["n", "features", "classes", "drift_at", "drift"])
    n = spec.take("n", positive_int, default=2000)
    features = spec.take("features", positive_int, default=16)
    classes = spec.take("classes", positive_int, default=4)
    drift_at = spec.take("drift_at", non_negative_int)
    kind = spec.take("drift", _drift_kind, default="permute")
    if classes < 2:
        raise SpecError(f"{spec.text!r}: classes must be >= 2")
    if n < 5 * classes:
        raise SpecError(
            f"{spec.text!r}: n={n} is too small for {classes} classes; use n>={5 * classes}"
        )
    if "drift" in spec.args and drift_at is None:
        raise SpecError(f"{spec.text!r}: drift={kind} needs drift_at=STEP")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, features)) * (2.0 / math.sqrt(features))
    means -= means.mean(axis=0)
    x = means[rng.integers(classes, size=n)] + rng.normal(size=(n, features))
    weight, bias = means.T, -0.5 * (means**2).sum(axis=1)
    y = (x @ weight + bias).argmax(axis=1)
    train, test = stratified_holdout(y, TEST_FRACTION, seed)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-8
    x = (x - mean) / std

    drift = None
    if drift_at is not None and kind == "permute":
        drift = _permutation_drift(drift_at, classes, seed)
    elif drift_at is not None:
        q, r = np.linalg.qr(rng.normal(size=(features, features)))
        rotated = (means @ (q * np.sign(np.diag(r))).T).T
        # Fold the standardisation into the rotated rule so it applies to the stored features.
        drift = Drift(
            at_step=drift_at,
            kind="rotate",
            weight=torch.as_tensor(std[:, None] * rotated, dtype=torch.float32),
            bias=torch.as_tensor(mean @ rotated + bias, dtype=torch.float32),
        )
    name = f"synthetic-{features}f{classes}c"
    return _dataset(x[train], y[train], x[test], y[test], classes, (features,), name, drift)


def load_npz(path: Path, seed: int) -> Dataset:
    """Load a user ``.npz``; without ``x_test``/``y_test`` hold out 20% (stratified)."""
    fix = "save it with numpy.savez(path, x=features, y=labels[, x_test=..., y_test=...])"
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path ({fix})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc}); {fix}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found {sorted(arrays)}); {fix}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: give both x_test and y_test or neither; {fix}")
    x, y = _check_xy(path, arrays["x"], arrays["y"], "x", "y")
    if "x_test" in arrays:
        x_test, y_test = _check_xy(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(
                f"{path}: x_test samples have shape {x_test.shape[1:]} but x samples have "
                f"{x.shape[1:]}; both must describe the same features"
            )
    else:
        train, test = stratified_holdout(y, TEST_FRACTION, seed)
        if len(test) == 0:
            raise DataError(
                f"{path}: too few samples per class to hold out 20% for testing; "
                "add samples or give x_test and y_test"
            )
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
    num_classes = int(max(y.max(), y_test.max())) + 1
    if num_classes < 2:
        raise DataError(f"{path}: labels must use at least 2 classes (found only class 0)")
    input_shape = tuple(int(d) for d in x.shape[1:]) or (1,)
    flat = math.prod(input_shape)
    x, x_test = x.reshape(len(x), flat), x_test.reshape(len(x_test), flat)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    x, x_test = (x - mean) / std, (x_test - mean) / std
    return _dataset(x, y, x_test, y_test, num_classes, input_shape, path.stem, None)


def _check_xy(
    path: Path, x: np.ndarray, y: np.ndarray, x_name: str, y_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one features/labels pair; return them as float64 / int64 arrays."""
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: {x_name} must be numeric, got dtype {x.dtype}")
    if np.iscomplexobj(x):
        raise DataError(f"{path}: {x_name} must be real-valued, got dtype {x.dtype}")
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{path}: {x_name} must have shape [samples, features...] with samples > 0")
    if y.ndim != 1:
        raise DataError(f"{path}: {y_name} must be 1-D [samples], got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(
            f"{path}: {x_name} has {len(x)} samples but {y_name} has {len(y)}; "
            "they must have the same length"
        )
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {x_name} contains NaN or infinite values; clean or impute them")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: {y_name} must hold integer class labels, got dtype {y.dtype}; "
            "convert with y.astype(numpy.int64)"
        )
    if (y < 0).any():
        raise DataError(f"{path}: {y_name} has negative labels; use class indices 0..C-1")
    return x.astype(np.float64), y.astype(np.int64)


def _dataset(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    input_shape: tuple[int, ...],
    name: str,
    drift: Drift | None,
) -> Dataset:
    return Dataset(
        x_train=torch.as_tensor(x_train, dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=torch.as_tensor(x_test, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=num_classes,
        input_shape=input_shape,
        name=name,
        drift=drift,
    )


def _permutation_drift(at_step: int, num_classes: int, seed: int) -> Drift:
    """A seeded label permutation that moves every class (a derangement)."""
    rng = np.random.default_rng([seed, 0xD21F7])
    perm = rng.permutation(num_classes)
    while (perm == np.arange(num_classes)).any():
        perm = rng.permutation(num_classes)
    return Drift(at_step=at_step, kind="permute", permutation=torch.as_tensor(perm))


def _drift_kind(raw: str) -> str:
    if raw not in DRIFT_KINDS:
        raise ValueError(f"choose one of: {', '.join(DRIFT_KINDS)}")
    return raw
