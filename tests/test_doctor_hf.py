"""`moekit doctor` on Hugging Face folders: a fault injected into tiny random Mixtral,
Qwen2-MoE, DeepSeek-V3 and gpt-oss checkpoints is reported at its layer and expert; the
healthy folders give no error and no warning; bad targets are one clear error; the target's
files are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json

import doctor_builders as b
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

from moekit.doctor.cli import examine
from moekit.doctor.target import read_target

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

EXPERT_LAYER, ROUTING_LAYER = 2, 1  # MoE layers in every family (DeepSeek's 0 is dense)


def _folder(tmp_path, arch: str, fault=None, tokenizer: bool = False):
    model = b.build(arch)
    b.balance(model)
    if fault is not None:
        fault(model)
    folder = tmp_path / arch
    b.save(model, folder, tokenizer=tokenizer)
    return folder


def _findings(folder, check: str) -> list:
    return [f for f in examine(read_target(folder)).findings if f.check == check]


def _digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("arch", b.ARCHS)
def test_healthy_folder_has_no_error_or_warning_and_is_left_unchanged(tmp_path, arch):
    folder = _folder(tmp_path, arch)
    before = _digest(folder)
    code, out, err = run_cli("doctor", str(folder), "--json")
    report = json.loads(out)
    assert code == 0, out
    assert report["counts"]["error"] == 0 and report["counts"]["warning"] == 0, out
    assert set(report["checks"]) == {"weights", "routing"}
    assert _digest(folder) == before


# (check, severity, fault, the experts it must name)
WEIGHT_FAULTS = {
    "exact_copy": (
        "weights.copies", "error", lambda m: b.copy_expert(m, EXPERT_LAYER, 1, 5), [1, 5],
    ),
    "near_copy": (
        "weights.copies", "error",
        lambda m: b.copy_expert(m, EXPERT_LAYER, 2, 6, noise=1e-3), [2, 6],
    ),
    "zero": ("weights.zero", "error", lambda m: b.zero_expert(m, EXPERT_LAYER, 3), [3]),
    "nan": ("weights.nonfinite", "error", lambda m: b.nan_expert(m, EXPERT_LAYER, 4), [4]),
    "scaled": ("weights.norm", "warning", lambda m: b.scale_expert(m, EXPERT_LAYER, 7, 10.0), [7]),
    "router_rows": (
        "weights.router_copies", "error", lambda m: b.copy_router_row(m, EXPERT_LAYER, 0, 2), [0, 2],
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", b.ARCHS)
@pytest.mark.parametrize("fault", sorted(WEIGHT_FAULTS))
def test_weight_fault_is_found_at_its_layer_and_expert(tmp_path, arch, fault):
    check, severity, inject, experts = WEIGHT_FAULTS[fault]
    found = _findings(_folder(tmp_path, arch, inject), check)
    assert found, f"{fault} not reported"
    assert {f.layer for f in found} == {EXPERT_LAYER}
    assert all(f.severity == severity for f in found)
    assert sorted({e for f in found for e in f.experts}) == experts


@pytest.mark.parametrize("arch", b.ARCHS)
def test_a_router_copied_into_another_layer_is_found(tmp_path, arch):
    def inject(model):
        with torch.no_grad():
            b.router_of(model, EXPERT_LAYER).copy_(b.router_of(model, ROUTING_LAYER))

    (found,) = _findings(_folder(tmp_path, arch, inject), "weights.layer_copies")
    assert found.layer == EXPERT_LAYER and found.evidence["same_as_layer"] == ROUTING_LAYER


@pytest.mark.parametrize("arch", b.ARCHS)
def test_a_dead_expert_is_found_on_calibration_tokens(tmp_path, arch):
    folder = _folder(tmp_path, arch, lambda m: b.push_router(m, ROUTING_LAYER, [3], -1.0))
    dead = [f for f in _findings(folder, "routing.dead") if f.layer == ROUTING_LAYER]
    assert dead and 3 in dead[0].experts and dead[0].severity == "warning"


@pytest.mark.parametrize("arch", b.ARCHS)
def test_routing_collapse_is_an_error_naming_the_experts(tmp_path, arch):
    folder = _folder(tmp_path, arch, lambda m: b.push_router(m, ROUTING_LAYER, [0, 1], 1.0))
    collapse = [f for f in _findings(folder, "routing.collapse") if f.layer == ROUTING_LAYER]
    assert collapse and sorted(collapse[0].experts) == [0, 1]
    assert collapse[0].severity == "error"
    code, _, _ = run_cli("doctor", str(folder))
    assert code == 1


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_a_missing_expert_tensor_is_named(tmp_path, arch):
    folder = _folder(tmp_path, arch)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    gone = next(n for n in tensors if f"layers.{EXPERT_LAYER}." in n and ".experts." in n)
    del tensors[gone]
    save_file(tensors, path, metadata={"format": "pt"})
    code, out, _ = run_cli("doctor", str(folder))
    assert code == 1
    assert "error: [weights.missing]" in out and gone in out


def test_routing_runs_on_the_models_own_tokenizer(tmp_path):
    report = examine(read_target(_folder(tmp_path, "mixtral", tokenizer=True)))
    assert "built-in text" in report.facts["calibration"]
    text = tmp_path / "calibration.txt"
    text.write_text("the lazy dog " * 300, encoding="utf-8")
    code, out, _ = run_cli(
        "doctor", str(tmp_path / "mixtral"), "--data", str(text), "--tokens", "64"
    )
    assert "64 tokens (--data)" in out


def test_bad_targets_are_one_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    code, out, err = run_cli("doctor", str(missing))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    code, _, err = run_cli("doctor", str(tmp_path / "notes.txt"))
    assert code == 2 and "is a file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli("doctor", str(empty))
    assert code == 2 and "is not a moekit run" in err
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    code, _, err = run_cli("doctor", str(unknown))
    assert code == 2 and "unsupported architecture 'llama'" in err
    (unknown / "config.json").write_text("[1, 2]", encoding="utf-8")
    code, _, err = run_cli("doctor", str(unknown))
    assert code == 2 and "moekit doctor: error:" in err
    truncated = _folder(tmp_path, "mixtral")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli("doctor", str(truncated))
    assert code == 2 and "moekit doctor: error:" in err and err.count("\n") == 1
