"""Autoregressive generation: a KV cache, sampling rules, and a streaming generator.

# B batch, T tokens, S cache length, G key/value heads, Dh head dim, V vocab, K top_k

    for step in stream(model, prompt_BT, max_new_tokens=50, temperature=0.8, top_p=0.9):
        print(step.token_B)

All sequences of a batch share one length (prompts of equal length, no padding).
Expert choice and Soft MoE layers are not causal, so their outputs in generation depend
on how many tokens one call sees; use token-choice routers in decoders. With a capacity
factor, capacity also depends on the tokens per call; dropless routing (capacity_factor
None) gives the same logits with and without the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .models.kv_cache import KVCache
from .models.transformer import Transformer

__all__ = ["Generation", "KVCache", "Step", "generate", "sample_next", "stream"]


def sample_next(
    logits_BV: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from the last position's logits.

    Args:
        logits_BV: (B, V) logits.
        temperature: 0 = greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the k most likely tokens (None = all).
        top_p: nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens
            whose probability reaches top_p (None = all).
        generator: a torch.Generator for reproducible sampling.
    Returns:
        token_B: (B,) long.
    """
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None:
        logits_BV = _nucleus(logits_BV, top_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _nucleus(logits_BV: Tensor, top_p: float) -> Tensor:
    """-inf for every token outside the smallest set whose probability reaches top_p."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    # A token stays if the mass of the tokens ranked above it is still below p (so the
    # most likely token always stays).
    drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= top_p
    drop_BV = drop_BV.scatter(-1, order_BV, drop_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


@dataclass
class Step:
    """One generated position.

    token_B: (B,) the new tokens. logits_BV: (B, V) the logits they were sampled from.
    expert_ids: with return_expert_ids, per layer (B, K) ids of the experts the new token
        itself was routed to in that layer, when fed back as input (see
        ModelOutput.expert_ids; None for dense layers), else None.
    """

    token_B: Tensor
    logits_BV: Tensor
    expert_ids: list[Tensor | None] | None = None


def _check_args(
    model: Transformer, prompt_BT: Tensor, max_new_tokens: int, temperature, top_k, top_p
) -> None:
    if prompt_BT.dim() != 2 or prompt_BT.shape[1] < 1:
        raise ValueError(f"prompt must be (B, T) with T >= 1, got shape {tuple(prompt_BT.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
    total = prompt_BT.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt length ({prompt_BT.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len ({model.config.max_seq_len})"
        )
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k ({top_k}) must be >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1] or None")


@torch.no_grad()
def stream(
    model: Transformer,
    prompt_BT: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    return_expert_ids: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Yield generated tokens one position at a time (for streaming output).

    Args:
        model: the Transformer (call model.eval() first: noisy routers add noise in training).
        prompt_BT: (B, T) prompt token ids.
        max_new_tokens: stop after this many positions.
        temperature, top_k, top_p, generator: see sample_next (temperature 0 = greedy).
        eos_token_id: stop once every sequence has produced it; a finished sequence keeps
            producing eos_token_id until then.
        use_cache: prefill a KVCache with the prompt and feed one token per step; False
            reruns the whole sequence every step (the slow reference).
        return_expert_ids: fill Step.expert_ids with each layer's routing of the new token;
            each step then waits for the forward that feeds its token back.
    Yields:
        Step(token_B, logits_BV, expert_ids).
    """
    _check_args(model, prompt_BT, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return
    B, T = prompt_BT.shape
    cache = KVCache.for_model(model, B, T + max_new_tokens) if use_cache else None
    tokens_BT = prompt_BT
    finished_B = torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    out = model(prompt_BT, kv_cache=cache)
    for step in range(max_new_tokens):
        # 1. pick the next token from the last position; finished sequences repeat eos
        logits_BV = out.logits[:, -1]
        token_B = sample_next(
            logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eos_token_id is not None:
            token_B = token_B.masked_fill(finished_B, eos_token_id)
            finished_B = finished_B | (token_B == eos_token_id)
        last = step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished_B.all()))
        tokens_BT = torch.cat([tokens_BT, token_B.unsqueeze(1)], dim=1)
        # 2. feed the token back: that forward gives the next logits and routes the token
        # itself. Without expert ids the token streams out first and the last one is never
        # fed back; with them the step waits for its forward (one forward more at the end).
        input_BT = token_B.unsqueeze(1) if use_cache else tokens_BT
        if not return_expert_ids:
            yield Step(token_B=token_B, logits_BV=logits_BV)
            if last:
                return
            out = model(input_BT, kv_cache=cache)
        else:
            out = model(input_BT, kv_cache=cache, return_expert_ids=True)
            expert_ids = [None if ids is None else ids[:, -1] for ids in out.expert_ids]
            yield Step(token_B=token_B, logits_BV=logits_BV, expert_ids=expert_ids)
            if last:
                return


@dataclass
class Generation:
    """tokens_BN: (B, N) the generated tokens (prompt excluded). logits_BNV: their logits.
    expert_ids: per layer (B, N, K) or None (see Step), when asked for, else None."""

    tokens_BN: Tensor
    logits_BNV: Tensor
    expert_ids: list[Tensor | None] | None = None


def generate(model: Transformer, prompt_BT: Tensor, **kwargs) -> Generation:
    """Run `stream` to the end and stack its steps; takes the same keyword arguments."""
    steps = list(stream(model, prompt_BT, **kwargs))
    B = prompt_BT.shape[0]
    if not steps:
        V = model.config.vocab_size
        empty = prompt_BT.new_empty(B, 0)
        return Generation(tokens_BN=empty, logits_BNV=torch.empty(B, 0, V, device=prompt_BT.device))
    tokens_BN = torch.stack([s.token_B for s in steps], dim=1)
    logits_BNV = torch.stack([s.logits_BV for s in steps], dim=1)
    expert_ids = None
    if steps[0].expert_ids is not None:
        per_layer = zip(*(s.expert_ids for s in steps))
        expert_ids = [None if ids[0] is None else torch.stack(ids, dim=1) for ids in per_layer]
    return Generation(tokens_BN=tokens_BN, logits_BNV=logits_BNV, expert_ids=expert_ids)
