"""`moekit merge --demo` end to end with a micro parent model and two domains: every run,
the loss table, the routing matrices and btx.json.

Slow (13 to 32 s on the shared 2-core machine): the demo tokenises the whole built-in corpus and
evaluates every model on its whole validation split; tests/test_surgery_merge.py runs the
same pipeline on a tiny corpus in the default run."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = [
    "--model.vocab_size", "300", "--model.d_model", "16", "--model.num_layers", "1",
    "--model.num_heads", "2", "--model.max_seq_len", "32", "--model.d_hidden", "32",
    "--batch-size", "64", "--seq-len", "32", "--train.eval_batches", "1",
]  # fmt: skip


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_the_table(tmp_path):
    out = tmp_path / "btx"
    code, stdout, stderr = run_cli(
        "merge", "--demo", "--domains", "math,dialogue", "--out", str(out), "--parent-steps", "2",
        "--branch-steps", "1", "--router-steps", "1", "--joint-steps", "1", "--no-progress", *MICRO,
    )  # fmt: skip
    assert code == 0, stderr
    for row in ("parent", "branch math", "branch dialogue", "BTX stage 1", "BTX", "parent +4"):
        assert f"\n{row} " in stdout
    assert "BTX layer 0: % of each domain's tokens that use each expert" in stdout
    result = json.loads((out / "btx.json").read_text())
    assert result["experts"] == ["math", "dialogue"]
    assert set(result["domains"]) == {"code", "prose", "math", "dialogue", "multilingual"}
    for run in ("parent", "branch-math", "branch-dialogue", "mix/stage1", "mix/stage2", "baseline"):
        assert (out / run / "checkpoint").is_dir()


def test_demo_refuses_bad_domains_and_run_arguments(tmp_path):
    code, _, stderr = run_cli("merge", "--demo", "--domains", "math,poetry", "--out", str(tmp_path))
    assert code == 2 and "--domains: choose two or more of" in stderr
    code, _, stderr = run_cli("merge", "--demo", "--preset", "tiny", "--out", str(tmp_path))
    assert code == 2 and "is an MoE" in stderr
    code, _, stderr = run_cli(
        "merge", "a", "b", "--parent", "p", "--out", "o", "--model.top_k", "1"
    )
    assert code == 2 and "overrides apply to --demo only" in stderr
