"""The communication planner behind `moekit bench comm`: worked examples of its formulas."""

from __future__ import annotations

import pytest

from moekit.cli import main
from moekit.models import count_parameters, presets
from moekit.parallel.comm import Link, expert_parameters, plan, preset_config

LINK = Link(bandwidth_gb_s=10.0, latency_us=5.0)


def test_all_to_all_bytes_and_time_worked_example():
    # tiny: 4 MoE layers, D 128, top_k 2, 16 experts. T = 1024 tokens, ep 2: half of the
    # 2048 rows leave the rank: 1024 rows * 128 * 2 bytes = 262,144 bytes per exchange;
    # 4 exchanges (dispatch, combine, and their backwards) * 4 layers = 4,194,304 bytes.
    p = plan(presets.tiny(), 1024, ep=2, dp=1, link=LINK)
    assert p.all_to_all_bytes == 4 * 4 * 262_144
    # each exchange: 1 peer * 5 us + 262,144 B / 10 GB/s = 5 + 26.2144 us
    assert p.all_to_all_seconds == pytest.approx(16 * (5e-6 + 262_144 / 1e10))
    assert p.experts_per_rank == 8


def test_gradient_all_reduce_and_memory_worked_example():
    config = presets.tiny()
    total, experts = count_parameters(config).total, expert_parameters(config)
    # 4 layers * 16 experts * (128 * 256 + 128 * 128) routed expert weights
    assert experts == 4 * 16 * (128 * 256 + 128 * 128)
    p = plan(config, 1024, ep=2, dp=2, link=LINK)
    replicated, local_experts = total - experts, experts // 2
    # ring: 2 (p-1)/p * N * 4 bytes; world of 4 for the replicated, DP group of 2 for experts
    expected = 2 * 3 / 4 * replicated * 4 + 2 * 1 / 2 * local_experts * 4
    assert p.all_reduce_bytes == pytest.approx(expected)
    assert p.all_reduce_seconds == pytest.approx(
        6 * 5e-6 + 2 * 3 / 4 * replicated * 4 / 1e10 + 2 * 5e-6 + local_experts * 4 / 1e10
    )
    assert p.params_per_rank == replicated + local_experts
    assert p.memory_bytes_per_rank == 16 * (replicated + local_experts)


def test_one_rank_sends_nothing():
    p = plan(presets.tiny(), 1024, ep=1, dp=1, link=LINK)
    assert p.all_to_all_bytes == p.all_reduce_bytes == p.all_to_all_seconds == 0


def test_mixtral_8x7b_sizes():
    config = preset_config("mixtral_8x7b")
    assert count_parameters(config).total == pytest.approx(46.7e9, rel=0.01)
    # 8 experts over 8 ranks: one expert (~176 M parameters per layer) each
    p = plan(config, 4096, ep=8, dp=1, link=LINK, flops_per_s=1e15)
    assert p.experts_per_rank == 1
    assert p.compute_seconds == pytest.approx(6 * count_parameters(config).active * 4096 / 1e15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ep": 3}, "ep (3) must divide num_experts (16)"),
        ({"ep": 0}, "ep (0)"),
        ({"tokens_per_rank": -1}, "tokens_per_rank (-1)"),
    ],
)
def test_bad_layouts_are_named(kwargs, message):
    args = {
        "config": presets.tiny(),
        "tokens_per_rank": 1024,
        "ep": 2,
        "dp": 1,
        "link": LINK,
    } | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(**args)


def test_dense_model_and_bad_link_are_errors():
    with pytest.raises(ValueError, match="no MoE layer"):
        plan(presets.tiny_dense(), 1024, ep=1, dp=1, link=LINK)
    with pytest.raises(ValueError, match="bandwidth"):
        Link(0.0, 1.0)


def test_bench_comm_prints_one_row_per_ep(capsys):
    assert (
        main(["bench", "--comm", "--model", "tiny", "--ep", "1", "2", "4", "--tokens", "1024"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[-3:]] == ["1", "2", "4"]
    assert main(["bench", "--comm", "--model", "nope"]) == 2
