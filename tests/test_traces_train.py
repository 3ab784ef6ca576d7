"""Training with a routing trace replayed: each training forward's MoE layers take the
trace's experts for exactly the rows of its batch (gradient accumulation's micro-batches
included); replaying the model's own trace leaves the first optimizer step bit for bit
what it is without replay; `moekit train --routing.replay TRACE` runs end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import MICRO, run_cli

from moekit.models import Transformer
from moekit.traces import save_trace
from moekit.traces.run import record_forward
from moekit.traces.training import Replay, ReplayData, ReplayLoader
from moekit.train.config import TrainConfig
from moekit.train.overrides import build_configs, parse_overrides
from moekit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_config():
    overrides = parse_overrides(MICRO[: MICRO.index("--steps")])
    return build_configs("tiny", overrides)[0]


def _sequences(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 384, (n, length), generator=g).tolist()


def _trace_of(model, sequences):
    return record_forward(model.eval(), sequences)


def test_every_micro_batch_takes_the_traces_experts():
    """With gradient accumulation each micro-batch is a part of the batch: the layers'
    counts equal the trace's counts over that part's rows (dropless, no padding)."""
    torch.manual_seed(0)
    model = Transformer(_model_config())
    recorder_model = copy.deepcopy(model)
    for p in recorder_model.parameters():  # another model's routing: every count differs
        p.data.normal_(0.0, 0.5)
    trace = _trace_of(recorder_model, _sequences(6, 9))
    loader = ReplayLoader(trace, batch_size=4, seq_len=8)
    forward = Replay(trace, "ids").wrap(model, model.train(), loader)
    inputs_BL, targets_BL = loader.next_batch()
    for part in (slice(0, 2), slice(2, 4)):
        out = forward(inputs_BL[part], targets_BL[part])
        rows = loader.rows_BL[part].reshape(-1)
        for i, stats in enumerate(s for s in out.stats if s is not None):
            counts = torch.bincount(trace.ids[rows, i].long().reshape(-1), minlength=4)
            assert torch.equal(stats.tokens_per_expert.cpu(), counts), (part, i)
        own = model(inputs_BL[part], targets_BL[part])
        assert not all(
            torch.equal(a.tokens_per_expert, b.tokens_per_expert)
            for a, b in zip(out.stats, own.stats)
            if a is not None
        )
    with pytest.raises(ValueError, match="not rows of the last batch"):
        forward(torch.zeros(1, 8, dtype=torch.long), None)


def test_own_trace_leaves_the_first_step_unchanged(tmp_path):
    torch.manual_seed(0)
    model_config = _model_config()
    model = Transformer(model_config)
    trace = _trace_of(copy.deepcopy(model), _sequences(8, 9, seed=1))
    config = TrainConfig(steps=1, batch_size=4, seq_len=8, eval_every=1, eval_batches=1, lr=1e-2)

    def first_step(run_dir, replay):
        trainer = Trainer(
            model_config, config, run_dir, data=ReplayData(trace), model=copy.deepcopy(model),
            show_progress=False, replay=replay,
        )  # fmt: skip
        record = trainer.train_step()
        return record, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    plain, plain_weights = first_step(tmp_path / "plain", None)
    replayed, replayed_weights = first_step(tmp_path / "replayed", Replay(trace, "ids"))
    assert plain["loss"] == replayed["loss"] and plain["grad_norm"] == replayed["grad_norm"]
    for name, weight in plain_weights.items():
        assert torch.equal(weight, replayed_weights[name]), name


def test_train_command_replays_a_trace(tmp_path):
    torch.manual_seed(0)
    trace = _trace_of(Transformer(_model_config()), _sequences(8, 17, seed=2))
    save_trace(trace, tmp_path / "trace")
    args = [a for a in MICRO]
    args[args.index("--seq-len") + 1] = "16"
    code, stdout, stderr = run_cli(
        "train", "--no-compare", "--routing.replay", str(tmp_path / "trace"),
        "--out", str(tmp_path / "run"), *args,
    )  # fmt: skip
    assert code == 0, stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == {"routing_replay": str(tmp_path / "trace"), "mode": "ids"}
    assert config["train"]["compile"] == "false"
    code, stdout, stderr = run_cli(
        "train", "--resume", "--out", str(tmp_path / "run"), "--no-progress"
    )
    assert code == 0, stderr  # a finished replayed run resumes with its saved trace
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config
    other = [a for a in args]
    other[other.index("--model.num_experts") + 1] = "8"
    code, _, stderr = run_cli(
        "train", "--no-compare", "--routing.replay", str(tmp_path / "trace"),
        "--out", str(tmp_path / "run8"), *other,
    )  # fmt: skip
    assert code == 2 and "model.num_experts: the trace has 4, the model has 8" in stderr


def test_finetune_replays_a_trace_recorded_from_its_base(tmp_path, text_file):
    """The RL loop on the command line: a base run samples (bf16 generation, recorded);
    `moekit finetune BASE --routing.replay TRACE` trains on the samples with their experts
    and resumes with the saved trace."""
    code, _, stderr = run_cli(
        "train", "--no-compare", "--data", str(text_file), "--out", str(tmp_path / "base"), *MICRO
    )
    assert code == 0, stderr
    (tmp_path / "prompts.txt").write_text("def load(\nclass Decoder:\nimport json\n")
    code, _, stderr = run_cli(
        "routing", "record", str(tmp_path / "base"), "--data", str(tmp_path / "prompts.txt"),
        "--generate", "12", "--dtype", "bf16", "--out", str(tmp_path / "samples"),
    )  # fmt: skip
    assert code == 0, stderr
    out = tmp_path / "ft"
    code, stdout, stderr = run_cli(
        "finetune", str(tmp_path / "base"), "--routing.replay", str(tmp_path / "samples"),
        "--out", str(out), "--steps", "3", "--train.batch_size", "2", "--train.seq_len", "16",
        "--train.eval_batches", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert "3 steps on 3 examples (3 cut to train.seq_len)" in stdout
    assert (out / "checkpoint").is_dir() and (out / "tokenizer.json").is_file()
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["routing_replay"] == str(tmp_path / "samples") and data["mode"] == "ids"
    code, _, stderr = run_cli("finetune", "--resume", "--out", str(out), "--no-progress")
    assert code == 0, stderr
    code, _, stderr = run_cli(
        "finetune", str(tmp_path / "base"), "--routing.replay", str(tmp_path / "samples"),
        "--data", str(text_file), "--out", str(tmp_path / "ft2"),
    )  # fmt: skip
    assert code == 2 and "drop --data" in stderr
