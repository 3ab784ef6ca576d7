"""The doctor's pieces on worked cases: layers that route alike, the margins, the report's
text, JSON and exit status, the Hugging Face config notes."""

from __future__ import annotations

import json

import torch

from moekit.doctor.findings import Finding, Report
from moekit.doctor.routing import (
    LAYERS_ALIKE,
    LayerRouting,
    calibration_ids,
    check_routing,
)
from moekit.doctor.runs import check_hf_config
from moekit.doctor.weights import NEAR_COPY, gram, relative_differences


def _layer(top1: torch.Tensor, num_experts: int = 4, close: int = 0) -> LayerRouting:
    counts = torch.bincount(top1, minlength=num_experts).double() * 2
    return LayerRouting(counts, [top1], close=close, tokens=len(top1))


def test_layers_whose_top1_choices_determine_each_other_route_alike():
    generator = torch.Generator().manual_seed(0)
    top1 = torch.randint(0, 4, (400,), generator=generator)
    permuted = torch.tensor([2, 0, 3, 1])[top1]  # another numbering, the same routing
    independent = torch.randint(0, 4, (400,), generator=generator)
    seen = {1: _layer(top1), 3: _layer(permuted), 5: _layer(independent)}
    alike = [f for f in check_routing(seen, top_k=2) if f.check == "routing.layers_alike"]
    assert len(alike) == 1
    assert alike[0].layer == 3 and alike[0].evidence["same_as_layer"] == 1
    assert alike[0].evidence["normalised_mutual_information"] >= LAYERS_ALIKE


def test_margin_share_is_a_note_then_a_warning():
    top1 = torch.arange(400) % 4
    note = check_routing({0: _layer(top1, close=20)}, top_k=2)
    warning = check_routing({0: _layer(top1, close=200)}, top_k=2)
    assert [f.severity for f in note if f.check == "routing.margins"] == ["note"]
    assert [f.severity for f in warning if f.check == "routing.margins"] == ["warning"]
    assert "moekit routing diff" in warning[-1].advice


def test_relative_differences_of_copies_and_strangers():
    base = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    experts = torch.stack([base[0], base[1], base[0] * (1 + 1e-4), base[2]])
    rel = relative_differences(gram(experts))
    assert rel[0, 2] < NEAR_COPY < rel[0, 1]
    assert rel[0, 0] == 0


def test_report_text_json_and_exit_status():
    report = Report("some/model", "hf", checks=["weights"], facts={"architecture": "mixtral"})
    assert report.exit_status == 0 and "nothing wrong found" in report.text()
    report.add([Finding("warning", "weights.norm", "layer 1: odd", "look", layer=1, experts=[2])])
    assert report.exit_status == 0
    report.add([Finding("error", "weights.zero", "layer 0: zero", "reconvert", layer=0)])
    assert report.exit_status == 1
    text = report.text()
    assert text.index("error: [weights.zero]") < text.index("warning: [weights.norm]")
    data = json.loads(report.dumps())
    assert data["counts"] == {"error": 1, "warning": 1, "note": 0}
    assert data["findings"][1]["experts"] == [2]


def test_calibration_without_a_tokenizer_is_random_and_says_so():
    ids, what = calibration_ids(None, "text", 100, vocab_size=50)
    assert len(ids) == 100 and int(ids.max()) < 50 and "random" in what
    ids, what = calibration_ids(lambda text: [1, 2, 3], "abc", 10, vocab_size=50)
    assert ids.tolist() == [1, 2, 3] and what == "3 tokens"  # never repeated
    few = check_routing({0: _layer(torch.arange(20) % 4, num_experts=8)}, top_k=2)
    assert [f.check for f in few] == ["routing.too_few_tokens"]


def test_a_balance_loss_transformers_will_not_add_is_a_note():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    (found,) = check_hf_config({"router_aux_loss_coef": 0.02}, model)
    assert found.severity == "note" and "output_router_logits" in found.message
    assert (
        check_hf_config({"router_aux_loss_coef": 0.02, "output_router_logits": True}, model) == []
    )
