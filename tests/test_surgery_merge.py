"""Branch-Train-MiX: merging K identical models gives the single model, experts are the
domain models' FFNs, stage 1 leaves everything but the routers unchanged, the routing
matrix counts every assignment, and the experiment and the CLI run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from moekit.data import CorpusConfig
from moekit.models import ModelConfig, Transformer
from moekit.surgery import merge_dense_models
from moekit.surgery.btx import (
    BTXSettings,
    branch_train_mix,
    evaluate_by_domain,
    format_btx,
)
from moekit.train import TrainConfig, load_trained_model, prepare_run_data

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = ModelConfig(
    vocab_size=320, d_model=16, num_layers=2, num_heads=2, max_seq_len=32, d_hidden=32
)


def dense(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(MICRO).eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_merging_identical_models_with_equal_router_rows_gives_the_model():
    model = dense(0)
    merged = merge_dense_models([model, model, model], top_k=2).eval()
    with torch.no_grad():  # equal rows: every token splits evenly over identical experts
        for layer in merged.layers:
            layer.ffn.router.weight.copy_(layer.ffn.router.weight[0].expand(3, -1))
    torch.testing.assert_close(merged(batch()).logits, model(batch()).logits, rtol=1e-5, atol=1e-5)


def test_experts_are_the_models_ffns_and_the_rest_is_averaged():
    models = [dense(seed) for seed in range(3)]
    merged = merge_dense_models(models, top_k=1, router="softmax_topk")
    for k, model in enumerate(models):
        for i in range(MICRO.num_layers):
            assert torch.equal(
                merged.layers[i].ffn.experts.w_up[k], model.layers[i].ffn.up.weight.t()
            )
            assert torch.equal(
                merged.layers[i].ffn.experts.w_down[k], model.layers[i].ffn.down.weight.t()
            )
    mean = sum(m.layers[1].attn.wq.weight for m in models) / 3
    torch.testing.assert_close(merged.layers[1].attn.wq.weight, mean)
    torch.testing.assert_close(merged.tok_embed.weight, sum(m.tok_embed.weight for m in models) / 3)
    assert merged.lm_head.weight is merged.tok_embed.weight  # still tied


def test_merge_refuses_one_model_and_different_configs():
    with pytest.raises(ValueError, match="at least 2"):
        merge_dense_models([dense(0)])
    other = Transformer(
        ModelConfig(vocab_size=320, d_model=16, num_layers=3, num_heads=2, max_seq_len=32)
    )
    with pytest.raises(ValueError, match="config differs"):
        merge_dense_models([dense(0), other])


TINY_CORPUS = CorpusConfig(
    code_modules=("colorsys.py", "bisect.py"), max_prose_topics=6, max_languages=1,
    num_math_problems=150, code_chunk_chars=1500,
)  # fmt: skip


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("btx")
    settings = BTXSettings(
        domains=("code", "math"), parent_steps=4, branch_steps=3, router_steps=3, joint_steps=2
    )
    train = TrainConfig(batch_size=4, seq_len=32, eval_every=50, eval_batches=2)
    result = branch_train_mix(
        out,
        MICRO,
        train,
        settings,
        corpus_config=TINY_CORPUS,
        show_progress=False,
        log=lambda _: None,
    )
    return out, result


def test_stage_one_changes_only_the_routers(experiment):
    out, _ = experiment
    start = _checkpoint_at_step_zero(out / "mix" / "stage1")
    after = load_trained_model(out / "mix" / "stage1").state_dict()
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    assert changed and all(".router." in k for k in changed), changed
    # stage 2 trains everything
    stage2 = load_trained_model(out / "mix" / "stage2").state_dict()
    assert not torch.equal(stage2["layers.0.ffn.experts.w_up"], after["layers.0.ffn.experts.w_up"])


def _checkpoint_at_step_zero(run_dir):
    """The weights the stage started from: the merge of the two branches."""
    branches = [load_trained_model(run_dir.parent.parent / f"branch-{d}") for d in ("code", "math")]
    merged = merge_dense_models(branches, top_k=2, router="softmax_topk")
    return merged.state_dict()


def test_routing_matrix_rows_sum_to_top_k_times_the_domain_tokens(experiment):
    out, result = experiment
    model = load_trained_model(out / "mix" / "stage2")
    validation = prepare_run_data(out / "parent").validation
    evaluation = evaluate_by_domain(model, validation, batch_size=4, seq_len=32)
    domains = [d for d in evaluation.tokens if d != "all"]
    assert len(evaluation.routing) == MICRO.num_layers
    for counts_GE in evaluation.routing:
        assert counts_GE.shape == (len(domains), 2)
        np.testing.assert_array_equal(
            counts_GE.sum(axis=1), [2 * evaluation.tokens[d] for d in domains]
        )
    assert sum(evaluation.tokens[d] for d in domains) == evaluation.tokens["all"]
    assert result["routing"]["BTX"] == [m.tolist() for m in evaluation.routing]


def test_per_domain_losses_average_to_the_overall_loss(experiment):
    _, result = experiment
    tokens = result["tokens"]
    for losses in result["losses"].values():
        weighted = sum(losses[d] * tokens[d] for d in result["domains"]) / tokens["all"]
        assert weighted == pytest.approx(losses["all"], rel=1e-6)


def test_experiment_writes_every_run_and_the_table(experiment):
    out, result = experiment
    assert json.loads((out / "btx.json").read_text())["losses"] == result["losses"]
    assert set(result["losses"]) == {
        "parent", "branch code", "branch math", "BTX stage 1", "BTX", "parent +11"
    }  # fmt: skip
    # the baseline trained as many extra steps as both branches and both stages
    assert json.loads((out / "baseline" / "config.json").read_text())["train"]["steps"] == 11
    table = format_btx(result)
    assert "BTX layer 1" in table and "parent +11" in table


def test_cli_merges_runs_and_trains_both_stages(experiment, tmp_path):
    out, _ = experiment
    code, stdout, stderr = run_cli(
        "merge", str(out / "branch-code"), str(out / "branch-math"), "--parent", str(out / "parent"),
        "--out", str(tmp_path / "mix"), "--router-steps", "2", "--joint-steps", "2", "--top-k", "1",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert "stage2" in stdout
    model = load_trained_model(tmp_path / "mix" / "stage2")
    assert (model.config.moe.num_experts, model.config.moe.top_k) == (2, 1)
    code, _, stderr = run_cli("merge", str(out / "branch-code"), "--out", str(tmp_path / "x"))
    assert code == 2 and "moekit merge: error: give two or more runs" in stderr


def test_trainable_patterns_freeze_the_rest_and_must_match():
    from moekit.train.optim import build_optimizer

    merged = merge_dense_models([dense(0), dense(1)])
    optimizer = build_optimizer(merged, TrainConfig(trainable="*.router.*, norm.*"))
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in merged.named_parameters():
        assert param.requires_grad == (".router." in name or name == "norm.weight")
        assert (id(param) in trained) == param.requires_grad
    with pytest.raises(ValueError, match=r"\['nothing\.\*'\] match no parameter"):
        build_optimizer(merged, TrainConfig(trainable="nothing.*"))
    with pytest.raises(ValueError, match="names no parameter pattern"):
        TrainConfig(trainable=" , ")
