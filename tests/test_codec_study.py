"""``sim/codec_study.py``'s candidate codecs: payload bytes as stated, reconstructions within
their form (rank-r factors exact on a rank-r matrix, outliers kept, the library's codecs
bit for bit)."""

import runpy
from pathlib import Path
from types import SimpleNamespace

import torch

from p2pfl.learning.compression import CodecConfig, Compressed, compress, decompress
from p2pfl.learning.params import ParamSchema, ParamSpec
from p2pfl.wire.messages import Average, Pull

SCRIPT = Path(__file__).resolve().parents[1] / "sim" / "codec_study.py"
SCHEMA = ParamSchema(
    (
        ParamSpec("fc.weight", (64, 32), "float32"),
        ParamSpec("fc.bias", (64,), "float32"),
        ParamSpec("head.weight", (10, 64), "float32"),
    )
)


def load_script() -> SimpleNamespace:
    return SimpleNamespace(**runpy.run_path(str(SCRIPT), run_name="codec_study"))


def test_rank_r_factors_are_exact_on_rank_r_weights_and_cost_what_they_carry():
    study = load_script()
    g = torch.Generator().manual_seed(0)
    fc = torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g)
    head = torch.randn(10, 2, generator=g) @ torch.randn(2, 64, generator=g)
    x = torch.cat([fc.reshape(-1), torch.randn(64, generator=g), head.reshape(-1)])
    decoded, size = study.low_rank(SCHEMA, 2)(x)
    assert size == 2 * 2 * (64 + 32) + 2 * 64 + 2 * 2 * (10 + 64)
    assert float((x - decoded).norm() / x.norm()) < 1e-3  # float16 factors only
    coarse, _ = study.low_rank(SCHEMA, 1)(x)
    assert float((x - coarse).norm() / x.norm()) > 0.05


def test_the_librarys_codecs_round_trip_as_the_links_do_and_outliers_travel_apart():
    study = load_script()
    x = torch.randn(SCHEMA.numel, generator=torch.Generator().manual_seed(1))
    decoded, size = study.block_scaled("int2", 1024)(x)
    assert torch.equal(decoded, decompress(compress(x, CodecConfig("int2", 1024))))
    assert size == (SCHEMA.numel + 3) // 4 + 4 * 3
    x[7] = 40.0
    with_outliers, bigger = study.int2_with_outliers(0.01)(x)
    assert with_outliers[7] == 40.0 and bigger > size
    assert (x - with_outliers).norm() < (x - study.block_scaled("int2")(x)[0]).norm()
    sparse, positions = study.topk(0.01)(x)
    assert int((sparse != 0).sum()) == 28
    assert 2 * 28 + 28 <= positions <= 2 * 28 + 2 * 28  # float16 values, 1-2 bytes per gap


def test_messages_are_counted_by_type_role_and_codec():
    study = load_script()
    echo = Compressed("int2", 4, torch.zeros(1, dtype=torch.uint8), echo=True, base=3)
    key = Compressed("int4", 4, torch.zeros(2, dtype=torch.uint8))
    assert study.message_kind(Average(1, echo)) == "Average echo int2"
    assert study.message_kind(Average(1, key)) == "Average key frame int4"
    assert study.message_kind(Pull(1)) == "Pull"
    shared = Compressed("int2", 4, torch.zeros(1, dtype=torch.uint8), base=2, base_kind=1)
    assert study.message_kind(Average(1, shared)) == "Average delta int2 on average on sender's"


def test_the_exact_oracle_decodes_its_role_exactly_at_the_codecs_size():
    study = load_script()
    from p2pfl.protocol.links import CodecLinks

    g = torch.Generator().manual_seed(2)
    config = CodecConfig("int2", 1024)
    role = ["reply"]
    for roles, exact in (({"reply"}, True), ({"echo"}, False), (set(), False)):
        sender, receiver = CodecLinks(config), CodecLinks(config)
        with study.decoded_exactly(roles, role):
            for _ in range(3):  # a key frame, then deltas on the chain
                x = torch.randn(SCHEMA.numel, generator=g)
                c = sender.encode("b", x)
                assert c.codec in ("int2", "int8")  # key frames in int8: sized as ever
                error = float((receiver.decode("a", c) - x).norm() / x.norm())
                assert error < 1e-6 if exact else error > 0.005
    assert study.links.decompress is decompress  # restored
