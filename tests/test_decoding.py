"""Decoding properties, each written once over every attention kind (grouped-query, latent,
sinks with a sliding window) and the decoder options: a KV cache filled in chunks and
token by token equals the full forward; cached and uncached generation agree; a ragged
batch (left-padded) gives each prompt its tokens alone; left- and right-padded forwards
equal each sequence alone; the decode step compiles once; compiled generation equals
eager. The decoders are builders.py's."""

from __future__ import annotations

import pytest
import torch
from builders import ALL_OPTIONS, decoder, moe_config, options_decoder

from moekit.generate import KVCache, generate

pytestmark = pytest.mark.usefixtures("one_thread")

# YaRN under a short original context, so latent attention's mscale matters.
YARN = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 8, "mscale_all_dim": 1.0}
SIGMOID = dict(router="sigmoid_topk", num_groups=2)
# name: (kind, overrides); max_seq_len 24 for every case.
KINDS = {
    "gqa": ("gqa", {}),
    "gqa-switch": ("gqa", dict(moe=moe_config(top_k=1, router="switch"))),
    "gqa-sigmoid_topk": ("gqa", dict(moe=moe_config(**SIGMOID))),
    "gqa-top_p-shared": ("gqa", dict(moe=moe_config(router="top_p", num_shared_experts=1))),
    "gqa-rotary_dim": ("gqa", dict(rotary_dim=2)),
    "gqa-norm_layer": ("gqa", dict(norm="layer")),
    # a compressed query, YaRN, sigmoid groups after a dense first layer
    "mla": ("mla", dict(rope_scaling=YARN, moe=moe_config(**SIGMOID), first_dense_layers=1)),
    "mla-q_proj": ("mla", dict(q_lora_rank=None)),
    # layer 0 slides (window 3): prompts and chunks longer and shorter than the window
    "sinks": ("sinks", {}),
}
ATTENTION = ["gqa", "mla", "sinks"]
# The family options on their own decoder (biases and the final norm drawn so they show):
# one at a time, then all of them, also with gpt-oss's attention.
OPTIONS = {f"options-{name}": {name: value} for name, value in ALL_OPTIONS.items()}
OPTIONS["options-all"] = ALL_OPTIONS
OPTIONS["options-all-sinks"] = ALL_OPTIONS | dict(attention="sinks", sliding_window=3)
LENGTHS = [5, 1, 8, 3]
CHUNKS = ((0, 4), (4, 5), (5, 6), (6, 11))


def build(name: str, **overrides):
    if name in OPTIONS:
        return options_decoder(**(OPTIONS[name] | overrides))
    kind, settings = KINDS[name]
    return decoder(kind, **(dict(max_seq_len=24) | settings | overrides))


def ragged_prompts(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (n,), generator=gen) for n in LENGTHS]


@pytest.mark.parametrize("name", [*KINDS, *OPTIONS])
def test_cache_filled_in_chunks_and_token_by_token_equals_the_full_forward(name):
    # A 4-token prefill, two single tokens (latent attention's absorbed step), then 5 new
    # queries over 11 keys (the explicit, bottom-right causal mask; past sinks' window).
    model = build(name)
    x_BT = torch.randint(0, 32, (2, 11), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model, batch_size=2, max_len=11)
    with torch.no_grad():
        full = model(x_BT).logits
        chunks = [model(x_BT[:, a:b], kv_cache=cache).logits for a, b in CHUNKS]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [*KINDS, "gqa-dense"])
def test_greedy_with_and_without_cache_gives_the_same_tokens_and_logits(name):
    model = build("gqa", moe=None) if name == "gqa-dense" else build(name)
    prompt = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=12, temperature=0.0)
    cached = generate(model, prompt, use_cache=True, **kwargs)
    uncached = generate(model, prompt, use_cache=False, **kwargs)
    assert cached.tokens_BN.shape == (2, 12)
    torch.testing.assert_close(cached.tokens_BN, uncached.tokens_BN)
    torch.testing.assert_close(cached.logits_BNV, uncached.logits_BNV, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", KINDS)
def test_ragged_left_padded_batch_gives_each_prompt_its_tokens_alone(name, use_cache):
    model = build(name)
    prompts = ragged_prompts()
    kwargs = dict(max_new_tokens=9, temperature=0.0, use_cache=use_cache)
    batched = generate(model, prompts, **kwargs)
    for row, p in enumerate(prompts):
        alone = generate(model, p.unsqueeze(0), **kwargs)
        torch.testing.assert_close(batched.tokens_BN[row], alone.tokens_BN[0])
        torch.testing.assert_close(
            batched.logits_BNV[row], alone.logits_BNV[0], atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("name", ATTENTION)
def test_padded_forward_equals_each_sequence_alone(name):
    # Left and right padding through one forward: each sequence's real positions match.
    model = build(name)
    prompts = ragged_prompts()
    T = max(LENGTHS)
    for left in (True, False):
        tokens_BT = torch.zeros(len(prompts), T, dtype=torch.long)
        mask_BT = torch.zeros(len(prompts), T, dtype=torch.bool)
        for b, p in enumerate(prompts):
            cols = slice(T - len(p), T) if left else slice(0, len(p))
            tokens_BT[b, cols], mask_BT[b, cols] = p, True
        with torch.no_grad():
            logits = model(tokens_BT, attention_mask_BT=mask_BT).logits
            for b, p in enumerate(prompts):
                alone = model(p.unsqueeze(0)).logits[0]
                torch.testing.assert_close(logits[b][mask_BT[b]], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ATTENTION)
def test_decode_step_compiles_once_and_is_reused(name):
    from torch._dynamo.testing import CompileCounter

    from moekit.generate import _decode_step

    torch._dynamo.reset()
    model = build(name)
    counter = CompileCounter()
    step = torch.compile(_decode_step, backend=counter, fullgraph=True, dynamic=False)
    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    eager_cache = KVCache.for_model(model, batch_size=2, max_len=16)
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        model(prompt, kv_cache=eager_cache)
        for t in range(6):
            token_B1 = torch.randint(0, 32, (2, 1), generator=torch.Generator().manual_seed(t))
            logits, _ = step(model, token_B1, cache, None)
            expected, _ = _decode_step(model, token_B1, eager_cache, None)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ATTENTION)
def test_compiled_generation_equals_eager_with_sampling_and_expert_ids(name):
    torch._dynamo.reset()
    model = build(name)
    kwargs = dict(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, return_expert_ids=True)
    eager = generate(model, ragged_prompts(), generator=torch.Generator().manual_seed(0), **kwargs)
    compiled = generate(
        model, ragged_prompts(), generator=torch.Generator().manual_seed(0), compile=True, **kwargs
    )
    torch.testing.assert_close(compiled.tokens_BN, eager.tokens_BN)
    torch.testing.assert_close(compiled.logits_BNV, eager.logits_BNV, atol=1e-4, rtol=1e-4)
    for a, b in zip(compiled.expert_ids, eager.expert_ids):
        assert (a is None) == (b is None)  # latent attention's case has a dense first layer
        if a is not None:
            torch.testing.assert_close(a, b)
