"""Tokenised conversations as padded batches with their loss mask, for the Trainer.

# B batch, L the longest example of the batch minus one

An example of n tokens gives inputs ids[:-1] and targets ids[1:], where a target counts
(is not IGNORE) when its token is an assistant token. Batches pad on the right to their
longest example with the tokenizer's padding token and IGNORE targets: attention is causal,
so no real token sees the padding after it, and no mask beyond the targets is needed.
InstructionData answers what the Trainer asks of RunData (loader, eval_windows,
domain_names); the domains of the evaluation tokens are the task families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import Tokenizer
from ..train import TrainConfig
from .chat import IGNORE, ChatTemplate, Conversation, Encoded


def encode_all(
    conversations: list[Conversation], template: ChatTemplate, max_tokens: int
) -> tuple[list[Encoded], int]:
    """Encode conversations; drop those whose trained tokens all fall past max_tokens.

    Returns:
        (the encoded examples, how many were cut to max_tokens).
    """
    encoded = [template.encode(c, max_tokens) for c in conversations]
    kept = [e for e in encoded if any(e.trained[1:])]
    return kept, sum(e.truncated for e in encoded)


def pad_batch(examples: list[Encoded], pad_id: int) -> tuple[Tensor, Tensor]:
    """(inputs_BL, targets_BL) of examples, right-padded; targets IGNORE where not trained."""
    length = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[row, :n] = torch.tensor(e.ids[:-1])
        ids = torch.tensor(e.ids[1:])
        targets[row, :n] = torch.where(torch.tensor(e.trained[1:]), ids, IGNORE)
    return inputs, targets


class ExampleLoader:
    """Shuffled batches of examples, epoch after epoch; the state is (epoch, batch index).

    The order of epoch e depends only on (seed, e), so a restored loader yields exactly the
    batches the original would have (as data.BatchLoader).
    """

    def __init__(self, examples: list[Encoded], batch_size: int, seed: int, pad_id: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.pad_id, self.seed = examples, pad_id, seed
        self.batch_size = min(batch_size, len(examples))
        self.epoch = self.batch_index = 0

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        per_epoch = len(self.examples) // self.batch_size
        if self.batch_index >= per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        start = self.batch_index * self.batch_size
        rows = self._order()[start : start + self.batch_size]
        self.batch_index += 1
        return pad_batch([self.examples[i] for i in rows], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]


@dataclass
class InstructionData:
    """Training and evaluation examples with their tokenizer (the Trainer's data)."""

    tokenizer: Tokenizer
    train: list[Encoded]
    validation: list[Encoded]

    def loader(self, config: TrainConfig) -> ExampleLoader:
        return ExampleLoader(self.train, config.batch_size, config.seed, self.tokenizer.pad_id)

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(sorted({e.family for e in self.validation}))

    def eval_windows(self, config: TrainConfig) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The validation examples in order, batch_size at a time (at most eval_batches),
        with each target's task family as its domain id."""
        names = self.domain_names
        batches = []
        limit = config.eval_batches * config.batch_size
        examples = self.validation[:limit]
        for start in range(0, len(examples), config.batch_size):
            chunk = examples[start : start + config.batch_size]
            inputs_BL, targets_BL = pad_batch(chunk, self.tokenizer.pad_id)
            family_B1 = torch.tensor([names.index(e.family) for e in chunk]).unsqueeze(1)
            batches.append((inputs_BL, targets_BL, family_B1.expand_as(inputs_BL).to(torch.uint8)))
        return batches
