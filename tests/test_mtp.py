"""DeepSeek-V3's multi-token prediction (models/mtp.py): the loss and its gradient equal a
direct reimplementation of the paper's eqs. (21)-(25) (shortened sequences, a hand-written
cross entropy); mtp_depth 0 changes nothing and the MTP modules never change the main
model's weights, logits, loss or generation; compile; the Trainer and the CLI train it and
resume bit-identically; accounting and LoRA see the modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import run_cli

from moekit import MoEConfig
from moekit.generate import generate
from moekit.interop import famous, save_hf
from moekit.interop.accounting import count_by_part
from moekit.models import ModelConfig, Transformer, count_parameters, dense_twin, published
from moekit.models.lora import LoRAConfig, add_lora
from moekit.train import (
    TrainConfig,
    Trainer,
    load_trained_model,
    prepare_run_data,
    read_metrics,
    train_from,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MLA = dict(
    attention="mla", q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
    v_head_dim=4,
)  # fmt: skip


def micro(mtp_depth: int = 1, **overrides) -> ModelConfig:
    """DeepSeek-V3's kind at micro size: MLA, first layer dense, sigmoid-routed MoE."""
    moe = MoEConfig(
        d_model=16, d_hidden=8, num_experts=4, top_k=2, router="sigmoid_topk", num_groups=2,
        num_shared_experts=1,
    )  # fmt: skip
    settings = dict(
        vocab_size=48, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, moe=moe,
        first_dense_layers=1, d_hidden=24, tied_embeddings=False, mtp_depth=mtp_depth, **MLA,
    )  # fmt: skip
    return ModelConfig(**(settings | overrides))


def build(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config)


def batch(seed: int = 1, B: int = 2, T: int = 10, vocab: int = 48):
    generator = torch.Generator().manual_seed(seed)
    tokens_BT = torch.randint(0, vocab, (B, T), generator=generator)
    targets_BT = torch.randint(0, vocab, (B, T), generator=generator)
    return tokens_BT, targets_BT


def hand_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """-log softmax at the target, averaged over the targets that are not -100 (0 if none)."""
    keep = targets_N != -100
    if not keep.any():
        return logits_NV.new_zeros(())
    log_probs = logits_NV[keep].float().log_softmax(-1)
    return -log_probs.gather(1, targets_N[keep, None]).mean()


def reference_mtp_loss(model: Transformer, tokens_BT, targets_BT) -> torch.Tensor:
    """The paper's form: module k runs on the T - k positions that have a target, the
    embedding and head are the main model's, and L = lambda / D * sum_k CE_k."""
    cfg, T = model.config, tokens_BT.shape[1]
    h_BTD = model.tok_embed(tokens_BT)
    where = model.place(tokens_BT, None, None)
    for block in model.layers:
        h_BTD, _ = block(h_BTD, where, None)
    total = 0.0
    for k, module in enumerate(model.mtp, start=1):
        n = T - k  # positions i = 0 .. T-k-1 have the input t_{i+k} and the target t_{i+k+1}
        if n <= 0:
            continue
        h_BnD = h_BTD[:, :n]
        merged = torch.cat(
            [module.embed_norm(model.tok_embed(tokens_BT[:, k:])), module.hidden_norm(h_BnD)], -1
        )
        where = model.place(tokens_BT[:, :n], None, None)  # positions 0 .. n-1
        h_BTD, _ = module.block(merged @ module.proj.weight.T, where, None)
        logits = model.lm_head(module.norm(h_BTD))
        total = total + hand_cross_entropy(logits.flatten(0, 1), targets_BT[:, k:].flatten())
    return total * cfg.mtp_loss_weight / cfg.mtp_depth


@pytest.mark.parametrize("depth", [1, 2])
def test_loss_and_gradient_equal_the_papers_form(depth):
    model = build(micro(depth))
    tokens_BT, targets_BT = batch()
    targets_BT[0, 3] = targets_BT[1, 7] = targets_BT[1, 9] = -100  # ignored, as in the main loss
    out = model(tokens_BT, targets_BT)
    out.mtp_loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = reference_mtp_loss(model, tokens_BT, targets_BT)
    expected.backward()
    torch.testing.assert_close(out.mtp_loss, expected, atol=1e-6, rtol=1e-5)
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    # the shared embedding and head, the main layers and every MTP module are trained
    assert {"tok_embed.weight", "lm_head.weight", "layers.0.attn.wo.weight"} <= got.keys()
    assert all(f"mtp.{k}.proj.weight" in got for k in range(depth))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_padding_predicts_nothing_and_a_left_padded_row_equals_the_row_alone():
    model = build(micro(2))
    tokens_BT, targets_BT = batch(B=1, T=8)
    alone = model(tokens_BT, targets_BT).mtp_loss
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded_BT, padded_targets_BT = torch.cat([pad, tokens_BT], 1), torch.cat([pad - 100, targets_BT], 1)  # fmt: skip
    mask_BT = torch.cat([pad, torch.ones_like(tokens_BT)], 1)
    padded = model(padded_BT, padded_targets_BT, attention_mask_BT=mask_BT).mtp_loss
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=1e-5)


def test_lambda_scales_the_loss_and_the_modules_moe_adds_aux_loss_and_stats():
    tokens_BT, targets_BT = batch()
    out = build(micro(2))(tokens_BT, targets_BT)
    half = build(micro(2, mtp_loss_weight=0.15))(tokens_BT, targets_BT)
    torch.testing.assert_close(half.mtp_loss, out.mtp_loss / 2)
    main = build(micro(0))(tokens_BT, targets_BT)
    assert len(out.stats) == len(main.stats) == 2  # the main layers' list is unchanged
    assert len(out.mtp_stats) == 2 and all(s is not None for s in out.mtp_stats)
    assert out.mtp_stats[0].tokens_per_expert.sum() == 2 * 10 * 2  # B * T * top_k
    assert out.aux_loss > main.aux_loss  # the modules' balance losses are added


def test_without_targets_or_with_only_ignored_ones_the_loss_is_zero():
    model = build(micro(2))
    tokens_BT, targets_BT = batch(T=2)  # D = 2 needs T > 2 for a single target
    targets_BT[:, 1] = -100  # module 1's only target
    assert model(tokens_BT, targets_BT).mtp_loss.item() == 0.0
    assert model(tokens_BT).mtp_loss.item() == 0.0


def test_mtp_changes_neither_the_main_weights_nor_logits_loss_or_generation():
    tokens_BT, targets_BT = batch()
    without, with_mtp = build(micro(0)), build(micro(2))
    main_state, state = without.state_dict(), with_mtp.state_dict()
    # same seed: the main weights are bit-identical; the modules add keys under mtp.{k}.
    assert {k for k in state if not k.startswith("mtp.")} == main_state.keys()
    assert {k.split(".")[1] for k in state if k.startswith("mtp.")} == {"0", "1"}
    for name, value in main_state.items():
        assert torch.equal(state[name], value), name
    a, b = without(tokens_BT, targets_BT), with_mtp(tokens_BT, targets_BT)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert a.mtp_loss.item() == 0.0 and a.mtp_stats == [] and b.mtp_loss > 0
    assert torch.equal(without(tokens_BT, num_logits=1).logits, with_mtp(tokens_BT, num_logits=1).logits)  # fmt: skip
    # generation (prefill and decode through the KV cache) ignores the modules
    ga, gb = (
        generate(m.eval(), tokens_BT[:, :4], max_new_tokens=4, temperature=0.0)
        for m in (without, with_mtp)
    )
    assert torch.equal(ga.tokens_BN, gb.tokens_BN) and torch.equal(ga.logits_BNV, gb.logits_BNV)


def test_mtp_depth_zero_is_the_default_and_adds_nothing():
    with pytest.warns(UserWarning, match="mtp_loss_weight has no effect with mtp_depth 0"):
        config = dataclasses.replace(micro(0), mtp_loss_weight=0.1)
    assert ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=1).mtp_depth == 0
    model = build(config)
    assert len(model.mtp) == 0 and not any(k.startswith("mtp") for k in model.state_dict())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mtp_depth": -1}, r"mtp_depth \(-1\)"),
        ({"mtp_depth": 1.5}, r"mtp_depth \(1.5\)"),
        ({"mtp_depth": True}, r"mtp_depth \(True\)"),
        ({"mtp_loss_weight": -0.1}, r"mtp_loss_weight \(-0.1\)"),
        ({"mtp_loss_weight": "0.3"}, r"mtp_loss_weight \('0.3'\)"),
    ],
)
def test_bad_settings_are_one_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        micro(**({"mtp_depth": 1} | settings))


def test_module_block_is_the_last_layers_kind():
    moe_last = build(micro(1))
    assert type(moe_last.mtp[0].block.attn) is type(moe_last.layers[-1].attn)
    assert type(moe_last.mtp[0].block.ffn).__name__ == "MoE"
    twin = dense_twin(micro(1))
    assert twin.mtp_depth == 1
    assert type(build(twin).mtp[0].block.ffn).__name__ == "MLP"


def test_compiled_training_forward_is_one_graph_and_equals_eager():
    torch._dynamo.reset()
    model = build(micro(2))
    tokens_BT, targets_BT = batch()

    def loss(tokens_BT, targets_BT):
        out = model(tokens_BT, targets_BT)
        return out.loss + out.aux_loss + out.mtp_loss, out.mtp_loss

    explanation = torch._dynamo.explain(loss)(tokens_BT, targets_BT)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    results = []
    for step in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        total, mtp_loss = step(tokens_BT, targets_BT)
        total.backward()
        results.append((mtp_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))  # fmt: skip
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_accounting_counts_the_modules_in_their_own_part():
    config, plain = micro(2), micro(0)
    counted, base = count_parameters(config), count_parameters(plain)
    model = build(config)
    module_params = sum(p.numel() for p in model.mtp.parameters())
    assert counted.total == base.total + module_params == sum(p.numel() for p in model.parameters())
    parts = count_by_part(config)
    assert parts.total["mtp"] == module_params and count_by_part(plain).total["mtp"] == 0
    assert parts.total_params == counted.total and parts.active_params == counted.active
    # each module's routed experts count by top_k / E = 1/2, like the main layers'
    routed = sum(p.numel() for p in model.mtp[0].block.ffn.experts.parameters())
    assert parts.total["mtp"] - parts.active["mtp"] == 2 * routed // 2
    assert any(note.startswith("mtp: 2") for note in parts.notes)


def test_deepseek_v3_module_count_equals_the_published_accounting_formula():
    # interop/famous.py sizes DeepSeek-V3's MTP module from its widths (11.61B)
    config = dataclasses.replace(published.deepseek_v3(), mtp_depth=1)
    assert count_by_part(config).total["mtp"] == famous.deepseek_v3().excluded["mtp_module"]


def test_saving_the_modules_in_a_layout_without_them_is_refused(tmp_path):
    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2)
    config = ModelConfig(
        vocab_size=48, d_model=16, num_layers=1, num_heads=2, moe=moe, mtp_depth=1,
        tied_embeddings=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"mixtral layout has no place for the tensors \[mtp\.0"):
        save_hf(build(config), tmp_path / "out", architecture="mixtral")


def test_lora_refuses_a_model_with_mtp_modules_naming_them():
    # adapters cover the decoder layers only (models/lora.py)
    with pytest.raises(ValueError, match=r"mtp\.0\.block\.attn, mtp\.0\.block\.ffn"):
        add_lora(build(micro(1)), LoRAConfig(rank=2, targets="experts"))


# ---------------------------------------------------------------- training


def trainer(run_dir, text_file, resume=False) -> Trainer:
    config = micro(1, vocab_size=384, max_seq_len=32)
    data = prepare_run_data(run_dir, data=text_file, vocab_size=config.vocab_size)
    settings = TrainConfig(
        steps=5, batch_size=2, seq_len=32, eval_every=5, eval_batches=1, checkpoint_every=10
    )
    return Trainer(config, settings, run_dir, data=data, resume=resume, show_progress=False)


def test_trainer_logs_and_trains_the_mtp_loss_and_resumes_bit_identically(tmp_path, text_file):
    straight = trainer(tmp_path / "a", text_file)
    before = straight.model.mtp[0].proj.weight.detach().clone()
    straight.train()
    records = read_metrics(tmp_path / "a", "train")
    assert all(r["mtp_loss"] > 0 for r in records)
    assert not torch.equal(straight.model.mtp[0].proj.weight, before)  # trained
    first = trainer(tmp_path / "b", text_file)
    first.train(stop_at=2)
    resumed = trainer(tmp_path / "b", text_file, resume=True)
    assert resumed.step == 2
    resumed.train()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("mtp.0.") for k in a) and a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
    assert [r["mtp_loss"] for r in read_metrics(tmp_path / "b", "train")] == [
        r["mtp_loss"] for r in records
    ]


def test_a_run_started_from_another_may_lower_lambda_and_nothing_else(tmp_path, text_file):
    trainer(tmp_path / "early", text_file).train(stop_at=2)
    with pytest.raises(ValueError, match=r"drop --model.mtp_depth \(of its settings only --model.mtp_loss_weight"):  # fmt: skip
        train_from(tmp_path / "early", tmp_path / "x", overrides={"model.mtp_depth": "2"})
    overrides = {"model.mtp_loss_weight": "0.1", "train.steps": "2"}
    train_from(tmp_path / "early", tmp_path / "late", overrides=overrides, show_progress=False)
    late = load_trained_model(tmp_path / "late")
    assert late.config.mtp_loss_weight == 0.1 and late.config.mtp_depth == 1
    assert [r["step"] for r in read_metrics(tmp_path / "late", "train")] == [1, 2]


def test_cli_trains_deepseek_v3_tiny_with_mtp_and_its_dense_twin(tmp_path, text_file):
    out = tmp_path / "cmp"
    code, _, stderr = run_cli(
        "train", "--data", str(text_file), "--out", str(out), "--preset", "deepseek_v3_tiny",
        "--model.mtp_depth", "1", "--model.vocab_size", "384", "--model.d_model", "32",
        "--model.num_layers", "2", "--model.max_seq_len", "32", "--steps", "3",
        "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
        "--train.eval_batches", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    for run in ("moe", "dense"):
        model = load_trained_model(out / run)
        assert model.config.mtp_depth == 1 and len(model.mtp) == 1
        assert [r["step"] for r in read_metrics(out / run, "train")] == [1, 2, 3]
        assert all(r["mtp_loss"] > 0 for r in read_metrics(out / run, "train"))


def fsdp_trainer_worker(folder: str, text: str) -> None:
    """FSDP x EP 2 through the Trainer (built on the meta device, sharded checkpoints): a
    stopped and resumed run ends bit-identical to an uninterrupted one, and both equal one
    process's losses, MTP losses and weights."""
    import torch.distributed as dist

    from moekit.parallel import init_parallel

    mesh = init_parallel(2, timeout_s=120, device=torch.device("cpu"), fsdp=True)
    config = micro(1, vocab_size=384, max_seq_len=32)
    # No balance loss: a rank's f_i * P_i over its own tokens is not the global one.
    config.moe = dataclasses.replace(config.moe, balance_loss_coef=0.0)
    settings = TrainConfig(
        steps=4, batch_size=4, seq_len=32, eval_every=2, eval_batches=1, checkpoint_every=2
    )

    def run(name: str, mesh, resume: bool = False) -> Trainer:
        data = prepare_run_data(f"{folder}/{name}", data=text, vocab_size=384, mesh=mesh)
        return Trainer(
            config, settings, f"{folder}/{name}", data=data, mesh=mesh, resume=resume,
            show_progress=False,
        )  # fmt: skip

    run("whole", mesh).train()
    run("stopped", mesh).train(stop_at=2)
    run("stopped", mesh, resume=True).train()
    if mesh.rank == 0:
        whole = load_trained_model(f"{folder}/whole").state_dict()
        again = load_trained_model(f"{folder}/stopped").state_dict()
        assert any(name.startswith("mtp.0.block.ffn.experts.") for name in whole)
        for name, tensor in whole.items():
            assert torch.equal(tensor, again[name]), name
        run("single", None).train()
        single = load_trained_model(f"{folder}/single").state_dict()
        for name, tensor in single.items():
            torch.testing.assert_close(whole[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
        records = [read_metrics(f"{folder}/{r}", "train") for r in ("whole", "single")]
        for got, want in zip(*records):
            assert abs(got["mtp_loss"] - want["mtp_loss"]) <= 1e-5 * want["mtp_loss"]
            assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"]
    dist.barrier()


@pytest.mark.distributed
def test_trainer_under_fsdp_x_ep_equals_one_process_and_resumes(tmp_path, text_file):
    from moekit.parallel.launch import spawn_local

    spawn_local(fsdp_trainer_worker, (str(tmp_path), str(text_file)), world_size=2, timeout_s=300)
