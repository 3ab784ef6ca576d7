"""Replaying a trace: a forward (training or inference) uses the trace's experts.

# B sequences, N tokens per sequence, T = B * N, L MoE layers, K top_k, E experts

Two modes:
    "ids"          the trace's expert ids; the combine weights are recomputed from the
                   current router's scores for those ids, the way the router computes its
                   own (router.replay_weights), so gradients reach the router through
                   them (the R3 / Megatron contract).
    "ids+weights"  ids and combine weights both from the trace (constants: the router
                   then learns only from its auxiliary losses).

Every token-choice router replays, dropless or with a capacity. With a capacity, the
replayed ids are the claims: the layer's capacity rule (claim order, drop or reroute,
batch priority) runs on them exactly as on its router's own choice, so a replayed token
can still be dropped or rerouted when its expert is full. A trace of the layer's own
routing therefore replays to the same result; a dropless engine's trace replays exactly
only into a dropless layer. Expert choice and Soft MoE are refused: which experts a token
gets depends on the whole batch there, not on the token.

Tokens the trace did not route (padding, a generation's last token) keep the router's
own choice. Where the trace agrees with the router on a token (same ids, same order,
same used slots), the router's own weights are used, so replaying a model's own trace
changes no output and no gradient, bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..routing import TokenChoice
from .format import Trace
from .record import moe_layers, moekit_identity

MODES = ("ids", "ids+weights")


@dataclass
class ReplayBatch:
    """The trace's sequences as one padded batch: feed tokens_BN (and attention_mask_BN
    when not None) to the model inside the replay context."""

    tokens_BN: Tensor
    attention_mask_BN: Tensor | None
    rows_BN: Tensor  # index of each position's trace row, -1 at padding


def padded_batch(trace: Trace, side: str = "right", pad_id: int = 0) -> ReplayBatch:
    """The trace's sequences padded to the longest ("right": real tokens first, "left":
    last, as left_padded gives a generation's prompts)."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    lengths = [trace.sequence(s).stop - trace.sequence(s).start for s in range(trace.num_sequences)]
    B, N = len(lengths), max(lengths, default=0)
    tokens_BN = torch.full((B, N), pad_id, dtype=torch.long)
    rows_BN = torch.full((B, N), -1, dtype=torch.long)
    for s, length in enumerate(lengths):
        cols = slice(0, length) if side == "right" else slice(N - length, N)
        rows = torch.arange(trace.sequence(s).start, trace.sequence(s).stop)
        tokens_BN[s, cols] = trace.tokens[rows]
        rows_BN[s, cols] = rows
    mask = None if min(lengths, default=N) == N else rows_BN >= 0
    return ReplayBatch(tokens_BN, mask, rows_BN)


class LayerReplay:
    """A MoE layer's routing_hook that swaps in the trace's experts for its T tokens.

    Args:
        name: the layer's name (for errors).
        ids_TK: (T, K) trace ids; use_T: (T,) bool, rows the trace routed.
        valid_TK: (T, K) used slots or None; weights_TK: (T, K) for "ids+weights".
        num_experts: ids outside [0, num_experts) (in unused slots) become expert 0.
    """

    def __init__(self, name, mode, ids_TK, use_T, valid_TK=None, weights_TK=None, num_experts=None):
        self.name, self.mode = name, mode
        self.ids_TK = ids_TK.long()
        if num_experts is not None:
            # An unused slot may hold any id (an engine's filler): expert 0 keeps the
            # gathers in range, and the slot stays unused.
            outside_TK = (self.ids_TK < 0) | (self.ids_TK >= num_experts)
            self.ids_TK = self.ids_TK.masked_fill(outside_TK, 0)
        self.use_T1 = use_T.bool().unsqueeze(1)
        self.valid_TK = valid_TK
        self.weights_TK = None if weights_TK is None else weights_TK.float()

    def __call__(self, layer, decision):
        if not isinstance(decision, TokenChoice):
            raise ValueError(
                f"layer {self.name}: a {type(decision).__name__} decision cannot replay a trace"
            )
        T = decision.ids_TK.shape[0]
        if T != self.ids_TK.shape[0]:
            raise ValueError(
                f"layer {self.name}: the forward routes {T} tokens, the replayed batch holds "
                f"{self.ids_TK.shape[0]}; feed the ReplayBatch's tokens"
            )
        device = decision.ids_TK.device
        use_T1 = self.use_T1.to(device)
        if not layer.router.sparse and self.mode == "ids":
            return decision  # every token uses every expert: the ids replay as they are
        ids_TK = torch.where(use_T1, self.ids_TK.to(device), decision.ids_TK)
        valid_TK = _valid(decision.valid_TK, self.valid_TK, use_T1)
        if self.mode == "ids+weights":
            trace_TK = self.weights_TK.to(device)
            weights_TK = torch.where(use_T1, trace_TK, decision.weights_TK)
        else:
            recomputed_TK = layer.router.replay_weights(decision, ids_TK, valid_TK)
            same_T1 = (ids_TK == decision.ids_TK).all(dim=1, keepdim=True)
            if valid_TK is not None or decision.valid_TK is not None:
                mine_TK = _ones_if_none(decision.valid_TK, ids_TK)
                same_T1 = same_T1 & (_ones_if_none(valid_TK, ids_TK) == mine_TK).all(1, True)
            weights_TK = torch.where(same_T1, decision.weights_TK, recomputed_TK)
        return replace(decision, ids_TK=ids_TK, weights_TK=weights_TK, valid_TK=valid_TK)


def _ones_if_none(valid_TK: Tensor | None, like_TK: Tensor) -> Tensor:
    return torch.ones_like(like_TK, dtype=torch.bool) if valid_TK is None else valid_TK


def _valid(router_TK: Tensor | None, trace_TK: Tensor | None, use_T1: Tensor) -> Tensor | None:
    if router_TK is None and trace_TK is None:
        return None
    trace_TK = _ones_if_none(None if trace_TK is None else trace_TK.to(use_T1.device), use_T1)
    if router_TK is None:
        router_TK = torch.ones_like(trace_TK)
    return torch.where(use_T1, trace_TK.expand_as(router_TK), router_TK)


def check_trace(model: nn.Module, trace: Trace, mode: str = "ids") -> None:
    """Raise ValueError naming the field if trace cannot replay into model in mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model: a {type(model).__name__} has no moekit MoE layers to replay into")
    for name, _, moe in layers:
        if not moe.router.causal or moe.router.mixes_tokens:
            raise ValueError(
                f"router: layer {name} uses the {moe.config.router} router, which cannot "
                "replay (a token's experts depend on the whole batch); use a token-choice router"
            )
    if len(trace.model.layers) != len(layers):
        raise ValueError(
            f"model.layers: the trace has {len(trace.model.layers)} MoE layers, the model "
            f"has {len(layers)}"
        )
    problem = trace.model.mismatch(moekit_identity(model, layers))
    if problem is not None:
        raise ValueError(f"the trace is of another model: {problem}")
    if mode == "ids+weights" and trace.weights is None:
        raise ValueError("weights: the trace holds no combine weights; replay it with mode 'ids'")


@contextlib.contextmanager
def replay_routing(model: nn.Module, trace: Trace, mode: str = "ids", padding: str = "right"):
    """Make the forwards of `model` inside the context use the trace's experts.

    Yields the ReplayBatch to feed: the trace's sequences padded on `padding`'s side.
    Every forward inside must route exactly those B * N tokens (any number of forwards:
    a training step, a recomputation).

        with replay_routing(model, trace, mode="ids") as batch:
            out = model(batch.tokens_BN, attention_mask_BT=batch.attention_mask_BN)
    """
    check_trace(model, trace, mode)
    batch = padded_batch(trace, padding)
    with replay_rows(model, trace, batch.rows_BN.reshape(-1), mode):
        yield batch


@contextlib.contextmanager
def replay_rows(model: nn.Module, trace: Trace, rows_T: Tensor, mode: str = "ids"):
    """replay_routing for any token layout: rows_T (T,) gives each token of the forward
    its trace row (-1: not replayed). The expert-parallel and data-parallel runs use it
    with each process's own rows."""
    check_trace(model, trace, mode)
    layers = moe_layers(model)
    use_T = rows_T >= 0
    index_T = rows_T.clamp_min(0)
    routed_T = trace.routed_mask()[index_T] & use_T
    handles = []
    for i, (name, _, moe) in enumerate(layers):
        valid = None if trace.valid is None else trace.valid[index_T, i]
        weights = None if trace.weights is None else trace.weights[index_T, i]
        ids = trace.ids[index_T, i]
        hook = LayerReplay(name, mode, ids, routed_T, valid, weights, moe.config.num_experts)
        handles.append((moe, moe.routing_hook))
        moe.routing_hook = hook
    try:
        yield
    finally:
        for moe, before in handles:
            moe.routing_hook = before
