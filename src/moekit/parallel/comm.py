"""Communication planner: bytes per step per rank under EP x DP, and alpha-beta times.

# T tokens per rank per step, D model, K top_k, E experts, L MoE layers, p ranks in a group

Model (uniform routing, dropless, no overlap of communication with compute):
- all-to-all: an assignment goes to any expert with equal chance, so a share (ep-1)/ep of
  a rank's T*K rows leave it. Each MoE layer runs four exchanges per step (dispatch and
  combine forward, and both again in backward), each sending
      V = T * K * (ep-1)/ep * D * bytes_per_value        per rank.
  Time of one exchange (pairwise, one message per peer): (ep-1) * alpha + V / bandwidth.
- gradients (fp32, as sync_gradients reduces them), ring all-reduce over p ranks sends
      2 * (p-1)/p * N * 4 bytes per rank; time 2 * (p-1) * alpha + that / bandwidth,
  with N = non-expert parameters over the world (p = W), and N = this rank's expert
  parameters (E/ep experts) over the DP group (p = dp).
- memory per rank: weights + gradients + two AdamW moments, all fp32 (16 bytes a
  parameter); the experts are split ep ways, everything else is replicated. Activations
  are not counted (they depend on T, sequence length and recomputation, not on ep).
Skew makes the busiest rank send more than V; the counts exchange and the group-wide
capacity gather (a few bytes per token) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import command_error
from ..models import ModelConfig, count_parameters

ADAM_BYTES_PER_PARAM = 16  # fp32 weight, gradient, exp_avg, exp_avg_sq
GRAD_BYTES = 4


@dataclass(frozen=True)
class Link:
    """The network between ranks: bandwidth per rank in GB/s (1e9 bytes), latency in us."""

    bandwidth_gb_s: float
    latency_us: float

    def __post_init__(self) -> None:
        if not self.bandwidth_gb_s > 0:
            raise ValueError(f"bandwidth ({self.bandwidth_gb_s} GB/s) must be > 0")
        if not self.latency_us >= 0:
            raise ValueError(f"latency ({self.latency_us} us) must be >= 0")

    def seconds(self, messages: int, num_bytes: float) -> float:
        return messages * self.latency_us * 1e-6 + num_bytes / (self.bandwidth_gb_s * 1e9)


@dataclass(frozen=True)
class CommPlan:
    """One EP x DP layout of one model, per rank and per optimizer step."""

    ep: int
    dp: int
    experts_per_rank: int
    params_per_rank: int
    memory_bytes_per_rank: int
    all_to_all_bytes: float  # sent per rank per step, all layers, forward and backward
    all_to_all_seconds: float
    all_reduce_bytes: float  # gradient all-reduces (world and DP groups), per rank per step
    all_reduce_seconds: float
    compute_seconds: float | None


def expert_parameters(config: ModelConfig) -> int:
    """Parameters of the routed experts over all MoE layers (shared experts excluded)."""
    moe = config.moe
    if moe is None:
        return 0
    up = moe.d_model * moe.d_hidden * (2 if moe.gated else 1)
    return len(config.moe_layers) * moe.num_experts * (up + moe.d_hidden * moe.d_model)


def plan(
    config: ModelConfig,
    tokens_per_rank: int,
    ep: int,
    dp: int,
    link: Link,
    *,
    bytes_per_value: int = 2,
    flops_per_s: float | None = None,
) -> CommPlan:
    """Bytes and alpha-beta seconds per step per rank for one layout.

    Args:
        config: the model.
        tokens_per_rank: T, tokens each rank processes per optimizer step.
        ep, dp: expert- and data-parallel sizes (world = ep * dp).
        link: bandwidth and latency between ranks.
        bytes_per_value: activation bytes (2 for bf16, 4 for fp32).
        flops_per_s: sustained FLOP/s per rank; with it, compute time 6 * active * T.
    """
    moe = config.moe
    if moe is None:
        raise ValueError("the model has no MoE layer: expert parallelism does not apply")
    for name, value in (("ep", ep), ("dp", dp), ("tokens_per_rank", tokens_per_rank)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
    if moe.num_experts % ep:
        raise ValueError(f"ep ({ep}) must divide num_experts ({moe.num_experts})")
    counts = count_parameters(config)
    experts = expert_parameters(config)
    replicated = counts.total - experts
    params_per_rank = replicated + experts // ep
    layers = len(config.moe_layers)

    rows_out = tokens_per_rank * moe.top_k * (ep - 1) / ep
    exchange_bytes = rows_out * moe.d_model * bytes_per_value
    a2a_bytes = 4 * layers * exchange_bytes
    a2a_seconds = 4 * layers * link.seconds(ep - 1, exchange_bytes) if ep > 1 else 0.0

    world = ep * dp
    ring_bytes, ring_seconds = 0.0, 0.0
    for group, params in ((world, replicated), (dp, experts // ep)):
        if group > 1:
            sent = 2 * (group - 1) / group * params * GRAD_BYTES
            ring_bytes += sent
            ring_seconds += link.seconds(2 * (group - 1), sent)
    compute = None if flops_per_s is None else 6 * counts.active * tokens_per_rank / flops_per_s
    return CommPlan(
        ep=ep,
        dp=dp,
        experts_per_rank=moe.num_experts // ep,
        params_per_rank=params_per_rank,
        memory_bytes_per_rank=params_per_rank * ADAM_BYTES_PER_PARAM,
        all_to_all_bytes=a2a_bytes,
        all_to_all_seconds=a2a_seconds,
        all_reduce_bytes=ring_bytes,
        all_reduce_seconds=ring_seconds,
        compute_seconds=compute,
    )


def format_table(plans: list[CommPlan]) -> str:
    """A fixed-width table, one row per layout."""
    head = (
        f"{'ep':>3} {'dp':>3} {'experts/rank':>12} {'params/rank':>12} {'mem/rank GB':>11} "
        f"{'a2a MB':>10} {'a2a ms':>9} {'allreduce MB':>12} {'allreduce ms':>12} {'compute ms':>10}"
    )
    rows = [head]
    for p in plans:
        compute = "-" if p.compute_seconds is None else f"{p.compute_seconds * 1e3:.1f}"
        rows.append(
            f"{p.ep:>3} {p.dp:>3} {p.experts_per_rank:>12} {p.params_per_rank / 1e6:>11.1f}M "
            f"{p.memory_bytes_per_rank / 1e9:>11.2f} {p.all_to_all_bytes / 1e6:>10.1f} "
            f"{p.all_to_all_seconds * 1e3:>9.2f} {p.all_reduce_bytes / 1e6:>12.1f} "
            f"{p.all_reduce_seconds * 1e3:>12.2f} {compute:>10}"
        )
    return "\n".join(rows)


def preset_config(name: str) -> ModelConfig:
    """A moekit preset by name, or a published model (mixtral_8x7b, mixtral_8x22b)."""
    from ..models import PRESETS
    from ..models.published import PUBLISHED_CONFIGS

    if name in PRESETS:
        return PRESETS[name]()
    published = PUBLISHED_CONFIGS.get(name)
    if published is None:
        raise ValueError(
            f"unknown model {name!r}; choose a preset ({', '.join(PRESETS)}) or a published "
            f"model ({', '.join(PUBLISHED_CONFIGS)})"
        )
    return published()


def main(argv: list[str] | None = None) -> int:
    """`moekit bench comm`: print the plan for each EP size."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="moekit bench comm",
        description="Bytes sent per step per rank under expert parallelism, and alpha-beta "
        "estimates of all-to-all and gradient all-reduce time (docs/scaling.md).",
    )
    parser.add_argument("--model", default="tiny", help="preset or published model (default tiny)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step")
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4, 8], help="EP sizes")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--bandwidth", type=float, default=25.0, help="GB/s per rank (default 25)")
    parser.add_argument("--latency", type=float, default=10.0, help="microseconds per message")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="activations")
    parser.add_argument("--flops", type=float, help="sustained FLOP/s per rank (compute column)")
    args = parser.parse_args(argv)
    try:
        config = preset_config(args.model)
        link = Link(args.bandwidth, args.latency)
        plans = [
            plan(
                config,
                args.tokens,
                ep,
                args.dp,
                link,
                bytes_per_value=2 if args.dtype == "bf16" else 4,
                flops_per_s=args.flops,
            )
            for ep in args.ep
        ]
    except ValueError as error:
        return command_error("bench comm", error)
    counts = count_parameters(config)
    print(
        f"{args.model}: {counts.total / 1e6:,.1f} M parameters ({expert_parameters(config) / 1e6:,.1f} M in "
        f"routed experts), {counts.active / 1e6:,.1f} M active per token"
    )
    print(
        f"{args.tokens} tokens per rank per step, {args.dtype} activations, dp {args.dp}, "
        f"{args.bandwidth:g} GB/s and {args.latency:g} us per message"
    )
    print(format_table(plans))
    return 0
