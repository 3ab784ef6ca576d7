"""Recording a transformers MoE model's routing by forward hooks on its routers.

# T tokens of one call, K top_k, E experts

Every family moekit converts (interop/architectures/; the tests run each) routes through
one router module per MoE layer whose forward returns
`(router_logits (T, E), top-k weights (T, K), top-k indices (T, K))`: the weights are the
ones the experts' outputs are mixed with (renormalised, scaled or softmaxed over the top-k
as the family does). The hook keeps those three, so nothing is recomputed and the model is
not converted. The indices are kept in the order the router returned them (DeepSeek's
routers do not sort theirs).
"""

from __future__ import annotations

import contextlib

from torch import nn

from .format import ModelIdentity
from .recorder import BLOCK, Entry, Recorder, recording_info

ROUTER_CLASS_SUFFIXES = ("TopKRouter", "TopkRouter")


def hf_routers(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(name, block index, router module) of every MoE router of a transformers model."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith(ROUTER_CLASS_SUFFIXES):
            match = BLOCK.search(name)
            if match is None:
                raise ValueError(f"router {name!r} is not inside a numbered decoder layer")
            found.append((name, int(match.group(1)), module))
    return found


def hf_identity(model: nn.Module, routers: list[tuple[str, int, nn.Module]]) -> ModelIdentity:
    config = model.config
    router = routers[0][2]
    return ModelIdentity(
        architecture=f"transformers:{config.model_type}",
        layers=[name for name, _, _ in routers],
        blocks=[block for _, block, _ in routers],
        num_blocks=config.num_hidden_layers,
        num_experts=router.num_experts,
        top_k=router.top_k,
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


@contextlib.contextmanager
def record_hf(model: nn.Module, logits: bool = True, mode: str = "forward"):
    """record_routing for a transformers model: yields a Recorder."""
    if not hasattr(model, "config") or not hasattr(model.config, "model_type"):
        raise ValueError(
            f"model: a {type(model).__name__} has neither moekit MoE layers nor a "
            "transformers config; nothing to record"
        )
    routers = hf_routers(model)
    if not routers:
        raise ValueError(
            f"model: the transformers {model.config.model_type} model has no top-k router "
            f"modules (class names ending in {' or '.join(ROUTER_CLASS_SUFFIXES)})"
        )
    identity = hf_identity(model, routers)
    recorder = Recorder(identity, logits, recording_info("transformers", identity.dtype, mode))
    recorder.recording["routing"] = "token choice: the router's top-k as the family computes it"
    recorder.entries = [[] for _ in routers]

    def begin(module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            raise ValueError("recording a transformers model needs input_ids (not inputs_embeds)")
        recorder.begin_call(tokens)

    handles = [model.register_forward_pre_hook(begin, with_kwargs=True)]
    for i, (_, _, router) in enumerate(routers):

        def keep(module, args, output, i=i):
            router_logits, weights_TK, ids_TK = output
            E = module.num_experts
            entry = Entry(ids_TK, weights_TK, None, router_logits.reshape(-1, E))
            recorder.add(i, entry)

        handles.append(router.register_forward_hook(keep))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
