"""Topology generators, TOML files, connectivity checks and the `topology show` command."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from typer.testing import CliRunner

from p2pfl.cli.topology import app
from p2pfl.spec import SpecError
from p2pfl.topology import TopologyError, build_topology, describe_topology, draw_topology

SHIPPED = Path(__file__).resolve().parent.parent / "topologies"


def _degrees(graph: nx.Graph) -> set[int]:
    return {d for _, d in graph.degree()}


@pytest.mark.parametrize(
    ("spec", "n", "degrees"),
    [
        ("complete", 7, {6}),
        ("ring", 10, {2}),
        ("star", 9, {1, 8}),
        ("torus", 12, {4}),
        ("torus", 36, {4}),
        ("regular:d=3", 12, {3}),
        ("small-world:k=4,p=0", 12, {4}),
    ],
)
def test_deterministic_degrees(spec, n, degrees):
    graph = build_topology(spec, n, seed=0)
    assert sorted(graph.nodes) == list(range(n))
    assert _degrees(graph) == degrees
    assert nx.is_connected(graph)


def test_torus_is_most_square():
    assert describe_topology(build_topology("torus", 36, seed=0))["diameter"] == 6  # 6x6
    assert describe_topology(build_topology("torus", 12, seed=0))["diameter"] == 3  # 3x4


@pytest.mark.parametrize(
    "spec",
    ["erdos-renyi:p=0.3", "small-world:k=4,p=0.3", "communities:blocks=3,p_in=0.7,p_out=0.05"],
)
def test_random_kinds_are_seeded_and_connected(spec):
    a, b = build_topology(spec, 30, seed=1), build_topology(spec, 30, seed=1)
    assert sorted(a.nodes) == list(range(30)) and nx.is_connected(a)
    assert set(a.edges) == set(b.edges)


def test_communities_blocks_as_equal_as_possible():
    graph = build_topology("communities:blocks=3,p_in=1,p_out=0.1", 10, seed=0)
    sizes = sorted(sum(1 for v in graph if graph.nodes[v]["block"] == b) for b in range(3))
    assert sizes == [3, 3, 4]


@pytest.mark.parametrize(
    ("spec", "n"),
    [
        ("mesh", 8),
        ("torus", 10),
        ("torus", 8),
        ("ring", 2),
        ("regular:d=3", 7),
        ("regular", 8),
        ("erdos-renyi:p=1.5", 8),
        ("small-world:k=3", 8),
        ("small-world:k=4,q=1", 8),
        ("complete:d=2", 8),
        ("communities:blocks=9", 4),
        ("ring", 0),
    ],
)
def test_bad_specs(spec, n):
    with pytest.raises(SpecError):
        build_topology(spec, n, seed=0)


def test_disconnected_graph_is_an_error_unless_allowed():
    with pytest.raises(TopologyError, match="disconnected.*allow_disconnected"):
        build_topology("erdos-renyi:p=0", 8, seed=0)
    empty = build_topology("erdos-renyi:p=0", 8, seed=0, allow_disconnected=True)
    assert empty.number_of_edges() == 0
    info = describe_topology(empty)
    assert info["diameter"] is None and not info["connected"] and info["nodes"] == 8


def test_shipped_files_load():
    ring = build_topology(str(SHIPPED / "ring16.toml"), None, seed=0)
    assert nx.utils.graphs_equal(ring, nx.cycle_graph(16))
    small = build_topology(str(SHIPPED / "small-world-16.toml"), 16, seed=0)
    assert small.number_of_nodes() == 16 and nx.is_connected(small)
    assert describe_topology(small)["degree_mean"] == 4.0


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "topo.toml"
    path.write_text(text)
    return str(path)


def test_toml_generator_takes_nodes_from_caller(tmp_path):
    path = _toml(tmp_path, 'generator = "regular"\n[params]\nd = 4\n')
    assert _degrees(build_topology(path, 10, seed=0)) == {4}


@pytest.mark.parametrize(
    ("text", "n", "fragment"),
    [
        ("nodes = 4\nedges = [[0, 1], [2, 3]]\n", 4, "disconnected \\(2 components\\)"),
        ("nodes = 4\nedges = [[0, 1], [1, 4]]\n", 4, "outside 0..3"),
        ("nodes = 3\nedges = [[0, 0], [1, 2]]\n", 3, "self-loop"),
        ("nodes = 3\nedges = [[0, 1, 2]]\n", 3, "pair of node numbers"),
        ("nodes = 3\nedges = [[0, 1], [1, 2]]\n", 5, "use 3 nodes"),
        ("edges = [[0, 1]]\n", 2, "needs nodes = N"),
        ('generator = "ring"\nedges = [[0, 1]]\n', 3, "exactly one of"),
        ("nodes = 3\n", 3, "exactly one of"),
        ('generator = "ring"\nshape = 3\n', 3, "unknown key"),
        ('generator = "hypercube"\n', 8, "unknown kind"),
        ('generator = "regular"\n[params]\nd = [1]\n', 8, "must be a number"),
        ("nodes = [", 3, "not a readable TOML"),
    ],
)
def test_bad_toml_files(tmp_path, text, n, fragment):
    with pytest.raises(TopologyError, match=fragment):
        build_topology(_toml(tmp_path, text), n, seed=0)


def test_missing_toml_file(tmp_path):
    with pytest.raises(TopologyError, match="file not found"):
        build_topology(str(tmp_path / "none.toml"), 4, seed=0)


def test_draw_topology_writes_png(tmp_path):
    out = tmp_path / "g.png"
    draw_topology(build_topology("communities:blocks=2", 12, seed=0), out)
    assert out.read_bytes().startswith(b"\x89PNG")


def test_cli_show_prints_summary_and_draws(tmp_path):
    png = tmp_path / "torus.png"
    result = CliRunner().invoke(app, ["show", "torus", "--nodes", "9", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "diameter" in result.output and "degree" in result.output
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cli_show_file_uses_its_node_count():
    result = CliRunner().invoke(app, ["show", str(SHIPPED / "ring16.toml")])
    assert result.exit_code == 0, result.output
    assert "16" in result.output and "8" in result.output


def test_cli_show_bad_spec_exits_2_without_traceback():
    result = CliRunner().invoke(app, ["show", "erdos-renyi:p=0", "--nodes", "6"])
    assert result.exit_code == 2
    assert "disconnected" in result.output and "Traceback" not in result.output
    allowed = CliRunner().invoke(app, ["show", "erdos-renyi:p=0", "--allow-disconnected"])
    assert allowed.exit_code == 0 and "no" in allowed.output
