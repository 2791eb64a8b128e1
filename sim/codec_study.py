"""Where a codec's bytes go in one simulation, and how other codecs would do on the vectors
it compressed (the "Why not 30×" tables of docs/compression.md).

    .venv/bin/python sim/codec_study.py sim/pareto-iid.toml \\
        --protocol dynamic:rel=0.02,group=2,cap=3,codec=int2,key=int2,block=1024

Runs the scenario once with ``--protocol`` (it must name a codec) and instruments it: every
message's encoded size is counted by kind (pull, reply as key frame or delta, echo, …, and
the codec it travelled in), and the vectors the links compress (``CodecLinks._lossy``:
reply and push deltas, echoes) are sampled. Then each candidate codec encodes the sample
offline and the script prints its payload bytes and relative error ``‖x − x̂‖ / ‖x‖``
(median and 90th percentile, replies and echoes apart): the block-scaled codecs and
``topk`` as ``p2pfl.learning.compression`` has them, ``int2`` with its largest 1 % of
entries sent apart in float16 (positions LEB128), and rank-``r`` factors of each 2-D weight
with the other tensors in float16 — PowerSGD's form, here at its best: the exact truncated
SVD, factors in float16 (power iterations with warm starts only approach it). A rank-``r``
codec that is not better per byte than ``int2`` here cannot be in a run either.

``--exact replies`` (or ``echoes``, or ``replies,echoes``) is an oracle that finds which of a
codec's errors costs sessions: those messages still travel and are counted in the codec, but
their receiver reconstructs exactly what was meant (the payload carries the exact vector
aside, for the simulation only), so the run learns as if that side were lossless. A codec
whose error feeds more sessions shows it as a run with fewer sessions at the same bytes per
message; the exact run's bytes are the most that making that side precise could save.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from p2pfl.cli.exits import run_script
from p2pfl.errors import P2pflError
from p2pfl.learning.compression import (
    BASE_KINDS,
    CodecConfig,
    Compressed,
    compress,
    decompress,
    encode_positions,
    packed_count,
    scale_count,
)
from p2pfl.learning.params import ParamSchema
from p2pfl.protocol import links
from p2pfl.simulator import engine
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario
from p2pfl.wire.messages import Message

BLOCK = 1024
ROLE_OF = {"replies": "reply", "echoes": "echo"}
"""What ``--exact`` may name: delta-chain messages (replies, pushes, key frames) and echoes,
and the role ``study`` files their vectors under."""
SAMPLE = 400
"""Vectors kept per kind (evenly over the run)."""
Candidate = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""A codec under study: a vector to (its reconstruction, payload bytes)."""


def block_scaled(name: str, block: int = BLOCK) -> Candidate:
    """A codec of ``p2pfl.learning.compression``: its round trip and payload bytes."""
    config = CodecConfig(name, block)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        scales = 4 * scale_count(x.numel(), block) if name != "fp16" else 0
        return decompress(compress(x, config)), packed_count(name, x.numel()) + scales

    return run


def topk(fraction: float) -> Candidate:
    """``topk`` with float16 values: bytes of the values and of the LEB128 positions."""
    config = CodecConfig("topk", fraction=fraction)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        c = compress(x, config)
        assert c.indices is not None
        return decompress(c), 2 * c.indices.numel() + len(encode_positions(c.indices))

    return run


def int2_with_outliers(fraction: float, block: int = BLOCK) -> Candidate:
    """``int2`` on all but the largest ``fraction`` of entries, which travel in float16 at
    LEB128 positions (the rest's scales no longer count them)."""
    inner = block_scaled("int2", block)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        k = math.ceil(fraction * x.numel())
        index = x.abs().topk(k).indices.sort().values
        rest = x.clone()
        rest[index] = 0
        out, size = inner(rest)
        out[index] = x[index].half().float()
        return out, size + 2 * k + len(encode_positions(index))

    return run


def low_rank(schema: ParamSchema, rank: int) -> Candidate:
    """Each 2-D weight as ``P·Qᵀ`` of ``rank`` columns (exact truncated SVD, factors in
    float16), every other tensor in float16."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        out, size, offset = x.half().float(), 0, 0
        for spec in schema.params:
            n = spec.numel
            if len(spec.shape) == 2:
                rows, cols = spec.shape
                r = min(rank, rows, cols)
                u, s, vh = torch.linalg.svd(x[offset : offset + n].view(rows, cols), False)
                p, q = (u[:, :r] * s[:r]).half().float(), vh[:r].half().float()
                out[offset : offset + n] = (p @ q).reshape(-1)
                size += 2 * r * (rows + cols)
            else:
                size += 2 * n
            offset += n
        return out, size

    return run


def candidates(schema: ParamSchema) -> dict[str, Candidate]:
    """The codecs the study compares, by the name the table shows."""
    return {
        "int8": block_scaled("int8"),
        "int4": block_scaled("int4"),
        "int2": block_scaled("int2"),
        "sign": block_scaled("sign"),
        "int2 + top 1 % in fp16": int2_with_outliers(0.01),
        **{f"topk {f:g}": topk(f) for f in (0.01, 0.05, 0.1, 0.25)},
        **{f"rank {r} (SVD, fp16)": low_rank(schema, r) for r in (1, 2, 4, 8)},
    }


def relative_errors(candidate: Candidate, vectors: list[torch.Tensor]) -> tuple[list[float], int]:
    """``‖x − x̂‖ / ‖x‖`` of each vector, and the largest payload in bytes."""
    errors, largest = [], 0
    for x in vectors:
        decoded, size = candidate(x)
        errors.append(float((x - decoded).norm() / x.norm().clamp_min(1e-30)))
        largest = max(largest, size)
    return errors, largest


@contextmanager
def decoded_exactly(roles: set[str], role: list[str]) -> Iterator[None]:
    """Within it, a payload the links compress while ``role[0]`` is in ``roles`` carries the
    exact vector aside and decodes to it (on both ends of the link); its codec, and so its
    encoded size, stay the codec's. The ``--exact`` oracle."""
    coded, decoded = links.compress, links.decompress

    def compressing(x: torch.Tensor, config: CodecConfig, unbiased: bool = False) -> Compressed:
        c = coded(x, config, unbiased)
        if role[0] in roles:
            c._exact = x.clone()  # type: ignore[attr-defined]  # read by `decompressing` only
        return c

    def decompressing(c: Compressed) -> torch.Tensor:
        meant = getattr(c, "_exact", None)
        return decoded(c) if meant is None else meant.clone()

    links.compress, links.decompress = compressing, decompressing
    try:
        yield
    finally:
        links.compress, links.decompress = coded, decoded


def message_kind(message: object) -> str:
    """A message's type, and for a compressed model what it is and its codec (and, for a
    delta on another base than the sender's last message, which: ``base=shared``)."""
    kind = type(message).__name__
    params = getattr(message, "params", None)
    if isinstance(params, Compressed):
        role = "echo" if params.echo else "key frame" if params.base == 0 else "delta"
        kind += f" {role} {params.codec}"
        if params.base_kind and not params.echo:
            kind += f" on {BASE_KINDS[params.base_kind]}"
    return kind


def study(
    scenario: Path,
    protocol: str,
    sample: int,
    overrides: dict[str, int] | None = None,
    exact: frozenset[str] = frozenset(),
) -> None:
    """Run ``protocol`` on ``scenario`` instrumented, print the bytes and the codecs' table;
    the messages of the ``exact`` roles (keys of ``ROLE_OF``) are decoded exactly (the oracle of
    the module docstring)."""
    if "codec=" not in protocol:
        raise P2pflError(f"{protocol!r} names no codec: add codec=int2 (or another) to it")
    count, nbytes = Counter[str](), Counter[str]()
    vectors: dict[str, list[torch.Tensor]] = {"reply": [], "echo": []}
    schemas: list[ParamSchema] = []
    sized, lossy, encode = engine.encoded_size, links.CodecLinks._lossy, links.CodecLinks.encode
    role = ["reply"]

    def counted(message: Message, schema: ParamSchema) -> int:
        size = sized(message, schema)
        kind = message_kind(message)
        count[kind] += 1
        nbytes[kind] += size
        schemas[:] = [schema]
        return size

    def kept(
        self: links.CodecLinks, delta: torch.Tensor, tolerance: float | None, unbiased: bool
    ) -> tuple[Compressed, torch.Tensor]:
        vectors[role[0]].append(delta.clone())
        return lossy(self, delta, tolerance, unbiased)

    def encoding(
        self: links.CodecLinks,
        peer: str,
        x: torch.Tensor,
        echo: bool = False,
        tolerance: float | None = None,
    ) -> Compressed:
        role[0] = "echo" if echo else "reply"
        return encode(self, peer, x, echo, tolerance)

    engine.encoded_size, links.CodecLinks._lossy = counted, kept  # type: ignore[method-assign]
    links.CodecLinks.encode = encoding  # type: ignore[method-assign]
    try:
        with decoded_exactly({ROLE_OF[r] for r in exact}, role):
            summary = Simulation(prepare(load_scenario(scenario, overrides or {})), protocol).run()
    finally:
        engine.encoded_size, links.CodecLinks._lossy = sized, lossy  # type: ignore[method-assign]
        links.CodecLinks.encode = encode  # type: ignore[method-assign]
    total = summary["bytes_sent"]
    oracle = f" (decoded exactly: {', '.join(sorted(exact))})" if exact else ""
    print(
        f"{scenario.stem} {protocol}{oracle}: accuracy {summary['final_accuracy']:.4f}, "
        f"{total / 1e6:.3f} MB, {summary['sessions']} sessions\n"
    )
    print("| message | count | MB | share | bytes each |\n|---|---|---|---|---|")
    for kind in sorted(count, key=lambda k: -nbytes[k]):
        print(
            f"| {kind} | {count[kind]} | {nbytes[kind] / 1e6:.3f} | "
            f"{nbytes[kind] / total:.0%} | {nbytes[kind] / count[kind]:.0f} |"
        )
    print("\n| codec | payload bytes | reply error (median / q90) | echo error (median / q90) |")
    print("|---|---|---|---|")
    kept_vectors = {k: v[:: max(1, len(v) // sample)] for k, v in vectors.items()}
    for name, candidate in candidates(schemas[0]).items():
        cells, largest = [], 0
        for vs in kept_vectors.values():
            if not vs:
                cells.append("none sent")
                continue
            errors, size = relative_errors(candidate, vs)
            largest = max(largest, size)
            q90 = statistics.quantiles(errors, n=10)[-1] if len(errors) > 1 else errors[0]
            cells.append(f"{statistics.median(errors):.3f} / {q90:.3f}")
        print(f"| {name} | {largest} | {' | '.join(cells)} |")
    sizes = {k: len(v) for k, v in kept_vectors.items()}
    print(f"\n(errors over {sizes} of the vectors sent, evenly sampled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--protocol", required=True, help="a spec with a codec")
    parser.add_argument("--sample", type=int, default=SAMPLE, help="vectors kept per kind")
    parser.add_argument("--seed", type=int, help="default: the scenario's")
    parser.add_argument("--steps", type=int, help="default: the scenario's")
    parser.add_argument(
        "--exact",
        default="",
        help="oracle: decode these messages exactly (replies, echoes, or replies,echoes)",
    )
    args = parser.parse_args()
    exact = frozenset(filter(None, args.exact.split(",")))
    if exact - set(ROLE_OF):
        raise P2pflError(f"--exact {args.exact!r}: name replies, echoes or both (comma-separated)")
    torch.set_num_threads(1)
    overrides = {k: v for k, v in (("seed", args.seed), ("steps", args.steps)) if v is not None}
    study(args.scenario, args.protocol, args.sample, overrides, exact)


if __name__ == "__main__":
    run_script(main)
