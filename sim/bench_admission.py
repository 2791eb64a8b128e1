"""Per-frame cost of community admission: the cached check (``Admission.on_frame``, what a
node runs for every sync frame) against verifying the member's credential again (the two
Ed25519 signature checks of ``check_credential``, what every frame cost before), measured in
the same run.

    python sim/bench_admission.py [--frames N]
"""

from __future__ import annotations

import argparse
import time

from libp2p.crypto.ed25519 import create_new_key_pair

from p2pfl.community.draft import create_manifest
from p2pfl.community.invite import check_credential, issue_invite
from p2pfl.peers import peer_id_of
from p2pfl.protocol.admission import Admission

DRAFT = (
    'name = "bench"\nadmission = "invite"\n[model]\nfactory = "mlp:hidden=8"\ninputs = [4]\n'
    'classes = 3\nshared = ["fc1.*"]\n[policy]\nprotocol = "dynamic"\n'
)


def per_frame_us(check: object, frames: int) -> float:
    started = time.perf_counter()
    for _ in range(frames):
        check()  # type: ignore[operator]
    return (time.perf_counter() - started) / frames * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000)
    args = parser.parse_args()
    founder, member = create_new_key_pair(), create_new_key_pair()
    founder_id, member_id = peer_id_of(founder.public_key), peer_id_of(member.public_key)
    now = int(time.time())
    manifest = create_manifest(DRAFT, "bench", founder, now)
    invite = issue_invite(manifest, founder, member_id, now + 3600)
    credential = invite.prove(member_id, founder_id)
    admission = Admission(manifest, founder_id, None)
    hello = Admission(manifest, member_id, invite).greet(now, founder_id)[0].hello
    admission.on_hello(now, member_id, hello)
    assert admission.on_frame(now, member_id) == []

    verify = per_frame_us(
        lambda: check_credential(manifest, member_id, founder_id, credential, now), args.frames
    )
    cached = per_frame_us(lambda: admission.on_frame(now, member_id), args.frames)
    print(f"frames: {args.frames}")
    print(f"verify the credential per frame: {verify:9.2f} us/frame")
    print(f"cached admission (on_frame):     {cached:9.2f} us/frame")
    print(f"ratio: {verify / cached:.0f}x")


if __name__ == "__main__":
    main()
