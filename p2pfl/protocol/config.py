"""Protocol specs (``none``, ``continuous``, ``periodic:b=B``, ``gossip:b=B``,
``dynamic:delta=D,b=B``) parsed into one validated configuration.

Every protocol that merges also takes the keys of the mechanisms shared by all of them:
``correction=λ`` (drift correction, ``p2pfl.protocol.correction``; default
``CORRECTION_DEFAULT``, 0 turns it off; ``agreement=H`` scales its gain by how much the
node's successive lessons agree, memory ``H`` merges, off by default, and ``floor=S`` keeps
merges more than ``S`` steps apart near the fixed gain, ``against=mean`` compares each lesson
with the earlier lessons' mean, ``boost=k`` multiplies its factor; ``pace=1`` learns at
one pace per step for merges fewer than 16 steps apart too, off by default) and
``outer_lr=L,outer_momentum=M`` (an outer Nesterov step on every merge,
``p2pfl.protocol.outer``; off by default: it halved dynamic's bytes on fixed data but made it
collapse on a changing stream, and it measured worse for periodic averaging with the
correction; DiLoCo's values are ``outer_lr=0.7, outer_momentum=0.9``;
``outer_lr=1,outer_momentum=0`` is plain averaging)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pfl.learning.compression import (
    BASES,
    BITS,
    CODECS,
    KEY_CODECS,
    SCALES,
    TOPK_VALUES,
    CodecConfig,
)
from p2pfl.learning.rules import MERGE_KEYS, MergeRule, parse_merge
from p2pfl.spec import (
    Spec,
    SpecError,
    non_negative_float,
    non_negative_int,
    parse_spec,
    positive_float,
    positive_int,
)

PROTOCOLS = ("none", "continuous", "periodic", "gossip", "dynamic")
CONDITIONS = ("distance", "coherent", "smoothed", "growth")
CODEC_KEYS = {"codec", "block", "topk", "values", "base", "mix", "key", "scale"}
DYNAMIC_CODEC_KEYS = {"tol"}
"""Codec keys measured in dynamic's Δ (``CodecConfig.tol``)."""
SPEC_BASE = "shared"
"""A spec's default ``base=`` (``CodecConfig.base``, the chain, is the library's). A message
on a link used rarely (a ``dynamic`` member's reply, a ``gossip`` exchange every ``b`` steps
with a random neighbour) is a delta on the closest vector both ends hold, often the average
last echoed or the peer's last message there, instead of on the sender's old message: a
smaller delta, so a smaller codec error at the same bytes (int2, 16 nodes, digits:
``dynamic`` 3-17 % fewer bytes, ``gossip:b=50`` +1.2 points; docs/compression.md, "Shared
bases")."""
DYNAMIC_SCALE = "unbiased"
"""``dynamic``'s default int2 ``scale=`` (``CodecConfig.scale``; every other protocol's, and
the library's, is ``rms``): a member drops its reply's codec error, and at the RMS scale
that error shrinks every reply toward its base (the coordinator's own model counts in
full, the members' moves at about 0.88). Unbiased replies under label skew: 0-11 % fewer
bytes and +0.14 to +0.8 point in nine of ten cells (seeds 1-4); on IID 5-11 % more bytes
(docs/compression.md, "Unbiased int2 replies"). A fixed schedule returns its messages'
error (the next delta carries it), and there the unbiased scale broke ``gossip:b=50``
(Dirichlet 0.5 0.963 -> 0.48)."""
LOCAL_KINDS = ("bn",)


@dataclass(frozen=True)
class ProtocolConfig:
    """Everything a core needs to know about its protocol.

    ``delta`` is absolute when given; otherwise the dynamic protocol uses
    ``rel * ||reference||²`` (see ``DynamicCore``), which makes the default independent of
    the model's size and scale; ``lr_power`` makes it follow the learning rate. ``outer``
    is ``(lr, momentum)`` of the outer optimizer, or None for plain merging.
    """

    kind: str
    b: int = 1
    delta: float | None = None
    rel: float = 0.0
    group: int = 0
    cap: int = 0
    correction: float = 0.0
    agreement: int = 0
    """Memory (merges) of the drift correction's lesson agreement; 0: fixed gain."""
    floor: int = 0
    """With ``agreement``: a merge ``K`` steps after the previous one learns at least
    ``1 − floor/K`` of the fixed gain (``correction.rare_floor``); 0: no floor."""
    against: str = "last"
    """With ``agreement``: what each lesson's cosine is taken with, the last lesson or the
    earlier lessons' mean (``mean``; ``correction.LessonAgreement``)."""
    boost: float = 1.0
    """With ``agreement``: the agreement factor is multiplied by this before its clamp."""
    pace: bool = False
    """The drift correction learns at one pace per step for merges fewer than 16 steps apart
    too (``correction.correction_gain``); off: ``λ`` per merge there."""
    outer: tuple[float, float] | None = None
    condition: str = "distance"
    smoothing: int = 16
    window: int = 16
    lr_power: float = 0.0
    stand_in: bool = False
    """``dynamic``: a coordinator learns the drift-correction update of a member that did
    not adopt its average (``DynamicCore._take_over``)."""
    merge: MergeRule = MergeRule()
    timeout: float = 0.5
    codec: CodecConfig | None = None
    local: str = ""
    text: str = ""

    @property
    def label(self) -> str:
        return self.text or self.kind


CORRECTION_DEFAULT = 0.1
DYNAMIC_DEFAULTS: dict[str, Any] = {
    "b": 2,
    "rel": 0.002,
    "correction": CORRECTION_DEFAULT,
    "cap": 0,
    "group": 0,
    "condition": "smoothed",
    "smoothing": 16,
    "window": 16,
    "lr_power": 0.0,
    "stand_in": False,
    "outer": None,
}
MECHANISM_KEYS = {
    "correction",
    "agreement",
    "floor",
    "against",
    "boost",
    "pace",
    "outer_lr",
    "outer_momentum",
}


def parse_protocol(text: str) -> ProtocolConfig:
    """Parse and validate a protocol spec; bad specs raise SpecError naming the fix."""
    spec = parse_spec(text, PROTOCOLS)
    if spec.kind == "none":
        spec.check_keys(set())
        return ProtocolConfig(kind="none", text=spec.text)
    common = {"timeout", "local"} | MERGE_KEYS | CODEC_KEYS | MECHANISM_KEYS
    base = {
        "merge": parse_merge(spec),
        "timeout": spec.take("timeout", positive_float, 0.5),
        "codec": _codec(spec),
        "local": spec.take("local", _local, ""),
        "correction": spec.take("correction", _damping, CORRECTION_DEFAULT),
        "agreement": spec.take("agreement", non_negative_int, 0),
        "floor": spec.take("floor", non_negative_int, 0),
        "against": spec.take("against", _against, "last"),
        "boost": spec.take("boost", positive_float, 1.0),
        "pace": spec.take("pace", _switch, False),
        "outer": _outer(spec, DYNAMIC_DEFAULTS["outer"] if spec.kind == "dynamic" else None),
        "text": spec.text,
    }
    tuned = base["floor"] or base["against"] != "last" or base["boost"] != 1.0
    if tuned and not base["agreement"]:
        raise SpecError(
            f"{text!r}: floor, against, boost tune the lesson agreement; give agreement=H"
        )
    if spec.kind == "continuous":
        spec.check_keys(common)
        return ProtocolConfig(kind="periodic", b=1, **base)
    if spec.kind in ("periodic", "gossip"):
        spec.check_keys(common | {"b"})
        return ProtocolConfig(kind=spec.kind, b=spec.take("b", positive_int, 1), **base)
    dynamic = {"b", "delta", "rel", "group", "cap", "condition", "smoothing", "window", "lr_power"}
    dynamic |= {"stand_in"}
    spec.check_keys(common | DYNAMIC_CODEC_KEYS | dynamic)
    d = DYNAMIC_DEFAULTS
    delta = spec.take("delta", non_negative_float, None)
    rel = spec.take("rel", non_negative_float, d["rel"])
    if delta is not None and "rel" in spec.args:
        raise SpecError(f"{text!r}: give either delta (absolute) or rel (relative), not both")
    return ProtocolConfig(
        kind="dynamic",
        b=spec.take("b", positive_int, d["b"]),
        delta=delta,
        rel=0.0 if delta is not None else rel,
        group=spec.take("group", non_negative_int, d["group"]),
        cap=spec.take("cap", non_negative_int, d["cap"]),
        condition=spec.take("condition", _condition, d["condition"]),
        smoothing=spec.take("smoothing", positive_int, d["smoothing"]),
        window=spec.take("window", positive_int, d["window"]),
        lr_power=spec.take("lr_power", _lr_power, d["lr_power"]),
        stand_in=spec.take("stand_in", _switch, d["stand_in"]),
        **base,
    )


def _outer(spec: Spec, default: tuple[float, float] | None) -> tuple[float, float] | None:
    """``(outer_lr, outer_momentum)``: ``default`` if neither key is given, else the given
    keys over ``default`` (or over 1 and 0, plain averaging, when the default is off)."""
    if not {"outer_lr", "outer_momentum"} & set(spec.args):
        return default
    lr, momentum = default or (1.0, 0.0)
    return (
        spec.take("outer_lr", positive_float, lr),
        spec.take("outer_momentum", _momentum, momentum),
    )


def _condition(raw: str) -> str:
    if raw not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}")
    return raw


def _lr_power(raw: str) -> float:
    value = float(raw)
    if not -4.0 <= value <= 4.0:
        raise ValueError(
            "lr_power is the exponent of Δ's learning-rate factor, between -4 and 4 "
            "(0: Δ ignores the learning rate; 2: √Δ shrinks with it)"
        )
    return value


def _against(raw: str) -> str:
    if raw not in ("last", "mean"):
        raise ValueError("must be last (the previous lesson) or mean (the earlier lessons' mean)")
    return raw


def _switch(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("must be 1 (on) or 0 (off)")
    return raw == "1"


def _damping(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("correction is a damping factor between 0 and 1 (0 turns it off)")
    return value


def _momentum(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value < 1.0:
        raise ValueError("momentum must be in [0, 1)")
    return value


def _codec(spec: Spec) -> CodecConfig | None:
    """``codec=fp16|int8|int4|int2|sign|topk`` with ``block=N`` (entries per scale of the
    block-scaled codecs, 0 for one scale) or ``topk=R`` (the kept fraction) and
    ``values=fp16|int8`` (how topk's kept values travel; int8 takes ``block`` too), and
    ``base=chain|shared`` (what a message is a delta on, see ``p2pfl.protocol.links``;
    default ``SPEC_BASE``) and
    ``mix=G`` (the consensus step of a fixed schedule's merge on lossy copies,
    ``CodecConfig.consensus_step``) and ``key=fp16|int8|int4|int2`` (how key frames
    travel, ``CodecConfig.key_codec``) and, for int2, ``scale=rms|unbiased`` (default
    ``DYNAMIC_SCALE`` in ``dynamic``, else rms; ``CodecConfig.scale``) and, for ``dynamic``,
    ``tol=T`` (a reply whose codec error would exceed T·√Δ travels in the key codec,
    ``CodecConfig.tol``), or None (float32 on the wire)."""
    name = spec.take("codec", str, None)
    if name is None:
        for key in ("block", "topk", "values", "base", "mix", "key", "scale", "tol"):
            if key in spec.args:
                raise SpecError(
                    f"{spec.text!r}: {key!r} sets up a codec; add codec=int8 or codec=topk"
                )
        return None
    if name not in CODECS:
        raise SpecError(f"{spec.text!r}: codec must be one of {', '.join(CODECS)}, got {name!r}")
    values = spec.take("values", _topk_values, "fp16")
    wrong = ("topk", "values") if name in BITS else ("block", "topk", "values")
    if name == "topk":
        wrong = ("block",) if values == "fp16" else ()
    wrong += () if name == "int2" else ("scale",)
    for key in wrong:
        if key in spec.args:
            hint = " (add values=int8)" if (name, key) == ("topk", "block") else ""
            raise SpecError(f"{spec.text!r}: {key!r} does not apply to codec={name}{hint}")
    block = spec.take("block", non_negative_int, CodecConfig.block)
    fraction = spec.take("topk", _fraction, CodecConfig.fraction)
    base = spec.take("base", _base, SPEC_BASE)
    mix = spec.take("mix", _mix, None)
    key = spec.take("key", _key, None)
    if "tol" in spec.args and spec.kind != "dynamic":
        raise SpecError(
            f"{spec.text!r}: tol is measured in dynamic's √Δ; {spec.kind} has no Δ (drop tol)"
        )
    tol = spec.take("tol", positive_float, None)
    default_scale = DYNAMIC_SCALE if (name, spec.kind) == ("int2", "dynamic") else "rms"
    scale = spec.take("scale", _scale, default_scale)
    return CodecConfig(name, block, fraction, values, base, mix, key, tol, scale)


def _base(raw: str) -> str:
    if raw not in BASES:
        raise ValueError(f"choose one of {', '.join(BASES)}")
    return raw


def _scale(raw: str) -> str:
    if raw not in SCALES:
        raise ValueError(f"choose one of {', '.join(SCALES)}")
    return raw


def _key(raw: str) -> str:
    if raw not in KEY_CODECS:
        raise ValueError(f"choose one of {', '.join(KEY_CODECS)}")
    return raw


def _topk_values(raw: str) -> str:
    if raw not in TOPK_VALUES:
        raise ValueError(f"choose one of {', '.join(TOPK_VALUES)}")
    return raw


def _local(raw: str) -> str:
    if raw not in LOCAL_KINDS:
        raise ValueError(
            f"choose one of {', '.join(LOCAL_KINDS)} (bn: BatchNorm's affine parameters stay "
            "on the node, FedBN; running statistics never leave it anyway)"
        )
    return raw


def _fraction(raw: str) -> float:
    return _unit(raw, "the kept fraction")


def _mix(raw: str) -> float:
    return _unit(raw, "the consensus step")


def _unit(raw: str, what: str) -> float:
    value = float(raw)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be in (0, 1]")
    return value
