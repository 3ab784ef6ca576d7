"""The commands that read a run back refuse a mistake in one line, before any output:
a task run given to a language-model command, and `moekit generate`'s bad arguments."""

from __future__ import annotations

import pytest
from helpers import MICRO, run_cli

from moekit.train.rundir import new_run_config, write_run_config


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    code, _, stderr = run_cli("train", "--no-compare", "--out", str(out), *MICRO)
    assert code == 0, stderr
    return out


@pytest.fixture
def task_run(tmp_path):
    """A task run's config.json, as tasks/loop.py start_run writes it (no weights needed:
    the refusal comes first)."""
    run = tmp_path / "vit-run"
    run.mkdir()
    model = {"name": "moe", "image_size": 8, "patch_size": 2, "d_model": 64, "num_layers": 4}
    config = new_run_config(task="vit", model=model, train={"steps": 2}, data={"source": "digits"})
    write_run_config(run, config)
    return run


@pytest.mark.parametrize(
    "command, extra",
    [("eval", []), ("generate", ["--prompt", "hi"]), ("route", ["--text", "hi"])],
)
def test_a_task_run_is_named_as_one(task_run, command, extra):
    code, stdout, stderr = run_cli(command, str(task_run), *extra)
    assert code == 2 and stdout == ""
    assert stderr == (
        f"moekit {command}: error: {str(task_run)!r} is a --task vit run; {command} reads "
        "language-model runs (trained by `moekit train` without --task)\n"
    )


def test_a_task_run_is_refused_by_every_reader_of_run_configs(task_run):
    from moekit.train import run_configs

    with pytest.raises(ValueError, match="is a --task vit run; this command reads"):
        run_configs(task_run)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "temperature (-1.0) must be >= 0"),
        (["--top-k", "0"], "top_k (0) must be >= 1 or None"),
        (["--top-p", "1.5"], "top_p (1.5) must be in (0, 1] or None"),
        (["--max-new-tokens", "-3"], "max_new_tokens (-3) must be >= 0"),
        (["--tokenizer", "/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
        (["--prompt", "word " * 40], "the model's max_seq_len is 32"),
    ],
)
def test_generate_checks_every_argument_before_it_echoes_the_prompt(lm_run, extra, message):
    code, stdout, stderr = run_cli("generate", str(lm_run), "--prompt", "ECHO", *extra)
    assert code == 2 and stdout == "", stdout
    assert stderr.startswith("moekit generate: error: ") and message in stderr
    assert len(stderr.splitlines()) == 1


def test_generate_of_a_missing_run_prints_nothing(tmp_path):
    code, stdout, stderr = run_cli("generate", str(tmp_path / "nope"), "--prompt", "ECHO")
    assert code == 2 and stdout == ""
    assert stderr.startswith("moekit generate: error: ")


def test_generate_still_streams_after_the_checks(lm_run):
    code, stdout, stderr = run_cli(
        "generate", str(lm_run), "--prompt", "ECHO", "--max-new-tokens", "3"
    )
    assert code == 0, stderr
    assert stdout.startswith("ECHO")
