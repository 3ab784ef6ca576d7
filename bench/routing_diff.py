"""How often a token's experts change between engines, on the same tiny models.

# S sequences, N tokens per sequence

Two models, random weights, no downloads: moekit's `tiny` preset (4 MoE layers, 16
experts top-2, vocabulary 4096) and a tiny Mixtral built by transformers (hidden 256, 4
layers, 8 experts top-2, vocabulary 4096, transformers' own initialisation), saved to a
temporary folder and converted (`moekit.interop.load_hf`). The tokens are S random
sequences of N tokens; each row records two traces of the same tokens and diffs them
(moekit.traces.diff_traces), printing the means over the MoE layers: the fraction of
tokens whose top-1 expert, expert set, or order differs, the mean weight gap on the
experts both chose, and the set-flip rate predicted from the router margins (with the
logit noise measured between the two traces) and from the rounding of the two boundary
logits alone.

    python bench/routing_diff.py               # every row
    python bench/routing_diff.py --no-compile  # without the eager-against-compiled rows
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from moekit.benchmark import machine_summary
from moekit.interop import load_hf
from moekit.models import Transformer, presets
from moekit.traces import Trace, diff_traces
from moekit.traces.run import concatenate, record_forward, record_generation


def tiny_mixtral(folder: Path):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def row(name: str, a: Trace, b: Trace) -> str:
    diff = diff_traces(a, b)

    def pct(field: str) -> str:
        value = diff.mean(field)
        return "-" if value is None else f"{100 * value:.2f}%"

    gap = diff.mean("weight_mean")
    return (
        f"| {name} | {diff.layers[0].tokens} | {pct('top1')} | {pct('set')} | {pct('order')} | "
        f"{'-' if gap is None else f'{gap:.1e}'} | {pct('predicted')} | {pct('rounding')} |"
    )


def decoding_rows(model, prompts, new_tokens: int, label: str) -> list[str]:
    """Greedy decoding, each prompt alone against one left-padded batch: the routing of
    the sequences whose tokens came out the same."""
    alone = [record_generation(model, [p], new_tokens) for p in prompts]
    batched = record_generation(model, prompts, new_tokens)
    same = [
        s for s in range(len(prompts)) if torch.equal(alone[s].tokens, batched.select([s]).tokens)
    ]
    if not same:
        return [f"| {label}: no sequence decoded to the same tokens | | | | | | | |"]
    a = concatenate([alone[s] for s in same])
    return [row(f"{label} ({len(same)}/{len(prompts)} sequences agree)", a, batched.select(same))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(machine_summary())
    g = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, 4096, (args.sequences, args.tokens), generator=g).tolist()
    prompts = [s[: 8 + 7 * i] for i, s in enumerate(sequences)]
    rows = []

    torch.manual_seed(0)
    tiny32 = Transformer(presets.tiny()).eval()
    tiny16 = Transformer(presets.tiny()).eval()
    tiny16.load_state_dict(tiny32.state_dict())
    tiny16 = tiny16.to(torch.bfloat16)
    t32, t16 = record_forward(tiny32, sequences), record_forward(tiny16, sequences)
    rows.append(row("moekit tiny: fp32 / bf16", t32, t16))

    with tempfile.TemporaryDirectory() as folder:
        hf32 = tiny_mixtral(Path(folder))
        ours32 = load_hf(folder).eval()
        ours16 = load_hf(folder).eval().to(torch.bfloat16)
        h32 = record_forward(hf32, sequences)
        h16 = record_forward(hf32.to(torch.bfloat16), sequences)
        o32, o16 = record_forward(ours32, sequences), record_forward(ours16, sequences)
    rows.append(row("Mixtral, transformers: fp32 / bf16", h32, h16))
    rows.append(row("Mixtral: transformers fp32 / moekit fp32", h32, o32))
    rows.append(row("Mixtral: transformers bf16 / moekit bf16", h16, o16))
    rows.append(row("Mixtral: transformers bf16 / moekit fp32", h16, o32))

    if not args.no_compile:
        for label, model, eager in (("fp32", tiny32, t32), ("bf16", tiny16, t16)):
            torch._dynamo.reset()
            compiled = record_forward(torch.compile(model), sequences)
            rows.append(row(f"moekit tiny {label}: eager / compiled", eager, compiled))

    rows += decoding_rows(tiny32, prompts, 16, "moekit tiny fp32 decoding: batch 1 / padded batch")
    rows += decoding_rows(tiny16, prompts, 16, "moekit tiny bf16 decoding: batch 1 / padded batch")

    print("| a / b | tokens | top-1 | set | order | weight gap | predicted | rounding only |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
