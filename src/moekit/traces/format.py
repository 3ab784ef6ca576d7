"""The routing trace: which experts every token of every MoE layer took, and how it was made.

# T tokens (all sequences, concatenated), L MoE layers, K top_k, E experts, S sequences

A trace is a folder of two files:
    routing.safetensors  tokens (T,) int64, positions (T,) int32, offsets (S+1,) int64,
                         ids (T, L, K) int32, and when known weights (T, L, K) fp32,
                         logits (T, L, E) fp32, valid (T, L, K) bool, routed (T,) bool
    trace.json           format and version, the model's identity, how it was recorded
Tensors are read with safetensors (memory-mapped, never unpickled); the folder is written
beside its final place and renamed into it, so a crash leaves no half-written trace.

ids are the experts in the order the engine ranked them (best first where it sorts).
valid marks used slots (top_p and gshard may leave a slot unused; None: all used).
routed marks tokens that went through the model (the last generated token never does;
None: all did). offsets are the sequence boundaries: sequence s is tokens
offsets[s]:offsets[s+1]; positions count from 0 within each sequence.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..files import fsync_file, replace_folder, write_text_synced

FORMAT = "moekit.routing-trace"
VERSION = 1
TENSORS_FILE = "routing.safetensors"
META_FILE = "trace.json"


@dataclass
class ModelIdentity:
    """What a trace was recorded from; replay refuses a model that differs in any field
    but architecture and dtype (a converted model replays its source's trace).

    layers: each MoE layer's module name; blocks: its block (decoder layer) index.
    """

    architecture: str
    layers: list[str]
    blocks: list[int]
    num_blocks: int
    num_experts: int
    top_k: int
    vocab_size: int
    d_model: int
    dtype: str

    # Fields replay and diff compare, in the order they are checked.
    STRUCTURE = ("num_blocks", "blocks", "num_experts", "top_k", "vocab_size", "d_model")

    def mismatch(self, other: ModelIdentity) -> str | None:
        """The first structural field where other differs, as a message, or None."""
        for name in self.STRUCTURE:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"model.{name}: the trace has {mine}, the model has {theirs}"
        return None


@dataclass
class Trace:
    """Per token and MoE layer: the K experts, their combine weights and optionally the
    router's logits; the tokens, their positions and sequence boundaries; the model's
    identity and how the trace was recorded (`recording`: engine, dtype, mode, ...)."""

    model: ModelIdentity
    tokens: Tensor
    offsets: Tensor
    ids: Tensor
    weights: Tensor | None = None
    logits: Tensor | None = None
    valid: Tensor | None = None
    routed: Tensor | None = None
    positions: Tensor | None = None
    recording: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = positions_from_offsets(self.offsets, self.tokens.shape[0])
        self.validate()

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.offsets.shape[0] - 1

    def sequence(self, s: int) -> slice:
        """The token rows of sequence s."""
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def sequences(self) -> list[Tensor]:
        """Each sequence's token ids."""
        return [self.tokens[self.sequence(s)] for s in range(self.num_sequences)]

    def routed_mask(self) -> Tensor:
        """(T,) bool: tokens that carry a recorded route."""
        if self.routed is None:
            return torch.ones(self.num_tokens, dtype=torch.bool)
        return self.routed

    def valid_mask(self) -> Tensor:
        """(T, L, K) bool: used slots of routed tokens."""
        valid = torch.ones(self.ids.shape, dtype=torch.bool) if self.valid is None else self.valid
        return valid & self.routed_mask()[:, None, None]

    def select(self, sequences: list[int]) -> Trace:
        """The trace of some of its sequences, in the given order."""
        rows = torch.cat(
            [torch.arange(self.sequence(s).start, self.sequence(s).stop) for s in sequences]
        )
        lengths = torch.tensor([self.sequence(s).stop - self.sequence(s).start for s in sequences])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        return replace(
            self, tokens=self.tokens[rows], offsets=offsets, ids=self.ids[rows],
            weights=pick(self.weights), logits=pick(self.logits), valid=pick(self.valid),
            routed=pick(self.routed), positions=self.positions[rows],
        )  # fmt: skip

    def validate(self) -> None:
        """Raise ValueError naming the first field that is inconsistent."""
        T, m = self.tokens.shape[0], self.model
        L, K = len(m.layers), m.top_k
        if len(m.blocks) != L:
            raise ValueError(f"model.blocks has {len(m.blocks)} entries for {L} layers")
        _shape("tokens", self.tokens, (T,))
        _shape("ids", self.ids, (T, L, K))
        _shape("positions", self.positions, (T,))
        for name in ("weights", "valid"):
            if getattr(self, name) is not None:
                _shape(name, getattr(self, name), (T, L, K))
        if self.logits is not None:
            _shape("logits", self.logits, (T, L, m.num_experts))
        if self.routed is not None:
            _shape("routed", self.routed, (T,))
        off = self.offsets
        if off.dim() != 1 or off.numel() < 1 or int(off[0]) != 0 or int(off[-1]) != T:
            raise ValueError(f"offsets must run from 0 to the token count {T}; got {off.tolist()}")
        if bool((off[1:] < off[:-1]).any()):
            raise ValueError(f"offsets must not decrease; got {off.tolist()}")
        used = self.valid_mask()
        bad = used & ((self.ids < 0) | (self.ids >= m.num_experts))
        if bool(bad.any()):
            t, layer, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"ids out of range: token {t}, layer {m.layers[layer]}, slot {k} has expert "
                f"{int(self.ids[t, layer, k])}; the model has {m.num_experts} experts"
            )


def positions_from_offsets(offsets: Tensor, num_tokens: int) -> Tensor:
    """(T,) int32 position of each token within its sequence."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    starts = torch.repeat_interleave(offsets[:-1].long(), lengths)
    return (torch.arange(num_tokens) - starts).to(torch.int32)


def _shape(name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected}")


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write trace into the folder `path` (replacing it atomically). Returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {
        "tokens": trace.tokens.long(),
        "positions": trace.positions.to(torch.int32),
        "offsets": trace.offsets.long(),
        "ids": trace.ids.to(torch.int32),
    }
    optional = {"weights": torch.float32, "logits": torch.float32, "valid": torch.bool}
    optional["routed"] = torch.bool
    for name, dtype in optional.items():
        if getattr(trace, name) is not None:
            tensors[name] = getattr(trace, name).to(dtype)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": asdict(trace.model),
        "recording": trace.recording,
        "num_tokens": trace.num_tokens,
        "num_sequences": trace.num_sequences,
    }
    write_text_synced(tmp / META_FILE, json.dumps(meta, indent=1))
    fsync_file(tmp / TENSORS_FILE)
    replace_folder(tmp, path, path.with_name(path.name + ".old"))
    return path


def load_trace(path: str | Path) -> Trace:
    """Read a trace folder written by save_trace; ValueError naming what is wrong."""
    path = Path(path)
    meta_path, tensor_path = path / META_FILE, path / TENSORS_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise ValueError(f"{path} is not a routing trace (needs {META_FILE} and {TENSORS_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"format: {meta_path} has {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"version: {meta_path} has {meta.get('version')!r}; this reads {VERSION}")
    try:
        model = ModelIdentity(**meta["model"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"model: {meta_path} has no valid model identity ({error})") from None
    tensors: dict[str, Tensor] = {}
    with safe_open(str(tensor_path), framework="pt") as file:
        for key in file.keys():
            tensors[key] = file.get_tensor(key)
    for name in ("tokens", "offsets", "ids"):
        if name not in tensors:
            raise ValueError(f"{name}: {tensor_path} has no {name!r} tensor")
    return Trace(
        model=model, tokens=tensors["tokens"].long(), offsets=tensors["offsets"].long(),
        ids=tensors["ids"], weights=tensors.get("weights"), logits=tensors.get("logits"),
        valid=tensors.get("valid"), routed=tensors.get("routed"),
        positions=tensors.get("positions"), recording=meta.get("recording", {}),
    )  # fmt: skip
