"""Supervised fine-tuning: the assistant-token mask on worked examples, the chat template as
transformers renders it, bad input named, resume bit-identical, and the command's exports."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.checkpoint import read_checkpoint_state
from moekit.cli import main
from moekit.config import MoEConfig
from moekit.data import train_tokenizer
from moekit.finetune.chat import (
    DEFAULT_TEMPLATE,
    IGNORE,
    ChatTemplate,
    Conversation,
    parse_line,
    read_conversations,
    tokenizer_config,
)
from moekit.finetune.data import pad_batch
from moekit.finetune.job import finetune, load_base
from moekit.interop import load_hf, save_hf
from moekit.models import ModelConfig, Transformer
from moekit.train import load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "What is two plus two? It is four. Hello there, how are you? I am fine, thanks.\n" * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny Mixtral-shaped base as a Hugging Face folder with its tokenizer."""
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        moe=moe,
    )
    folder = tmp_path_factory.mktemp("base") / "hf"
    files = {"tokenizer.json": tokenizer.backend.to_str()}
    return save_hf(Transformer(config), folder, extra_files=files)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    lines = [
        {"prompt": "What is two plus two?", "response": "It is four."},
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "how are you?"},
            {"role": "user", "content": "I am fine"},
            {"role": "assistant", "content": "thanks."},
        ]},
    ] * 6  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _trained_text(tokenizer, ids, trained) -> str:
    return tokenizer.decode([i for i, t in zip(ids, trained) if t])


def test_the_mask_covers_the_assistant_turns_and_their_end_token(tokenizer):
    # Rendered: "<|user|>\nWhat is two plus two?<|endoftext|>\n<|assistant|>\nIt is four.
    # <|endoftext|>\n": only "It is four.<|endoftext|>" is trained; the "\n" after the end
    # token and the "<|assistant|>\n" header are prompt.
    template = ChatTemplate(DEFAULT_TEMPLATE, tokenizer)
    one = parse_line('{"prompt": "What is two plus two?", "response": "It is four."}', "x:1")
    encoded = template.encode(one, max_tokens=100)
    assert tokenizer.decode(encoded.ids) == template.render(one.messages)
    assert _trained_text(tokenizer, encoded.ids, encoded.trained) == "It is four.<|endoftext|>"
    # Two assistant turns: both trained, the user turn between them not.
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "how are you?"},
        {"role": "user", "content": "I am fine"},
        {"role": "assistant", "content": "thanks."},
    ]
    two = template.encode(Conversation(messages), max_tokens=100)
    trained = [tokenizer.decode([i]) for i, t in zip(two.ids, two.trained) if t]
    assert "".join(trained) == "how are you?<|endoftext|>thanks.<|endoftext|>"


def test_padded_batch_targets_are_the_next_assistant_tokens(tokenizer):
    template = ChatTemplate(DEFAULT_TEMPLATE, tokenizer)
    short = template.encode(parse_line('{"prompt": "Hi", "response": "four"}', "x:1"), 100)
    long = template.encode(parse_line('{"prompt": "Hello there", "response": "It is four."}', "x:2"), 100)  # fmt: skip
    inputs_BL, targets_BL = pad_batch([short, long], tokenizer.pad_id)
    assert inputs_BL.shape == targets_BL.shape == (2, len(long.ids) - 1)
    n = len(short.ids) - 1
    assert (inputs_BL[0, n:] == tokenizer.pad_id).all() and (targets_BL[0, n:] == IGNORE).all()
    for row, example in enumerate((short, long)):
        kept = targets_BL[row][targets_BL[row] != IGNORE].tolist()
        want = [i for i, t in zip(example.ids[1:], example.trained[1:]) if t]
        assert kept == want
    assert tokenizer.decode(targets_BL[0][targets_BL[0] != IGNORE].tolist()) == "four<|endoftext|>"


def test_transformers_renders_and_tokenises_the_saved_template_alike(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    config = tokenizer_config(DEFAULT_TEMPLATE, tokenizer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four."},
    ]
    template = ChatTemplate(DEFAULT_TEMPLATE, tokenizer)
    assert hf.apply_chat_template(messages, tokenize=False) == template.render(messages)
    prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == template.render(messages[:1], add_generation_prompt=True)
    ids = hf(template.render(messages), add_special_tokens=False)["input_ids"]
    assert ids == template.encode(Conversation(messages), 100).ids


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "a", "answer": "b"}', r'x\.jsonl:2: needs "messages", or "prompt"'),
        ('{"prompt": "a", "response": "  "}', r"x\.jsonl:2: message 1 is an empty response"),
        ('{"messages": [{"role": "bot", "content": "a"}]}', r"x\.jsonl:2: message 0 has role"),
        ('{"messages": [{"role": "user", "content": "a"}]}', r"x\.jsonl:2: no assistant"),
        ("not json", r"x\.jsonl:2: not valid JSON"),
    ],
)
def test_a_bad_line_is_named(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_conversations(path)


def test_a_template_without_the_end_token_does_not_fit(tokenizer):
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", tokenizer)
    with pytest.raises(ValueError, match="does not fit the tokenizer.*'<\\|endoftext\\|>'"):
        template.encode(parse_line('{"prompt": "a", "response": "b"}', "x:1"), 100)


def test_a_base_that_cannot_be_loaded_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=f"cannot load base '{tmp_path}'"):
        load_base(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        load_base(tmp_path / "missing")


def test_the_command_refuses_bad_input_and_overwrites_nothing(tmp_path, base_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    out = tmp_path / "out"
    code = main(["finetune", str(base_dir), "--data", str(bad), "--out", str(out)])
    assert code == 2 and f"{bad}:2: needs" in capsys.readouterr().err
    assert not out.exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "tokenizer.json").write_text("mine")
    code = main(["finetune", str(base_dir), "--data", str(bad), "--out", str(taken)])
    assert code == 2 and "already holds files" in capsys.readouterr().err
    assert (taken / "tokenizer.json").read_text() == "mine"


def _weights(run_dir) -> dict:
    from safetensors.torch import load_file

    folder, _ = read_checkpoint_state(run_dir)
    return load_file(folder / "model.safetensors")


def test_a_resumed_run_ends_with_the_same_weights(tmp_path, base_dir, data_file):
    overrides = {
        "train.steps": "6",
        "train.batch_size": "4",
        "train.checkpoint_every": "3",
        "lora.rank": "4",
        "lora.dropout": "0.1",
        "lora.targets": "attention,experts,router",
    }
    straight = finetune(base_dir, data_file, tmp_path / "a", overrides, show_progress=False)
    finetune(base_dir, data_file, tmp_path / "b", overrides, show_progress=False, stop_at=3)
    resumed = finetune(None, None, tmp_path / "b", {}, resume=True, show_progress=False)
    assert straight.train.steps == resumed.train.steps == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_finetune_command_writes_a_chat_model_and_a_peft_adapter(tmp_path, base_dir, data_file):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "sft"
    args = ["finetune", str(base_dir), "--data", str(data_file), "--out", str(out)]
    args += ["--steps", "2", "--train.batch_size", "4", "--lora.rank", "4", "--no-progress"]
    assert main(args) == 0
    for name in ("hf/config.json", "adapter/adapter_config.json", "merged/model.safetensors"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    # moekit reads the LoRA run back with its adapters merged: the merged export's logits
    tokens = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        ours = load_trained_model(out)(tokens).logits
        torch.testing.assert_close(load_hf(out / "merged")(tokens).logits, ours)
    hf = transformers.AutoTokenizer.from_pretrained(out / "merged")
    messages = [{"role": "user", "content": "Hello"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nHello<|endoftext|>\n<|assistant|>\n"
    )


def test_the_instruction_set_is_deterministic_and_holds_families_out():
    from moekit.finetune.instructions import HELD_OUT, build_instructions, math_answer

    train, held_out = build_instructions(num_math=60)
    again, _ = build_instructions(num_math=60)
    assert [c.messages for c in train] == [c.messages for c in again]
    assert {c.family for c in held_out} == set(HELD_OUT)
    assert not {c.family for c in train} & set(HELD_OUT)
    families = {c.family for c in train}
    assert {"python-explain", "chat-greetings", "math-addition"} <= families
    division = next(c for c in held_out if c.family == "math-division")
    assert math_answer(division.messages[1]["content"]).count("remainder") == 1
    for conversation in train + held_out:  # every example passes the data checks
        parse_line(json.dumps({"messages": conversation.messages}), conversation.source)


def test_router_freezing_and_aux_losses_are_settings(base_dir):
    from moekit.finetune.job import FinetuneConfig, prepare_model
    from moekit.models.lora import LoRAConfig

    base, _ = load_base(base_dir)
    frozen, _ = prepare_model(base, {}, LoRAConfig(), FinetuneConfig(train_router=False))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and not any(".router." in n for n in trainable)
    assert frozen.training  # a loaded base comes in eval mode; dropout and noise must act
    base, _ = load_base(base_dir)
    quiet, train = prepare_model(
        base, {"train.lr": "1e-4"}, LoRAConfig(), FinetuneConfig(aux_losses=False)
    )
    assert quiet.config.moe.balance_loss_coef == 0 and train.lr == 1e-4
    assert quiet(torch.zeros(1, 4, dtype=torch.long)).aux_loss.item() == 0.0
    with pytest.raises(ValueError, match="contradicts lora.targets 'router'"):
        prepare_model(
            base, {}, LoRAConfig(rank=2, targets="router"), FinetuneConfig(train_router=False)
        )
    with pytest.raises(ValueError, match="do not fit the base's weights"):
        prepare_model(base, {"model.num_experts": "8"}, LoRAConfig(), FinetuneConfig())
    with pytest.raises(ValueError, match=r"train.seq_len \(100\) exceeds"):
        prepare_model(base, {"train.seq_len": "100"}, LoRAConfig(), FinetuneConfig())


@pytest.mark.slow
def test_the_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    from moekit.finetune.demo import DemoBudget, run_demo

    budget = DemoBudget(
        pretrain_steps=4, finetune_steps=3, eval_per_family=2, exact_match_per_family=1
    )
    results = run_demo(tmp_path, seeds=1, show_progress=False, budget=budget)
    assert set(results["seeds"][0]) == {"moe", "moe, router frozen", "dense"}
    assert "| moe, router frozen |" in results["table"]
    assert (tmp_path / "results.json").is_file()


def test_demo_budget_overrides_are_parsed_and_checked():
    from moekit.finetune.cli import _demo_budget

    assert _demo_budget(["--demo.pretrain_steps", "600"]).pretrain_steps == 600
    with pytest.raises(ValueError, match="--demo.FIELD settings"):
        _demo_budget(["--train.steps", "3"])
    with pytest.raises(ValueError, match="expects an integer"):
        _demo_budget(["--demo.pretrain_steps", "many"])


def test_lora_settings_without_a_rank_warn():
    from moekit.finetune.job import split_overrides

    with pytest.warns(UserWarning, match="lora.alpha, lora.targets: no effect without lora.rank"):
        split_overrides({"lora.targets": "experts", "lora.alpha": "4"})
