"""The trace format: a save/load round trip keeps every tensor and field bit for bit
(hypothesis over shapes and optional parts); writes are atomic; bad traces are refused
with one error naming the field; vLLM's and SGLang's routed-expert layouts read and
write in their documented shape and ordering."""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
import torch
from builders import identity, make_trace
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.traces import Trace, load_trace, save_trace
from moekit.traces.engines import from_sglang, from_vllm, to_sglang, to_vllm
from moekit.traces.format import META_FILE, TENSORS_FILE


def _equal(a: Trace, b: Trace) -> None:
    assert a.model == b.model and a.recording == b.recording
    for name in ("tokens", "offsets", "ids", "weights", "logits", "valid", "routed", "positions"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y) and x.dtype == y.dtype, name


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    layers=st.integers(1, 3),
    top_k=st.integers(1, 3),
    optional=st.sets(st.sampled_from(["weights", "logits", "valid", "routed"])),
)
def test_round_trip_keeps_everything(tmp_path_factory, lengths, layers, top_k, optional):
    T = sum(lengths)
    parts = {}
    for name in ("weights", "logits"):
        if name not in optional:
            parts[name] = None
    if "valid" in optional:
        parts["valid"] = torch.rand(T, layers, top_k) > 0.3
    if "routed" in optional:
        parts["routed"] = torch.rand(T) > 0.2
    trace = make_trace(tuple(lengths), layers, 4, top_k, **parts)
    path = tmp_path_factory.mktemp("t") / "trace"
    save_trace(trace, path)
    _equal(trace, load_trace(path))
    # positions count from 0 in each sequence
    expected = torch.cat([torch.arange(n) for n in lengths]).to(torch.int32)
    assert torch.equal(trace.positions, expected)


def test_files_are_safetensors_and_json_and_a_rewrite_replaces_atomically(tmp_path):
    path = tmp_path / "trace"
    save_trace(make_trace(), path)
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format"] == "moekit.routing-trace" and meta["version"] == 1
    assert meta["model"]["layers"] == ["layers.0.ffn", "layers.1.ffn"]
    assert sorted(p.name for p in path.iterdir()) == sorted([META_FILE, TENSORS_FILE])
    save_trace(make_trace(seed=1), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]  # no .tmp or .old left
    _equal(load_trace(path), make_trace(seed=1))


def test_select_keeps_the_chosen_sequences():
    trace = make_trace(lengths=(2, 3, 4))
    picked = trace.select([2, 0])
    assert picked.offsets.tolist() == [0, 4, 6]
    assert torch.equal(picked.ids[:4], trace.ids[5:9]) and torch.equal(
        picked.ids[4:], trace.ids[:2]
    )
    assert picked.positions.tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(ids=torch.zeros(8, 3, 2, dtype=torch.int32)),
            r"ids has shape \(8, 3, 2\), expected \(8, 2, 2\)",
        ),
        (
            dict(ids=torch.zeros(8, 2, 3, dtype=torch.int32)),
            r"ids has shape \(8, 2, 3\), expected \(8, 2, 2\)",
        ),
        (
            dict(ids=torch.full((8, 2, 2), 4, dtype=torch.int32)),
            "ids out of range: token 0, layer layers.0.ffn, slot 0 has expert 4; the model has 4 experts",
        ),
        (dict(ids=torch.full((8, 2, 2), -1, dtype=torch.int32)), "ids out of range"),
        (dict(weights=torch.zeros(8, 2, 1)), r"weights has shape \(8, 2, 1\)"),
        (dict(logits=torch.zeros(8, 2, 5)), r"logits has shape \(8, 2, 5\), expected \(8, 2, 4\)"),
        (dict(offsets=torch.tensor([0, 5, 7])), "offsets must run from 0 to the token count 8"),
        (dict(offsets=torch.tensor([0, 6, 3, 8])), "offsets must not decrease"),
        (dict(routed=torch.ones(7, dtype=torch.bool)), r"routed has shape \(7,\)"),
    ],
)
def test_inconsistent_traces_are_refused_naming_the_field(change, message):
    trace = make_trace()
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(trace, **change)


def test_unused_slots_may_hold_any_id():
    valid = torch.ones(8, 2, 2, dtype=torch.bool)
    valid[0, 0, 1] = False
    ids = make_trace().ids.clone()
    ids[0, 0, 1] = 99
    dataclasses.replace(make_trace(), ids=ids, valid=valid)  # no error: the slot is unused


def test_bad_files_are_refused_naming_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="is not a routing trace"):
        load_trace(tmp_path)
    path = save_trace(make_trace(), tmp_path / "trace")
    meta = json.loads((path / META_FILE).read_text())
    for key, value, message in [
        ("format", "other", "format: .* has 'other'"),
        ("version", 7, "version: .* has 7; this reads 1"),
        ("model", {"architecture": "x"}, "model: .* has no valid model identity"),
    ]:
        (path / META_FILE).write_text(json.dumps(meta | {key: value}))
        with pytest.raises(ValueError, match=message):
            load_trace(path)
    (path / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_trace(path)


# --- engines -----------------------------------------------------------------------


def test_vllm_layout_is_tokens_layers_top_k():
    model = identity(layers=2, experts=8, top_k=2)
    # [t, l, k] = 4 t + 2 l + k: every element says where it sits
    prompt = np.arange(3 * 2 * 2, dtype=np.int16).reshape(3, 2, 2) % 8
    gen = (np.arange(2 * 2 * 2, dtype=np.int16).reshape(2, 2, 2) + 3) % 8
    request = dict(
        prompt_token_ids=[5, 6, 7], output_token_ids=[8, 9, 10],
        prompt_routed_experts=prompt, routed_experts=gen,
    )  # fmt: skip
    trace = from_vllm(model, [request])
    assert trace.tokens.tolist() == [5, 6, 7, 8, 9, 10]
    assert trace.routed.tolist() == [True] * 5 + [False]  # the last token had no row
    assert trace.ids.dtype == torch.int32
    assert trace.ids[1, 1, 0] == int(prompt[1, 1, 0]) and trace.ids[4, 0, 1] == int(gen[1, 0, 1])
    back = to_vllm(trace)[0]
    assert back["token_ids"] == [5, 6, 7, 8, 9, 10]
    assert np.array_equal(back["routed_experts"], np.concatenate([prompt, gen]).astype(np.int32))
    assert back["routed_experts"].dtype == np.int32
    assert from_vllm(model, [{"prompt_token_ids": [5, 6, 7, 8, 9, 10], **back}]).ids.shape == (
        6,
        2,
        2,
    )


def test_sglang_layout_is_base64_int32_without_the_last_token():
    model = identity(layers=3, experts=4, top_k=2)
    rows = np.arange(4 * 3 * 2).reshape(4, 3, 2) % 4
    encoded = base64.b64encode(rows.astype("<i4").tobytes()).decode()
    trace = from_sglang(model, [{"token_ids": [1, 2, 3, 4, 5], "routed_experts": encoded}])
    assert trace.routed.tolist() == [True, True, True, True, False]
    assert torch.equal(trace.ids[:4], torch.from_numpy(rows.astype(np.int32)))
    assert to_sglang(trace)[0]["routed_experts"] == encoded
    # routed_experts_start_len: the first tokens were routed in an earlier turn
    later = from_sglang(
        model,
        [
            {
                "token_ids": [1, 2, 3, 4, 5, 6],
                "routed_experts": encoded,
                "routed_experts_start_len": 1,
            }
        ],
    )
    assert later.routed.tolist() == [False, True, True, True, True, False]


@pytest.mark.parametrize(
    "request_, message",
    [
        (
            dict(token_ids=[1, 2, 3], routed_experts="***"),
            "requests\\[0\\].routed_experts is not base64",
        ),
        (
            dict(token_ids=[1, 2, 3], routed_experts=base64.b64encode(b"abcdef").decode()),
            "not a whole number",
        ),
        (
            dict(token_ids=[1, 2, 3], routed_experts=np.zeros((3, 3, 2), dtype=np.int32)),
            "has 3 rows; tokens 0 to 1",
        ),
        (
            dict(token_ids=[1, 2, 3], routed_experts=np.zeros((2, 2, 2), dtype=np.int32)),
            "has 2 layers and top_k 2; the model has 3 MoE layers",
        ),
        (
            dict(token_ids=[1, 2, 3], routed_experts=np.full((2, 3, 2), 9, dtype=np.int32)),
            "ids out of range",
        ),
    ],
)
def test_bad_engine_outputs_are_refused_naming_the_field(request_, message):
    with pytest.raises(ValueError, match=message):
        from_sglang(identity(layers=3), [request_])
