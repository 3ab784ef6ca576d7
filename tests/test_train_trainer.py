"""Trainer: metrics and checkpoints of a short run, bit-identical resume (after stop_at and
after Ctrl-C), corrupt and incompatible checkpoints, the schedule, router bias updates."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from moekit import MoEConfig
from moekit.models import ModelConfig
from moekit.train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    lr_at,
    prepare_run_data,
    read_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_model(**moe_overrides) -> ModelConfig:
    moe = {"d_model": 32, "d_hidden": 32, "num_experts": 4, "top_k": 2} | moe_overrides
    return ModelConfig(
        vocab_size=384,
        d_model=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=32,
        moe=MoEConfig(**moe),
    )


def micro_train(**overrides) -> TrainConfig:
    settings = {
        "steps": 6,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 2,
        "eval_batches": 2,
    }
    return TrainConfig(**(settings | {"checkpoint_every": 4} | overrides))


def make_trainer(run_dir, text_file, model=None, resume=False, **train_overrides) -> Trainer:
    model = model or micro_model()
    data = prepare_run_data(run_dir, data=text_file, vocab_size=model.vocab_size)
    return Trainer(
        model,
        micro_train(**train_overrides),
        run_dir,
        data=data,
        resume=resume,
        show_progress=False,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_schedule_warmup_then_cosine_to_the_floor():
    # Warmup 2 of 6 steps: 0.5, 1.0; cosine over steps 2..5 (3 intervals) ends at 0.1.
    lrs = [lr_at(s, lr=1.0, steps=6, warmup_steps=2, min_lr_ratio=0.1) for s in range(6)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[3] == pytest.approx(0.1 + 0.9 * 0.75)  # cos(pi/3) = 0.5
    assert lrs[5] == pytest.approx(0.1)


def test_a_few_steps_write_metrics_and_a_safetensors_checkpoint(tmp_path, text_file):
    result = make_trainer(tmp_path, text_file).train()
    assert result.steps == 6
    train = read_metrics(tmp_path, split="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {
        "loss",
        "aux_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "dropped_fraction",
    } <= train[0].keys()
    assert train[0]["aux_loss"] > 0
    evals = read_metrics(tmp_path, split="val")
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert result.evals == [(r["step"], r["loss"]) for r in evals]
    assert evals[-1]["loss"] < evals[0]["loss"]
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["loader"]["batch_index"] == 6
    assert (tmp_path / "tokenizer.json").exists()


def test_stop_and_resume_ends_with_bit_identical_weights(tmp_path, text_file):
    # noisy_topk draws router noise from the torch RNG, so the RNG state must resume too.
    model = micro_model(router="noisy_topk")
    straight = make_trainer(tmp_path / "a", text_file, model)
    straight.train()
    first = make_trainer(tmp_path / "b", text_file, model)
    first.train(stop_at=3)
    resumed = make_trainer(tmp_path / "b", text_file, model, resume=True)
    assert resumed.step == 3
    resumed.train()
    assert_bit_identical(weights(straight), weights(resumed))
    assert read_metrics(tmp_path / "a", "val") == read_metrics(tmp_path / "b", "val")


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, text_file, monkeypatch):
    straight = make_trainer(tmp_path / "a", text_file)
    straight.train()
    interrupted = make_trainer(tmp_path / "b", text_file)
    next_batch, calls = interrupted.loader.next_batch, []

    def press_ctrl_c():
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step; the step still finishes
        return next_batch()

    monkeypatch.setattr(interrupted.loader, "next_batch", press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    resumed = make_trainer(tmp_path / "b", text_file, resume=True)
    resumed.train()
    assert_bit_identical(weights(straight), weights(resumed))


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_truncated_checkpoint_is_one_clear_error_and_is_left_alone(tmp_path, text_file):
    make_trainer(tmp_path, text_file).train(stop_at=2)
    model_file = tmp_path / "checkpoint" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    before = snapshot(tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match="model.safetensors.* truncated or corrupt"):
        make_trainer(tmp_path, text_file, resume=True)
    # Starting afresh over it is refused too.
    with pytest.raises(ValueError, match="already holds a trained run"):
        make_trainer(tmp_path, text_file)
    assert snapshot(tmp_path / "checkpoint") == before


def test_a_save_that_died_half_way_leaves_the_last_good_checkpoint(tmp_path, text_file):
    make_trainer(tmp_path, text_file).train(stop_at=2)
    partial = tmp_path / "checkpoint.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    resumed = make_trainer(tmp_path, text_file, resume=True)
    assert resumed.step == 2
    resumed.train()
    assert not partial.exists()


def test_checkpoint_from_another_format_names_the_formats(tmp_path, text_file):
    make_trainer(tmp_path, text_file).train(stop_at=2)
    path = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps(state | {"format": 99, "versions": {"moekit": "9.0"}}))
    with pytest.raises(
        CheckpointError, match=r"format 99 \(written by moekit 9.0\).* reads format 1"
    ):
        make_trainer(tmp_path, text_file, resume=True)


def test_unreadable_trainer_state_is_a_checkpoint_error(tmp_path, text_file):
    make_trainer(tmp_path, text_file).train(stop_at=2)
    (tmp_path / "checkpoint" / "trainer_state.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match="unreadable"):
        make_trainer(tmp_path, text_file, resume=True)


def test_sigmoid_router_bias_moves_after_the_step(tmp_path, text_file):
    model = micro_model(router="sigmoid_topk", balance_loss_coef=0.0, bias_update_rate=0.01)
    trainer = make_trainer(tmp_path, text_file, model, steps=1, eval_every=1)
    trainer.train()
    for layer in trainer.model.layers:
        # One step moves each bias by +-rate (0 only for an expert at exactly the mean load).
        assert layer.ffn.router.bias.abs().max().item() == pytest.approx(0.01)


def test_bf16_autocast_trains(tmp_path, text_file):
    result = make_trainer(tmp_path, text_file, steps=2, eval_every=2, dtype="bfloat16").train()
    assert result.steps == 2 and result.final_val_loss == result.final_val_loss  # not NaN


def test_resume_with_a_different_config_is_refused(tmp_path, text_file):
    make_trainer(tmp_path, text_file).train(stop_at=2)
    with pytest.raises(ValueError, match="config differs"):
        make_trainer(tmp_path, text_file, resume=True, lr=1e-4)


def test_resume_of_a_run_saved_before_newer_settings_existed(tmp_path, text_file):
    # A config.json written by an older moekit lacks settings added since; they take their
    # defaults, so the run is the same run and resumes.
    make_trainer(tmp_path, text_file).train(stop_at=2)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["train"]["trainable"], saved["model"]["qk_norm"]
    config_path.write_text(json.dumps(saved))
    resumed = make_trainer(tmp_path, text_file, resume=True)
    assert resumed.step == 2


def test_compiled_training_follows_the_eager_run(tmp_path, text_file):
    """--train.compile true: the same losses, router biases and weights as eager training
    (to float rounding: the compiled kernels may sum in another order)."""
    model = micro_model(
        router="sigmoid_topk", capacity_factor=1.25, bias_update_rate=0.01, z_loss_coef=1e-3
    )
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        trainer = make_trainer(
            tmp_path / str(compiled), text_file, model, steps=3, eval_every=3, compile=compiled
        )
        trainer.train()
        losses = [r["loss"] for r in read_metrics(tmp_path / str(compiled), split="train")]
        runs[compiled] = (losses, weights(trainer))
    (eager_losses, eager_weights), (comp_losses, comp_weights) = runs[False], runs[True]
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    for key, value in eager_weights.items():
        torch.testing.assert_close(comp_weights[key], value, atol=1e-4, rtol=1e-4, msg=key)


def test_tensorboard_events_mirror_the_metrics_and_routing_logs(tmp_path, text_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, text_file, steps=4, eval_every=2, tensorboard=True)
    trainer.routing.every = 2
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    train = read_metrics(tmp_path, split="train")
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in train] == [1, 2, 3, 4]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    val = read_metrics(tmp_path, split="val")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("val/loss")] == [
        (r["step"], r["loss"]) for r in val
    ]
    for tag in ("train/lr", "train/tokens_per_s", "train/load_cv", "routing/layer0/load_cv"):
        assert tag in events.Tags()["scalars"], tag
    routing = [r for r in read_metrics(tmp_path / "routing.jsonl") if r["split"] == "train"]
    histogram = events.Histograms("routing/layer1/expert_load")
    assert [h.step for h in histogram] == [r["step"] for r in routing] == [2, 4]
    counts = routing[-1]["layers"][1]["tokens_per_expert"]
    assert list(histogram[-1].histogram_value.bucket) == counts


def test_accumulated_steps_resume_bit_identical_and_log_the_whole_batch(tmp_path, text_file):
    """grad_accum 2 with the global scope and noisy_topk (router noise, and the counting
    pass that must leave the RNG where it found it): stopped at a step boundary and
    resumed, the weights are bit-identical; the logs count optimizer steps and every
    token of the batch."""
    model = micro_model(router="noisy_topk", balance_scope="global", load_loss_coef=0.01)
    straight = make_trainer(tmp_path / "a", text_file, model, grad_accum=2)
    straight.train()
    first = make_trainer(tmp_path / "b", text_file, model, grad_accum=2)
    first.train(stop_at=3)
    resumed = make_trainer(tmp_path / "b", text_file, model, resume=True, grad_accum=2)
    resumed.train()
    assert_bit_identical(weights(straight), weights(resumed))
    assert read_metrics(tmp_path / "a", "val") == read_metrics(tmp_path / "b", "val")
    routing = [json.loads(line) for line in (tmp_path / "a" / "routing.jsonl").open()]
    train = [r for r in routing if r["split"] == "train"]
    assert sum(r["steps"] for r in train) == 6
    tokens_per_step = 4 * 32 * 2  # batch_size x seq_len x top_k, both micro-batches
    for record in train:
        for layer in record["layers"]:
            assert sum(layer["tokens_per_expert"]) == tokens_per_step * record["steps"]
