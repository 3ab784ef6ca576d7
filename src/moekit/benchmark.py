"""MoE layer speed against its physical limit: a dense FFN doing the same active FLOPs.

# T tokens, D model, F expert hidden, E experts, K top_k

ratio = time(MoE fwd+bwd) / time(dense SwiGLU fwd+bwd on T*K rows, D -> F -> D, nn.Linear
weights). The dense FFN does exactly the MoE's expert FLOPs with no routing and one big
GEMM per projection, so 1.00 is the limit a perfect MoE would reach. The MoE is the real
`moekit.MoE` (softmax top-k router, dropless, balance loss on), so routing, dispatch and
combine count. When transformers is importable, its Mixtral sparse block runs beside it.

    python bench/layer.py                      # fp32 and bf16, the four standard shapes
    python bench/layer.py --dtype fp32 --shapes 4096,512,1024,8,2 --reps 9
    python bench/layer.py --quick              # two small shapes, < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .moe import MoE
from .runtime import keep_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STANDARD_SHAPES = [
    "4096,512,1024,8,2",
    "1024,512,1024,64,2",
    "4096,512,1024,64,2",
    "1024,512,256,64,8",
]
QUICK_SHAPES = ["512,256,512,8,2", "256,256,128,32,4"]


@dataclass
class Shape:
    num_tokens: int
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        parts = [v for v in text.replace(" ", ",").split(",") if v]
        if len(parts) != 5 or not all(v.isdigit() and int(v) > 0 for v in parts):
            raise ValueError(f"a shape is 'T,d,h,E,k' (5 positive integers); got {text!r}")
        return cls(*(int(v) for v in parts))

    def __str__(self) -> str:
        return f"{self.num_tokens} {self.d_model} {self.d_hidden} {self.num_experts} {self.top_k}"

    def flops(self) -> float:
        """fwd+bwd FLOPs of the active experts: 3 passes x 2 x (T*K) x D x 3F."""
        return 3 * 2 * self.num_tokens * self.top_k * self.d_model * 3 * self.d_hidden


def machine_summary() -> str:
    """CPU model, the vector extensions that matter for GEMMs, torch version and threads."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    has = {
        name: ("yes" if name in flags else "no")
        for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    }
    return (
        f"machine: {model}, {torch.get_num_threads()} threads | "
        + ", ".join(f"{k} {v}" for k, v in has.items())
        + f" | torch {torch.__version__}"
    )


class DenseSwiGLU(nn.Module):
    """The limit: one FFN, nn.Linear weights (out, in), gate and up fused."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _median_seconds(steps: list, reps: int, warmup: int) -> list[float]:
    """Median time of each step; the steps take turns, so a slow spell hits them alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(reps):
        for step, step_times in zip(steps, times):
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
    return [statistics.median(step_times) for step_times in times]


def _train_step(module: nn.Module, x: Tensor, grad: Tensor):
    """One fwd+bwd; parameter grads are dropped first, as optimizer.zero_grad() does."""

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        if isinstance(out, Tensor):
            out.backward(grad)
        else:  # MoEOutput: the balance loss trains the router too
            torch.autograd.backward(
                [out.hidden, out.aux_loss], [grad, torch.ones_like(out.aux_loss)]
            )

    return step


def build_moe(shape: Shape, dtype: torch.dtype, backend: str = "auto") -> MoE:
    config = MoEConfig(
        d_model=shape.d_model,
        d_hidden=shape.d_hidden,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        router="softmax_topk",
        capacity_factor=None,
        balance_loss_coef=0.01,
        expert_backend=backend,
    )
    return MoE(config).to(dtype)


def saved_activation_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes autograd keeps from forward to backward (distinct storages, parameters not
    counted): the activation memory a training step holds at its peak, beyond the
    weights and their gradients (which a same-FLOPs dense FFN has E/K times fewer of)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(storages.values())


def build_hf_block(shape: Shape, dtype: torch.dtype, implementation: str) -> nn.Module | None:
    """transformers' MixtralSparseMoeBlock, or None when transformers is missing."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(
        hidden_size=shape.d_model,
        intermediate_size=shape.d_hidden,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        experts_implementation=implementation,
    )
    block = MixtralSparseMoeBlock(config)
    for param in block.parameters():
        nn.init.normal_(param, std=shape.d_model**-0.5)
    return block.to(dtype)


def run_shape(
    shape: Shape, dtype: torch.dtype, reps: int, warmup: int, hf: bool, compiled: bool = False
) -> dict:
    """Times of dense, moekit (each expert backend; compiled too if asked) and
    (optionally) transformers for one shape, in seconds; saved-activation bytes."""
    torch.manual_seed(0)
    T, D, K = shape.num_tokens, shape.d_model, shape.top_k
    x_TD = torch.randn(T, D, dtype=dtype, requires_grad=True)
    grad_TD = torch.randn(T, D, dtype=dtype)
    x_AD = torch.randn(T * K, D, dtype=dtype, requires_grad=True)
    grad_AD = torch.randn(T * K, D, dtype=dtype)

    dense = DenseSwiGLU(D, shape.d_hidden).to(dtype)
    moe = build_moe(shape, dtype)
    loop = build_moe(shape, dtype, backend="loop")
    loop.load_state_dict(moe.state_dict())
    with torch.no_grad():
        counts_E = moe(x_TD).stats.tokens_per_expert
    dense_s, moe_s, loop_s = _median_seconds(
        [
            _train_step(dense, x_AD, grad_AD),
            _train_step(moe, x_TD, grad_TD),
            _train_step(loop, x_TD, grad_TD),
        ],
        reps,
        warmup,
    )
    result = {
        "dense": dense_s,
        "moekit": moe_s,
        "loop": loop_s,
        "rows": (int(counts_E.min()), int(counts_E.max())),
        "memory": saved_activation_bytes(moe, x_TD) / max(1, saved_activation_bytes(dense, x_AD)),
        "compiled": None,
        "compile_s": None,
    }
    if compiled:
        torch._dynamo.reset()
        step = _train_step(torch.compile(moe, fullgraph=True), x_TD, grad_TD)
        start = time.perf_counter()
        step()
        result["compile_s"] = time.perf_counter() - start
        result["compiled"] = _median_seconds([step], reps, warmup)[0]
    for name in ("eager", "grouped_mm"):
        block = build_hf_block(shape, dtype, name) if hf else None
        if block is None:
            result["hf_" + name] = None
            continue
        x_1TD = x_TD.detach().unsqueeze(0).requires_grad_()
        step = _train_step(block, x_1TD, grad_TD.unsqueeze(0))
        result["hf_" + name] = _median_seconds([step], max(1, reps // 3), 1)[0]
    return result


def _ratio(seconds: float | None, dense_seconds: float) -> str:
    return "n/a" if seconds is None else f"{seconds / dense_seconds:.2f}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit bench",
        description=__doc__.split("\n")[0],
        epilog="sub-commands:\n  moekit bench comm   bytes and time of expert-parallel "
        "communication per step, for each EP size (`moekit bench comm --help`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument(
        "--shapes", nargs="+", metavar="T,d,h,E,k", help="default: the four standard shapes"
    )
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (bf16 uses a third)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bf16-token-scale",
        type=float,
        default=None,
        help="bf16 runs T * this many tokens; default 1 on CPUs with bf16 "
        "instructions, 0.25 without (bf16 GEMMs are slow there)",
    )
    parser.add_argument(
        "--allocator",
        choices=["both", "default", "keep"],
        default="both",
        help="default malloc (a user's own loop), glibc keeping freed memory "
        "(what moekit train does), or both passes in one run",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the torch.compile'd layer (and its compile time)",
    )
    parser.add_argument("--no-hf", action="store_true", help="skip transformers even if importable")
    parser.add_argument("--quick", action="store_true", help="two small shapes, fewer repetitions")
    parser.add_argument("--keep-freed-memory", action="store_true", help="same as --allocator keep")
    return parser


@dataclass
class _Plan:
    """What one `moekit bench` run times: shapes, dtypes, repetitions, allocator passes."""

    shapes: list[Shape]
    dtypes: list[str]
    reps: int
    warmup: int
    token_scale: float
    bf16_native: bool
    passes: list[str]
    hf: bool
    compiled: bool


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> _Plan:
    """The checked settings; a bad shape is a usage error naming it."""
    try:
        shapes = [
            Shape.parse(text)
            for text in (args.shapes or (QUICK_SHAPES if args.quick else STANDARD_SHAPES))
        ]
    except ValueError as error:
        parser.error(str(error))
    bf16_native = _has_cpu_flag("avx512_bf16") or _has_cpu_flag("amx_bf16")
    token_scale = (
        1.0 if bf16_native and args.bf16_token_scale is None else (args.bf16_token_scale or 0.25)
    )
    passes = {"both": ["default", "keep"], "default": ["default"], "keep": ["keep"]}[args.allocator]
    return _Plan(
        shapes=shapes,
        dtypes=["fp32", "bf16"] if args.dtype == "both" else [args.dtype],
        reps=3 if args.quick else args.reps,
        warmup=1 if args.quick else args.warmup,
        token_scale=token_scale,
        bf16_native=bf16_native,
        passes=["keep"] if args.keep_freed_memory else passes,
        hf=not args.no_hf,
        compiled=args.compile,
    )


def _print_header(plan: _Plan) -> None:
    print(machine_summary())
    print(
        f"load average before: {os.getloadavg()[0]:.2f} | median of {plan.reps} reps after {plan.warmup} warmup "
        f"(bf16: a third, HF: a third) | bf16 at T x {plan.token_scale:g} "
        f"({'bf16 instructions present' if plan.bf16_native else 'no bf16 instructions: fewer tokens'})"
    )
    print(
        "ratio = MoE fwd+bwd time / dense SwiGLU fwd+bwd with the same active FLOPs (1.00 = limit); "
        "act mem = saved activations, MoE / dense"
    )


def _run_pass(plan: _Plan, allocator: str) -> None:
    """One allocator pass: a table row per dtype and shape."""
    if allocator == "keep" and not keep_freed_memory():
        print("allocator: cannot keep freed memory (not glibc); skipped")
        return
    print(
        f"\nallocator: {'glibc, keeps freed memory' if allocator == 'keep' else 'default (a user loop)'}"
    )
    print(
        f"{'dtype':5} | {'T d h E k':22} | {'dense ms':>9} | {'GFLOP/s':>7} | {'moekit':>6} | "
        f"{'loop':>6} | {'compiled':>8} | {'HF eager':>8} | {'HF grouped_mm':>13} | {'act mem':>7} | rows/expert"
    )
    for dtype_name in plan.dtypes:
        for parsed in plan.shapes:
            shape = dataclasses.replace(parsed)
            reps = plan.reps
            if dtype_name == "bf16":
                shape.num_tokens = max(shape.num_experts, int(shape.num_tokens * plan.token_scale))
                reps = max(1, plan.reps // 3)
            r = run_shape(
                shape,
                DTYPES[dtype_name],
                reps,
                min(plan.warmup, reps),
                plan.hf,
                compiled=plan.compiled,
            )
            print(_row(dtype_name, shape, r), flush=True)


def _row(dtype_name: str, shape: Shape, r: dict) -> str:
    compiled = "n/a" if r["compiled"] is None else f"{r['compiled'] / r['dense']:.2f}"
    return (
        f"{dtype_name:5} | {str(shape):22} | {r['dense'] * 1e3:9.1f} | {shape.flops() / r['dense'] / 1e9:7.1f} | "
        f"{_ratio(r['moekit'], r['dense']):>6} | {_ratio(r['loop'], r['dense']):>6} | {compiled:>8} | "
        f"{_ratio(r['hf_eager'], r['dense']):>8} | {_ratio(r['hf_grouped_mm'], r['dense']):>13} | "
        f"{r['memory']:7.2f} | {r['rows'][0]}-{r['rows'][1]}"
        + ("" if r["compile_s"] is None else f" | compile {r['compile_s']:.1f} s")
    )


def main(argv: list[str] | None = None) -> int:
    """Print the ratio table; see the module docstring for the flags. (`moekit bench comm`,
    the communication planner, is its own command: moekit.parallel.comm.)"""
    parser = _parser()
    args = parser.parse_args(argv)
    plan = _plan(args, parser)
    torch.set_num_threads(args.threads)
    _print_header(plan)
    for allocator in plan.passes:
        _run_pass(plan, allocator)
    return 0


def _has_cpu_flag(name: str) -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return name in line.split()
    except OSError:
        pass
    return False


if __name__ == "__main__":
    main()
