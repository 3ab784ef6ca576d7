"""Generation: sampling rules, streaming, stopping, expert ids, the static cache (the
decoding properties over every attention kind are test_decoding.py's)."""

from __future__ import annotations

import pytest
import torch
from builders import decoder

from moekit.generate import KVCache, generate, sample_next, stream


def prompt(B: int = 2, T: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(seed))


def test_full_cache_raises():
    model = decoder()
    cache = KVCache.for_model(model, batch_size=2, max_len=4)
    with pytest.raises(ValueError, match=r"KV cache is full: 5 positions > max_len \(4\)"):
        model(prompt(T=5), kv_cache=cache)


def test_stream_yields_one_step_at_a_time():
    model = decoder()
    steps = stream(model, prompt(), max_new_tokens=3, temperature=0.0)
    first = next(steps)
    assert first.token_B.shape == (2,) and first.logits_BV.shape == (2, 32)
    assert first.expert_ids is None
    assert len(list(steps)) == 2


def test_generation_stops_when_every_sequence_produced_the_end_token():
    # Sampling with a seeded generator draws the same tokens in both runs until a sequence
    # finishes (sequences of a batch do not interact).
    model = decoder()
    kwargs = dict(max_new_tokens=12, temperature=2.0)
    free = generate(model, prompt(), generator=torch.Generator().manual_seed(1), **kwargs).tokens_BN
    eos = int(free[0, 1])
    first_eos = [int((row == eos).nonzero()[0]) if (row == eos).any() else 12 for row in free]
    stopped = generate(
        model, prompt(), eos_token_id=eos, generator=torch.Generator().manual_seed(1), **kwargs
    ).tokens_BN
    # The run ends at the step where the later sequence reaches eos (or at the limit).
    assert stopped.shape[1] == min(max(first_eos) + 1, 12)
    for row, end in enumerate(first_eos):
        torch.testing.assert_close(stopped[row, : end + 1], free[row, : end + 1])
        assert (stopped[row, end:] == eos).all()  # a finished sequence keeps producing eos


def test_single_sequence_stops_at_its_end_token():
    model = decoder()
    free = generate(model, prompt(B=1), max_new_tokens=6, temperature=0.0).tokens_BN
    eos = int(free[0, 2])
    first_eos = int((free[0] == eos).nonzero()[0])
    stopped = generate(
        model, prompt(B=1), max_new_tokens=6, temperature=0.0, eos_token_id=eos
    ).tokens_BN
    torch.testing.assert_close(stopped, free[:, : first_eos + 1])


def test_several_end_tokens_stop_at_whichever_comes_first():
    # A model may end a reply with any of a few ids (generation_config's eos_token_id list).
    model = decoder()
    kwargs = dict(max_new_tokens=12, temperature=2.0)
    free = generate(model, prompt(), generator=torch.Generator().manual_seed(1), **kwargs).tokens_BN
    eos_ids = [int(free[0, 1]), int(free[1, 3])]
    first_eos = [
        min([int((row == e).nonzero()[0]) for e in eos_ids if (row == e).any()] + [12])
        for row in free
    ]
    stopped = generate(
        model, prompt(), eos_token_id=eos_ids, generator=torch.Generator().manual_seed(1), **kwargs
    ).tokens_BN
    assert stopped.shape[1] == min(max(first_eos) + 1, 12)
    for row, end in enumerate(first_eos):
        torch.testing.assert_close(stopped[row, : end + 1], free[row, : end + 1])
        assert (stopped[row, end + 1 :] == eos_ids[0]).all()  # then the first id, repeated
    with pytest.raises(
        ValueError, match=r"eos_token_id must be an id or a non-empty list, not \[\]"
    ):
        generate(model, prompt(), eos_token_id=[], **kwargs)


def test_expert_ids_of_generated_tokens_match_a_full_forward():
    model = decoder()
    result = generate(model, prompt(), max_new_tokens=4, temperature=0.0, return_expert_ids=True)
    assert [ids.shape for ids in result.expert_ids] == [(2, 4, 2), (2, 4, 2)]
    # Each generated token's own routing: positions 5..8 of prompt + generated tokens.
    sequence_BT = torch.cat([prompt(), result.tokens_BN], dim=1)
    full = model(sequence_BT, return_expert_ids=True)
    for step_ids, full_ids in zip(result.expert_ids, full.expert_ids):
        torch.testing.assert_close(step_ids, full_ids[:, 5:])


def test_expert_ids_are_none_for_dense_layers():
    model = decoder("gqa", num_layers=2, moe_every=2)
    result = generate(model, prompt(), max_new_tokens=2, temperature=0.0, return_expert_ids=True)
    assert result.expert_ids[0] is None
    assert result.expert_ids[1].shape == (2, 2, 2)


def test_sampling_is_reproducible_with_a_generator():
    model = decoder()
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.9)
    a = generate(model, prompt(), generator=torch.Generator().manual_seed(3), **kwargs)
    b = generate(model, prompt(), generator=torch.Generator().manual_seed(3), **kwargs)
    torch.testing.assert_close(a.tokens_BN, b.tokens_BN)


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    logits_BV = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(sample_next(logits_BV, temperature=0.0), torch.tensor([1, 0]))
    torch.testing.assert_close(sample_next(logits_BV, top_k=1), torch.tensor([1, 0]))


def test_top_k_only_samples_the_k_best():
    logits_BV = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]])).repeat(2000, 1)
    tokens_B = sample_next(logits_BV, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tokens_B.tolist()) == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted probabilities 0.5, 0.3, 0.15, 0.05 (tokens 2, 0, 3, 1). The mass before token 3
    # is 0.8, which reaches top_p = 0.8, so only tokens 2 and 0 remain; at p = 0.81 token 3
    # joins them.
    logits_BV = torch.log(torch.tensor([[0.3, 0.05, 0.5, 0.15]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits_BV, top_p=0.8, generator=gen).tolist()) == {0, 2}
    assert set(sample_next(logits_BV, top_p=0.81, generator=gen).tolist()) == {0, 2, 3}
    assert set(sample_next(logits_BV, top_p=0.1, generator=gen).tolist()) == {2}


def test_low_temperature_approaches_greedy():
    logits_BV = torch.tensor([[0.0, 1.0, 0.5]]).repeat(500, 1)
    tokens_B = sample_next(logits_BV, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert (tokens_B == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(max_new_tokens=28),
            r"prompt length \(5\) \+ max_new_tokens \(28\) exceeds max_seq_len \(32\)",
        ),
        (dict(max_new_tokens=2, temperature=-1.0), r"temperature \(-1.0\)"),
        (dict(max_new_tokens=2, top_k=0), r"top_k \(0\)"),
        (dict(max_new_tokens=2, top_p=1.5), r"top_p \(1.5\)"),
    ],
)
def test_bad_generation_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(decoder(), prompt(), **kwargs)


def test_zero_new_tokens_returns_empty():
    result = generate(decoder(), prompt(), max_new_tokens=0)
    assert result.tokens_BN.shape == (2, 0)


def test_expert_ids_with_and_without_cache_agree_up_to_max_seq_len():
    # 5 prompt + 7 new tokens fill max_seq_len (12): the last token's own routing still fits.
    model = decoder("gqa", max_seq_len=12)
    kwargs = dict(max_new_tokens=7, temperature=0.0, return_expert_ids=True)
    cached = generate(model, prompt(), use_cache=True, **kwargs)
    uncached = generate(model, prompt(), use_cache=False, **kwargs)
    torch.testing.assert_close(cached.tokens_BN, uncached.tokens_BN)
    for a, b in zip(cached.expert_ids, uncached.expert_ids):
        torch.testing.assert_close(a, b)


# Prompts of different lengths in one batch.
LENGTHS = [5, 1, 8, 3]


def ragged_prompts(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (n,), generator=gen) for n in LENGTHS]


def test_right_padded_prompt_with_a_mask_equals_the_list_of_prompts():
    model = decoder()
    prompts = ragged_prompts()
    tokens_BT = torch.zeros(len(prompts), max(LENGTHS), dtype=torch.long)
    mask_BT = torch.zeros_like(tokens_BT)
    for b, p in enumerate(prompts):
        tokens_BT[b, : len(p)], mask_BT[b, : len(p)] = p, 1
    kwargs = dict(max_new_tokens=6, temperature=0.0)
    from_list = generate(model, prompts, **kwargs).tokens_BN
    from_mask = generate(model, tokens_BT, attention_mask=mask_BT, **kwargs).tokens_BN
    torch.testing.assert_close(from_mask, from_list)


def test_each_sequence_of_a_ragged_batch_stops_at_its_end_token():
    model = decoder("gqa", max_seq_len=24)
    prompts = ragged_prompts()
    free = generate(model, prompts, max_new_tokens=10, temperature=0.0).tokens_BN
    eos = int(free[2, 1])
    stopped = generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_token_id=eos)
    for row in range(len(prompts)):
        hits = (free[row] == eos).nonzero()
        end = int(hits[0]) if len(hits) else 10
        torch.testing.assert_close(stopped.tokens_BN[row, : end + 1], free[row, : end + 1])
        assert (stopped.tokens_BN[row, end:] == eos).all()


def test_static_cache_is_written_in_place_and_keeps_its_shapes():
    model = decoder()
    cache = KVCache.for_model(model, batch_size=2, max_len=10)
    pointers = [k.data_ptr() for k in cache.k_BGSDh]
    model(prompt(T=4), kv_cache=cache)
    for t in range(3):
        model(prompt(T=1, seed=t), kv_cache=cache)
    assert cache.length == 7 and cache.seen_B.tolist() == [7, 7]
    assert [k.data_ptr() for k in cache.k_BGSDh] == pointers
    assert all(k.shape == (2, 2, 10, 4) for k in cache.k_BGSDh)
    assert cache.filled_BS[:, :7].all() and not cache.filled_BS[:, 7:].any()
