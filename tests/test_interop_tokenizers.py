"""Converted checkpoints keep their own tokenizer's special tokens, in every command.

Each architecture moekit converts gets a tiny random transformers model and a tokenizer
of another special-token convention (built here with `tokenizers`, nothing downloaded):

    mixtral    Llama's: <s> prepended by the post-processor, </s> ends, no pad token
    qwen2_moe  Qwen's: <|im_end|> ends a reply, <|endoftext|> pads and also ends
               (generation_config lists both)
    qwen3_moe  GPT-2's: <|endoftext|> only (bos = eos), no pad token
    olmoe      OLMoE's: <|endoftext|> ends, <|padding|> pads, both added after training
               (ids at the end of the vocabulary), named as {"content": ...} dicts
    deepseek_v3  DeepSeek's: <｜begin▁of▁sentence｜> first (by the post-processor; its
               add_bos_token says so too), <｜end▁of▁sentence｜> ends and pads
    gpt_oss    gpt-oss's: <|return|> ends a reply, <|call|> a tool call, <|endoftext|>
               pads; generation_config lists all three; <|startoftext|> is bos, not added

The oracles are transformers' own tokenizer (prompt ids) and generate() (greedy ids and
where they stop), and the ids the checkpoint's files name.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import hf_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from moekit.cli import main
from moekit.data import SPECIAL_TOKENS_FILE, Tokenizer, load_documents, tokenize_documents
from moekit.train import generate_text

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the quick brown fox jumps over the lazy dog. a mixture of experts routes tokens. "
PROMPT = "the quick brown"


def _added_token(content: str) -> dict:
    """A token as older transformers versions wrote it into tokenizer_config.json."""
    flags = dict.fromkeys(("lstrip", "normalized", "rstrip", "single_word"), False)
    return {"__type": "AddedToken", "content": content, **flags, "special": True}


# per architecture: special tokens (trained in at ids 0.., or added after training),
# tokenizer_config.json, config.json / generation_config.json ids (by token), what the
# tokenizer must come out as, and the eos the model is made to emit.
CONVENTIONS = {
    "mixtral": dict(
        trained=["<unk>", "<s>", "</s>"],
        post_bos="<s>",
        tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        config={"bos_token_id": "<s>", "eos_token_id": "</s>"},
        want=dict(eos=["</s>"], bos="<s>", pad=None, add_bos=True),
        stop="</s>",
    ),
    "qwen2_moe": dict(
        trained=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        tokenizer_config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        config={"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"},
        generation={"eos_token_id": ["<|im_end|>", "<|endoftext|>"]},
        want=dict(eos=["<|im_end|>", "<|endoftext|>"], bos="<|endoftext|>", pad="<|endoftext|>"),
        stop="<|endoftext|>",  # not the document separator: generation stops at any eos
    ),
    "qwen3_moe": dict(
        trained=["<|endoftext|>"],
        tokenizer_config={
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_bos_token": False,
        },
        config={"bos_token_id": "<|endoftext|>", "eos_token_id": "<|endoftext|>"},
        want=dict(eos=["<|endoftext|>"], bos="<|endoftext|>", pad=None),
        stop="<|endoftext|>",
    ),
    "olmoe": dict(
        added=["<|endoftext|>", "<|padding|>"],
        tokenizer_config={
            "eos_token": _added_token("<|endoftext|>"),
            "pad_token": _added_token("<|padding|>"),
            "bos_token": None,
        },
        config={"eos_token_id": "<|endoftext|>", "pad_token_id": "<|padding|>"},
        want=dict(eos=["<|endoftext|>"], bos=None, pad="<|padding|>"),
        stop="<|endoftext|>",
    ),
    "deepseek_v3": dict(
        trained=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        post_bos="<｜begin▁of▁sentence｜>",
        tokenizer_config={
            "bos_token": "<｜begin▁of▁sentence｜>",
            "eos_token": "<｜end▁of▁sentence｜>",
            "pad_token": "<｜end▁of▁sentence｜>",
            "add_bos_token": True,
        },
        config={
            "bos_token_id": "<｜begin▁of▁sentence｜>",
            "eos_token_id": "<｜end▁of▁sentence｜>",
        },
        want=dict(
            eos=["<｜end▁of▁sentence｜>"],
            bos="<｜begin▁of▁sentence｜>",
            pad="<｜end▁of▁sentence｜>",
            add_bos=True,
        ),
        stop="<｜end▁of▁sentence｜>",
    ),
    "gpt_oss": dict(
        trained=["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>"],
        tokenizer_config={
            "bos_token": "<|startoftext|>",
            "eos_token": "<|return|>",
            "pad_token": "<|endoftext|>",
        },
        config={"eos_token_id": "<|return|>", "pad_token_id": "<|endoftext|>"},
        generation={"eos_token_id": ["<|return|>", "<|call|>", "<|endoftext|>"]},
        want=dict(
            eos=["<|return|>", "<|call|>", "<|endoftext|>"],
            bos="<|startoftext|>",
            pad="<|endoftext|>",
        ),
        stop="<|call|>",
    ),
}
ARCHS = tuple(CONVENTIONS)


def _backend(convention: dict) -> HFTokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=convention.get("trained", []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT] * 4, trainer=trainer)
    backend.add_special_tokens(convention.get("added", []))
    if bos := convention.get("post_bos"):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    return backend


def _ids(backend: HFTokenizer, value):
    return (
        [_ids(backend, v) for v in value] if isinstance(value, list) else backend.token_to_id(value)
    )


def _greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None
    )
    return out[0, len(prompt_ids) :].tolist()


def _tiny_model(arch: str, **overrides):
    """A tiny random transformers model of arch (tests/builders.py, the contract's shapes)."""
    return hf_model(arch, **overrides)


def make_checkpoint(arch: str, folder) -> dict:
    """A Hugging Face folder for arch with its convention's tokenizer, whose greedy
    continuation of PROMPT ends with the convention's stop token after a few tokens.
    Returns {"prompt_ids", "continuation" (before the stop), "stop"}."""
    convention = CONVENTIONS[arch]
    backend = _backend(convention)
    ids = {key: _ids(backend, value) for key, value in convention["config"].items()}
    model = _tiny_model(arch, vocab_size=backend.get_vocab_size(), **ids)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"} | convention[
        "tokenizer_config"
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt_ids = hf_tokenizer(PROMPT)["input_ids"]
    # Swap two rows of the output layer: where the greedy continuation would first emit a
    # new token, the model now emits the stop token (earlier steps are unchanged).
    stop = backend.token_to_id(convention["stop"])
    tokens = _greedy(model, prompt_ids, 6)
    k = next(
        (i for i in range(1, 6) if tokens[i] not in tokens[:i] + [stop]),
        0,
    )
    assert stop not in tokens[: k + 1]
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[[stop, tokens[k]]] = weight[[tokens[k], stop]]
    model.save_pretrained(folder)
    if "generation" in convention:
        generation = {key: _ids(backend, v) for key, v in convention["generation"].items()}
        (folder / "generation_config.json").write_text(json.dumps(generation))
    # transformers' generate stops at the ids the saved files name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = reloaded.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    assert out[0, len(prompt_ids) :].tolist() == tokens[:k] + [stop]
    return {"prompt_ids": prompt_ids, "continuation": tokens[:k], "stop": stop}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{arch: (Hugging Face folder, converted run directory, make_checkpoint's facts)}."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(arch)
        facts = make_checkpoint(arch, root / "hf")
        assert main(["convert", str(root / "hf"), str(root / "run")]) == 0
        out[arch] = (root / "hf", root / "run", facts)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": TEXT * (i % 3 + 1)}) + "\n" for i in range(60)))
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_records_the_checkpoints_special_tokens(converted, arch):
    hf, run, _ = converted[arch]
    want = CONVENTIONS[arch]["want"]
    recorded = json.loads((run / SPECIAL_TOKENS_FILE).read_text())
    assert recorded["eos_tokens"] == want["eos"]
    assert (recorded["bos_token"], recorded["pad_token"]) == (want["bos"], want["pad"])
    assert recorded["add_bos_token"] is want.get("add_bos", False)
    tokenizer, hf_tokenizer = Tokenizer.load(run), transformers.AutoTokenizer.from_pretrained(hf)
    assert (run / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert tokenizer == Tokenizer.load(hf)  # read from the Hugging Face files directly
    assert tokenizer.eot_id == hf_tokenizer.eos_token_id
    assert [tokenizer.token(i) for i in tokenizer.eos_ids] == want["eos"]
    # no pad token: padding falls back to the document separator
    assert tokenizer.pad_id == hf_tokenizer.convert_tokens_to_ids(want["pad"] or want["eos"][0])
    # prompts encode as transformers encodes them (with <s> first for mixtral)
    for text in (PROMPT, "a mixture of experts"):
        assert tokenizer.encode_prompt(text) == hf_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_stops_at_the_checkpoints_eos(converted, arch, capsys):
    _, run, facts = converted[arch]
    pieces = list(generate_text(run, PROMPT, max_new_tokens=8, temperature=0))
    assert [p.token for p in pieces] == facts["continuation"]
    capsys.readouterr()
    args = ["generate", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "8"]
    assert main(args) == 0
    # a byte-level token can end mid-character: such a tail is not printed
    want = PROMPT + Tokenizer.load(run).decode(facts["continuation"]).rstrip("\ufffd")
    assert capsys.readouterr().out == want + "\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_route_eval_and_train_from_a_converted_run(converted, arch, text_file, tmp_path, capsys):
    _, run, facts = converted[arch]
    tokenizer = Tokenizer.load(run)
    capsys.readouterr()
    assert main(["route", str(run), "--text", PROMPT, "--color", "never"]) == 0
    assert "<|endoftext|>" not in capsys.readouterr().err
    # documents in streams: bos first (when the tokenizer adds one), the separator last
    stream = tokenize_documents(load_documents(text_file), tokenizer)
    ends = (stream.tokens_N == tokenizer.eot_id).nonzero()[0]
    assert len(ends) == 60 and ends[-1] == len(stream) - 1
    if tokenizer.add_bos:
        assert stream.tokens_N[0] == tokenizer.bos_id
        assert (stream.tokens_N[ends[:-1] + 1] == tokenizer.bos_id).all()
    assert main(["eval", str(run), "--data", str(text_file), "--max-batches", "1"]) == 0
    assert "validation loss" in capsys.readouterr().out
    # further training: starts from the converted weights, keeps the tokenizer
    new = tmp_path / "more"
    args = ["train", "--init-from", str(run), "--out", str(new), "--data", str(text_file)]
    args += ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2"]
    args += ["--train.eval_batches", "1", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    assert Tokenizer.load(new) == tokenizer
    meta = json.loads((new / "data" / "train.json").read_text())
    assert meta["eot_id"] == tokenizer.eot_id and meta["tokenizer_sha256"] == tokenizer.sha256()
    assert (
        json.loads((new / "config.json").read_text())["model"]
        == json.loads((run / "config.json").read_text())["model"]
    )
    # it resumes like any run (here: already at its last step, so it only reloads)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(new), "--no-progress"]) == 0
    assert "2 steps, final validation loss" in capsys.readouterr().out
    assert main(["report", str(new), "--tokens-per-domain", "64", "--sample-tokens", "16"]) == 0
    assert (new / "report.html").is_file()


def test_report_on_a_converted_run_tokenises_with_its_tokenizer(converted, capsys):
    _, run, _ = converted["mixtral"]
    before = (run / "tokenizer.json").read_bytes()
    assert main(["report", str(run), "--tokens-per-domain", "64", "--sample-tokens", "16"]) == 0
    assert (run / "report.html").is_file()
    # the converted tokenizer stays; the default corpus is tokenised with it
    assert (run / "tokenizer.json").read_bytes() == before
    meta = json.loads((run / "data" / "val.json").read_text())
    assert meta["tokenizer_sha256"] == Tokenizer.load(run).sha256()


def test_back_to_hugging_face_keeps_the_special_tokens(converted, tmp_path):
    hf, run, _ = converted["qwen2_moe"]
    assert main(["convert", str(run), str(tmp_path / "hf")]) == 0
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    original = transformers.AutoTokenizer.from_pretrained(hf)
    assert (back.eos_token, back.pad_token) == (original.eos_token, original.pad_token)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    want = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    assert generation.eos_token_id == want and config.eos_token_id == want[0]
    assert Tokenizer.load(tmp_path / "hf") == Tokenizer.load(run)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_finetune_a_converted_run_ends_turns_and_pads_with_its_tokens(converted, arch, tmp_path):
    from moekit.finetune.chat import DEFAULT_TEMPLATE, ChatTemplate, parse_line
    from moekit.finetune.data import pad_batch

    _, run, _ = converted[arch]
    want = CONVENTIONS[arch]["want"]
    tokenizer = Tokenizer.load(run)
    eos = tokenizer.backend.token_to_id(want["eos"][0])
    pad = tokenizer.backend.token_to_id(want["pad"] or want["eos"][0])  # no pad: eos
    template = ChatTemplate(DEFAULT_TEMPLATE, tokenizer)
    lines = [{"prompt": "Hi", "response": "four"}, {"prompt": "a fox?", "response": "a lazy dog."}]
    short, long = (template.encode(parse_line(json.dumps(line), "x"), 100) for line in lines)
    assert short.ids.count(eos) == 2 and short.ids[-2] == eos  # "...four</s>\n"
    # bos first when the tokenizer starts text with it (mixtral), as for a prompt
    start = int(want.get("add_bos", False))
    assert (short.ids[0] == tokenizer.bos_id) is bool(start)
    assert short.ids[start : start + 3] == tokenizer.encode("<|user|>\nHi")[:3]
    inputs_BL, _ = pad_batch([short, long], tokenizer.pad_id)
    assert (inputs_BL[0, len(short.ids) - 1 :] == pad).all()
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines * 6))
    out = tmp_path / "sft"
    args = ["finetune", str(run), "--data", str(data), "--out", str(out), "--steps", "2"]
    assert main(args + ["--train.batch_size", "4", "--no-progress"]) == 0
    assert Tokenizer.load(out) == tokenizer
    exported = transformers.AutoTokenizer.from_pretrained(out / "hf")
    assert (exported.eos_token_id, exported.pad_token) == (eos, want["pad"])
    generation = transformers.GenerationConfig.from_pretrained(out / "hf")
    assert generation.eos_token_id == eos


def _no_end_token_run(root) -> None:
    """A converted run whose tokenizer and files name no end-of-sequence token."""
    backend = _backend({"trained": ["<unk>"]})
    (root / "hf").mkdir(parents=True)
    hf_model("mixtral", vocab_size=backend.get_vocab_size()).save_pretrained(root / "hf")
    backend.save(str(root / "hf" / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["convert", str(root / "hf"), str(root / "run")]) == 0


def test_a_missing_end_token_is_one_error_where_a_command_needs_it(tmp_path, text_file, capsys):
    _no_end_token_run(tmp_path)
    run = tmp_path / "run"
    # routing and generation do not need one (generation then runs to max-new-tokens)
    assert main(["route", str(run), "--text", PROMPT, "--color", "never"]) == 0
    assert len(list(generate_text(run, PROMPT, max_new_tokens=3, temperature=0))) == 3
    capsys.readouterr()
    # token streams do: one line naming the token and the files it was looked for in
    args = ["train", "--init-from", str(run), "--out", str(tmp_path / "more")]
    assert main(args + ["--data", str(text_file), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: the tokenizer has no end-of-document token")
    assert err.count("\n") == 1 and "<|endoftext|>" in err
    # the new run's copy of the record, and the checkpoint's files it was recorded from
    assert f"{tmp_path / 'more' / SPECIAL_TOKENS_FILE}" in err
    assert (
        f"tokenizer_config.json, config.json, generation_config.json in '{tmp_path / 'hf'}'" in err
    )
    assert main(["generate", str(run), "--prompt", ""]) == 2
    assert "no end-of-document token" in capsys.readouterr().err


def test_a_run_converted_before_special_tokens_were_recorded(
    converted, tmp_path, text_file, capsys
):
    import shutil

    _, run, _ = converted["qwen2_moe"]
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("data", "report.html"))
    (old / SPECIAL_TOKENS_FILE).unlink()
    # it loads, with moekit's own tokens as far as the tokenizer holds them
    tokenizer = Tokenizer.load(old)
    assert tokenizer.eos_ids == (tokenizer.backend.token_to_id("<|endoftext|>"),)
    assert main(["eval", str(old), "--data", str(text_file), "--max-batches", "1"]) == 0
    _no_end_token_run(tmp_path / "x")
    (tmp_path / "x" / "run" / SPECIAL_TOKENS_FILE).unlink()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "x" / "run"), "--data", str(text_file)]) == 2
    err = capsys.readouterr().err
    assert f"no {SPECIAL_TOKENS_FILE} beside it" in err and "convert it again" in err


def test_files_that_name_a_token_the_tokenizer_lacks_stop_the_conversion(
    converted, tmp_path, capsys
):
    import shutil

    hf, _, _ = converted["qwen3_moe"]
    shutil.copytree(hf, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        json.dumps(config | {"pad_token": "<pad>"})
    )
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        "tokenizer_config.json' names pad_token '<pad>'" in err and not (tmp_path / "run").exists()
    )
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    generation = {"eos_token_id": [0, 10_000]}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(generation))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    assert "eos_token_id [0, 10000] is not an id of the tokenizer" in capsys.readouterr().err


def test_init_from_refuses_what_the_weights_fix(converted, tmp_path, capsys):
    _, run, _ = converted["olmoe"]
    base = ["train", "--init-from", str(run), "--out", str(tmp_path / "x"), "--no-progress"]
    cases = [
        (["--preset", "tiny"], "--init-from trains the model of that run; drop --preset"),
        (["--model.top_k", "1"], f"--init-from keeps {str(run)!r}'s model; drop --model.top_k"),
        (["--resume"], "--resume continues --out; drop --init-from"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    capsys.readouterr()
    assert main(["train", "--init-from", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
    assert "no checkpoint to start from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
