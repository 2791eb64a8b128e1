"""Datasets: the bundled digits, a synthetic task with concept drift, and user ``.npz`` files.

Every loader returns a :class:`Dataset` with flat float32 features ``[n, prod(input_shape)]``,
int64 labels ``0..num_classes-1`` and a held-out global test set.

Concept drift (digits and synthetic) changes the task while the samples stay: a *concept* is
a labelling of the same inputs (concept 0 is the original task). ``drift_at=S`` drifts once,
after step ``S``; ``drift_every=N`` drifts after every ``N`` steps (first after ``drift_at``
if given, else after ``N``), cycling through ``concepts=C`` concepts (default 2: the old task
comes back at every second drift). ``drift=permute`` relabels by a label permutation per
concept, chosen so that every drift moves every label; ``drift=rotate`` (synthetic only)
relabels by a rotated linear boundary. ``transition=sudden|gradual|alternate`` and
``drift_width=W``: a gradual drift ramps the share of samples labelled by the new concept
linearly over ``W`` steps (default ``N // 4``); ``alternate`` makes every second drift
gradual, starting with a sudden one.

A data stream (synthetic only): ``modes=M`` makes the task a Gaussian mixture with ``M``
unit-variance modes per class (a sample's label is its mode's class; non-linear, so a model
needs many samples), and ``fresh=1`` makes every training batch *new* samples drawn from it,
never seen before: each node draws the classes of its own partition (so label skew is kept),
and prequential accuracy measures generalisation, not memory (:class:`FreshSamples`).
"""

from __future__ import annotations

import importlib.util
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from p2pfl.errors import P2pflError
from p2pfl.spec import Spec, SpecError, non_negative_int, parse_spec, positive_int

DATASET_KINDS = ("digits", "synthetic")
DRIFT_KINDS = ("permute", "rotate")
TRANSITIONS = ("sudden", "gradual", "alternate")
STREAM_KEYS = ("modes", "fresh")
DRIFT_KEYS = ("drift_at", "drift_every", "concepts", "drift", "transition", "drift_width")
TEST_FRACTION = 0.2


class DataError(P2pflError, ValueError):
    """A data file the user gave cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class DriftEvent:
    """A drift after step ``step`` to concept ``concept``; gradual over ``width`` steps
    (0: sudden)."""

    step: int
    concept: int
    width: int = 0


@dataclass(frozen=True)
class DriftState:
    """The task at one step: samples are labelled by ``concept``, except that during a
    gradual transition a share ``share`` of them is labelled by ``next`` instead."""

    concept: int
    next: int | None = None
    share: float = 0.0


@dataclass(frozen=True, eq=False)
class Drift:
    """Recurring concept drift: events after step ``at_step``, then every ``every`` steps
    (``None``: once), cycling through ``concepts`` labellings of the same samples.

    ``permute`` maps every original label ``y`` to ``permutations[c, y]``; ``rotate``
    relabels each sample with the rotated linear boundary ``argmax(x @ weights[c] +
    biases[c])``. Concept 0 is the original labelling.
    """

    at_step: int
    kind: str
    concepts: int = 2
    every: int | None = None
    width: int = 0
    transition: str = "sudden"
    permutations: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    biases: torch.Tensor | None = None

    def events(self, steps: int) -> list[DriftEvent]:
        """The drift events of a run of ``steps`` steps (those that start before its end)."""
        if self.every is None:
            starts = [self.at_step] if self.at_step < steps else []
        else:
            starts = list(range(self.at_step, steps, self.every))
        events = []
        for k, start in enumerate(starts, 1):
            gradual = self.transition == "gradual" or (
                self.transition == "alternate" and k % 2 == 0
            )
            events.append(DriftEvent(start, k % self.concepts, self.width if gradual else 0))
        return events

    def state(self, step: int) -> DriftState:
        """The task at simulation step ``step`` (1-based): steps ``1..at_step`` see concept
        0; a gradual drift after step ``s`` over ``W`` steps labels step ``s + j`` with the
        new concept at share ``j / W`` (``j = 1..W``)."""
        if step <= self.at_step:
            return DriftState(0)
        k = 1 if self.every is None else (step - 1 - self.at_step) // self.every + 1
        start = self.at_step + (k - 1) * (self.every or 0)
        old, new = (k - 1) % self.concepts, k % self.concepts
        width = self.events(start + 1)[-1].width
        if step - start < width:
            return DriftState(old, new, (step - start) / width)
        return DriftState(new)

    def relabel(self, x: torch.Tensor, y: torch.Tensor, concept: int) -> torch.Tensor:
        """Labels of samples ``x`` (original labels ``y``) under ``concept``."""
        if concept == 0:
            return y
        if self.permutations is not None:
            return self.permutations[concept][y]
        assert self.weights is not None and self.biases is not None
        return (x @ self.weights[concept] + self.biases[concept]).argmax(dim=1)


@dataclass(frozen=True, eq=False)
class FreshSamples:
    """New samples of given classes from a Gaussian mixture: ``means [classes, modes,
    features]``, unit noise, modes equally likely. The numbers come from the caller's
    generator, drawn for a whole ``[rows, batch]`` block at once, so that a shard that uses
    some of the rows draws the same samples as the whole simulation."""

    means: torch.Tensor

    def draw(
        self, classes: torch.Tensor, rows: slice, total: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Samples ``[k, batch, features]`` of ``classes [k, batch]``, rows ``rows`` of a
        ``total``-row block."""
        batch, modes, features = classes.shape[1], self.means.shape[1], self.means.shape[2]
        mode = (torch.rand(total, batch, generator=generator)[rows] * modes).long()
        noise = torch.randn(total, batch, features, generator=generator)[rows]
        return noise.add_(self.means[classes, mode])

    def skip(self, total: int, batch: int, generator: torch.Generator) -> None:
        """Use up the numbers of a ``total``-row block (see ``NodeDataBank.skip``)."""
        torch.rand(total, batch, generator=generator)
        torch.randn(total, batch, self.means.shape[2], generator=generator)


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
    fresh: FreshSamples | None = None
    """If set, training batches are new samples from this generator (never re-seen)."""


def load_dataset(spec: str, seed: int) -> Dataset:
    """Load ``digits[:DRIFT]``, ``synthetic:n=,features=,classes=[,DRIFT]`` (DRIFT: the keys
    in the module docstring) or a ``.npz`` file with arrays ``x``, ``y`` (optionally
    ``x_test``, ``y_test``)."""
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


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (pixels 0-16, labels), read from the file it ships without
    importing scikit-learn (that import alone costs 1.5-6 s, most of a simulation's start-up)."""
    found = importlib.util.find_spec("sklearn")
    origin = found.origin if found is not None else None
    path = Path(origin).parent / "datasets" / "data" / "digits.csv.gz" if origin else None
    if path is None or not path.exists():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1]


def _load_digits(spec: Spec, seed: int) -> Dataset:
    spec.check_keys(DRIFT_KEYS)
    if spec.args.get("drift", "permute") != "permute":
        raise SpecError(
            f"{spec.text!r}: digits supports only drift=permute (rotate needs synthetic)"
        )
    drift = _parse_drift(spec, 10, seed)
    pixels, labels = _digits_arrays()
    x = pixels.astype(np.float32) / 16.0
    y = labels.astype(np.int64)
    train, test = stratified_holdout(y, TEST_FRACTION, seed)
    return _dataset(x[train], y[train], x[test], y[test], 10, (1, 8, 8), "digits", drift)


def _make_synthetic(spec: Spec, seed: int) -> Dataset:
    """Gaussian clusters labelled by their (linear) nearest-mean boundary; with ``modes`` a
    Gaussian mixture labelled by mode (see the module docstring)."""
    spec.check_keys(["n", "features", "classes", *STREAM_KEYS, *DRIFT_KEYS])
    n = spec.take("n", positive_int, default=2000)
    features = spec.take("features", positive_int, default=16)
    classes = spec.take("classes", positive_int, default=4)
    if classes < 2:
        raise SpecError(f"{spec.text!r}: classes must be >= 2")
    if n < 5 * classes:
        raise SpecError(
            f"{spec.text!r}: n={n} is too small for {classes} classes; use n>={5 * classes}"
        )
    fresh = spec.take("fresh", _choice(("0", "1")), default="0") == "1"
    modes = spec.take("modes", positive_int, default=8 if fresh else None)
    drift = _parse_drift(spec, classes, seed)
    if modes is not None:
        return _make_mixture(spec.text, n, features, classes, modes, fresh, drift, seed)
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, features)) * (2.0 / math.sqrt(features))
    means -= means.mean(axis=0)
    x = means[rng.integers(classes, size=n)] + rng.normal(size=(n, features))
    weight, bias = means.T, -0.5 * (means**2).sum(axis=1)
    y = (x @ weight + bias).argmax(axis=1)
    train, test = stratified_holdout(y, TEST_FRACTION, seed)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-8
    x = (x - mean) / std

    if drift is not None and drift.kind == "rotate":
        weights, biases = [std[:, None] * weight], [mean @ weight + bias]  # concept 0
        for _ in range(1, drift.concepts):
            q, r = np.linalg.qr(rng.normal(size=(features, features)))
            rotated = (means @ (q * np.sign(np.diag(r))).T).T
            # Fold the standardisation into the rotated rule so it applies to stored features.
            weights.append(std[:, None] * rotated)
            biases.append(mean @ rotated + bias)
        drift = replace(
            drift,
            weights=torch.as_tensor(np.stack(weights), dtype=torch.float32),
            biases=torch.as_tensor(np.stack(biases), dtype=torch.float32),
        )
    name = f"synthetic-{features}f{classes}c"
    return _dataset(x[train], y[train], x[test], y[test], classes, (features,), name, drift)


def _make_mixture(
    text: str,
    n: int,
    features: int,
    classes: int,
    modes: int,
    fresh: bool,
    drift: Drift | None,
    seed: int,
) -> Dataset:
    """``n`` samples of a Gaussian mixture: per class ``modes`` means drawn from N(0, I),
    unit noise around them, labelled by class (``n`` sets the test set and the nodes' class
    mixes; with ``fresh`` training batches are new draws)."""
    if drift is not None and drift.kind != "permute":
        raise SpecError(f"{text!r}: a mixture (modes=, fresh=1) drifts by drift=permute only")
    generator = torch.Generator().manual_seed(seed)
    source = FreshSamples(torch.randn(classes, modes, features, generator=generator))
    y = torch.randint(classes, (1, n), generator=generator)
    x = source.draw(y, slice(0, 1), 1, generator)[0]
    train, test = stratified_holdout(y[0].numpy(), TEST_FRACTION, seed)
    name = f"mixture-{features}f{classes}c{modes}m" + ("-fresh" if fresh else "")
    dataset = _dataset(
        x[train].numpy(),
        y[0, train].numpy(),
        x[test].numpy(),
        y[0, test].numpy(),
        classes,
        (features,),
        name,
        drift,
    )
    return replace(dataset, fresh=source if fresh else None)


MAX_CLASSES = 100_000
"""Most classes a user data set may have: a model's output layer has one unit per class (a
stray label of 1e9 would otherwise ask for a layer of billions of units)."""


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
    if y.max() >= MAX_CLASSES:
        raise DataError(
            f"{path}: {y_name} has label {int(y.max())}, but labels are class indices 0..C-1 "
            f"with at most {MAX_CLASSES:,} classes; map your labels to 0..C-1 first "
            "(e.g. numpy.unique(y, return_inverse=True))"
        )
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


def _parse_drift(spec: Spec, num_classes: int, seed: int) -> Drift | None:
    """The drift keys of a data set spec (None without ``drift_at`` and ``drift_every``);
    ``rotate`` concepts are filled in by the synthetic loader, which knows the rule."""
    at = spec.take("drift_at", non_negative_int)
    every = spec.take("drift_every", positive_int)
    if at is None and every is None:
        extra = sorted(set(spec.args) & set(DRIFT_KEYS))
        if extra:
            raise SpecError(f"{spec.text!r}: {extra[0]} needs drift_at=STEP or drift_every=N")
        return None
    kind = spec.take("drift", _choice(DRIFT_KINDS), default="permute")
    concepts = spec.take("concepts", positive_int, default=2)
    width = spec.take("drift_width", non_negative_int)
    transition = spec.take(
        "transition", _choice(TRANSITIONS), default="gradual" if width else "sudden"
    )
    if concepts < 2:
        raise SpecError(f"{spec.text!r}: concepts must be >= 2 (the original task and another)")
    if kind == "permute" and concepts > num_classes:
        raise SpecError(
            f"{spec.text!r}: at most {num_classes} label-permutation concepts fit "
            f"{num_classes} classes; lower concepts"
        )
    if transition == "sudden":
        width = 0
    elif width is None:
        if every is None:
            raise SpecError(f"{spec.text!r}: a one-off gradual drift needs drift_width=W")
        width = max(1, every // 4)
    if every is not None and width >= every:
        raise SpecError(
            f"{spec.text!r}: drift_width={width} must be shorter than drift_every={every}"
        )
    perms = _concept_permutations(concepts, num_classes, seed) if kind == "permute" else None
    return Drift(
        at_step=at if at is not None else every,
        kind=kind,
        concepts=concepts,
        every=every,
        width=width,
        transition=transition,
        permutations=perms,
    )


def _concept_permutations(concepts: int, num_classes: int, seed: int) -> torch.Tensor:
    """``[concepts, classes]`` label maps, row 0 the identity, any two rows different on
    every label (so every drift moves every label): ``c -> s⁻¹((s(y) + c) mod classes)`` for
    a seeded permutation ``s``."""
    s = np.random.default_rng([seed, 0xD21F7]).permutation(num_classes)
    inverse = np.argsort(s)
    rows = [inverse[(s + c) % num_classes] for c in range(concepts)]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"choose one of: {', '.join(options)}")
        return raw

    return convert
