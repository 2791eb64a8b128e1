"""Network topologies: networkx generators named by a spec, and ``topologies/*.toml`` files.

Generators: ``complete``, ``ring``, ``star``, ``torus``, ``regular:d=D``, ``erdos-renyi:p=P``,
``small-world:k=K,p=P``, ``communities:blocks=B,p_in=P,p_out=Q``. A TOML file holds either
``generator = "small-world"`` with a ``[params]`` table (and optionally ``nodes = N``), or
``nodes = N`` with ``edges = [[0, 1], [1, 2], ...]``. Every graph has nodes ``0..n-1``.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import networkx as nx

from p2pfl.spec import Spec, SpecError, parse_spec, positive_int, probability

TOPOLOGY_KINDS = (
    "complete",
    "ring",
    "star",
    "torus",
    "regular",
    "erdos-renyi",
    "small-world",
    "communities",
)
RANDOM_KINDS = ("regular", "erdos-renyi", "communities")
CONNECT_DRAWS = 20


class TopologyError(SpecError):
    """A topology that cannot be used: a bad file, or a graph that is not connected."""


def build_topology(
    spec: str, num_nodes: int | None, seed: int, allow_disconnected: bool = False
) -> nx.Graph:
    """Build the graph ``spec`` names on nodes ``0..num_nodes-1``.

    ``num_nodes`` may be None for a file that fixes its node count. Random generators are
    redrawn (seeds ``seed, seed+1, ...``, at most 20 draws) until the graph is connected; a
    graph that stays disconnected raises TopologyError unless ``allow_disconnected``.
    """
    if spec.strip().lower().endswith(".toml"):
        return _load_toml(Path(spec.strip()), num_nodes, seed, allow_disconnected)
    return _generate(spec, num_nodes, seed, allow_disconnected)


def _generate(spec: str, num_nodes: int | None, seed: int, allow_disconnected: bool) -> nx.Graph:
    parsed = parse_spec(spec, TOPOLOGY_KINDS + ("a path ending in .toml",))
    if num_nodes is None:
        raise SpecError(f"{spec!r}: give the number of nodes (e.g. --nodes 16)")
    if num_nodes < 1:
        raise SpecError(f"{spec!r}: need at least one node, got {num_nodes}")
    draws = CONNECT_DRAWS if parsed.kind in RANDOM_KINDS and not allow_disconnected else 1
    for draw in range(draws):
        graph = _draw(parsed, num_nodes, seed + draw)
        if allow_disconnected or nx.is_connected(graph):
            return graph
    again = f" in {draws} draws (seeds {seed}..{seed + draws - 1})" if draws > 1 else ""
    raise TopologyError(
        f"{spec!r} on {num_nodes} nodes gives a disconnected graph{again}; add edges "
        "(e.g. raise p, d or p_out) or pass allow_disconnected (--allow-disconnected)"
    )


def _draw(spec: Spec, n: int, seed: int) -> nx.Graph:
    """One graph of the parsed spec's kind on nodes 0..n-1."""
    kind, text = spec.kind, spec.text
    if kind in ("complete", "ring", "star", "torus"):
        spec.check_keys([])
    if kind == "complete":
        return nx.complete_graph(n)
    if kind == "ring":
        if n < 3:
            raise SpecError(f"{text!r}: a ring needs at least 3 nodes, got {n}")
        return nx.cycle_graph(n)
    if kind == "star":
        return nx.star_graph(n - 1)
    if kind == "torus":
        rows = max((r for r in range(3, math.isqrt(n) + 1) if n % r == 0), default=None)
        if rows is None:
            raise SpecError(
                f"{text!r}: a torus needs nodes = rows x cols with rows, cols >= 3 "
                f"(e.g. 9, 12, 16, 20, 25); {n} does not factor that way"
            )
        grid = nx.grid_2d_graph(rows, n // rows, periodic=True)
        return nx.convert_node_labels_to_integers(grid, ordering="sorted")
    if kind == "regular":
        spec.check_keys(["d"])
        d = spec.take("d", positive_int, required=True)
        if d >= n or (d * n) % 2:
            raise SpecError(
                f"{text!r}: a {d}-regular graph on {n} nodes needs d < nodes and d x nodes even"
            )
        return nx.random_regular_graph(d, n, seed=seed)
    if kind == "erdos-renyi":
        spec.check_keys(["p"])
        return nx.gnp_random_graph(n, spec.take("p", probability, required=True), seed=seed)
    if kind == "small-world":
        spec.check_keys(["k", "p"])
        k = spec.take("k", positive_int, default=4)
        p = spec.take("p", probability, default=0.1)
        if k % 2 or k >= n:
            raise SpecError(f"{text!r}: k (ring neighbours) must be even and < nodes ({n})")
        try:
            return nx.connected_watts_strogatz_graph(n, k, p, tries=100, seed=seed)
        except nx.NetworkXError as exc:
            raise TopologyError(f"{text!r}: {exc}; lower p or raise k") from None
    spec.check_keys(["blocks", "p_in", "p_out"])
    blocks = spec.take("blocks", positive_int, default=4)
    p_in = spec.take("p_in", probability, default=0.5)
    p_out = spec.take("p_out", probability, default=0.05)
    if blocks > n:
        raise SpecError(f"{text!r}: {blocks} blocks need at least {blocks} nodes, got {n}")
    sizes = [n // blocks + (1 if i < n % blocks else 0) for i in range(blocks)]
    probs = [[p_in if i == j else p_out for j in range(blocks)] for i in range(blocks)]
    return nx.stochastic_block_model(sizes, probs, seed=seed)


def _load_toml(path: Path, num_nodes: int | None, seed: int, allow_disconnected: bool) -> nx.Graph:
    """A topology file: a generator with parameters, or an explicit edge list."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TopologyError(f"{path}: file not found; check the path") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TopologyError(f"{path}: not a readable TOML file ({exc})") from None
    form = "write generator = ... with [params], or nodes = N with edges = [[0, 1], ...]"
    unknown = sorted(set(doc) - {"generator", "params", "nodes", "edges"})
    if unknown:
        raise TopologyError(f"{path}: unknown key(s) {unknown}; {form}")
    if ("generator" in doc) == ("edges" in doc):
        raise TopologyError(f"{path}: give exactly one of 'generator' and 'edges'; {form}")
    file_nodes = doc.get("nodes")
    if file_nodes is not None:
        if not isinstance(file_nodes, int) or isinstance(file_nodes, bool) or file_nodes < 1:
            raise TopologyError(f"{path}: nodes must be a positive integer, got {file_nodes!r}")
        if num_nodes is not None and num_nodes != file_nodes:
            raise TopologyError(
                f"{path}: the file has {file_nodes} nodes but {num_nodes} were asked; "
                f"use {file_nodes} nodes (--nodes {file_nodes}) or edit the file"
            )
        num_nodes = file_nodes
    if "generator" in doc:
        params = doc.get("params", {})
        if not isinstance(doc["generator"], str) or not isinstance(params, dict):
            raise TopologyError(f"{path}: generator must be a string and [params] a table")
        for key, value in params.items():
            if not isinstance(value, int | float | str):
                raise TopologyError(f"{path}: parameter {key} = {value!r} must be a number")
        args = ",".join(f"{key}={value}" for key, value in params.items())
        spec = f"{doc['generator']}:{args}" if args else doc["generator"]
        try:
            return _generate(spec, num_nodes, seed, allow_disconnected)
        except SpecError as exc:
            raise TopologyError(f"{path}: {exc}") from None
    if file_nodes is None or "params" in doc:
        raise TopologyError(f"{path}: an edge list needs nodes = N and no [params]; {form}")
    graph = nx.Graph()
    graph.add_nodes_from(range(file_nodes))
    edges = doc["edges"]
    if not isinstance(edges, list):
        raise TopologyError(f"{path}: edges must be a list of [a, b] pairs")
    for edge in edges:
        if (
            not isinstance(edge, list)
            or len(edge) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in edge)
        ):
            raise TopologyError(f"{path}: edge {edge!r} is not a pair of node numbers [a, b]")
        a, b = edge
        if not (0 <= a < file_nodes and 0 <= b < file_nodes):
            raise TopologyError(f"{path}: edge {edge} names a node outside 0..{file_nodes - 1}")
        if a == b:
            raise TopologyError(f"{path}: edge {edge} is a self-loop; remove it")
        graph.add_edge(a, b)
    if not allow_disconnected and not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise TopologyError(
            f"{path}: the graph is disconnected ({parts} components); add edges joining them "
            "or pass allow_disconnected (--allow-disconnected)"
        )
    return graph


def describe_topology(graph: nx.Graph) -> dict[str, Any]:
    """Node and edge counts, degree min/mean/max, and the diameter (None if disconnected)."""
    degrees = [d for _, d in graph.degree()]
    n = graph.number_of_nodes()
    connected = n > 0 and nx.is_connected(graph)
    return {
        "nodes": n,
        "edges": graph.number_of_edges(),
        "degree_min": min(degrees, default=0),
        "degree_mean": sum(degrees) / n if n else 0.0,
        "degree_max": max(degrees, default=0),
        "connected": connected,
        "diameter": nx.diameter(graph) if connected else None,
    }


def draw_topology(graph: nx.Graph, path: str | Path) -> None:
    """Draw the graph to a PNG file (nodes coloured by community block when there is one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    n = graph.number_of_nodes()
    pos = nx.spring_layout(graph, seed=0)
    colors = [graph.nodes[v].get("block", 0) % 10 for v in graph.nodes]
    nx.draw_networkx(
        graph,
        pos,
        ax=ax,
        node_color=colors,
        cmap="tab10",
        vmin=0,
        vmax=9,
        node_size=max(20, 300 - 2 * n),
        with_labels=n <= 40,
        font_size=7,
        edge_color="#999999",
        width=0.6,
    )
    info = describe_topology(graph)
    ax.set_title(f"{info['nodes']} nodes, {info['edges']} edges, diameter {info['diameter']}")
    fig.savefig(path, format="png")
