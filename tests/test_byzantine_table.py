"""``sim/byzantine.py``'s table: each attacked cell with its cost against the attack-free run,
and the largest cost within issue 11's aim (K/N ≤ 3/16)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "sim" / "byzantine.py"


def load_script():
    spec = importlib.util.spec_from_file_location("byzantine_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_gives_each_attacks_cost_and_the_largest_within_the_aim():
    script = load_script()
    results = {
        "default": {"none": 0.879, "replay 3/16": 0.816, "replay 5/16": 0.5, "flood 1/16": 0.9},
        "today": {"replay 3/16": 0.2},
    }
    text = script.table(results, ["replay", "flood"])
    assert "| replay | 3/16 | 0.816 (-6.3) | 0.200 |" in text
    assert "| flood | 1/16 | 0.900 (+2.1) | nan |" in text
    assert "| replay | 5/16 | 0.500 (-37.9) | nan |" in text
    # 5/16 lies beyond the aim; a gain counts as a negative cost; no attack-free run: none
    assert text.rstrip().endswith("(points; aim ≤ 3): default 6.3.")
