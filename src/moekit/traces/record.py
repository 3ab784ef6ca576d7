"""Recording which experts every token took: from a moekit model (the layer's routing hook)
or a transformers model (forward hooks on its routers, traces/record_hf.py).

# B sequences, N tokens per sequence, T = B * N tokens of one call, K top_k, E experts

    with record_routing(model) as recorder:      # any number of forwards or a generate
        model(tokens_BN, attention_mask_BT=real_BN)
    trace = recorder.trace(tokens_BN, real_BN)

Every call of the model appends, per MoE layer, the (B, n) tokens it routed; the calls are
joined along the sequence (a prefill then one-token decode steps join into the sequence
they decoded), and padding is left out. Token-choice routers record the decision the
layer used (after a replay hook, before capacity: an assignment capacity dropped keeps its
expert). Expert choice records, per token, one slot per expert (valid where the expert
picked the token; a token takes 0..E experts, decided by the whole batch); Soft MoE
records every expert for every token, weighted by the token's combine mass on the
expert's slots (its experts' inputs mix all tokens of a sequence, so ids alone say
little). `recording["routing"]` says which.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..moe import MoE
from ..routing import ExpertChoice, SoftAssignment, TokenChoice
from .format import ModelIdentity
from .record_hf import record_hf
from .recorder import BLOCK, Entry, Recorder, recording_info

ROUTING_NOTES = {
    "token_choice": "token choice: K experts per token, as the router chose them (before capacity)",
    "expert_choice": "expert choice: one slot per expert, valid where that expert picked the "
    "token (0..E experts per token, decided by the whole batch); replay refuses it",
    "soft": "Soft MoE: every expert for every token, weighted by the token's combine mass on "
    "the expert's slots; the experts' inputs mix a sequence's tokens; replay refuses it",
}


def moe_layers(model: nn.Module) -> list[tuple[str, int, MoE]]:
    """(name, block index, layer) of every MoE layer of a moekit model, in order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE) and not name.startswith("mtp."):
            match = BLOCK.search(name + ".")
            found.append((name or "moe", int(match.group(1)) if match else len(found), module))
    return found


def moekit_identity(model: nn.Module, layers: list[tuple[str, int, MoE]]) -> ModelIdentity:
    """The identity of a moekit model (a Transformer, or any module holding MoE layers)."""
    moe = layers[0][2].config
    config = getattr(model, "config", None)
    param = next(model.parameters())
    router = layers[0][2].router
    per_token = router.sparse and router.causal and not router.mixes_tokens
    K = moe.top_k if per_token else moe.num_experts  # dense, expert choice, Soft: a slot each
    return ModelIdentity(
        architecture=f"moekit:{moe.router}",
        layers=[name for name, _, _ in layers],
        blocks=[block for _, block, _ in layers],
        num_blocks=getattr(config, "num_layers", len(layers)),
        num_experts=moe.num_experts,
        top_k=K,
        vocab_size=getattr(config, "vocab_size", 0),
        d_model=moe.d_model,
        dtype=str(param.dtype).removeprefix("torch."),
    )


def decision_entry(decision, num_tokens: int, num_experts: int) -> tuple[Entry, str]:
    """A routing decision as a trace entry (T rows), and which kind it was."""
    if isinstance(decision, TokenChoice):
        entry = Entry(decision.ids_TK, decision.weights_TK, decision.valid_TK, decision.logits_TE)
        return entry, "token_choice"
    if isinstance(decision, ExpertChoice):
        E = decision.token_ids_EC.shape[0]
        expert_E1 = torch.arange(E, device=decision.token_ids_EC.device).unsqueeze(1)
        weights_TE = decision.weights_EC.new_zeros(num_tokens, E)
        weights_TE[decision.token_ids_EC, expert_E1] = decision.weights_EC
        valid_TE = torch.zeros(num_tokens, E, dtype=torch.bool, device=weights_TE.device)
        valid_TE[decision.token_ids_EC, expert_E1] = True
        ids_TE = torch.arange(E, device=weights_TE.device).expand(num_tokens, E)
        return Entry(ids_TE, weights_TE, valid_TE, decision.logits_TE), "expert_choice"
    if isinstance(decision, SoftAssignment):
        combine_TS = decision.combine_BNS.flatten(0, 1)
        weights_TE = combine_TS.reshape(combine_TS.shape[0], num_experts, -1).sum(dim=-1)
        ids_TE = torch.arange(num_experts, device=weights_TE.device).expand_as(weights_TE)
        return Entry(ids_TE, weights_TE, None, None), "soft"
    raise TypeError(f"cannot record a routing decision of type {type(decision).__name__}")


@contextlib.contextmanager
def record_routing(model: nn.Module, logits: bool = True, mode: str = "forward"):
    """Record the routing of every forward of `model` while the context is open.

    Args:
        model: a moekit model (MoE layers) or a transformers MoE model of a family moekit
            converts (its routers are hooked; it is not converted).
        logits: keep each layer's router logits (T, E) fp32 too (for the diff's margins).
        mode: what the calls are ("forward", "generate"), written into the trace.
    Yields:
        a Recorder; `recorder.trace(tokens_BN, real_BN)` gives the Trace.
    """
    layers = moe_layers(model)
    if not layers:
        with record_hf(model, logits, mode) as recorder:
            yield recorder
        return
    identity = moekit_identity(model, layers)
    recorder = Recorder(identity, logits, recording_info("moekit", identity.dtype, mode))
    recorder.entries = [[] for _ in layers]
    kinds = set()
    handles = [model.register_forward_pre_hook(_begin(recorder), with_kwargs=True)]
    previous = [moe.routing_hook for _, _, moe in layers]
    for i, (_, _, moe) in enumerate(layers):

        def hook(layer, decision, i=i, before=previous[i]):
            if before is not None:
                decision = before(layer, decision)
            num_tokens = _tokens_of(decision)
            entry, kind = decision_entry(decision, num_tokens, layer.config.num_experts)
            kinds.add(kind)
            recorder.add(i, entry)
            return decision

        moe.routing_hook = hook
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
        for (_, _, moe), before in zip(layers, previous):
            moe.routing_hook = before
        recorder.recording["routing"] = "; ".join(ROUTING_NOTES[k] for k in sorted(kinds))


def _tokens_of(decision) -> int:
    if isinstance(decision, SoftAssignment):
        return decision.combine_BNS.shape[0] * decision.combine_BNS.shape[1]
    return decision.logits_TE.shape[0]


def _begin(recorder: Recorder):
    def pre_hook(module, args, kwargs):
        tokens = args[0] if args else kwargs.get("tokens_BT", kwargs.get("input_ids"))
        if tokens.is_floating_point():  # a bare layer: (..., D) hidden states
            tokens = tokens[..., 0]
        recorder.begin_call(
            tokens.reshape(tokens.shape[0], -1) if tokens.dim() > 1 else tokens[None]
        )

    return pre_hook
