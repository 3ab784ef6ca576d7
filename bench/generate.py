"""Greedy decoding speed: moekit against transformers' `generate` and the bandwidth limit.

# B batch, T prompt tokens, N new tokens, D model, E experts, K top_k, V vocab

Two models, random weights, no downloads: a tiny Mixtral built by transformers (hidden
256, 4 layers, 8 experts top-2, vocabulary 4096) and moekit's `small` preset converted to
the Mixtral format (no shared expert, no dense first layer: Mixtral has neither). Each is
saved to a temporary folder and loaded by both libraries (`moekit.interop.load_hf`,
`AutoModelForCausalLM.from_pretrained`). Tokens/s = B * N / the wall time of the whole
call (prefill included); the greedy tokens must be identical.

    python bench/generate.py                  # both models, batch 1 and 8, eager and compiled
    python bench/generate.py --models tiny --no-compile
    python bench/generate.py --threshold      # decode steps: small-batch MoE path or dispatch

The decode limit: bytes one decode step must read (the distinct experts the batch uses,
attention, router and norm weights, the output head, the embedding rows, the KV cache at
its mean length) divided by the memory bandwidth of a large copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config

import moekit.moe
from moekit.benchmark import machine_summary
from moekit.generate import _decode_step, compiled_decode_step, generate
from moekit.interop import load_hf, save_hf
from moekit.models import KVCache, Transformer, presets


def tiny_mixtral(folder: Path) -> None:
    """The tiny Mixtral, written by transformers' save_pretrained."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    transformers.MixtralForCausalLM(config).eval().save_pretrained(folder)


def small_as_mixtral(folder: Path) -> None:
    """moekit's `small` preset without its shared expert and dense first layer, via save_hf."""
    torch.manual_seed(0)
    base = presets.small()
    config = dataclasses.replace(
        base, first_dense_layers=0, moe=dataclasses.replace(base.moe, num_shared_experts=0)
    )
    save_hf(Transformer(config), folder, architecture="mixtral")


MODELS = {"tiny": tiny_mixtral, "small": small_as_mixtral}


def seconds(calls: list, reps: int) -> list[tuple[float, object]]:
    """Median wall time of each call and its last result, after one warm-up call each.

    The calls take turns within each repetition, so a slow spell (other processes on the
    cores) hits them alike.
    """
    results = [call() for call in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            results[i] = call()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), result) for t, result in zip(times, results)]


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes/s of a large tensor copy (read + write both count)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def step_bytes(model: Transformer, batch: int, cache_len: float) -> float:
    """Bytes one decode step of `batch` tokens reads (fp32 weights, see the docstring)."""
    cfg, moe = model.config, model.config.moe
    size = model.tok_embed.weight.element_size()
    D, Dh = cfg.d_model, cfg.head_dim
    attention = D * Dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    expert = 3 * D * moe.d_hidden
    # expected distinct experts of a batch: E * (1 - (1 - K/E)^B) (independent tokens)
    distinct = moe.num_experts * (1 - (1 - moe.top_k / moe.num_experts) ** batch)
    per_layer = attention + distinct * expert + moe.num_experts * D + 2 * D
    kv = batch * cache_len * 2 * cfg.num_kv_heads * Dh
    head = cfg.vocab_size * D + batch * D
    return size * (cfg.num_layers * (per_layer + kv) + head)


@torch.no_grad()
def hf_generate(hf_model, prompt_BT: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = hf_model.generate(
        prompt_BT,
        attention_mask=torch.ones_like(prompt_BT),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, prompt_BT.shape[1] :]


def run_model(name: str, args) -> list[str]:
    """The table rows of one model: batch 1 and 8, time to first token, the limit."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        MODELS[name](folder)
        model = load_hf(folder)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_model.generation_config.eos_token_id = None
    bandwidth = copy_bandwidth()
    rows = []
    for batch in args.batches:
        rows.append(run_batch(name, model, hf_model, batch, bandwidth, args))
        print(rows[-1], flush=True)
    rows.append(time_to_first_token(name, model, hf_model, args))
    print(rows[-1], flush=True)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    return rows


def run_batch(name: str, model, hf_model, batch: int, bandwidth: float, args) -> str:
    """One table row: transformers, moekit eager and compiled, the limit."""
    N = args.new_tokens
    prompt_BT = torch.randint(
        0, model.config.vocab_size, (batch, args.prompt_len), generator=torch.Generator()
    )
    kw = dict(max_new_tokens=N, temperature=0.0)
    calls = [
        lambda: hf_generate(hf_model, prompt_BT, N),
        lambda: generate(model, prompt_BT, **kw).tokens_BN,
    ]
    cold = None
    if args.compile:
        torch._dynamo.reset()
        cold = _timed(lambda: generate(model, prompt_BT, compile=True, **kw))
        calls.append(lambda: generate(model, prompt_BT, compile=True, **kw).tokens_BN)
    timed = seconds(calls, args.reps)
    (hf_s, hf_tokens), (eager_s, eager) = timed[:2]
    cells = [name, str(batch), f"{batch * N / hf_s:.0f}", f"{batch * N / eager_s:.0f}"]
    same = torch.equal(hf_tokens, eager)
    best_s = eager_s
    if cold is not None:
        comp_s, comp = timed[2]
        same = same and torch.equal(hf_tokens, comp)
        per_token_gain = (eager_s - comp_s) / N
        pays = f"{(cold - comp_s) / per_token_gain:.0f}" if per_token_gain > 0 else "never"
        cells += [f"{batch * N / comp_s:.0f}", f"{cold - comp_s:.1f} s", pays]
        best_s = min(eager_s, comp_s)
    else:
        cells += ["-", "-", "-"]
    limit = bandwidth / step_bytes(model, batch, args.prompt_len + N / 2) * batch
    cells += [
        f"{hf_s / best_s:.2f}x",
        f"{limit:.0f}",
        f"{batch * N / best_s / limit:.0%}",
        "yes" if same else "NO",
    ]
    return "| " + " | ".join(cells) + " |"


def time_to_first_token(name: str, model, hf_model, args) -> str:
    prompt_BT = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator())
    (hf_s, _), (ours_s, _) = seconds(
        [
            lambda: hf_generate(hf_model, prompt_BT, 1),
            lambda: generate(model, prompt_BT, max_new_tokens=1),
        ],
        args.reps,
    )
    return (
        f"time to first token, 512-token prompt, batch 1, {name}: transformers "
        f"{hf_s * 1e3:.0f} ms, moekit {ours_s * 1e3:.0f} ms"
    )


def step_ms(model: Transformer, batch: int, step, small_batch_rows: int) -> float:
    """Milliseconds per decode step (after a 32-token prefill) with the given limit."""
    saved, moekit.moe.SMALL_BATCH_ROWS = moekit.moe.SMALL_BATCH_ROWS, small_batch_rows
    try:
        cache = KVCache.for_model(model, batch, 256)
        token_B1 = torch.randint(0, model.config.vocab_size, (batch, 1))
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (batch, 32)), kv_cache=cache)
            calls = [lambda: [step(model, token_B1, cache, None) for _ in range(20)]]
            return seconds(calls, 3)[0][0] / 20 * 1e3
    finally:
        moekit.moe.SMALL_BATCH_ROWS = saved


def threshold_sweep(args) -> None:
    """Decode-step time, the small-batch MoE path against dispatch, eager and compiled."""
    with tempfile.TemporaryDirectory() as tmp:
        tiny_mixtral(Path(tmp) / "tiny")
        model = load_hf(Path(tmp) / "tiny")
    print("tiny Mixtral decode step, ms (batch B: B * top_k = 2B assignment rows per layer)")
    print(
        "| batch | rows | dispatch eager | gathered eager | dispatch compiled | gathered compiled |"
    )
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        cells = []
        for step in (_decode_step, compiled_decode_step()):
            for limit in (0, 10**6):
                torch._dynamo.reset()
                cells.append(f"{step_ms(model, batch, step, limit):.2f}")
        eager, compiled = cells[:2], cells[2:]
        row = [str(batch), str(2 * batch), *eager, *compiled]
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--threshold", action="store_true", help="only the small-batch sweep")
    args = parser.parse_args()
    args.batches = args.batches or ([1, 2, 4, 8] if args.threshold else [1, 8])
    torch.set_num_threads(args.threads)
    # Cold compile times, as a first run sees them (inductor's on-disk cache off).
    torch._inductor.config.fx_graph_cache = False
    print(machine_summary())
    if args.threshold:
        threshold_sweep(args)
        return
    print(
        f"greedy, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, fp32; tokens/s "
        "include the prefill; compile = one-time cost, pays after = tokens to recover it"
    )
    print(
        "| model | batch | transformers tok/s | moekit eager | moekit compiled | compile "
        "| pays after | best / transformers | limit tok/s | of limit | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        run_model(name, args)


if __name__ == "__main__":
    main()
