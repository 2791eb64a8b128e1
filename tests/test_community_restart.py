"""Community cores survive a node restart: the node checkpoint holds each community's core
state and counters by community id; a restarted node resumes the communities it is still in,
ignores those it left, starts afresh those whose saved state does not fit, and still loads a
checkpoint written before communities were checkpointed. The metrics endpoint shows one
series per community.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_community_daemon import (
    Node,
    admit,
    draft,
    found,
    make_nodes,
    run,
    running,
    wait_until,
)

from p2pfl.community import store
from p2pfl.community.manifest import Manifest
from p2pfl.daemon.checkpoint import decode_checkpoint, encode_checkpoint, write_atomically
from p2pfl.daemon.metrics import metrics_registry
from p2pfl.daemon.node import NodeDaemon
from p2pfl.daemon.state import node_state
from p2pfl.protocol.dynamic import DynamicCore


def core_of(node: Node, manifest: Manifest) -> DynamicCore:
    core = node.community(manifest).core
    assert isinstance(core, DynamicCore)
    return core


def snapshot(node: Node, manifest: Manifest) -> dict[str, Any]:
    """Everything of a community that must survive a restart (copies)."""
    community = node.community(manifest)
    core = core_of(node, manifest)
    return {
        "step": core.step,
        "steps_since_sync": core.steps_since_sync,
        "stats": core.stats.as_dict(),
        "reference": core.reference.clone(),
        "correction": None if core.correction is None else core.correction.clone(),
        "counters": dict(community.counters),
    }


def assert_same(restored: dict[str, Any], saved: dict[str, Any]) -> None:
    tensors = ("reference", "correction")
    assert {k: v for k, v in restored.items() if k not in tensors} == {
        k: v for k, v in saved.items() if k not in tensors
    }
    for name in tensors:
        assert saved[name] is not None and torch.equal(restored[name], saved[name]), name


def assert_learner_correction(node: Node, parts: dict[Manifest, torch.Tensor]) -> None:
    """The learner's correction holds each community's correction on its part, zero
    elsewhere."""
    assert node.daemon is not None
    expected = torch.zeros(node.daemon.schema.numel)
    for manifest, correction in parts.items():
        expected[node.community(manifest).part.index] = correction
    assert torch.equal(node.daemon.learner.correction(0), expected)


def scrape(daemon: NodeDaemon) -> dict[tuple[str, str], float]:
    """The endpoint's per-community samples: (sample name, community id) -> value."""
    text = generate_latest(metrics_registry(daemon.metrics)).decode()
    return {
        (sample.name, sample.labels["community"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "community" in sample.labels
    }


def set_state(node: Node, manifest: Manifest, step: int, correction: float) -> None:
    """Give a community core and its counters a state a run could have left (no network)."""
    community = node.community(manifest)
    core = core_of(node, manifest)
    core.step, core.steps_since_sync = step, step % 7
    core.stats.syncs, core.stats.sessions = step // 10, step // 20
    core.reference = core.model.read().clone() + 0.25
    core.correction = torch.full_like(core.reference, correction)
    community.counters.update(bytes_sent=100 * step, bytes_received=90 * step, rejected=2)


def save(daemon: NodeDaemon) -> None:
    async def body() -> None:
        with trio.fail_after(10):
            await daemon.save_checkpoint()

    trio.run(body)


def rewrite_checkpoint(node: Node, change: Callable[[dict[str, Any]], None]) -> None:
    state = decode_checkpoint((node.home / "ckpt").read_bytes())
    change(state)
    write_atomically(node.home, encode_checkpoint(state))


# ------------------------------------------------------------------------------- network


def test_a_restarted_member_resumes_its_community_exactly(tmp_path, caplog, monkeypatch):
    """b syncs with a, both stop; b restarts with the step, reference, correction, stats and
    counters its community had when the final checkpoint was taken; its learner's correction
    is the community's on fc1 and zero elsewhere, the metrics show the counters before and
    after, and the resumed core goes on counting."""
    caplog.set_level(logging.INFO, logger="p2pfl.communities")
    a, b = make_nodes(tmp_path, 2)
    manifest = found(a, draft("body", ["fc1.*"], "dynamic"))
    admit(a, manifest, b)
    a.start(2)
    communities = b.start(2).communities
    at_checkpoint: list[dict[str, Any]] = []
    checkpoint_communities = communities.state_dict

    def recording_state_dict() -> dict[str, Any]:
        """The live state whenever a checkpoint is taken (peers may still change it while
        the node shuts down, after its final checkpoint)."""
        at_checkpoint.append(snapshot(b, manifest))
        return checkpoint_communities()

    monkeypatch.setattr(communities, "state_dict", recording_state_dict)
    live: dict[str, Any] = {}

    async def first() -> None:
        async with running([a, b]):
            await wait_until(
                lambda: (
                    core_of(b, manifest).stats.syncs >= 3
                    and core_of(b, manifest).correction is not None
                    and b.community(manifest).counters["bytes_received"] > 0
                ),
                30,
                "b syncs and learns a correction",
            )
            live["metrics"] = scrape(b.daemon)  # same task, no await: nothing moves between
            live["state"] = snapshot(b, manifest)

    run(first)
    assert live["metrics"] == expected_metrics(manifest.id, live["state"], members=1)
    saved = at_checkpoint[-1]  # the final checkpoint, written at stop
    assert saved["step"] >= live["state"]["step"] and saved["stats"]["syncs"] >= 3

    a.start(2)
    b.start(2)
    assert_same(snapshot(b, manifest), saved)
    assert f"community 'body' ({manifest.id[:12]}) resumed at step {saved['step']}" in caplog.text
    assert_learner_correction(b, {manifest: saved["correction"]})
    assert scrape(b.daemon) == expected_metrics(manifest.id, saved, members=0)

    async def second() -> None:
        async with running([a, b]):
            await wait_until(
                lambda: core_of(b, manifest).stats.syncs > saved["stats"]["syncs"],
                30,
                "b syncs again",
            )

    run(second)
    again = snapshot(b, manifest)
    assert again["step"] > saved["step"]
    assert again["counters"]["bytes_sent"] > saved["counters"]["bytes_sent"]


def expected_metrics(
    community: str, state: dict[str, Any], members: int
) -> dict[tuple[str, str], float]:
    counters = state["counters"]
    return {
        ("p2pfl_community_step_total", community): state["step"],
        ("p2pfl_community_syncs_total", community): state["stats"]["syncs"],
        ("p2pfl_community_bytes_sent_total", community): counters["bytes_sent"],
        ("p2pfl_community_bytes_received_total", community): counters["bytes_received"],
        ("p2pfl_community_rejected_total", community): counters["rejected"],
        ("p2pfl_community_send_failures_total", community): counters["send_failures"],
        ("p2pfl_community_members", community): members,
    }


# ---------------------------------------------------------------------- checkpoint only


def test_state_of_a_left_community_is_ignored(tmp_path, caplog):
    """A node in two communities checkpoints, leaves one while stopped and restarts: the one
    it is still in resumes, the other's saved state is ignored (logged), and the learner's
    correction holds only the remaining community's."""
    (a,) = make_nodes(tmp_path, 1)
    body = found(a, draft("body", ["fc1.*"], "dynamic"))
    head = found(a, draft("head", ["head.*"], "dynamic"))
    daemon = a.start(1)
    set_state(a, body, step=40, correction=0.5)
    set_state(a, head, step=40, correction=-2.0)
    saved = snapshot(a, body)
    save(daemon)
    store.remove_membership(a.home, head.id)
    caplog.set_level(logging.INFO, logger="p2pfl.communities")

    daemon = a.start(1)
    assert list(daemon.communities.active) == [body.id]
    assert_same(snapshot(a, body), saved)
    assert f"community 'head' ({head.id[:12]}): this node is no longer a member" in caplog.text
    assert_learner_correction(a, {body: saved["correction"]})
    assert {community for _, community in scrape(daemon)} == {body.id}


def wrong_schema(entry: dict[str, Any]) -> None:
    entry["schema"] = b"\x00" * 16


def wrong_reference(entry: dict[str, Any]) -> None:
    entry["core"]["reference"] = torch.zeros(3)


def wrong_correction_dtype(entry: dict[str, Any]) -> None:
    entry["core"]["correction"] = entry["core"]["correction"].double()


def malformed_counter(entry: dict[str, Any]) -> None:
    entry["counters"]["bytes_sent"] = "many"


def missing_core(entry: dict[str, Any]) -> None:
    del entry["core"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (wrong_schema, "saved for another shared schema"),
        (wrong_reference, "its reference is torch.float32 [3]"),
        (wrong_correction_dtype, "its correction is torch.float64"),
        (malformed_counter, "many"),
        (missing_core, "core"),
    ],
)
def test_saved_state_that_does_not_fit_starts_the_community_afresh(
    tmp_path, caplog, change, reason
):
    """A community whose saved state does not fit starts at step 0 with a warning naming it;
    the other community and the model are restored."""
    (a,) = make_nodes(tmp_path, 1)
    body = found(a, draft("body", ["fc1.*"], "dynamic"))
    head = found(a, draft("head", ["head.*"], "dynamic"))
    daemon = a.start(1)
    set_state(a, body, step=30, correction=0.5)
    set_state(a, head, step=30, correction=-2.0)
    saved_head = snapshot(a, head)
    model = daemon.learner.get(0).clone()
    save(daemon)
    rewrite_checkpoint(a, lambda state: change(state["communities"][body.id]))
    caplog.set_level(logging.WARNING, logger="p2pfl.communities")

    daemon = a.start(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"community 'body' ({body.id[:12]}) starts afresh at step 0" in warnings[0]
    assert reason in warnings[0]
    fresh = core_of(a, body)
    assert (fresh.step, fresh.stats.syncs, fresh.correction) == (0, 0, None)
    assert a.community(body).counters == dict.fromkeys(
        ["bytes_sent", "bytes_received", "rejected", "send_failures"], 0
    )
    assert torch.equal(fresh.reference, a.community(body).part.take(model))
    assert_same(snapshot(a, head), saved_head)
    assert_learner_correction(a, {head: saved_head["correction"]})
    assert torch.equal(daemon.learner.get(0), model)


def test_a_checkpoint_without_a_communities_section_loads(tmp_path, caplog):
    """A checkpoint of the previous version (no communities section) restores the model and
    counters; the communities start at step 0, silently. A malformed section is a warning,
    not a refusal."""
    (a,) = make_nodes(tmp_path, 1)
    body = found(a, draft("body", ["fc1.*"], "dynamic"))
    daemon = a.start(1)
    set_state(a, body, step=30, correction=0.5)
    daemon.core.step = 55
    model = daemon.learner.get(0).clone()
    old = node_state(daemon.learner, daemon.core, daemon.peer_id, {"rejected": 4})
    del old["communities"]
    write_atomically(a.home, encode_checkpoint(old))
    caplog.set_level(logging.WARNING)

    daemon = a.start(1)
    assert (daemon.core.step, daemon.counters["rejected"]) == (55, 4)
    assert torch.equal(daemon.learner.get(0), model)
    assert (core_of(a, body).step, core_of(a, body).correction) == (0, None)
    assert_learner_correction(a, {})
    assert caplog.records == []

    rewrite_checkpoint(a, lambda state: state.update(communities=[1, 2]))
    daemon = a.start(1)
    assert daemon.core.step == 55 and core_of(a, body).step == 0
    assert "communities section is a list, not a table" in caplog.text
