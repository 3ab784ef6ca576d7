"""One way to a run's tokenizer: --tokenizer PATH, else the run's own tokenizer.json; a run
converted without one is refused by every command that reads its text, before any work and
without writing into it; a tokenizer larger than the model's vocabulary is refused; and a
fine-tune whose Hugging Face export is impossible stops before its first step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moekit.cli import main
from moekit.data import train_tokenizer
from moekit.data.tokenizer import run_tokenizer
from moekit.interop.convert import write_run
from moekit.models import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, text_file):
    """A folder holding a small tokenizer.json trained on text_file."""
    tokenizer = train_tokenizer([text_file.read_text(encoding="utf-8")], vocab_size=300)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def vocab_size(tokenizer_dir):
    from moekit.data import Tokenizer

    return Tokenizer.load(tokenizer_dir).vocab_size


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, vocab_size):
    """A tiny random Mixtral saved by transformers, with no tokenizer.json."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("hf") / "mixtral"
    transformers.MixtralForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_dir):
    run = tmp_path_factory.mktemp("runs") / "converted"
    assert main(["convert", str(hf_dir), str(run)]) == 0
    return run


def _files(folder) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_convert_notes_a_source_without_tokenizer(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"note: {hf_dir} has no tokenizer.json: eval/generate on {tmp_path / 'run'}" in out
    assert "--tokenizer PATH" in out
    assert (tmp_path / "run" / "checkpoint").is_dir()


COMMANDS = {
    "eval": ["eval", "{run}", "--max-batches", "1"],
    "eval --data": ["eval", "{run}", "--data", "{text}", "--max-batches", "1"],
    "generate": ["generate", "{run}", "--prompt", "PROMPT-ECHO", "--max-new-tokens", "3"],
    "route": ["route", "{run}", "--text", "def f(x):"],
    "report": ["report", "{run}", "--out", "{tmp}/report.html"],
    "routing record": ["routing", "record", "{run}", "--data", "{lines}", "--out", "{tmp}/t"],
    "finetune": ["finetune", "{run}", "--data", "{chats}", "--out", "{tmp}/ft"],
}


def _argv(name, run, text_file, tmp_path, extra=()):
    chats = tmp_path / "chats.jsonl"
    lines = [{"prompt": "What is two plus two?", "response": "It is four."}] * 4
    chats.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    lines_file = tmp_path / "lines.txt"
    lines_file.write_text("def f(x):\n    return x + 1\n", encoding="utf-8")
    values = {"run": run, "text": text_file, "tmp": tmp_path, "chats": chats, "lines": lines_file}
    return [part.format(**values) for part in COMMANDS[name]] + list(extra)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_converted_run_without_tokenizer_is_refused(name, converted, text_file, tmp_path, capsys):
    before = _files(converted)
    assert main(_argv(name, converted, text_file, tmp_path)) == 2
    captured = capsys.readouterr()
    assert "has no tokenizer (converted from" in captured.err
    assert "pass --tokenizer PATH" in captured.err
    assert "PROMPT-ECHO" not in captured.out  # refused before the prompt is echoed
    assert "Traceback" not in captured.err
    assert _files(converted) == before
    assert not any(tmp_path.glob("ft")) and not any(tmp_path.glob("t"))


@pytest.mark.parametrize("name", ["eval --data", "generate", "route", "routing record"])
def test_with_tokenizer_the_commands_work_and_write_nothing_into_the_run(
    name, converted, tokenizer_dir, text_file, tmp_path, capsys
):
    before = _files(converted)
    extra = ["--tokenizer", str(tokenizer_dir / "tokenizer.json")]
    assert main(_argv(name, converted, text_file, tmp_path, extra)) == 0, capsys.readouterr()
    assert _files(converted) == before


def test_eval_of_the_runs_own_data_tokenises_it_in_memory(
    converted, tokenizer_dir, text_file, tmp_path, capsys
):
    # A copy of the converted run whose data source is a text file: eval without --data
    # reads its validation split in the given tokenizer, and writes no streams.
    run = tmp_path / "copy"
    shutil.copytree(converted, run)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    config["data"] = str(text_file)
    (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    before = _files(run)
    argv = ["eval", str(run), "--max-batches", "1", "--tokenizer", str(tokenizer_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "validation loss" in capsys.readouterr().out
    assert _files(run) == before


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(
    converted, text_file, vocab_size, tmp_path, capsys
):
    larger = train_tokenizer([text_file.read_text(encoding="utf-8")], vocab_size=vocab_size + 40)
    assert larger.vocab_size > vocab_size
    larger.save(tmp_path / "larger")
    with pytest.raises(
        ValueError, match=rf"{larger.vocab_size} tokens.*vocab_size \({vocab_size}\)"
    ):
        run_tokenizer(converted, tmp_path / "larger")
    argv = ["generate", str(converted), "--tokenizer", str(tmp_path / "larger")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(larger.vocab_size) in err and str(vocab_size) in err


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tokenizer_dir, vocab_size):
    """A dense model as a run with a tokenizer: no Hugging Face MoE architecture holds it."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab_size, d_model=32, num_layers=1, num_heads=4, max_seq_len=64, moe=None
    )
    run = tmp_path_factory.mktemp("dense") / "run"
    run.mkdir()
    write_run(Transformer(config), run, source="a dense model")
    from moekit.data import copy_tokenizer

    copy_tokenizer(tokenizer_dir, run)
    return run


@pytest.mark.parametrize("lora", [[], ["--lora.rank", "2", "--lora.targets", "attention"]])
def test_an_impossible_export_stops_before_the_first_step(
    lora, dense_run, text_file, tmp_path, capsys
):
    argv = _argv("finetune", dense_run, text_file, tmp_path, ["--steps", "1", "--no-progress"])
    assert main(argv + lora) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face export after fine-tuning is impossible" in err
    assert "dense model" in err and "--no-export" in err
    assert not (tmp_path / "ft" / "checkpoint").exists()
    assert main(argv + lora + ["--no-export"]) == 0, capsys.readouterr().err
    assert (tmp_path / "ft" / "checkpoint").is_dir()
    assert not (tmp_path / "ft" / "hf").exists()
