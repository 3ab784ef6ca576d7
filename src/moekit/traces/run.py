"""Recording runs: a model's routing over given sequences (one padded forward) or over a
greedy generation from given prompts, for moekit and transformers models alike.

# B sequences, N tokens per sequence
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..generate import generate, left_padded
from .format import Trace
from .record import moe_layers, record_routing


def _is_moekit(model: nn.Module) -> bool:
    return bool(moe_layers(model))


def right_padded(sequences: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(tokens_BN, real_BN): the sequences from column 0, padded on the right."""
    if not sequences or min(len(s) for s in sequences) < 1:
        raise ValueError("every sequence needs at least one token")
    N = max(len(s) for s in sequences)
    tokens_BN = torch.full((len(sequences), N), pad_id, dtype=torch.long)
    real_BN = torch.zeros(len(sequences), N, dtype=torch.bool)
    for b, sequence in enumerate(sequences):
        tokens_BN[b, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        real_BN[b, : len(sequence)] = True
    return tokens_BN, real_BN


@torch.no_grad()
def record_forward(
    model: nn.Module, sequences: list[list[int]], logits: bool = True, padding: str = "right"
) -> Trace:
    """The routing of one forward over the sequences, padded into one batch on `padding`'s
    side ("right", "left") or run one at a time ("none": batch 1, no padding)."""
    if padding == "none":
        traces = [record_forward(model, [s], logits, "right") for s in sequences]
        return concatenate(traces)
    if padding == "right":
        tokens_BN, real_BN = right_padded(sequences)
    elif padding == "left":
        tokens_BN, real_BN = left_padded(sequences)
        real_BN = torch.ones_like(tokens_BN, dtype=torch.bool) if real_BN is None else real_BN
    else:
        raise ValueError(f"padding must be 'right', 'left' or 'none'; got {padding!r}")
    mask = None if bool(real_BN.all()) else real_BN
    with record_routing(model, logits) as recorder:
        if _is_moekit(model):
            model(tokens_BN, attention_mask_BT=mask)
        else:
            model(input_ids=tokens_BN, attention_mask=None if mask is None else mask.long())
    trace = recorder.trace(tokens_BN, real_BN)
    trace.recording["batch"] = f"{len(sequences)} sequences, {padding}-padded"
    return trace


@torch.no_grad()
def record_generation(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, logits: bool = True
) -> Trace:
    """The routing of a greedy generation from the prompts (left-padded into one batch,
    KV cache): the prompts' tokens, then each generated token but the last, which is never
    fed back (kept in the trace with routed False)."""
    prompt_BT, real_BT = left_padded(prompts)
    real_BT = torch.ones_like(prompt_BT, dtype=torch.bool) if real_BT is None else real_BT
    with record_routing(model, logits, mode="generate") as recorder:
        if _is_moekit(model):
            new_BN = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
            new_BN = new_BN.tokens_BN
        else:
            out = model.generate(
                input_ids=prompt_BT, attention_mask=real_BT.long(), max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
            new_BN = out[:, prompt_BT.shape[1] :]
    tokens_BN = torch.cat([prompt_BT, new_BN], dim=1)
    real_BN = torch.cat([real_BT, torch.ones_like(new_BN, dtype=torch.bool)], dim=1)
    trace = recorder.trace(tokens_BN, real_BN)
    trace.recording["batch"] = f"{len(prompts)} prompts, left-padded, {max_new_tokens} new tokens"
    return trace


def concatenate(traces: list[Trace]) -> Trace:
    """One trace of the sequences of several traces of the same model, in order."""
    first = traces[0]
    for other in traces[1:]:
        problem = first.model.mismatch(other.model)
        if problem is not None:
            raise ValueError(f"cannot concatenate traces of different models: {problem}")

    def cat(name: str) -> Tensor | None:
        parts = [getattr(t, name) for t in traces]
        if any(p is None for p in parts):
            if name == "routed" and not all(p is None for p in parts):
                parts = [t.routed_mask() for t in traces]
            else:
                return None
        return torch.cat(parts)

    lengths = torch.cat([t.offsets[1:] - t.offsets[:-1] for t in traces])
    return Trace(
        model=first.model, tokens=cat("tokens"),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        ids=cat("ids"), weights=cat("weights"), logits=cat("logits"), valid=cat("valid"),
        routed=cat("routed"), positions=cat("positions"), recording=dict(first.recording),
    )  # fmt: skip
