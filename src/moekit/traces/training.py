"""Training on a trace's sequences with its routing replayed (`--routing.replay TRACE`).

# B sequences per batch, L tokens per sequence (train.seq_len)

Reinforcement learning on an MoE trains on the sequences an inference engine generated;
replay makes each training forward send every token to the experts the engine used, so
the policy that is optimised is the one that ran. `ReplayData` is the trainer's data: the
trace's sequences in order, cycled, one per row (inputs = tokens[:L], targets =
tokens[1:L+1], right-padded with targets ignored). `Replay.wrap` turns the trainer's
forward into one that finds each micro-batch's rows of the trace (the rows of this
process's shard of the batch the loader gave last) and runs inside `replay_rows`.
Evaluation stays unreplayed: the validation loss is the model's own routing on the
trace's first sequences. Padding tokens are routed by the router itself; with a capacity
they take room, as any padding does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .format import Trace
from .replay import MODES, check_trace, replay_rows

IGNORE = -100


@dataclass
class _Vocabulary:
    """What the Trainer asks of a tokenizer: its size."""

    vocab_size: int


class ReplayLoader:
    """Batches of the trace's sequences, cycled in order; resumable.

    rows_BL: the trace row of each input token of the last batch (-1 at padding).
    """

    def __init__(self, trace: Trace, batch_size: int, seq_len: int, start: int = 0):
        self.trace, self.batch_size, self.seq_len = trace, batch_size, seq_len
        self.position = start
        self.rows_BL = torch.empty(0, seq_len, dtype=torch.long)
        self.inputs_BL = torch.empty(0, seq_len, dtype=torch.long)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        S = self.trace.num_sequences
        picks = [(self.position + b) % S for b in range(self.batch_size)]
        self.position += self.batch_size
        inputs_BL, targets_BL, rows_BL = batch_of(self.trace, picks, self.seq_len)
        self.rows_BL, self.inputs_BL = rows_BL, inputs_BL
        return inputs_BL, targets_BL

    def rows_for(self, inputs_bL: Tensor) -> Tensor:
        """The trace rows of a part of the last batch (a shard's micro-batch): the first
        run of its rows whose tokens equal inputs_bL."""
        b = inputs_bL.shape[0]
        tokens = inputs_bL.detach().cpu()
        for start in range(0, self.inputs_BL.shape[0] - b + 1):
            if torch.equal(self.inputs_BL[start : start + b], tokens):
                return self.rows_BL[start : start + b]
        raise ValueError(
            "routing replay: the forward's tokens are not rows of the last batch of the trace"
        )

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def batch_of(trace: Trace, sequences: list[int], seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs_BL, targets_BL, rows_BL) of the given sequences, right-padded to seq_len."""
    B = len(sequences)
    inputs_BL = torch.zeros(B, seq_len, dtype=torch.long)
    targets_BL = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    rows_BL = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, s in enumerate(sequences):
        rows = torch.arange(trace.sequence(s).start, trace.sequence(s).stop)
        n = min(len(rows), seq_len)
        inputs_BL[b, :n] = trace.tokens[rows[:n]]
        rows_BL[b, :n] = rows[:n]
        m = min(len(rows) - 1, seq_len)
        targets_BL[b, :m] = trace.tokens[rows[1 : m + 1]]
    return inputs_BL, targets_BL, rows_BL


@dataclass
class ReplayData:
    """The Trainer's data from a trace: `loader`, `eval_windows`, `domain_names`."""

    trace: Trace

    @property
    def tokenizer(self) -> _Vocabulary:
        return _Vocabulary(int(self.trace.tokens.max()) + 1 if self.trace.num_tokens else 0)

    def loader(self, config) -> ReplayLoader:
        return ReplayLoader(self.trace, config.batch_size, config.seq_len)

    def eval_windows(self, config) -> list[tuple[Tensor, Tensor, Tensor]]:
        S = self.trace.num_sequences
        windows = []
        for i in range(config.eval_batches):
            picks = [(i * config.batch_size + b) % S for b in range(config.batch_size)]
            inputs_BL, targets_BL, _ = batch_of(self.trace, picks, config.seq_len)
            windows.append((inputs_BL, targets_BL, torch.zeros_like(inputs_BL)))
        return windows

    @property
    def domain_names(self) -> tuple[str, ...]:
        return ("trace",)


@dataclass
class Replay:
    """A trace and the replay mode ("ids" or "ids+weights") for the trainer."""

    trace: Trace
    mode: str = "ids"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"routing.replay_mode must be one of {', '.join(MODES)}; got {self.mode!r}"
            )

    def wrap(self, forward: Callable, model: nn.Module, loader: ReplayLoader) -> Callable:
        """forward(inputs_BL, targets_BL) with the trace's routing for those rows."""
        check_trace(model, self.trace, self.mode)
        if not isinstance(loader, ReplayLoader):
            raise ValueError("routing replay trains on the trace's sequences: use ReplayData")

        def replayed(inputs_BL: Tensor, targets_BL: Tensor | None = None, **kwargs):
            rows_BL = loader.rows_for(inputs_BL)
            with replay_rows(model, self.trace, rows_BL.reshape(-1), self.mode):
                return forward(inputs_BL, targets_BL, **kwargs)

        return replayed
