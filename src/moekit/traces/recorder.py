"""What recording collects: every call's routing per MoE layer, joined into a Trace.

# B sequences, N tokens per sequence, T = B * N tokens of one call, K top_k, E experts
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .format import ModelIdentity, Trace

BLOCK = re.compile(r"layers\.(\d+)\.")


@dataclass
class Entry:
    """One layer's routing in one call: (T, K) ids, weights, valid, (T, E) logits or None."""

    ids: Tensor
    weights: Tensor
    valid: Tensor | None
    logits: Tensor | None


@dataclass
class Recorder:
    """Collects every call's routing per MoE layer; `trace()` turns it into a Trace."""

    model: ModelIdentity
    keep_logits: bool
    recording: dict
    shapes: list[tuple[int, int]] = field(default_factory=list)
    entries: list[list[Entry]] = field(default_factory=list)

    def begin_call(self, tokens_BN: Tensor) -> None:
        """Called before each forward of the model: the call's (B, n) token layout."""
        B, n = tokens_BN.shape
        self.shapes.append((B, n))
        for layer in self.entries:
            layer.append(None)

    def add(self, layer: int, entry: Entry) -> None:
        if not self.shapes:
            raise RuntimeError("a routing decision arrived before the model's forward began")
        self.entries[layer][-1] = detach_entry(entry, self.keep_logits)

    def trace(self, tokens_BN: Tensor, real_BN: Tensor | None = None) -> Trace:
        """The Trace of the recorded calls over the sequences tokens_BN.

        Args:
            tokens_BN: (B, N) every token of the sequences, padding included; the calls
                routed its first columns (a generation's last token never goes through
                the model, so it is kept with routed False).
            real_BN: bool mask of real tokens (any padding layout), None: all real.
        """
        B, N = tokens_BN.shape
        if not self.shapes:
            raise ValueError("nothing was recorded: run the model inside record_routing()")
        batches = {shape[0] for shape in self.shapes}
        if batches != {B}:
            raise ValueError(f"tokens has {B} sequences; the recorded calls had {sorted(batches)}")
        fed = sum(n for _, n in self.shapes)
        if fed > N:
            raise ValueError(f"the calls routed {fed} tokens per sequence; tokens has only {N}")
        real_BN = torch.ones(B, N, dtype=torch.bool) if real_BN is None else real_BN.bool().cpu()
        per_layer = [self._join(layer, B, N) for layer in range(len(self.entries))]
        routed_BN = torch.zeros(B, N, dtype=torch.bool)
        routed_BN[:, :fed] = True
        keep = real_BN.reshape(-1)
        lengths = real_BN.sum(dim=1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

        def stack(i: int) -> Tensor | None:
            parts = [joined[i] for joined in per_layer]
            if parts[0] is None:
                return None
            return torch.stack(parts, dim=2).flatten(0, 1)[keep]

        valid = stack(2)
        routed = routed_BN.reshape(-1)[keep]
        return Trace(
            model=self.model, tokens=tokens_BN.cpu().reshape(-1)[keep].long(), offsets=offsets,
            ids=stack(0), weights=stack(1), valid=valid, logits=stack(3),
            routed=None if bool(routed.all()) else routed, recording=self.recording,
        )  # fmt: skip

    def _join(self, layer: int, B: int, N: int) -> list[Tensor | None]:
        """(B, N, ...) ids, weights, valid, logits of one layer over the calls, zero-padded
        past the routed columns."""
        calls = self.entries[layer]
        if any(entry is None for entry in calls):
            missing = [i for i, entry in enumerate(calls) if entry is None]
            raise ValueError(f"layer {self.model.layers[layer]} did not route in calls {missing}")
        out = []
        for name in ("ids", "weights", "valid", "logits"):
            if getattr(calls[0], name) is None:
                out.append(None)
                continue
            pieces = [getattr(e, name).reshape(B, n, -1) for e, (_, n) in zip(calls, self.shapes)]
            joined = torch.cat(pieces, dim=1)
            pad = joined.new_zeros(B, N - joined.shape[1], joined.shape[2])
            if name == "valid":
                pad = pad.bool()
            out.append(torch.cat([joined, pad], dim=1))
        return out


def detach_entry(entry: Entry, keep_logits: bool) -> Entry:
    return Entry(
        ids=entry.ids.detach().to(torch.int32).cpu(),
        weights=entry.weights.detach().float().cpu(),
        valid=None if entry.valid is None else entry.valid.detach().bool().cpu(),
        logits=entry.logits.detach().float().cpu()
        if keep_logits and entry.logits is not None
        else None,
    )


def recording_info(engine: str, dtype: str, mode: str) -> dict:
    return {
        "engine": engine,
        "dtype": dtype,
        "mode": mode,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
