"""Where a training step's time goes: the MoE of `moekit train` against its dense twin.

# T tokens (batch x sequence), D model, F expert hidden, E experts, K top_k, R = T*K rows

Part 1 times whole optimizer steps (forward, backward, clipping, AdamW) of the two
models on the same batch, alternating MoE and dense step by step so that drift of the
machine hits both alike, eager and with the blocks compiled (as `--train.compile true`
does), and prints tokens/s and their ratio; the compile time is the first compiled step.
Part 2 breaks one MoE layer's forward+backward into its parts, each timed alone on the
training batch's T tokens, beside the dense twin's FFN:

    router        x @ W_router, softmax, top-k, renormalise (forward + backward)
    plan          argsort of the R slots by expert, counts, inverse permutation
    dispatch      gather x into expert-grouped rows (forward + backward)
    experts       the grouped SwiGLU MLP over R rows (forward + backward)
    combine       weights, gather back, sum over K (forward + backward)
    shared        the always-on expert (forward + backward)
    losses        balance loss, z-loss and the statistics

    python bench/train_step.py                    # the default job's models and batch
    python bench/train_step.py --preset tiny --model.moe.num_experts 32
    python bench/train_step.py --no-compile --reps 20

Run it on an idle machine: two processes on two cores distort every figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moekit.benchmark import machine_summary
from moekit.dispatch import build_plan
from moekit.models import Transformer, dense_twin
from moekit.moe import MoE
from moekit.runtime import keep_freed_memory
from moekit.train.compiling import compile_blocks
from moekit.train.optim import build_optimizer
from moekit.train.overrides import build_configs, parse_overrides
from moekit.train.step import optimizer_step


def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over reps calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def step_fn(model, optimizer, config, inputs, targets):
    def step():
        out = model(inputs, targets)
        (out.loss + out.aux_loss).backward()
        optimizer_step(model, optimizer, config, 10)
        out.loss.item()

    return step


def whole_steps(moe_config, train_config, reps: int, compiled: bool) -> dict[str, float]:
    """Median step seconds of the MoE and its twin, alternated step by step."""
    tokens = torch.randint(
        0, moe_config.vocab_size, (train_config.batch_size, train_config.seq_len + 1)
    )
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    steps, first = {}, {}
    for name, config in (("moe", moe_config), ("dense", dense_twin(moe_config))):
        torch.manual_seed(0)
        model = Transformer(config)
        if compiled:
            compile_blocks(model)
        steps[name] = step_fn(
            model, build_optimizer(model, train_config), train_config, inputs, targets
        )
        start = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - start
    for fn in steps.values():
        fn()
    seconds = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()} | {
        f"{name}_first": s for name, s in first.items()
    }


def layer_parts(moe_config, num_tokens: int, reps: int) -> dict[str, float]:
    """Forward+backward seconds of each part of one MoE layer, and of the dense FFN."""
    cfg = moe_config.moe
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = Transformer(dense_twin(moe_config)).layers[0].ffn
    x_TD = torch.randn(num_tokens, cfg.d_model, requires_grad=True)
    grad_TD = torch.randn(num_tokens, cfg.d_model)
    with torch.no_grad():
        routing = layer.router.route(x_TD, None)
        plan = build_plan(routing, cfg, None)
        x_RD = plan.dispatch(x_TD)
    R = x_RD.shape[0]
    rows_RD = x_RD.detach().requires_grad_()
    grad_RD = torch.randn(R, cfg.d_model)

    def router():
        r = layer.router.route(x_TD, None)
        (r.weights_TK.sum() + r.probs_TE.sum()).backward()

    def dispatch():
        plan.dispatch(x_TD).backward(grad_RD)

    def experts():
        layer.experts(rows_RD, plan.counts_E).backward(grad_RD)

    weights_TK = routing.weights_TK.detach().requires_grad_()
    plan.weights_TK = weights_TK

    def combine():
        plan.combine(rows_RD).backward(grad_TD)

    def shared():
        layer.shared(x_TD).backward(grad_TD)

    def whole():
        out = layer(x_TD)
        torch.autograd.backward([out.hidden, out.aux_loss], [grad_TD, torch.ones(())])

    def dense_ffn():
        dense(x_TD).backward(grad_TD)

    parts = {
        "router": router,
        "plan": lambda: build_plan(routing, cfg, None),
        "dispatch": dispatch,
        "experts": experts,
        "combine": combine,
        "shared": shared if layer.shared is not None else None,
        "losses": lambda: layer._losses_and_stats(routing, plan.counts_E, None),
        "whole MoE layer": whole,
        "dense FFN": dense_ffn,
    }
    return {name: timed(fn, reps) for name, fn in parts.items() if fn is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled steps")
    args, extra = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    moe_config, train_config = build_configs(args.preset, parse_overrides(extra))
    print(machine_summary())
    tokens = train_config.batch_size * train_config.seq_len
    print(f"\n1. whole training steps, {tokens} tokens each (median of {args.reps})")
    print(
        f"{'':<10}{'MoE ms':>10}{'dense ms':>10}{'MoE tok/s':>12}{'dense tok/s':>12}{'ratio':>8}{'first MoE / dense':>20}"
    )
    for compiled in (False, True) if not args.no_compile else (False,):
        s = whole_steps(moe_config, train_config, args.reps, compiled)
        print(
            f"{'compiled' if compiled else 'eager':<10}{s['moe'] * 1e3:>10.1f}{s['dense'] * 1e3:>10.1f}"
            f"{tokens / s['moe']:>12,.0f}{tokens / s['dense']:>12,.0f}{s['dense'] / s['moe']:>8.3f}"
            f"{s['moe_first']:>11.1f} / {s['dense_first']:.1f} s"
        )
    parts = layer_parts(moe_config, tokens, args.reps)
    print(f"\n2. one layer, forward+backward on {tokens} tokens (median of {args.reps})")
    dense_ms = parts["dense FFN"] * 1e3
    for name, seconds in parts.items():
        print(f"{name:<18}{seconds * 1e3:>8.2f} ms{seconds * 1e3 / dense_ms:>8.2f}x dense FFN")
    listed = sum(v for k, v in parts.items() if k not in ("whole MoE layer", "dense FFN"))
    print(f"{'sum of the parts':<18}{listed * 1e3:>8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
