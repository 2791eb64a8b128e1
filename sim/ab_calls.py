"""A/B of pure functions inside one run, which the machine's load cannot bias.

Every call of each named function runs two versions, the one of another code tree (``--base``,
e.g. a ``git archive`` of main) and this tree's, in alternating order; the results must be
equal (a run that diverges stops with an AssertionError), and the process time of each
version is summed per function (and per argument kind for ``encoded_size``: the message type;
for ``distances_to``: up to 6 pairs or more). The rest of the command line is
``sim/bench_scale.py``'s, e.g.::

    git archive main | tar -x -C /tmp/base
    nice -n 10 python sim/ab_calls.py --base /tmp/base \\
        --call p2pfl.learning.merge:distances_to --call p2pfl.wire.codec:encoded_size \\
        -- --child e2e --nodes 1000 --steps 100 --protocol dynamic

The totals are printed as JSON on stderr at the end; bench_scale's own JSON on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import runpy
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_base(module: str, base: Path) -> Any:
    """``module`` (dotted) as it is in the ``base`` tree, loaded under a name of its own."""
    path = base.joinpath(*module.split(".")).with_suffix(".py")
    name = "ab_base_" + module.replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: no {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up
    spec.loader.exec_module(loaded)
    return loaded


def kind(name: str, args: tuple[Any, ...]) -> str:
    """The bucket a call's time is summed into."""
    if name == "encoded_size":
        return f"{name} {type(args[0]).__name__}"
    if name == "distances_to":
        return f"{name} {'> 6' if max(len(args[0]), len(args[1])) > 6 else '<= 6'} pairs"
    return name


def both(name: str, old: Callable[..., Any], new: Callable[..., Any], totals: Any) -> Any:
    """A function running ``old`` and ``new`` on every call, alternating which goes first."""
    flip = [False]

    def call(*args: Any) -> Any:
        bucket = totals[kind(name, args)]
        order = (("base", old), ("this", new))
        flip[0] = not flip[0]
        out = {}
        for tag, fn in reversed(order) if flip[0] else order:
            start = time.process_time()
            out[tag] = fn(*args)
            bucket[tag] += time.process_time() - start
        bucket["calls"] += 1
        assert out["base"] == out["this"], f"{name}: {out['base']!r} != {out['this']!r}"
        return out["this"]

    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="root of the other code tree")
    p.add_argument("--call", action="append", required=True, help="module:function, repeatable")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then bench_scale.py's arguments")
    args = p.parse_args()
    totals: Any = defaultdict(lambda: defaultdict(float))
    for target in args.call:
        module, name = target.split(":")
        new = getattr(importlib.import_module(module), name)
        wrapped = both(name, getattr(load_base(module, args.base), name), new, totals)
        for loaded in list(sys.modules.values()):  # every module that imported it by name
            if getattr(loaded, "__name__", "").startswith("p2pfl") and (
                getattr(loaded, name, None) is new
            ):
                setattr(loaded, name, wrapped)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.argv = [str(HERE / "bench_scale.py"), *rest]
    sys.path.insert(0, str(HERE))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        rows = {k: {tag: round(v, 3) for tag, v in b.items()} for k, b in sorted(totals.items())}
        print(json.dumps(rows, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
