"""Build a model on the meta device and initialise only this rank's shards of it.

    template = record_init(lambda: Transformer(config))   # meta: no memory, no values
    model = fully_shard_model(parallelize(template.model, mesh), mesh)
    model.to_empty(device=mesh.device)
    template.replay(write_into_shards)                    # one full parameter at a time

The weights come out equal to those of `Transformer(config)` built in one process after
the same `torch.manual_seed`, and the RNG ends in the same state: construction on the meta
device runs every initialiser (nn.init.normal_, Tensor.uniform_, fill_, ...) on tensors
without storage; a TorchFunctionMode records each in-place call instead of running it.
`replay` then runs the recorded calls in their order on real CPU tensors of the recorded
shapes, so they draw from the global generator exactly as the one-process construction
does, and hands each parameter's final value to a callback that copies this rank's part
into its shard. A tensor lives from a call that overwrites it (an initialiser) to its last
call, so at most about one full parameter exists at a time, never the whole model.

What cannot be replayed is refused with a ValueError naming it, rather than initialised
differently: random factories (torch.randn(...) whose result becomes a parameter), an
initialiser applied to a view (a slice of a parameter), in-place calls that read another
meta tensor, and updates (mul_, add_) of a value that no recorded initialiser set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..models import ModelConfig, Transformer
from .all_to_all import ExpertParallelExperts
from .apply import parallelize
from .fsdp import fully_shard_model
from .mesh import ParallelMesh

# In-place calls whose result does not depend on the tensor's previous values.
_OVERWRITES = frozenset(
    {
        "normal_", "uniform_", "fill_", "zero_", "zeros_", "ones_", "constant_",
        "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
        "trunc_normal_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_",
        "eye_", "orthogonal_", "sparse_",
    }
)  # fmt: skip
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"})
# In-place calls that change a tensor's metadata, not its values: run them on the meta tensor.
_METADATA_ONLY = frozenset(
    {
        "requires_grad_", "share_memory_", "detach_", "resize_", "resize_as_", "set_",
        "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_", "swapdims_", "swapaxes_",
        "rename_", "refine_names_", "align_to_",
    }
)  # fmt: skip
_RANDOM_FACTORIES = frozenset(
    {
        "randn", "rand", "randint", "randperm", "normal", "bernoulli", "multinomial",
        "poisson", "randn_like", "rand_like", "randint_like",
    }
)  # fmt: skip


@dataclass
class _Call:
    func: Callable
    args: tuple
    kwargs: dict
    target: Tensor


class _Recorder(TorchFunctionMode):
    """Records in-place calls on meta tensors instead of running them."""

    def __init__(self):
        super().__init__()
        self.calls: list[_Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        inplace = name in _INPLACE_DUNDERS or (
            name.endswith("_") and not name.startswith("_") and name not in _METADATA_ONLY
        )
        if isinstance(target, Tensor) and target.is_meta and inplace:
            others = [
                a
                for a in (*args[1:], *kwargs.values())
                if isinstance(a, Tensor) and a is not target
            ]
            if target._base is not None or any(a.is_meta for a in others):
                raise ValueError(
                    f"meta-device initialisation cannot replay {name} on "
                    f"{'a view of a parameter' if target._base is not None else 'another meta tensor'}"
                    f" (shape {tuple(target.shape)}); initialise whole parameters in place"
                )
            self.calls.append(_Call(func, tuple(args), dict(kwargs), target))
            return target
        if name in _RANDOM_FACTORIES:
            raise ValueError(
                f"meta-device initialisation cannot replay torch.{name}: draw initial values "
                "in place (nn.init.normal_(param), param.uniform_()) so they can be replayed"
            )
        return func(*args, **kwargs)


@dataclass
class RecordedInit:
    """A model built on the meta device and the initialiser calls its construction made."""

    model: nn.Module
    calls: list[_Call]
    names: dict[int, list[str]] = field(default_factory=dict)  # id(tensor) -> its names

    def replay(self, write: Callable[[str, Tensor], None], device=None) -> set[str]:
        """Run the recorded calls on real tensors; write(name, value) each tensor's final
        value under every name it has in the model. Returns the names written.

        device: where the values are drawn (default CPU, where one process builds the
        model: the same device draws the same numbers).
        """
        device = torch.device("cpu") if device is None else device
        following: list[_Call | None] = [None] * len(self.calls)  # the next call on the same tensor
        seen: dict[int, _Call] = {}
        for i in range(len(self.calls) - 1, -1, -1):
            following[i] = seen.get(id(self.calls[i].target))
            seen[id(self.calls[i].target)] = self.calls[i]
        live: dict[int, Tensor] = {}
        written: set[str] = set()
        for i, call in enumerate(self.calls):
            key, target = id(call.target), call.target
            name = getattr(call.func, "__name__", "")
            if name in _OVERWRITES:
                live[key] = torch.empty(target.shape, dtype=target.dtype, device=device)
            elif key not in live:  # it updates a value a factory made (torch.ones(...))
                raise ValueError(
                    f"meta-device initialisation cannot replay {name} on a tensor of shape "
                    f"{tuple(target.shape)} whose value no recorded initialiser set"
                )
            real = live[key]
            args = tuple(real if a is target else a for a in call.args)
            kwargs = {k: real if v is target else v for k, v in call.kwargs.items()}
            with torch.no_grad():
                call.func(*args, **kwargs)
            after = following[i]
            if after is None or getattr(after.func, "__name__", "") in _OVERWRITES:
                value = live.pop(key)
                if after is None:  # the final value
                    for tensor_name in self.names.get(key, ()):
                        write(tensor_name, value)
                        written.add(tensor_name)
        return written


def record_init(build: Callable[[], nn.Module], init: str | None = "init_weights") -> RecordedInit:
    """Call build() on the meta device, recording its initialisers (and then those of
    model.init_weights(), which a meta-built Transformer skips in its constructor).

    Args:
        build: makes the model, e.g. lambda: Transformer(config).
        init: the method to call after build() under the recorder (None: none).
    Returns:
        The meta model, the recorded calls, and each recorded tensor's names in the model.
    """
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = build()
        if init is not None:
            getattr(model, init)()
    names: dict[int, list[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(tensor), []).append(name)
    return RecordedInit(model, recorder.calls, names)


def _local_part(full: Tensor, like: Tensor, owner) -> Tensor:
    """This rank's part of a whole tensor: its EP rows (owner: an ExpertParallelExperts),
    then its dim-0 chunk of an FSDP2 shard (torch.chunk's split, as FSDP2 makes it)."""
    if owner is not None and full.dim() > 0:
        full = full[owner.first_expert : owner.first_expert + owner.num_experts]
    if hasattr(like, "device_mesh"):
        chunks = full.chunk(like.device_mesh.size(), dim=0)
        index = like.device_mesh.get_local_rank()
        full = chunks[index] if index < len(chunks) else full[:0]
    local = like.to_local() if hasattr(like, "to_local") else like
    if full.shape != local.shape:
        raise ValueError(f"a part of shape {tuple(full.shape)} does not fit {tuple(local.shape)}")
    return full


def sharded_transformer(config: ModelConfig, mesh: ParallelMesh) -> Transformer:
    """A Transformer built on the meta device, expert-parallel and FSDP-sharded over mesh,
    then materialised on mesh.device with only this rank's shards initialised: the values
    `Transformer(config)` gets in one process after the same torch.manual_seed (and the
    same RNG state afterwards). No rank ever holds the whole model."""
    recorded = record_init(lambda: Transformer(config))
    model = fully_shard_model(parallelize(recorded.model, mesh), mesh)
    model.to_empty(device=mesh.device)
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets |= dict(model.named_buffers(remove_duplicate=False))
    owners = {
        f"{name}.{param}": module
        for name, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for param in module.sharded_names
    }

    def write(name: str, full: Tensor) -> None:
        target = targets[name]
        local = target.to_local() if hasattr(target, "to_local") else target
        with torch.no_grad():
            local.copy_(_local_part(full, target, owners.get(name)))

    written = recorded.replay(write)
    model.init_rope()  # not stored anywhere: recomputed from the config
    unset = sorted(set(targets) - written - {"rope_cos", "rope_sin"})
    if unset:
        raise ValueError(f"meta-device initialisation left {unset[:3]} without values")
    return model
