"""``--json`` on every command that prints state or creates something: stdout holds exactly
one JSON document with full ids; exit codes are those of the human output."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from p2pfl.cli import app

ROOT = Path(__file__).resolve().parent.parent


def run_json(*args: object, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 else result


def test_node_and_community_commands_print_json(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    node_a = run_json("node", "init", "--home", a, "--json")
    node_b = run_json("node", "init", "--home", b, "--json")
    assert node_a["peer_id"].startswith("12D3KooW") and node_a["config"] == str(a / "config.toml")

    draft = tmp_path / "draft.toml"
    draft.write_text((ROOT / "examples" / "community" / "manifest.toml").read_text())
    created = run_json("community", "create", "--home", a, draft, "--json")
    community = created["id"]
    assert len(community) == 32 and created["founder"] == node_a["peer_id"]
    assert Path(created["manifest"]).is_file() and created["name"] == "digits-body"

    invited = run_json(
        "community", "invite", "--home", a, community[:6], "--for", node_b["peer_id"],
        "--expires", "1h", "--json",
    )  # fmt: skip
    assert invited["community"] == community and invited["for"] == node_b["peer_id"]
    assert invited["token"].startswith("p2pfl-invite:") and invited["expires"] > 0

    address = f"/ip4/127.0.0.1/tcp/4001/p2p/{node_a['peer_id']}"
    joined = run_json(
        "community", "join", "--home", b, invited["token"], "--bootstrap", address, "--json"
    )
    assert (joined["id"], joined["peer_id"]) == (community, node_b["peer_id"])
    assert joined["bootstrap"] == [address] and joined["invite_expires"] == invited["expires"]

    (entry,) = run_json("community", "list", "--home", b, "--json")["communities"]
    assert entry["id"] == community  # the full id, not the table's 12 characters
    assert (entry["role"], entry["admission"], entry["shared"]) == ("member", "invite", ["fc1.*"])
    assert entry["credential"].startswith("expires ")
    (founded,) = run_json("community", "list", "--home", a, "--json")["communities"]
    assert (founded["role"], founded["credential"], founded["invite_expires"]) == (
        "founder",
        "founder",
        None,
    )

    left = run_json("community", "leave", "--home", b, community, "--json")
    assert left == {"id": community, "name": "digits-body", "left": True}
    assert run_json("community", "list", "--home", b, "--json") == {"communities": []}


def test_errors_keep_their_exit_codes_with_json(tmp_path: Path):
    result = run_json("community", "list", "--home", tmp_path / "nowhere", "--json", code=2)
    assert result.stdout == "" and "does not exist" in result.stderr
    result = run_json("node", "status", "--home", tmp_path, "--json", code=1)
    assert result.stdout == "" and "no node is running" in result.stderr


def test_topology_show_json(tmp_path: Path):
    png = tmp_path / "ring.png"
    info = run_json("topology", "show", "ring", "-n", "6", "--png", png, "--json")
    assert info == {
        "spec": "ring",
        "nodes": 6,
        "edges": 6,
        "degree_min": 2,
        "degree_mean": 2.0,
        "degree_max": 2,
        "connected": True,
        "diameter": 3,
        "png": str(png),
    }
    assert png.stat().st_size > 0


def test_sim_json_is_the_summary(tmp_path: Path):
    out = tmp_path / "run"
    small = ["--nodes", "4", "--steps", "10", "--topology", "ring", "--quiet"]
    summary = run_json("sim", *small, "--protocol", "continuous", "--out", out, "--json")
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["runs"][0]["protocol"] == "continuous"


def test_sim_help_shows_the_communities_table_name():
    result = CliRunner().invoke(app, ["sim", "--help"])
    assert "[[communities]]" in " ".join(result.output.split())
