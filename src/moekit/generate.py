"""Autoregressive generation: a KV cache, sampling rules, and a streaming generator.

# B batch, T tokens, S cache length, G key/value heads, Dh head dim, V vocab, K top_k

    for step in stream(model, prompt_BT, max_new_tokens=50, temperature=0.8, top_p=0.9):
        print(step.token_B)

Prompts of different lengths are left-padded into one batch: padding is masked out of
attention and takes no rotary position, so each sequence gets the tokens it would get
decoded alone. With compile=True the one-token decode step runs through torch.compile
over a static cache (models/kv_cache.py): one graph, traced once per batch size and cache
length, reused at every position.

Expert choice and Soft MoE layers are not causal, so their outputs in generation depend
on how many tokens one call sees; use token-choice routers in decoders. With a capacity
factor, capacity also depends on the tokens per call (and padding takes room); dropless
routing (capacity_factor None) gives the same logits with and without the cache, and in
a batch or alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .models.expert_ids import tap_routers
from .models.kv_cache import KVCache
from .models.transformer import Transformer

__all__ = [
    "Generation",
    "KVCache",
    "Step",
    "check_sampling",
    "generate",
    "left_padded",
    "sample_next",
    "stream",
]

# A compiled step's cache length is rounded up to a multiple of this, so prompts of
# nearby lengths reuse one compiled graph (each new cache shape compiles once more).
COMPILED_CACHE_MULTIPLE = 256


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
    check_sampling(temperature, top_k, top_p)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming a sampling setting out of range (see sample_next)."""
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k ({top_k}) must be >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1] or None")


def left_padded(
    prompt: Tensor | Sequence, attention_mask_BT: Tensor | None = None, pad_id: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Prompts of any lengths as one left-padded batch.

    Args:
        prompt: (B, T) token ids, or a list of B sequences of token ids (lists or 1-D
            tensors) of any lengths.
        attention_mask_BT: with a (B, T) prompt, 1 at real tokens and 0 at padding, in any
            layout (left, right); None = every token is real.
        pad_id: the id written at padding (never attended to).
    Returns:
        (prompt_BT, real_BT): the real tokens of each sequence at the end of its row, and
        the bool mask of real tokens (None when every sequence has the full length).
    """
    if isinstance(prompt, Tensor):
        if attention_mask_BT is None:
            return prompt, None
        if attention_mask_BT.shape != prompt.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask_BT.shape)} does not match the "
                f"prompt's {tuple(prompt.shape)}"
            )
        rows = [row[mask.bool()] for row, mask in zip(prompt, attention_mask_BT)]
        device = prompt.device
    else:
        rows = [torch.as_tensor(row, dtype=torch.long).flatten() for row in prompt]
        device = rows[0].device if rows else None
    lengths = [len(row) for row in rows]
    if not rows or min(lengths) < 1:
        raise ValueError(f"every prompt needs at least one token; lengths {lengths}")
    T = max(lengths)
    prompt_BT = torch.full((len(rows), T), pad_id, dtype=torch.long, device=device)
    real_BT = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        prompt_BT[b, T - len(row) :] = row
        real_BT[b, T - len(row) :] = True
    return prompt_BT, None if min(lengths) == T else real_BT


def _decode_step(
    model: Transformer, token_B1: Tensor, cache: KVCache, routings: list | None
) -> tuple[Tensor, list[Tensor | None] | None]:
    """One token per sequence through the model with the cache: the next logits (B, V)
    and, with `routings` (the list `tap_routers` fills during the call), each layer's
    (B, K) experts of that token. The hooks are registered outside, so a compiled step
    traces them as part of the one graph."""
    out = model(token_B1, kv_cache=cache)
    if routings is None:
        return out.logits[:, -1], None
    B = token_B1.shape[0]
    expert_ids = [None if r is None else r.expert_ids(B, 1)[:, -1] for r in routings]
    return out.logits[:, -1], expert_ids


@functools.cache
def compiled_decode_step():
    """`_decode_step` under torch.compile (inductor, one graph, static shapes).

    Only the logits (and expert ids) leave the graph, so the layers' aux losses and
    statistics are dead code that inductor drops.
    """
    return torch.compile(_decode_step, fullgraph=True, dynamic=False)


def _cache_length(model: Transformer, needed: int, compile: bool) -> int:
    if not compile:
        return needed
    rounded = -(-needed // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
    return min(rounded, model.config.max_seq_len)


@torch.no_grad()
def stream(
    model: Transformer,
    prompt: Tensor | Sequence,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    return_expert_ids: bool = False,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
    compile: bool = False,
) -> Iterator[Step]:
    """Yield generated tokens one position at a time (for streaming output).

    Args:
        model: the Transformer (call model.eval() first: noisy routers add noise in training).
        prompt: (B, T) prompt token ids, or a list of B prompts of any lengths (see
            left_padded).
        max_new_tokens: stop after this many positions.
        temperature, top_k, top_p, generator: see sample_next (temperature 0 = greedy).
        eos_token_id: an id, or several (a model may end a reply with any of a few); a
            sequence that produced one is finished and keeps producing the first;
            generation stops once every sequence is finished.
        use_cache: prefill a KVCache with the prompt and feed one token per step; False
            reruns the whole sequence every step (the slow reference).
        return_expert_ids: fill Step.expert_ids with each layer's routing of the new token;
            each step then waits for the forward that feeds its token back.
        attention_mask: with a padded (B, T) prompt, 1 at its real tokens (any layout).
        compile: run the decode step through torch.compile (needs use_cache). The first
            step pays the compile; see docs/benchmarks.md for when that pays.
    Yields:
        Step(token_B, logits_BV, expert_ids).
    """
    prompt_BT, real_BT = left_padded(prompt, attention_mask)
    _check_args(model, prompt_BT, max_new_tokens, temperature, top_k, top_p)
    if compile and not use_cache:
        raise ValueError("compile=True needs use_cache=True (it compiles the cached decode step)")
    if max_new_tokens == 0:
        return
    eos_ids = None
    if eos_token_id is not None:
        eos_ids = torch.as_tensor(eos_token_id, dtype=torch.long, device=prompt_BT.device)
        if eos_ids.dim() > 1 or eos_ids.numel() == 0:
            raise ValueError(
                f"eos_token_id must be an id or a non-empty list, not {eos_token_id!r}"
            )
        eos_ids = eos_ids.flatten()
    B, T = prompt_BT.shape
    cache = None
    if use_cache:
        cache = KVCache.for_model(model, B, _cache_length(model, T + max_new_tokens, compile))
    decode = compiled_decode_step() if compile else _decode_step
    with tap_routers(model.layers, enabled=return_expert_ids and use_cache) as routings:
        yield from _steps(
            model,
            prompt_BT,
            real_BT,
            cache,
            decode,
            routings if return_expert_ids else None,
            max_new_tokens=max_new_tokens,
            sample=functools.partial(
                sample_next, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            ),
            eos_ids=eos_ids,
        )


def _steps(
    model, prompt_BT, real_BT, cache, decode, routings, *, max_new_tokens, sample, eos_ids
) -> Iterator[Step]:
    """The generation loop of `stream` (arguments checked, cache made, hooks set)."""
    return_expert_ids = routings is not None
    B = prompt_BT.shape[0]
    tokens_BT = prompt_BT
    finished_B = torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    # Left padding: the last column is real in every row, and only it needs logits.
    out = model(prompt_BT, kv_cache=cache, attention_mask_BT=real_BT, num_logits=1)
    logits_BV = out.logits[:, -1]
    for step in range(max_new_tokens):
        # 1. pick the next token; finished sequences repeat eos
        token_B = sample(logits_BV)
        if eos_ids is not None:
            token_B = token_B.masked_fill(finished_B, eos_ids[0])
            finished_B = finished_B | torch.isin(token_B, eos_ids)
        last = step == max_new_tokens - 1 or (eos_ids is not None and bool(finished_B.all()))
        step_logits_BV = logits_BV
        # 2. feed the token back: that forward gives the next logits and routes the token
        # itself. Without expert ids the token streams out first and the last one is never
        # fed back; with them the step waits for its forward (one forward more at the end).
        if not return_expert_ids:
            yield Step(token_B=token_B, logits_BV=step_logits_BV)
            if last:
                return
        if cache is not None:
            logits_BV, expert_ids = decode(model, token_B.unsqueeze(1), cache, routings)
        else:
            tokens_BT = torch.cat([tokens_BT, token_B.unsqueeze(1)], dim=1)
            if real_BT is not None:
                real_BT = torch.cat([real_BT, real_BT.new_ones(B, 1)], dim=1)
            out = model(
                tokens_BT,
                attention_mask_BT=real_BT,
                return_expert_ids=return_expert_ids,
                num_logits=1,
            )
            logits_BV = out.logits[:, -1]
            if return_expert_ids:
                expert_ids = [None if ids is None else ids[:, -1] for ids in out.expert_ids]
        if return_expert_ids:
            yield Step(token_B=token_B, logits_BV=step_logits_BV, expert_ids=expert_ids)
            if last:
                return


@dataclass
class Generation:
    """tokens_BN: (B, N) the generated tokens (prompt excluded). logits_BNV: their logits.
    expert_ids: per layer (B, N, K) or None (see Step), when asked for, else None."""

    tokens_BN: Tensor
    logits_BNV: Tensor
    expert_ids: list[Tensor | None] | None = None


def generate(model: Transformer, prompt: Tensor | Sequence, **kwargs) -> Generation:
    """Run `stream` to the end and stack its steps; takes the same arguments."""
    steps = list(stream(model, prompt, **kwargs))
    if not steps:
        prompt_BT, _ = left_padded(prompt, kwargs.get("attention_mask"))
        B, V = prompt_BT.shape[0], model.config.vocab_size
        empty = prompt_BT.new_empty(B, 0)
        return Generation(tokens_BN=empty, logits_BNV=torch.empty(B, 0, V, device=prompt_BT.device))
    tokens_BN = torch.stack([s.token_B for s in steps], dim=1)
    logits_BNV = torch.stack([s.logits_BV for s in steps], dim=1)
    expert_ids = None
    if steps[0].expert_ids is not None:
        per_layer = zip(*(s.expert_ids for s in steps))
        expert_ids = [None if ids[0] is None else torch.stack(ids, dim=1) for ids in per_layer]
    return Generation(tokens_BN=tokens_BN, logits_BNV=logits_BNV, expert_ids=expert_ids)
