"""`moekit report` and `moekit route` end to end on a micro comparison trained on three
labelled domains; the routing log's counts against the model's own expert ids; a task run
(labels x experts, accuracy); bad input."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
from helpers import micro_comparison, run_cli

from moekit import MoEConfig
from moekit.data import Tokenizer
from moekit.models import ModelConfig, Transformer, count_parameters
from moekit.report import mutual_information
from moekit.report.gather import gather
from moekit.report.html import SECTIONS
from moekit.report.routing import route_batch, route_tokens
from moekit.train import (
    TrainConfig,
    Trainer,
    load_trained_model,
    prepare_run_data,
    read_metrics,
)
from moekit.train.evaluation import fixed_eval_batches, fixed_eval_domains

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    return micro_comparison(tmp_path_factory)


@pytest.fixture(scope="module")
def report(comparison):
    code, stdout, stderr = run_cli("report", str(comparison), "--tokens-per-domain", "256")
    assert code == 0, stderr
    assert stdout.strip() == f"wrote {comparison / 'report.html'}"
    return (comparison / "report.html").read_text(encoding="utf-8")


def images(page: str) -> list[bytes]:
    return [
        base64.b64decode(uri)
        for uri in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    ]


def test_report_has_every_section_and_nothing_to_fetch(report):
    for name in SECTIONS:
        assert f'<section id="{name}">' in report
    assert "<script" not in report.lower()
    # The only URLs are data URIs: no http(s), no files beside the page.
    assert not re.search(r"(src|href)=\"(?!data:)", report)
    assert "http://" not in report and "https://" not in report
    pngs = images(report)
    assert len(pngs) >= 5
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)


def test_report_shows_both_runs_parameters_and_the_speedup(report, comparison):
    config = load_trained_model(comparison / "moe").config
    moe, dense = (
        count_parameters(config),
        count_parameters(load_trained_model(comparison / "dense").config),
    )
    for params in (moe, dense):
        assert f"{params.total:,}" in report and f"{params.active:,}" in report
    assert "speed-up over the dense twin" in report
    assert '<img src="data:image/png;base64,' in report.split('id="curves"')[1]


def test_token_tabs_colour_every_sample_token_by_its_top1_expert(report, comparison):
    data = gather(comparison, tokens_per_domain=256)
    assert [domain for domain, _ in data.samples] == ["code", "prose", "math"]
    _, routing = data.samples[0]
    panel = report.split('id="panel-1"')[1].split('<div class="panel"')[0]
    code_sample = panel.split("<h3>code</h3>")[1].split("</div>")[0]
    spans = re.findall(r'<span style="background:([^"]+)" title="([^"]*)">', code_sample)
    assert len(spans) == len(routing.pieces)
    from moekit.report.html import expert_colour

    expected = [expert_colour(int(e), 4) for e in routing.top1(1)]
    assert [colour for colour, _ in spans] == expected
    assert "expert " in spans[0][1] and "layer 1" in spans[0][1]
    assert report.count('type="radio" name="layer-tab"') == 2


def test_specialisation_matrix_counts_top_k_assignments_per_domain(comparison):
    data = gather(comparison, tokens_per_domain=256)
    assert data.labels == ["code", "prose", "math"]
    for _, counts in data.label_counts:
        assert counts.shape == (3, 4)
        # each domain routes its first 256 validation tokens (or all it has), top-2 each
        assert (counts.sum(axis=1) <= 2 * 256).all() and counts.sum() > 0
        assert 0 <= mutual_information(counts) <= 1.585 + 1e-9


def test_routing_log_matches_the_models_own_expert_ids(tmp_path, comparison):
    model_config = load_trained_model(comparison / "moe").config
    train_config = TrainConfig(steps=4, batch_size=4, seq_len=32, eval_every=2, eval_batches=2)
    run = tmp_path / "run"
    data = prepare_run_data(run, data=comparison.parent / "corpus.jsonl", vocab_size=384)
    trainer = Trainer(
        model_config,
        train_config,
        run,
        data=data,
        show_progress=False,
        routing_stats_every=3,
    )
    trainer.train()
    records = read_metrics(run / "routing.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [(r["step"], r["steps"]) for r in train] == [(3, 3), (4, 1)]
    for layer in range(2):
        assigned = sum(sum(r["layers"][layer]["tokens_per_expert"]) for r in train)
        assert assigned == 4 * 4 * 32 * 2  # steps x batch x seq_len x top_k, dropless
    # The last evaluation's counts: the final model's expert ids on the eval batches.
    last = [r for r in records if r["split"] == "val"][-1]
    assert last["step"] == 4 and last["domains"][:3] == ["code", "prose", "math"]
    model = trainer.model.eval()
    domains = fixed_eval_domains(data, train_config)
    for layer in range(2):
        expected = torch.zeros(len(last["domains"]), 4, dtype=torch.long)
        for (inputs_BL, _), domains_BL in zip(fixed_eval_batches(data, train_config), domains):
            ids_BLK = model(inputs_BL, return_expert_ids=True).expert_ids[layer]
            for d in range(len(last["domains"])):
                expected[d] += torch.bincount(ids_BLK[domains_BL == d].flatten(), minlength=4)
        assert last["layers"][layer]["domain_expert_counts"] == expected.tolist()


def test_routing_stats_can_be_switched_off(tmp_path, comparison):
    model_config = load_trained_model(comparison / "moe").config
    run = tmp_path / "run"
    data = prepare_run_data(run, data=comparison.parent / "corpus.jsonl", vocab_size=384)
    config = TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1)
    Trainer(
        model_config, config, run, data=data, show_progress=False, routing_stats_every=0
    ).train()
    assert not (run / "routing.jsonl").exists()


def test_route_batch_agrees_with_the_models_expert_ids(comparison):
    model = load_trained_model(comparison / "moe")
    tokens_BT = torch.randint(2, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    decisions = route_batch(model, tokens_BT)
    expert_ids = model(tokens_BT, return_expert_ids=True).expert_ids
    for layer, (ids_BTK, weights_BTK) in decisions.items():
        assert torch.equal(ids_BTK, expert_ids[layer])
        # softmax top-2 renormalised: the two weights of a token sum to 1, best first
        assert torch.allclose(weights_BTK.sum(-1), torch.ones(2, 16))
        assert (weights_BTK[..., 0] >= weights_BTK[..., 1]).all()


def test_route_prints_each_tokens_top1_expert_per_layer(comparison):
    text = "def wrap(text):\n    return text"
    code, stdout, _ = run_cli("route", str(comparison), "--text", text, "--color", "never")
    assert code == 0
    routing = route_tokens(
        load_trained_model(comparison / "moe"),
        Tokenizer.load(comparison / "moe"),
        Tokenizer.load(comparison / "moe").encode(text),
    )
    expected = [
        f"layer {layer}: "
        + "".join(
            f"{p.replace(chr(10), '⏎')}[{e}]" for p, e in zip(routing.pieces, routing.top1(i))
        )
        for i, layer in enumerate(routing.layers)
    ]
    assert stdout.splitlines() == expected


def test_route_colours_only_on_request_or_a_terminal(comparison, monkeypatch):
    code, coloured, _ = run_cli(
        "route",
        str(comparison / "moe"),
        "--text",
        "x = 1",
        "--color",
        "always",
        "--layer",
        "1",
    )
    assert code == 0 and "\x1b[30;48;2;" in coloured and coloured.startswith("experts: ")
    assert sum(line.startswith("layer ") for line in coloured.splitlines()) == 1
    monkeypatch.setenv("NO_COLOR", "1")
    code, plain, _ = run_cli("route", str(comparison / "moe"), "--text", "x = 1")
    assert code == 0 and "\x1b" not in plain


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["route", "{cmp}", "--text", "x", "--layer", "5"],
            r"--layer 5 is not an MoE layer; choose from \[0, 1\]",
        ),
        (["route", "{cmp}", "--text", ""], "the text has no tokens"),
        (["report", "{cmp}/nowhere"], "is not a directory"),
        (
            ["report", "{cmp}", "--sample-tokens", "0"],
            r"--sample-tokens \(0\) must be >= 1",
        ),
    ],
)
def test_bad_input_is_one_clear_error(comparison, args, message):
    code, _, stderr = run_cli(*[a.format(cmp=comparison) for a in args])
    assert code == 2
    assert re.match(rf"moekit {args[0]}: error: .*{message}", stderr)


def task_run(tmp_path, *, specialisation: dict | None):
    run = tmp_path / "digits"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"task": "classify-digits", "model": {"num_experts": 3}})
    )
    records = [
        {"split": "train", "step": s, "loss": 2.0 / s, "accuracy": 0.5 + s / 40}
        for s in range(1, 11)
    ]
    records += [
        {"split": "val", "step": s, "loss": 2.2 / s, "accuracy": 0.45 + s / 40} for s in (5, 10)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if specialisation is not None:
        (run / "specialisation.json").write_text(json.dumps(specialisation))
    return run


def test_task_run_shows_curves_accuracy_and_the_label_matrix(tmp_path):
    table = {
        "labels": ["zero", "one"],
        "layers": [{"name": "moe", "counts": [[9, 0, 0], [0, 4, 5]]}],
    }
    run = task_run(tmp_path, specialisation=table)
    code, _, stderr = run_cli("report", str(run))
    assert code == 0, stderr
    page = (run / "report.html").read_text(encoding="utf-8")
    for name in SECTIONS:
        assert f'<section id="{name}">' in page
    assert "this classify-digits run stores no per-token routing" in page
    assert 'alt="accuracy curves"' in page and 'alt="specialisation moe"' in page
    assert f"{mutual_information([[9, 0, 0], [0, 4, 5]]):.3f}" in page  # summary row
    # Each label owns its experts and both have 9 assignments: I = H(label) = 1 bit.
    assert f"{mutual_information([[9, 0, 0], [0, 4, 5]]):.3f}" == "1.000"


def test_task_run_without_a_table_notes_it_and_a_bad_table_is_an_error(tmp_path):
    run = task_run(tmp_path, specialisation=None)
    assert run_cli("report", str(run))[0] == 0
    assert "this run has no specialisation.json" in (run / "report.html").read_text(
        encoding="utf-8"
    )
    (run / "specialisation.json").write_text(
        json.dumps({"labels": ["a"], "layers": [{"name": "x", "counts": [[1], [2]]}]})
    )
    code, _, stderr = run_cli("report", str(run))
    assert (
        code == 2
        and "layer 'x' has a counts table of shape (2, 1); expected one row per label (1)" in stderr
    )


def test_a_dense_run_gets_notes_instead_of_routing(comparison):
    code, _, stderr = run_cli(
        "report", str(comparison / "dense"), "--out", str(comparison / "dense.html")
    )
    assert code == 0, stderr
    page = (comparison / "dense.html").read_text(encoding="utf-8")
    assert page.count("No per-token routing: this is a dense model") == 1
    assert "No specialisation table: this is a dense model" in page
    assert 'alt="loss curves"' in page


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_routers_without_top_k_tokens(router):
    moe = MoEConfig(d_model=32, d_hidden=32, num_experts=4, top_k=2, router=router)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, moe=moe)
    ).eval()
    tokens_BT = torch.randint(0, 64, (2, 8))
    decisions = route_batch(model, tokens_BT)
    if router == "soft":
        assert decisions == {}  # every token mixes every expert: no per-token experts
        return
    expert_ids = model(tokens_BT, return_expert_ids=True).expert_ids
    for layer, (ids_BTE, weights_BTE) in decisions.items():
        assert torch.equal(ids_BTE, expert_ids[layer])  # expert e in column e, else -1
        assert ((weights_BTE > 0) == (ids_BTE >= 0)).all()


def test_routing_statistics_do_not_change_training(tmp_path, comparison):
    model_config = load_trained_model(comparison / "moe").config
    config = TrainConfig(steps=4, batch_size=2, seq_len=32, eval_every=2, eval_batches=1)
    weights, losses = [], []
    for every in (1, 0):
        run = tmp_path / f"every{every}"
        data = prepare_run_data(run, data=comparison.parent / "corpus.jsonl", vocab_size=384)
        trainer = Trainer(
            model_config,
            config,
            run,
            data=data,
            show_progress=False,
            routing_stats_every=every,
        )
        trainer.train()
        weights.append(trainer.model.state_dict())
        losses.append([(r["step"], r["loss"]) for r in read_metrics(run)])
    assert losses[0] == losses[1]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_run_before_its_first_checkpoint_shows_its_logs(tmp_path, comparison):
    run = tmp_path / "early"
    run.mkdir()
    for name in ("config.json", "metrics.jsonl", "routing.jsonl"):
        (run / name).write_bytes((comparison / "moe" / name).read_bytes())
    code, _, stderr = run_cli("report", str(run))
    assert code == 0, stderr
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "No per-token routing: no checkpoint in" in page
    assert 'alt="expert load over training"' in page and 'alt="loss curves"' in page
