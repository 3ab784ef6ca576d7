"""Adapter checks: a PEFT LoRA adapter against its base model's tensors.

# E experts, r rank

What they catch: target names that never reach the routed experts (in transformers 5 the
routed experts are 3-D parameters, so target_modules ["gate_proj", "up_proj", "down_proj"]
lands on the shared experts and dense layers only), adapters still at their initial value
(PEFT starts lora_B at zero: such an adapter changes nothing), experts whose adapter never
received a gradient, and factors whose rank or shape does not fit the base.
"""

from __future__ import annotations

import re

import torch

from .findings import Finding
from .target import Adapter

_PREFIX = "base_model.model."
_FACTOR = re.compile(r"\.lora_([AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"layers\.(\d+)\.")
# target names that mean "the experts' projections" in the families moekit reads
_EXPERT_NAMES = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate_up_proj", "experts"}


def module_kind(module: str) -> str:
    """ "routed", "shared", "router", "attention" or "other" for a module path."""
    if "shared_expert" in module:
        return "shared"
    if re.search(r"\.experts(\.|$)", module):
        return "routed"
    if module.endswith((".gate", ".router")):
        return "router"
    if "attn" in module:
        return "attention"
    return "other"


def factors(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    """{module path (without PEFT's prefix and base_layer nesting): {"A": .., "B": ..}};
    a module with two nested parameter adapters keeps each under its own nesting."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        match = _FACTOR.search(key)
        if match is None:
            continue
        module = key[: match.start()].removeprefix(_PREFIX)
        modules.setdefault(module, {})[match.group(1)] = tensor
    return modules


def check_adapter(adapter: Adapter, facts: dict) -> list[Finding]:
    modules = factors(adapter)
    kinds = sorted({module_kind(m.replace(".base_layer", "")) for m in modules})
    facts["adapter"] = (
        f"rank {adapter.config.get('r')}, {len(modules)} adapted modules ({', '.join(kinds)})"
    )
    if not modules:
        return [
            Finding("error", "adapter.empty", "the adapter holds no LoRA factors", "save it again")
        ]
    findings = _coverage(adapter, modules)
    findings += _untrained(modules, adapter)
    if adapter.base is None:
        findings.append(
            Finding(
                "note",
                "adapter.base",
                "no base model folder (base_model_name_or_path is not a folder here): ranks "
                "and shapes were not checked against it",
                "pass --base BASE_FOLDER",
            )
        )
    else:
        facts["base"] = str(adapter.base)
        findings += _shapes(modules, adapter)
    return findings


def _coverage(adapter: Adapter, modules: dict) -> list[Finding]:
    kinds: dict[str, set[str]] = {}
    for module in modules:
        plain = module.replace(".base_layer", "")
        kinds.setdefault(module_kind(plain), set()).add(_LAYER.sub("layers.*.", plain))
    if "routed" in kinds:
        return []
    covered = {kind: sorted(names)[:6] for kind, names in kinds.items()}
    targets = set(adapter.config.get("target_modules") or []) | {
        t.rsplit(".", 1)[-1] for t in adapter.config.get("target_parameters") or []
    }
    meant = sorted(targets & _EXPERT_NAMES)
    if meant:
        return [
            Finding(
                "warning",
                "adapter.misses_experts",
                f"the targets {meant} name expert projections, but no routed expert is "
                f"adapted: the adapters sit on {covered}",
                "in transformers 5 routed experts are 3-D parameters (mlp.experts.gate_up_proj, "
                "mlp.experts.down_proj): list them in target_parameters, as moekit finetune "
                "--lora.rank writes them",
                evidence={"covered": covered, "targets": sorted(targets)},
            )
        ]
    return [
        Finding(
            "note",
            "adapter.misses_experts",
            f"the adapter covers no routed expert, only {covered}",
            "fine if meant; to adapt the experts, add their 3-D parameters to target_parameters",
            evidence={"covered": covered},
        )
    ]


def _untrained(modules: dict, adapter: Adapter) -> list[Finding]:
    zero = [m for m, f in modules.items() if "B" in f and not f["B"].any()]
    if len(zero) == len(modules):
        return [
            Finding(
                "error",
                "adapter.untrained",
                f"every lora_B of the adapter's {len(modules)} modules is zero, its initial "
                "value: the adapter changes nothing",
                "it was saved before training, or no gradient reached it (frozen, or the "
                "optimizer was built before the adapters were added)",
                evidence={"modules": len(modules)},
            )
        ]
    findings = []
    if zero:
        findings.append(
            Finding(
                "warning",
                "adapter.untrained",
                f"{len(zero)} of {len(modules)} adapted modules still have lora_B at zero "
                f"(never trained): {zero[:4]}",
                "these modules received no gradient: check that they are used in training",
                layer=_layer(zero[0]),
                evidence={"modules": zero[:20]},
            )
        )
    findings += _untrained_experts(modules, adapter)
    return findings


def _untrained_experts(modules: dict, adapter: Adapter) -> list[Finding]:
    """Routed experts whose own columns of lora_B are zero while their siblings' are not.

    PEFT's 3-D adapters hold lora_B (out, r*E) with columns rank-major (j*E + e)."""
    rank = int(adapter.config.get("r") or 0)
    findings = []
    for module, f in modules.items():
        if module_kind(module.replace(".base_layer", "")) != "routed" or "A" not in f or not rank:
            continue
        B = f["B"]
        if f["A"].shape[0] % rank or B.dim() != 2:
            continue
        E = f["A"].shape[0] // rank
        if E < 2 or B.shape[1] != rank * E:
            continue
        alive = B.reshape(B.shape[0], rank, E).ne(0).any(dim=(0, 1))
        dead = (~alive).nonzero().flatten().tolist()
        if dead and alive.any():
            findings.append(
                Finding(
                    "warning",
                    "adapter.untrained_experts",
                    f"layer {_layer(module)}: the adapters of experts {dead} ({module}) are at "
                    "their initial value: no token reached these experts in fine-tuning",
                    "fine-tune with a balance loss on, or on data that reaches them",
                    layer=_layer(module),
                    experts=dead,
                )
            )
    return findings


def _shapes(modules: dict, adapter: Adapter) -> list[Finding]:
    shapes = adapter.base_shapes
    rank = adapter.config.get("r")
    wrong = []
    for module, f in modules.items():
        if "A" not in f or "B" not in f:
            wrong.append(f"{module}: lora_A or lora_B missing")
            continue
        a, b = tuple(f["A"].shape), tuple(f["B"].shape)
        plain = module.replace(".base_layer", "")
        base = shapes.get(f"{plain}.weight")
        if base is not None and len(base) == 2:
            if a[1] != base[1] or b[0] != base[0] or a[0] != b[1]:
                wrong.append(f"{module}: lora_A {a}, lora_B {b} against the base {base}")
            elif rank and a[0] != rank and not adapter.config.get("rank_pattern"):
                wrong.append(f"{module}: rank {a[0]} but adapter_config.json says r = {rank}")
            continue
        params = expert_shapes(shapes, plain)
        if not any(_fits_3d(a, b, s) for s in params):
            found = f"the base's {params}" if params else "no such module in the base"
            wrong.append(f"{module}: lora_A {a}, lora_B {b} fit none of {found}")
    if not wrong:
        return []
    return [
        Finding(
            "error",
            "adapter.shapes",
            f"{len(wrong)} adapted modules do not fit the base: " + "; ".join(wrong[:4]),
            "the adapter was trained on another base (another size or architecture): use "
            "the base it was trained on",
            layer=_layer(wrong[0]),
            evidence={"modules": wrong[:20]},
        )
    ]


def expert_shapes(shapes: dict[str, tuple], module: str) -> list[tuple]:
    """The (E, X, Y) shapes of a routed-experts module's parameters in the base: its 3-D
    tensors, or for a per-expert layout (experts.{e}.w1.weight) each projection stacked
    over the experts, and two same-shaped projections fused as gate and up are."""
    found = [s for n, s in shapes.items() if n.startswith(module + ".") and len(s) == 3]
    per_expert: dict[str, list[tuple]] = {}
    pattern = re.compile(re.escape(module) + r"\.(\d+)\.(\w+)\.weight$")
    for name, shape in shapes.items():
        match = pattern.match(name)
        if match and len(shape) == 2:
            per_expert.setdefault(match.group(2), []).append(shape)
    stacked = {p: (len(s), *s[0]) for p, s in per_expert.items() if len(set(s)) == 1}
    found += list(stacked.values())
    found += [(E, 2 * out, cols) for E, out, cols in stacked.values()]
    return found


def _fits_3d(a: tuple, b: tuple, base: tuple) -> bool:
    """PEFT's parameter adapter of a 3-D (E, X, Y) tensor: A (E*r, in), B (out, r*E)."""
    E = base[0]
    return (
        len(a) == 2
        and len(b) == 2
        and a[0] % E == 0
        and b[1] == a[0]
        and sorted((a[1], b[0])) == sorted(base[1:])
    )


def _layer(text: str) -> int | None:
    match = _LAYER.search(text)
    return int(match.group(1)) if match else None
