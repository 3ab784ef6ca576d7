"""Batches of (inputs, targets) from a token stream, shuffled by seed and resumable.

Legend: B batch size, L sequence length, W windows in an epoch.

Each epoch cuts the stream into W windows of L + 1 tokens every L tokens (neighbours share
one token, so every token after the first is a target exactly once), starting at an
offset in [0, L) drawn for that epoch (so window edges move between epochs), and visits
the windows in a random order. The order of epoch e depends only on (seed, e), so the
whole state is (epoch, batch index) and a restored loader yields exactly the batches the
original would have. Windows cross document boundaries: the end-of-document token tells
the model where one document stops.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from moekit.data.stream import TokenStream


class BatchLoader:
    """Yields `(inputs_BL, targets_BL)` int64 tensors forever, epoch after epoch.

    Args:
        stream: the token stream (in memory or memmap).
        batch_size: sequences per batch (B).
        seq_len: tokens per sequence (L); targets are inputs shifted by one token.
        seed: seed of the window order; equal seeds give equal batches.
        return_domains: also yield `domains_BL` (uint8 domain id of each target token).
    """

    def __init__(
        self,
        stream: TokenStream,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        return_domains: bool = False,
    ):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be > 0")
        # The smallest epoch (offset L - 1) must still fill one batch.
        needed = batch_size * seq_len + seq_len
        if len(stream) < needed:
            raise ValueError(
                f"stream has {len(stream)} tokens; batch_size {batch_size} x seq_len {seq_len} "
                f"needs at least {needed}"
            )
        self.stream = stream
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.return_domains = return_domains
        self.epoch = 0
        self.batch_index = 0
        self._epoch_starts: np.ndarray | None = None

    def _starts_for_epoch(self, epoch: int) -> np.ndarray:
        """Window start positions of one epoch, in visiting order."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.seq_len))
        num_windows = (len(self.stream) - offset - 1) // self.seq_len
        return offset + self.seq_len * rng.permutation(num_windows)

    def _batches_in_epoch(self) -> int:
        return len(self._current_starts()) // self.batch_size

    def _current_starts(self) -> np.ndarray:
        if self._epoch_starts is None:
            self._epoch_starts = self._starts_for_epoch(self.epoch)
        return self._epoch_starts

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next batch: (inputs_BL, targets_BL) or, with return_domains, plus domains_BL."""
        if self.batch_index >= self._batches_in_epoch():
            # The partial batch at the end of an epoch is dropped: every batch is full.
            self.epoch, self.batch_index, self._epoch_starts = self.epoch + 1, 0, None
        b = self.batch_index
        starts_B = self._current_starts()[b * self.batch_size : (b + 1) * self.batch_size]
        self.batch_index += 1
        return windows_to_batch(self.stream, starts_B, self.seq_len, self.return_domains)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: restoring this state repeats the batches that follow."""
        return {"seed": self.seed, "epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict() of a loader over the same stream and shapes."""
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.batch_index = state["batch_index"]
        self._epoch_starts = None


def windows_to_batch(
    stream: TokenStream, starts_B: np.ndarray, seq_len: int, return_domains: bool = False
) -> tuple[torch.Tensor, ...]:
    """Cut windows of seq_len + 1 tokens at `starts_B` into shifted inputs and targets.

    Returns:
        inputs_BL, targets_BL (int64), and domains_BL when return_domains is true.
    """
    index_BW = np.asarray(starts_B)[:, None] + np.arange(seq_len + 1)
    # Fancy indexing reads only these windows from a memmap, then we widen to int64.
    window_BW = torch.from_numpy(stream.tokens_N[index_BW].astype(np.int64))
    batch = (window_BW[:, :-1], window_BW[:, 1:])
    if return_domains:
        batch += (torch.from_numpy(np.asarray(stream.domain_ids_N[index_BW[:, 1:]])),)
    return batch


def sequential_batches(
    stream: TokenStream,
    *,
    batch_size: int,
    seq_len: int,
    return_domains: bool = False,
    max_windows: int | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One pass over the stream in order, for evaluation: the same batches every time.

    The last batch may hold fewer than batch_size sequences; the final tokens that do not
    fill a window are left out. max_windows (None = all) caps the number of windows by
    taking evenly spaced ones across the whole stream, in order: a sample of every part of
    the stream rather than its head (streams are laid out document by document, and the
    built-in corpus's documents are grouped by domain).
    """
    num_windows = (len(stream) - 1) // seq_len
    index = np.arange(num_windows)
    if max_windows is not None and max_windows < num_windows:
        if max_windows < 1:
            raise ValueError(f"max_windows ({max_windows!r}) must be at least 1")
        # floor(i * n / m) for i < m: distinct, increasing, spread from the first window on.
        index = np.arange(max_windows) * num_windows // max_windows
    starts = index * seq_len
    for first in range(0, len(starts), batch_size):
        yield windows_to_batch(stream, starts[first : first + batch_size], seq_len, return_domains)
