"""Routed-expert layouts of serving engines, read into traces and written from them.

# S tokens of one sequence, L MoE layers, K top_k

Both engines return, per request, expert ids only (no combine weights), token-major:
element [t, l, k] is the k-th expert of MoE layer l (counted from the model's first MoE
layer) for token t.
    vLLM      `prompt_routed_experts` [prompt_len, L, K] and, per completion,
              `routed_experts` [gen_len, L, K] (int16 in some versions, int32 in others);
              a full-sequence form `routed_experts` [S, L, K] without the prompt part is
              read too. The last generated token may lack a row (it is never fed back).
    SGLang    `routed_experts`: base64 of int32 little-endian, flattened from
              [S - 1 - start, L, K]: tokens start .. S - 2 (the last token never goes
              through the model; start is `routed_experts_start_len`, 0 by default).
Rows the engine did not return are kept with routed False (replay leaves them to the
router). A trace from either engine replays in mode "ids" only.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from torch import Tensor

from .format import ModelIdentity, Trace


def _array(name: str, value, model: ModelIdentity) -> np.ndarray:
    """An engine's [tokens, L, K] id array, checked against the model's L and K."""
    array = np.asarray(value)
    if array.ndim != 3:
        raise ValueError(f"{name} must be [tokens, layers, top_k]; got shape {array.shape}")
    L, K = len(model.layers), model.top_k
    if array.shape[1:] != (L, K):
        raise ValueError(
            f"{name} has {array.shape[1]} layers and top_k {array.shape[2]}; the model has "
            f"{L} MoE layers and top_k {K}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer expert ids; got {array.dtype}")
    return array.astype(np.int32)


def _assemble(model: ModelIdentity, sequences: list[tuple[list[int], np.ndarray, int]], engine):
    """Trace from (token ids, routed rows, first routed token) per sequence."""
    L, K = len(model.layers), model.top_k
    tokens, ids, routed, lengths = [], [], [], []
    for token_ids, rows, start in sequences:
        S = len(token_ids)
        full = np.zeros((S, L, K), dtype=np.int32)
        mask = np.zeros(S, dtype=bool)
        full[start : start + len(rows)] = rows
        mask[start : start + len(rows)] = True
        tokens.append(torch.as_tensor(token_ids, dtype=torch.long))
        ids.append(torch.from_numpy(full))
        routed.append(torch.from_numpy(mask))
        lengths.append(S)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])
    routed_T = torch.cat(routed)
    return Trace(
        model=model, tokens=torch.cat(tokens), offsets=offsets, ids=torch.cat(ids),
        routed=None if bool(routed_T.all()) else routed_T,
        recording={"engine": engine, "dtype": model.dtype, "mode": "generate"},
    )  # fmt: skip


def from_vllm(model: ModelIdentity, requests: list[dict]) -> Trace:
    """A trace of vLLM outputs: each request a dict with `prompt_token_ids`,
    `output_token_ids`, `routed_experts` and optionally `prompt_routed_experts`."""
    sequences = []
    for i, request in enumerate(requests):
        prompt = list(request.get("prompt_token_ids", request.get("token_ids", [])))
        output = list(request.get("output_token_ids", []))
        S = len(prompt) + len(output)
        gen = _array(f"requests[{i}].routed_experts", request["routed_experts"], model)
        if request.get("prompt_routed_experts") is not None:
            head = _array(
                f"requests[{i}].prompt_routed_experts", request["prompt_routed_experts"], model
            )
            if len(head) != len(prompt):
                raise ValueError(
                    f"requests[{i}].prompt_routed_experts has {len(head)} rows for "
                    f"{len(prompt)} prompt tokens"
                )
            if len(gen) not in (len(output), len(output) - 1):
                raise ValueError(
                    f"requests[{i}].routed_experts has {len(gen)} rows for {len(output)} "
                    "generated tokens"
                )
            rows = np.concatenate([head, gen])
        else:
            rows = gen
        if len(rows) not in (S, S - 1):
            raise ValueError(f"requests[{i}].routed_experts has {len(rows)} rows for {S} tokens")
        sequences.append((prompt + output, rows, 0))
    return _assemble(model, sequences, "vllm")


def to_vllm(trace: Trace) -> list[dict]:
    """Each sequence as vLLM's full-sequence form: `token_ids` and `routed_experts`
    [routed prefix length, L, K] int32 (rows up to the first token without a route)."""
    out = []
    for s in range(trace.num_sequences):
        rows = trace.sequence(s)
        routed = trace.routed_mask()[rows]
        n = int(routed.long().cumprod(0).sum())
        out.append(
            {
                "token_ids": trace.tokens[rows].tolist(),
                "routed_experts": trace.ids[rows][:n].to(torch.int32).numpy(),
            }
        )
    return out


def decode_sglang(encoded: str, model: ModelIdentity, name: str = "routed_experts") -> np.ndarray:
    """SGLang's base64 int32 routed experts as a [tokens, L, K] array."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name} is not base64: {error}") from None
    L, K = len(model.layers), model.top_k
    if len(raw) % (4 * L * K):
        raise ValueError(
            f"{name} holds {len(raw)} bytes, not a whole number of [layers {L}, top_k {K}] "
            "int32 rows"
        )
    flat = np.frombuffer(raw, dtype="<i4")
    return flat.reshape(-1, L, K)


def encode_sglang(ids_SLK: Tensor) -> str:
    """[tokens, L, K] ids as SGLang's base64 of int32 little-endian."""
    return base64.b64encode(ids_SLK.to(torch.int32).numpy().astype("<i4").tobytes()).decode()


def from_sglang(model: ModelIdentity, requests: list[dict]) -> Trace:
    """A trace of SGLang outputs: each request a dict with `token_ids` (prompt and output),
    `routed_experts` (base64 or an array) and optionally `routed_experts_start_len`."""
    sequences = []
    for i, request in enumerate(requests):
        token_ids = list(request["token_ids"])
        start = int(request.get("routed_experts_start_len", 0) or 0)
        value = request["routed_experts"]
        name = f"requests[{i}].routed_experts"
        rows = decode_sglang(value, model, name) if isinstance(value, str) else value
        rows = _array(name, rows, model)
        expected = len(token_ids) - 1 - start
        if len(rows) != expected:
            raise ValueError(
                f"{name} has {len(rows)} rows; tokens {start} to {len(token_ids) - 2} of a "
                f"{len(token_ids)}-token sequence need {expected}"
            )
        sequences.append((token_ids, rows, start))
    return _assemble(model, sequences, "sglang")


def to_sglang(trace: Trace) -> list[dict]:
    """Each sequence as SGLang returns it: `token_ids` and base64 `routed_experts` of
    every token but the last."""
    out = []
    for s in range(trace.num_sequences):
        rows = trace.sequence(s)
        routed = trace.routed_mask()[rows][:-1]
        if not bool(routed.all()):
            raise ValueError(f"sequence {s} has tokens without a route before its last token")
        ids = trace.ids[rows][:-1]
        out.append({"token_ids": trace.tokens[rows].tolist(), "routed_experts": encode_sglang(ids)})
    return out
