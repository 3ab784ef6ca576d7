"""--train.compile: "auto" compiles a job long enough to pay the compile back and leaves a
short one eager (worked figures), one decision serves both models of a comparison, the
compiled blocks leave the trainer eager, and the old boolean settings still read."""

from __future__ import annotations

import pytest

from moekit import MoEConfig
from moekit.models import ModelConfig
from moekit.train import TrainConfig, Trainer, compiling, prepare_run_data
from moekit.train import trainer as trainer_module
from moekit.train.compiling import CompileDecision

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(run_dir, text_file, **train_settings) -> Trainer:
    moe = MoEConfig(d_model=32, d_hidden=32, num_experts=4, top_k=2)
    model = ModelConfig(
        vocab_size=384, d_model=32, num_layers=2, num_heads=2, max_seq_len=32, moe=moe
    )
    data = prepare_run_data(run_dir, data=text_file, vocab_size=model.vocab_size)
    settings = {"batch_size": 4, "seq_len": 32, "eval_batches": 1} | train_settings
    return Trainer(model, TrainConfig(**settings), run_dir, data=data, show_progress=False)


def test_auto_decides_from_the_measured_step_time_both_ways():
    lines = []
    # 1000 steps left x 0.5 s x 9% = 45 s saved > 15 s to compile: compile.
    long_job = CompileDecision("auto", log=lines.append)
    assert long_job.decide([9.0, 0.5, 0.5, 0.5], steps_left=1000) is True
    assert "compiling (1000 steps left x 0.50 s x 9% saved = 45 s > ~15 s" in lines[-1]
    # The first step (allocations, warm-up) is not used: 9.0 s would have said compile.
    short_job = CompileDecision("auto", log=lines.append)
    assert short_job.decide([9.0, 0.5, 0.5, 0.5], steps_left=200) is False
    assert "staying eager (200 steps left x 0.50 s x 9% saved = 9 s <= ~15 s" in lines[-1]
    # Decided once: later calls keep the first answer.
    assert short_job.decide([5.0, 5.0], steps_left=10_000) is False


def test_true_and_false_need_no_probe_and_booleans_still_read():
    assert CompileDecision("true").compiled is True
    assert CompileDecision("false").compiled is False
    assert TrainConfig(compile=True).compile == "true"
    assert TrainConfig(compile=False).compile == "false"
    assert TrainConfig().compile == "auto"
    with pytest.raises(ValueError, match="compile \\('sometimes'\\) must be one of auto"):
        TrainConfig(compile="sometimes")


@pytest.mark.parametrize("compile_seconds, compiles", [(0.0, True), (1e9, False)])
def test_trainer_auto_compiles_after_the_probe_or_stays_eager(
    tmp_path, text_file, monkeypatch, capsys, compile_seconds, compiles
):
    """A job that pays back (compile cost 0) compiles its blocks after PROBE_STEPS eager
    steps; one that cannot (cost 1e9 s) never does. Either way evaluation runs eager and
    the model leaves the trainer uncompiled."""
    monkeypatch.setattr(compiling, "COMPILE_SECONDS", compile_seconds)
    calls = []
    monkeypatch.setattr(
        trainer_module, "compile_blocks", lambda model: calls.append(("compile", model))
    )
    monkeypatch.setattr(
        trainer_module, "uncompile_blocks", lambda model: calls.append(("uncompile", model))
    )
    trainer = make_trainer(tmp_path, text_file, steps=6, eval_every=3, compile="auto")
    original_step = trainer.train_step
    compiled_at = []

    def step():
        record = original_step()
        if calls and not compiled_at:
            compiled_at.append(trainer.step)
        return record

    trainer.train_step = step
    trainer.train()
    out = capsys.readouterr().out
    if compiles:
        # Steps 1-4 eager (the probe), the 5th step compiles before it runs.
        assert compiled_at == [compiling.PROBE_STEPS + 1]
        assert [kind for kind, _ in calls] == ["compile", "uncompile"]
        assert "train.compile auto: compiling (2 steps left" in out
    else:
        assert calls == []
        assert "train.compile auto: staying eager (2 steps left" in out


def test_a_shared_decision_compiles_the_second_trainer_at_once(tmp_path, text_file, monkeypatch):
    """A comparison's dense twin takes the MoE's decision without probing again."""
    calls = []
    monkeypatch.setattr(trainer_module, "compile_blocks", lambda model: calls.append(model))
    monkeypatch.setattr(trainer_module, "uncompile_blocks", lambda model: None)
    decision = CompileDecision("auto", log=lambda line: None)
    decision.decide([1.0, 1.0], steps_left=10_000)
    trainer = make_trainer(tmp_path, text_file, steps=1, eval_every=1, compile="auto")
    trainer.compile_decision = decision
    trainer.train()
    assert calls == [trainer.model]
