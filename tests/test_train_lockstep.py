"""The comparison trains its two models in lockstep: each ends bit for bit where it ends
trained alone (own loader, own torch RNG stream), a line per evaluation goes to stdout, and
a comparison interrupted mid-way (in either model's segment) resumes bit-identically."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from moekit import MoEConfig
from moekit.models import ModelConfig, dense_twin
from moekit.train import TrainConfig, Trainer, compare, prepare_run_data, read_metrics
from moekit.train.config import for_dense_twin
from moekit.train.data import copy_run_data

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_moe() -> ModelConfig:
    # noisy_topk draws its router noise from torch's global RNG: the streams must not mix.
    moe = MoEConfig(d_model=32, d_hidden=32, num_experts=4, top_k=2, router="noisy_topk")
    return ModelConfig(
        vocab_size=384, d_model=32, num_layers=2, num_heads=2, max_seq_len=32, moe=moe
    )


# Segments of 2 steps: MoE 1-2, dense 1-2, MoE 3-4, dense 3-4, MoE 5-6, dense 5-6.
MICRO_TRAIN = TrainConfig(
    steps=6, batch_size=4, seq_len=32, eval_every=2, eval_batches=2, checkpoint_every=4
)


@pytest.fixture(scope="module")
def lockstep(tmp_path_factory, text_file):
    """An uninterrupted comparison, and what compare() printed."""
    out = tmp_path_factory.mktemp("lockstep")
    lines = []
    comparison = compare(
        micro_moe(), MICRO_TRAIN, out, data=text_file, show_progress=False, log=lines.append
    )
    return out, comparison, lines


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def assert_same_run(a, b) -> None:
    """Bit-identical weights and the same validation losses."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), name
    assert [r["loss"] for r in read_metrics(a, "val")] == [
        r["loss"] for r in read_metrics(b, "val")
    ]


def test_lockstep_equals_each_model_trained_alone(lockstep, tmp_path):
    out, comparison, _ = lockstep
    for name, config in (("moe", micro_moe()), ("dense", dense_twin(micro_moe()))):
        copy_run_data(out / "moe", tmp_path / name)  # the same tokens
        data = prepare_run_data(tmp_path / name, vocab_size=384)
        # The twin trains at dense_lr (its own tuned learning rate), the MoE at lr.
        train = for_dense_twin(MICRO_TRAIN) if name == "dense" else MICRO_TRAIN
        alone = Trainer(config, train, tmp_path / name, data=data, show_progress=False)
        result = alone.train()
        assert_same_run(out / name, tmp_path / name)
        assert result.final_val_loss == getattr(comparison, name).final_val_loss


def test_each_model_trains_at_its_own_learning_rate(lockstep):
    out, _, _ = lockstep
    assert MICRO_TRAIN.lr != MICRO_TRAIN.dense_lr
    for name, lr in (("moe", MICRO_TRAIN.lr), ("dense", MICRO_TRAIN.dense_lr)):
        saved = json.loads((out / name / "config.json").read_text())["train"]
        assert saved["lr"] == lr
        # Warmup's first step: lr * 1 / warmup_steps (lr_at), so the peaks differ too.
        first = read_metrics(out / name, "train")[0]["lr"]
        assert first == pytest.approx(lr / MICRO_TRAIN.warmup_steps)
    assert for_dense_twin(TrainConfig(dense_lr=None)).lr == TrainConfig().lr


def test_a_line_per_evaluation_with_both_losses_the_gap_and_tokens_per_s(lockstep):
    out, comparison, lines = lockstep
    moe = dict(comparison.moe.evals)
    dense = dict(comparison.dense.evals)
    evals = [line for line in lines if line.startswith("step ")]
    assert [int(re.match(r"step (\d+)/6", line)[1]) for line in evals] == [0, 2, 4, 6]
    assert evals[0] == (
        f"step 0/6  val loss  MoE {moe[0]:.3f}  dense {dense[0]:.3f}  ({moe[0] - dense[0]:+.3f})"
    )
    for line, step in zip(evals[1:], (2, 4, 6)):
        head = (
            f"step {step}/6  val loss  MoE {moe[step]:.3f}  dense {dense[step]:.3f}  "
            f"({moe[step] - dense[step]:+.3f})  tok/s  MoE "
        )
        assert line.startswith(head), line
        assert re.fullmatch(r"[\d,]+  dense [\d,]+", line[len(head) :]), line


def test_lines_reach_stdout_as_they_happen(tmp_path, text_file, capsys):
    config = TrainConfig(steps=2, batch_size=4, seq_len=32, eval_every=1, eval_batches=1)
    compare(micro_moe(), config, tmp_path, data=text_file, show_progress=False)
    stdout = capsys.readouterr().out
    assert re.search(r"^step 1/2  val loss  MoE \d\.\d{3}  dense \d\.\d{3}  \([+-]\d\.\d{3}\)"
                     r"  tok/s  MoE [\d,]+  dense [\d,]+$", stdout, re.M)  # fmt: skip
    assert stdout.count("val loss") == 3  # steps 0, 1, 2


@pytest.mark.parametrize(
    "interrupted_call",
    # train_step calls: M1 M2 D1 D2 M3 M4 D3 ...; the 5th is the MoE's step 3 (mid-segment:
    # the dense model waits at 2), the 7th the dense model's step 3 (the MoE waits at 4).
    [5, 7],
    ids=["in-moe-segment", "in-dense-segment"],
)
def test_a_comparison_interrupted_mid_way_resumes_bit_identically(
    lockstep, tmp_path, text_file, monkeypatch, interrupted_call
):
    out, comparison, _ = lockstep
    train_step, calls = Trainer.train_step, []

    def press_ctrl_c(self):
        calls.append(self.run_dir.name)
        if len(calls) == interrupted_call:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step; the step still finishes
        return train_step(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", press_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            compare(micro_moe(), MICRO_TRAIN, tmp_path, data=text_file, show_progress=False)
    steps = {run: json.loads((tmp_path / run / "checkpoint/trainer_state.json").read_text())["step"]
             for run in ("moe", "dense")}  # fmt: skip
    assert steps == ({"moe": 3, "dense": 2} if interrupted_call == 5 else {"moe": 4, "dense": 3})
    lines = []
    resumed = compare(
        micro_moe(),
        MICRO_TRAIN,
        tmp_path,
        data=text_file,
        resume=True,
        show_progress=False,
        log=lines.append,
    )
    for run in ("moe", "dense"):
        assert_same_run(out / run, tmp_path / run)
    assert resumed.moe.evals == comparison.moe.evals
    assert resumed.dense.evals == comparison.dense.evals
    # Lines for the evaluations still to come only: steps 4 and 6.
    assert [line[:8] for line in lines if line.startswith("step ")] == ["step 4/6", "step 6/6"]
