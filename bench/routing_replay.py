"""The worked example of docs/traces.md: a bf16 generation's routing replayed in fp32.

# B sequences, P prompt tokens, G generated tokens, V vocabulary

Reinforcement learning samples with one engine and trains with another. Here the sampler
is moekit's `tiny` preset (random weights, seed 0) in bf16, decoding greedily with its KV
cache; the trainer is the same weights in fp32, one forward over the generated sequences.
The script records the sampler's routing, the trainer's routing with and without
replaying the sampler's trace, and prints, for each: the share of tokens whose expert set
differs from the sampler's (mean over MoE layers), and the gap between the trainer's and
the sampler's log-probabilities of the generated tokens (mean and max |difference|).

    python bench/routing_replay.py                 # about 20 s on 2 cores
    python bench/routing_replay.py --mode ids+weights
"""

from __future__ import annotations

import argparse

import torch

from moekit.benchmark import machine_summary
from moekit.generate import generate
from moekit.models import Transformer, presets
from moekit.traces import diff_traces, record_routing, replay_routing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--mode", choices=("ids", "ids+weights"), default="ids")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(machine_summary())
    torch.manual_seed(0)
    trainer = Transformer(presets.tiny()).eval()
    sampler = Transformer(presets.tiny()).eval()
    sampler.load_state_dict(trainer.state_dict())
    sampler = sampler.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 4096, (args.prompts, args.prompt_tokens), generator=g)

    # 1. sample in bf16, recording which experts every token took
    with record_routing(sampler, mode="generate") as recorder, torch.no_grad():
        out = generate(sampler, prompts, max_new_tokens=args.new_tokens, temperature=0.0)
    tokens_BN = torch.cat([prompts, out.tokens_BN], dim=1)
    sampled = recorder.trace(tokens_BN)
    P = args.prompt_tokens
    logp_sampler = out.logits_BNV.float().log_softmax(-1).gather(-1, out.tokens_BN[..., None])

    # 2. the fp32 trainer's forward over the same tokens, without and with replay
    def trainer_forward():
        with record_routing(trainer) as rec, torch.no_grad():
            logits = trainer(tokens_BN).logits.float()
        logp = logits[:, P - 1 : -1].log_softmax(-1).gather(-1, out.tokens_BN[..., None])
        return rec.trace(tokens_BN), logp

    plain, logp_plain = trainer_forward()
    with replay_routing(trainer, sampled, args.mode) as batch:
        assert torch.equal(batch.tokens_BN, tokens_BN)
        replayed, logp_replayed = trainer_forward()

    # 3. the predictions made at inputs where some layer of the plain forward flipped
    B, N = tokens_BN.shape
    same_TLK = sampled.ids.sort(-1).values == plain.ids.sort(-1).values
    flipped_BN = (~same_TLK.all(-1)).any(-1).reshape(B, N)
    flipped_BG = flipped_BN[:, P - 1 : -1]

    print(f"{args.prompts} prompts x {P} tokens, {args.new_tokens} generated (bf16), "
          f"trainer fp32, replay mode {args.mode}; {int(flipped_BG.sum())} of "
          f"{flipped_BG.numel()} generated tokens were predicted at a flipped input")  # fmt: skip
    print("| trainer forward | set flips vs sampler | top-1 flips | "
          "|log p gap| mean | max | mean at flipped inputs |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, trace, logp in (
        ("fp32", plain, logp_plain),
        ("fp32 + replay", replayed, logp_replayed),
    ):
        diff = diff_traces(sampled, trace)
        gap_BG = (logp - logp_sampler).abs()[..., 0]
        at_flips = gap_BG[flipped_BG].mean() if flipped_BG.any() else float("nan")
        print(
            f"| {name} | {100 * diff.mean('set'):.2f}% | {100 * diff.mean('top1'):.2f}% | "
            f"{gap_BG.mean():.2e} | {gap_BG.max():.2e} | {at_flips:.2e} |"
        )


if __name__ == "__main__":
    main()
