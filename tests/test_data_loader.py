"""Token streams (in memory and memmap) and the seeded, resumable batch loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moekit.data import (
    DOMAINS,
    BatchLoader,
    Document,
    TokenStream,
    build_corpus,
    load_stream,
    prepare,
    read_stream_meta,
    sequential_batches,
    tokenize_documents,
    train_tokenizer,
)
from moekit.data.stream import token_dtype

DOCUMENTS = [
    Document(id=f"doc{i}", domain=domain, text=text * (1 + i % 4))
    for i, (domain, text) in enumerate(
        [
            ("code", "def add(a, b):\n    return a + b\n"),
            ("prose", "The quick brown fox jumps over the lazy dog. "),
            ("math", "Problem: Compute 12 + 30.\nAnswer: 42\n"),
            ("dialogue", "A: Hello\nB: Hi, how are you?\n"),
            ("multilingual", "A: Grüß Gott\nB: こんにちは\n"),
            ("notes", "a user domain outside the default five\n"),
        ]
        * 5
    )
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([d.text for d in DOCUMENTS], vocab_size=320)


@pytest.fixture(scope="module")
def stream(tokenizer):
    return tokenize_documents(DOCUMENTS, tokenizer)


def counting_stream(num_tokens: int) -> TokenStream:
    """A stream whose token at position i is i, so a batch shows where it was cut."""
    tokens_N = np.arange(num_tokens, dtype=np.uint32)
    return TokenStream(tokens_N, (tokens_N % 3).astype(np.uint8), DOMAINS[:3], eot_id=0)


# --- streams ------------------------------------------------------------------------------


def test_stream_is_documents_each_followed_by_eot(stream, tokenizer):
    assert stream.tokens_N.dtype == np.uint16
    assert stream.domains == DOMAINS + ("notes",)
    ends = np.flatnonzero(stream.tokens_N == tokenizer.eot_id)
    assert len(ends) == len(DOCUMENTS) and ends[-1] == len(stream) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    for document, start, end in zip(DOCUMENTS, starts, ends, strict=True):
        assert tokenizer.decode(stream.tokens_N[start:end].tolist()) == document.text
        # The end-of-document token belongs to its document's domain.
        assert set(stream.domain_ids_N[start : end + 1]) == {stream.domains.index(document.domain)}


def test_token_dtype_widens_past_uint16():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_prepare_then_memmap_equals_in_memory_stream(stream, tokenizer, tmp_path):
    # A generator with small chunks: the writer must not need the whole corpus at once.
    path = prepare(
        (d for d in DOCUMENTS), tokenizer, tmp_path / "train.bin",
        domains=stream.domains, documents_per_chunk=4,
    )  # fmt: skip
    loaded = load_stream(path, tokenizer=tokenizer)
    assert isinstance(loaded.tokens_N, np.memmap)
    np.testing.assert_array_equal(loaded.tokens_N, stream.tokens_N)
    np.testing.assert_array_equal(loaded.domain_ids_N, stream.domain_ids_N)
    assert (loaded.domains, loaded.eot_id) == (stream.domains, stream.eot_id)
    meta = read_stream_meta(path)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 320
    assert meta["num_tokens"] == len(stream) and meta["num_documents"] == len(DOCUMENTS)
    assert meta["tokenizer_sha256"] == tokenizer.sha256()
    assert json.loads((tmp_path / "train.json").read_text()) == meta


def test_load_stream_errors_name_the_path(tokenizer, tmp_path):
    path = prepare(DOCUMENTS[:3], tokenizer, tmp_path / "small.bin")
    other = train_tokenizer(["something else entirely"] * 10, vocab_size=300)
    with pytest.raises(ValueError, match="small.bin' was made with tokenizer"):
        load_stream(path, tokenizer=other)
    with pytest.raises(ValueError, match="missing.json"):
        load_stream(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="must end in .bin"):
        prepare(DOCUMENTS, tokenizer, tmp_path / "train.npy")
    with pytest.raises(ValueError, match=r"\['notes'\] not in"):
        prepare(DOCUMENTS, tokenizer, tmp_path / "x.bin", domains=DOMAINS)


# --- loader -------------------------------------------------------------------------------


def test_batches_are_shifted_windows_of_the_stream():
    stream = counting_stream(1000)
    loader = BatchLoader(stream, batch_size=4, seq_len=16, seed=0, return_domains=True)
    inputs_BL, targets_BL, domains_BL = loader.next_batch()
    assert inputs_BL.shape == targets_BL.shape == (4, 16)
    assert inputs_BL.dtype == targets_BL.dtype == torch.int64
    # Token i sits at position i, so each row must be a run of consecutive positions.
    assert torch.equal(targets_BL, inputs_BL + 1)
    assert torch.equal(inputs_BL, inputs_BL[:, :1] + torch.arange(16))
    assert torch.equal(domains_BL.long(), targets_BL % 3)


def test_an_epoch_visits_every_window_once():
    stream = counting_stream(1000)
    seq_len, batch_size = 16, 4
    loader = BatchLoader(stream, batch_size=batch_size, seq_len=seq_len, seed=5)
    starts = []
    while loader.epoch == 0:
        starts.extend(loader.next_batch()[0][:, 0].tolist())
    starts = starts[:-batch_size]  # the last batch read already belongs to epoch 1
    offset = min(starts)
    num_windows = (1000 - offset - 1) // seq_len
    expected = offset + seq_len * np.arange(num_windows // batch_size * batch_size)
    assert sorted(starts) != starts  # shuffled
    assert set(starts) <= set(offset + seq_len * np.arange(num_windows))
    assert len(set(starts)) == len(starts) == len(expected)


def test_loader_is_deterministic_given_seed(stream):
    def first_batches(seed):
        loader = BatchLoader(stream, batch_size=2, seq_len=8, seed=seed)
        return [loader.next_batch() for _ in range(5)]

    same = zip(first_batches(1), first_batches(1), strict=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in same)
    assert not torch.equal(first_batches(1)[0][0], first_batches(2)[0][0])


def test_resume_gives_the_same_next_batches():
    stream = counting_stream(500)
    original = BatchLoader(stream, batch_size=3, seq_len=10, seed=11)
    # 25 batches crosses an epoch boundary (about 16 batches per epoch).
    for _ in range(25):
        original.next_batch()
    state = original.state_dict()
    assert state["epoch"] == 1
    expected = [original.next_batch() for _ in range(30)]

    restored = BatchLoader(stream, batch_size=3, seq_len=10, seed=0)
    restored.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for want, got in zip(expected, [restored.next_batch() for _ in range(30)], strict=True):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_memmap_loader_matches_in_memory_loader(stream, tokenizer, tmp_path):
    loaded = load_stream(prepare(DOCUMENTS, tokenizer, tmp_path / "train.bin"))
    in_memory = iter(BatchLoader(stream, batch_size=2, seq_len=8, seed=3))
    on_disk = iter(BatchLoader(loaded, batch_size=2, seq_len=8, seed=3))
    for _ in range(10):
        want, got = next(in_memory), next(on_disk)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_sequential_batches_see_every_target_once():
    stream = counting_stream(103)
    batches = list(sequential_batches(stream, batch_size=4, seq_len=10))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    targets = torch.cat([t.flatten() for _, t in batches])
    assert torch.equal(targets, torch.arange(1, 101))


def test_sequential_batches_spread_a_window_cap_over_the_stream():
    # 10 windows of 10 tokens; a cap of 4 takes windows floor(i * 10 / 4) = 0, 2, 5, 7.
    stream = counting_stream(103)
    batches = list(sequential_batches(stream, batch_size=3, seq_len=10, max_windows=4))
    assert [b[0].shape[0] for b in batches] == [3, 1]
    inputs = torch.cat([x for x, _ in batches])
    assert inputs[:, 0].tolist() == [0, 20, 50, 70]
    assert torch.equal(inputs[1], torch.arange(20, 30))
    # A cap at or above the window count changes nothing.
    capped = list(sequential_batches(stream, batch_size=4, seq_len=10, max_windows=10))
    plain = list(sequential_batches(stream, batch_size=4, seq_len=10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(capped, plain))


def test_loader_rejects_a_stream_too_short():
    with pytest.raises(ValueError, match="stream has 50 tokens"):
        BatchLoader(counting_stream(50), batch_size=4, seq_len=16)


@pytest.mark.slow
def test_default_corpus_end_to_end(tmp_path):
    # The full pipeline at default sizes: corpus, 4096-token tokenizer, prepared streams.
    corpus = build_corpus(tmp_path / "cache")
    tokenizer = train_tokenizer(d.text for d in corpus.train)
    assert tokenizer.vocab_size == 4096
    path = prepare(corpus.validation, tokenizer, tmp_path / "val.bin")
    loaded = load_stream(path, tokenizer=tokenizer)
    in_memory = tokenize_documents(corpus.validation, tokenizer)
    np.testing.assert_array_equal(loaded.tokens_N, in_memory.tokens_N)
    assert set(np.unique(loaded.domain_ids_N)) == set(range(len(DOMAINS)))
    inputs_BL, targets_BL = BatchLoader(loaded, batch_size=8, seq_len=256).next_batch()
    assert int(inputs_BL.max()) < 4096 and targets_BL.shape == (8, 256)
