"""`moekit routing`: record from a Hugging Face folder (transformers' model, and moekit's
conversion) and from a moekit run, in fp32 and bf16; diff (table, JSON, HTML); show;
export and import the engines' layouts; one clear error for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from builders import hf_model
from helpers import MICRO, run_cli

from moekit.traces import load_trace

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Mixtral's Hugging Face folder, its moekit run, and a token file."""
    root = tmp_path_factory.mktemp("routing")
    hf_model("mixtral").save_pretrained(root / "hf")
    code, _, stderr = run_cli("convert", str(root / "hf"), str(root / "run"))
    assert code == 0, stderr
    lines = ["1 5 9 13 17 21 25 29", "2 4 8 16 32 64", "7 7 7 3 3 3 90 91 92 11"]
    (root / "tokens.txt").write_text("\n".join(lines) + "\n")
    return root


def _record(folders, out, *extra):
    code, stdout, stderr = run_cli(
        "routing", "record", *extra, "--tokens", str(folders / "tokens.txt"), "--out", str(out)
    )
    assert code == 0, stderr
    return stdout


def test_record_diff_show_from_a_folder_and_a_run(folders, tmp_path):
    stdout = _record(folders, tmp_path / "hf32", str(folders / "hf"))
    assert "3 sequences, 24 tokens, 3 MoE layers, top-2, fp32" in stdout
    _record(folders, tmp_path / "hf16", str(folders / "hf"), "--dtype", "bf16")
    _record(folders, tmp_path / "run32", str(folders / "run"))
    _record(folders, tmp_path / "conv", str(folders / "hf"), "--engine", "moekit")
    hf32, hf16, run32 = (load_trace(tmp_path / n) for n in ("hf32", "hf16", "run32"))
    assert hf32.recording["engine"] == "transformers" and hf16.recording["dtype"] == "bfloat16"
    assert run32.recording["engine"] == "moekit"
    assert hf32.tokens.tolist()[:8] == [1, 5, 9, 13, 17, 21, 25, 29]
    assert hf32.offsets.tolist() == [0, 8, 14, 24]

    code, table, stderr = run_cli(
        "routing", "diff", str(tmp_path / "hf32"), str(tmp_path / "run32"),
        "--html", str(tmp_path / "diff.html"),
    )  # fmt: skip
    assert code == 0, stderr
    assert table.splitlines()[2].split()[:4] == ["layer", "tokens", "top1", "set"]
    assert table.splitlines()[-1].split()[:2] == ["mean", "72"]
    page = (tmp_path / "diff.html").read_text()
    assert '<section id="routing-diff">' in page and "model.layers.2.mlp.gate" in page
    code, text, _ = run_cli(
        "routing", "diff", str(tmp_path / "hf32"), str(tmp_path / "hf16"), "--json"
    )
    data = json.loads(text)
    assert [d["tokens"] for d in data["layers"]] == [24, 24, 24]
    assert all(d["rounding"] is not None and d["predicted"] is not None for d in data["layers"])

    code, text, _ = run_cli("routing", "show", str(tmp_path / "hf16"))
    assert code == 0 and "transformers:mixtral, 3 MoE layers" in text
    assert "recording.dtype: bfloat16" in text


def test_a_saved_diff_is_a_section_of_the_runs_report(tmp_path, text_file):
    run = tmp_path / "run"
    code, _, stderr = run_cli(
        "train", "--no-compare", "--data", str(text_file), "--out", str(run), *MICRO
    )
    assert code == 0, stderr
    (tmp_path / "text.txt").write_text("def load(s):\n    return json.loads(s)\n")
    for dtype in ("fp32", "bf16"):
        code, _, stderr = run_cli(
            "routing", "record", str(run), "--data", str(tmp_path / "text.txt"),
            "--dtype", dtype, "--out", str(tmp_path / dtype),
        )  # fmt: skip
        assert code == 0, stderr
    code, _, stderr = run_cli(
        "routing", "diff", str(tmp_path / "fp32"), str(tmp_path / "bf16"), "--save", str(run)
    )
    assert code == 0, stderr
    code, _, stderr = run_cli("report", str(run), "--tokens-per-domain", "64")
    assert code == 0, stderr
    report = (run / "report.html").read_text()
    assert report.count('<section id="routing-diff">') == 1 and '<section id="summary">' in report
    assert "layers.1.ffn" in report


def test_generate_records_prompt_and_continuation(folders, tmp_path):
    _record(folders, tmp_path / "gen", str(folders / "run"), "--generate", "4")
    trace = load_trace(tmp_path / "gen")
    assert trace.offsets.tolist() == [0, 12, 22, 36]
    assert trace.recording["mode"] == "generate"
    assert int((~trace.routed).sum()) == 3  # each sequence's last token


def test_export_and_import_the_engines_layouts(folders, tmp_path):
    _record(folders, tmp_path / "t", str(folders / "hf"))
    for engine in ("vllm", "sglang"):
        out = tmp_path / f"{engine}.json"
        code, _, stderr = run_cli(
            "routing", "export", engine, str(tmp_path / "t"), "--out", str(out)
        )
        assert code == 0, stderr
        code, _, stderr = run_cli(
            "routing", "import", engine, str(out), "--like", str(tmp_path / "t"),
            "--out", str(tmp_path / f"from-{engine}"),
        )  # fmt: skip
        assert code == 0, stderr
        back, original = load_trace(tmp_path / f"from-{engine}"), load_trace(tmp_path / "t")
        routed = back.routed_mask()
        assert torch.equal(back.tokens, original.tokens)
        assert torch.equal(back.ids[routed], original.ids[routed])
        assert back.weights is None  # the engines return ids only


def test_a_preset_records_with_seeded_random_weights(folders, tmp_path):
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        _record(folders, tmp_path / name, "tiny", "--seed", str(seed))
    a, b, c = (load_trace(tmp_path / n) for n in "abc")
    assert a.model.architecture == "moekit:softmax_topk" and len(a.model.layers) == 4
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    code, _, stderr = run_cli(
        "routing",
        "record",
        "nonsense",
        "--tokens",
        str(folders / "tokens.txt"),
        "--out",
        str(tmp_path / "x"),
    )
    assert code == 2 and "is neither a folder" in stderr and "tiny" in stderr


def test_bad_input_is_one_error_line(folders, tmp_path):
    code, _, stderr = run_cli("routing", "show", str(tmp_path))
    assert code == 2 and stderr.startswith("moekit routing show: error:")
    assert "is not a routing trace" in stderr
    (tmp_path / "bad.txt").write_text("1 2 x\n")
    code, _, stderr = run_cli(
        "routing", "record", str(folders / "hf"), "--tokens", str(tmp_path / "bad.txt"),
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2 and "each line must be token ids" in stderr
    code, _, stderr = run_cli(
        "routing", "record", str(folders / "hf"), "--data", str(tmp_path / "bad.txt"),
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2 and "has no tokenizer; pass --tokens" in stderr


def test_replaying_a_bf16_generation_in_fp32_takes_its_experts(folders, tmp_path):
    """The worked example's commands: bf16 generation, fp32 forward over the same tokens,
    the same forward replaying the generation's trace: no expert differs then."""
    run = str(folders / "run")
    _record(folders, tmp_path / "gen", run, "--dtype", "bf16", "--generate", "6")
    code, _, stderr = run_cli(
        "routing",
        "record",
        run,
        "--from-trace",
        str(tmp_path / "gen"),
        "--out",
        str(tmp_path / "fwd"),
    )
    assert code == 0, stderr
    code, _, stderr = run_cli(
        "routing", "record", run, "--from-trace", str(tmp_path / "gen"),
        "--replay", str(tmp_path / "gen"), "--out", str(tmp_path / "replayed"),
    )  # fmt: skip
    assert code == 0, stderr
    code, text, _ = run_cli(
        "routing", "diff", str(tmp_path / "gen"), str(tmp_path / "replayed"), "--json"
    )
    layers = json.loads(text)["layers"]
    assert all(d["set"] == 0.0 and d["top1"] == 0.0 and d["order"] == 0.0 for d in layers)
    assert load_trace(tmp_path / "replayed").recording["replay"]["mode"] == "ids"
    code, _, stderr = run_cli(
        "routing", "record", run, "--tokens", str(folders / "tokens.txt"),
        "--replay", str(tmp_path / "gen"), "--out", str(tmp_path / "bad"),
    )  # fmt: skip
    assert code == 2 and "pass --from-trace" in stderr
