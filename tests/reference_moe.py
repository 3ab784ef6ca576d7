"""The slow, obviously-correct MoE forward the fast layer is tested against.

# T tokens, D model, F expert hidden, E experts, K top_k, C capacity per expert

Written from the papers' definitions, one token at a time, without calling any moekit
function: it reads only the layer's config and parameter tensors. Routing decisions are
Python lists walked in loops; the values stay tensors so that autograd gives the reference
gradients. Everything is computed in the dtype of x (the tests pass float64).

Randomness. In eval mode nothing is random. In training mode noisy_topk draws its noise as
one float32 (T, E) standard normal tensor and switch its jitter as one float32 (T, D)
uniform tensor from the global generator, in the order the layer draws them (sparsemixer:
a float32 (T, K, E) Exponential(1) tensor, then a float32 (T, K) uniform one); so call
torch.manual_seed(s) before the layer and again before the reference, and give the layer
float32 input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReferenceOutput:
    """hidden: like x; aux_loss: weighted scalar; parts: the unweighted loss parts.

    tokens_per_expert: rows each expert processed; routed: assignments before capacity;
    assignments: per token, the kept (expert, weight) pairs.
    """

    hidden: Tensor
    aux_loss: Tensor
    parts: dict[str, Tensor]
    tokens_per_expert: list[int]
    routed: int
    assignments: list[list[tuple[int, Tensor]]]


@dataclass
class TokenRoute:
    """One token's routing decision.

    picks: the chosen (expert, weight) pairs, best first.
    gate: per-expert value a rerouted weight is taken from; rank: the ranking the token
    walks when it reroutes (-inf: not allowed); probs: distribution for the losses;
    logits: for the z-loss; smooth_load: noisy top-k's P(expert in top-k), or None.
    """

    picks: list[tuple[int, Tensor]]
    gate: Tensor
    rank: list[float]
    probs: Tensor
    logits: Tensor
    smooth_load: Tensor | None = None


# ---------------------------------------------------------------- elementwise math


def softmax(v: Tensor) -> Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def logsumexp(v: Tensor) -> Tensor:
    m = v.max()
    return m + torch.log(torch.exp(v - m).sum())


def sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def softplus(v: Tensor) -> Tensor:
    return torch.log1p(torch.exp(v))


def normal_cdf(v: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))


def gelu_tanh(v: Tensor) -> Tensor:
    return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def activation(h: Tensor, name: str, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """The expert nonlinearity; GLU variants: first half is the gate, second half up."""
    if name == "swiglu_clamped":
        # gpt-oss: gate clamped from above, up to [-limit, limit]; (up + 1) * gate * s(a gate)
        half = h.shape[-1] // 2
        gate = torch.clamp(h[:half], max=limit)
        up = torch.clamp(h[half:], min=-limit, max=limit)
        return (up + 1) * gate * sigmoid(alpha * gate)
    if name in ("swiglu", "geglu"):
        half = h.shape[-1] // 2
        gate, up = h[:half], h[half:]
        act = gate * sigmoid(gate) if name == "swiglu" else gelu_tanh(gate)
        return act * up
    if name == "gelu":
        return gelu_tanh(h)
    if name == "relu":
        return torch.clamp(h, min=0.0)
    if name == "silu":
        return h * sigmoid(h)
    raise AssertionError(name)


def cv_squared(values: list[Tensor] | Tensor) -> Tensor:
    v = torch.stack(list(values)) if not isinstance(values, Tensor) else values
    mean = v.sum() / len(v)
    variance = ((v - mean) ** 2).sum() / len(v)
    return variance / (mean**2 + 1e-10)


def descending(values: list[float]) -> list[int]:
    """Indices of values, largest first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: -values[i])


# ---------------------------------------------------------------- experts


def expert_activation(moe, h: Tensor) -> Tensor:
    cfg = moe.config
    return activation(h, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)


def routed_expert(moe, e: int, x_D: Tensor) -> Tensor:
    w_up = moe.experts.w_up[e].to(x_D.dtype)  # (D, H)
    w_down = moe.experts.w_down[e].to(x_D.dtype)  # (F, D)
    if not moe.config.expert_bias:
        return expert_activation(moe, x_D @ w_up) @ w_down
    b_up, b_down = moe.experts.b_up[e].to(x_D.dtype), moe.experts.b_down[e].to(x_D.dtype)
    return expert_activation(moe, x_D @ w_up + b_up) @ w_down + b_down


def router_logits(moe, x_D: Tensor) -> Tensor:
    """W x (+ b with router_bias): the router's (E,) logits for one token."""
    logits = moe.router.weight.to(x_D.dtype) @ x_D
    if moe.config.router_bias:
        logits = logits + moe.router.logit_bias.to(x_D.dtype)
    return logits


def mix_experts(moe, x_TD, kept):
    """Per token: the sum over its kept (expert, weight) pairs of weight * expert(x)."""
    hidden = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for e, w in kept[t]:
            y = y + w * routed_expert(moe, e, x_TD[t])
        hidden.append(y)
    return hidden


def shared_experts(moe, x_D: Tensor) -> Tensor:
    up = moe.shared.up.weight.to(x_D.dtype)  # (H, D), nn.Linear layout
    down = moe.shared.down.weight.to(x_D.dtype)  # (D, F)
    y = down @ expert_activation(moe, up @ x_D)
    if moe.shared_gate is not None:
        y = sigmoid(moe.shared_gate.weight.to(x_D.dtype)[0] @ x_D) * y
    return y


# ---------------------------------------------------------------- token-choice routers


def route_token(
    moe, x_D: Tensor, noise_E: Tensor | None, jitter_D: Tensor | None, uniform: Tensor | None = None
) -> TokenRoute:
    """One token through the configured router, from the paper's definition.

    uniform: the gshard router's U(0, 1) draw in training (None: keep both experts); for
    sparsemixer noise_E is its (K, E) exponential draws and uniform its (K,) coins."""
    cfg = moe.config
    E, K = cfg.num_experts, cfg.top_k
    if cfg.router == "sparsemixer":
        return _route_sparsemixer(cfg, router_logits(moe, x_D), noise_E, uniform)

    if cfg.router == "switch":
        # Switch Transformer: router input *= U(1 - eps, 1 + eps) in training; top-1 of the
        # softmax, weighted by its raw probability.
        x_router = x_D * jitter_D.to(x_D.dtype) if jitter_D is not None else x_D
        logits = router_logits(moe, x_router)
        p = softmax(logits)
        best = descending(p.tolist())[0]
        return TokenRoute([(best, p[best])], p, p.tolist(), p, logits)

    logits = router_logits(moe, x_D)
    if cfg.router == "sigmoid_topk":
        return _route_sigmoid(moe, logits)

    smooth_load = None
    scores = logits
    if cfg.router == "noisy_topk" and noise_E is not None:
        # Shazeer 2017 eq. (4): H = x W_g + N(0, 1) * softplus(x W_noise).
        noise_std = softplus(moe.router.noise_weight.to(x_D.dtype) @ x_D)
        scores = logits + noise_E.to(x_D.dtype) * noise_std
        smooth_load = _noisy_load(scores, logits, noise_std, K)
    p = softmax(scores)
    order = descending(p.tolist())

    if cfg.router == "gshard":
        # GShard Algorithm 1: top-2, g1 + g2 normalised to 1; in training the second expert
        # is dispatched only when 2 * g2 > a U(0, 1) draw. No renormalisation after it.
        first, second = order[:2]
        g1, g2 = p[first] / (p[first] + p[second]), p[second] / (p[first] + p[second])
        picks = [(first, g1)]
        if uniform is None or 2 * g2.item() > uniform.item():
            picks.append((second, g2))
        return TokenRoute(picks, p, p.tolist(), p, logits)
    if cfg.router == "dense":
        chosen = list(range(E))
    elif cfg.router == "top_p":
        # Fewest experts whose probabilities reach top_p, at most top_k.
        chosen, mass = [], 0.0
        for e in order[:K]:
            if mass >= cfg.top_p:
                break
            chosen.append(e)
            mass += p[e].item()
    elif cfg.router == "softmax_topk":
        return _route_softmax_groups(cfg, p, logits)
    else:
        chosen = order[:K]

    weights = [p[e] for e in chosen]
    if cfg.renormalize and cfg.router != "dense":
        total = sum(weights)
        weights = [w / total for w in weights]
    return TokenRoute(list(zip(chosen, weights)), p, p.tolist(), p, logits, smooth_load)


def _route_softmax_groups(cfg, p: Tensor, logits: Tensor) -> TokenRoute:
    """Softmax top-k; with groups, DeepSeek-V2 section 2.2.2: a group's score is its best
    probability and a token picks inside its topk_groups best groups; weights times
    routed_scaling (after any renormalisation)."""
    E, K = cfg.num_experts, cfg.top_k
    probs = p.tolist()
    size = E // cfg.num_groups
    group_scores = [max(probs[g * size : (g + 1) * size]) for g in range(cfg.num_groups)]
    kept_groups = set(descending(group_scores)[: cfg.topk_groups])
    rank = [probs[e] if e // size in kept_groups else -math.inf for e in range(E)]
    chosen = descending(rank)[:K]
    weights = [p[e] for e in chosen]
    if cfg.renormalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    weights = [w * cfg.routed_scaling for w in weights]
    return TokenRoute(list(zip(chosen, weights)), p * cfg.routed_scaling, rank, p, logits)


def _route_sparsemixer(
    cfg, logits: Tensor, exponential_KE: Tensor | None, coin_K: Tensor | None
) -> TokenRoute:
    """GRIN (arXiv:2409.12136) / Phi-3.5-MoE, one expert per stage: the free experts within
    (max - s) / max(|s|, max) <= 2 eps of the best free one, softmax over those; evaluation
    takes the best, training the Gumbel-max sample (gumbel = -log exponential), whose weight
    is m * factor (1 if best or coin > 0.75, else 0.3333) with the gradient of m alone."""
    E, K, eps = cfg.num_experts, cfg.top_k, cfg.jitter_eps
    values = logits.tolist()
    free, picks = list(range(E)), []
    for k in range(K):
        best = max(free, key=lambda e: (values[e], -e))  # ties: the lower index
        top = values[best]
        # 0 / 0 (every logit 0) keeps the expert, as NaN > 2 eps is False
        kept = [e for e in free if not 0 < max(abs(values[e]), top) * 2 * eps < top - values[e]]
        masked = logits.masked_fill(torch.tensor([e not in kept for e in range(E)]), -math.inf)
        p = softmax(masked)
        if exponential_KE is None:
            picks.append((best, p[best]))
        else:
            gumbel = [-math.log(v) for v in exponential_KE[k].double().tolist()]
            pick = max(kept, key=lambda e: (values[e] + gumbel[e], -e))
            factor = 1.0 if pick == best or coin_K[k].item() > 0.75 else 0.3333
            picks.append((pick, p[pick] + (factor - 1.0) * p[pick].detach()))
        free.remove(picks[-1][0])
    probs = softmax(logits)
    rank = probs.tolist()
    if exponential_KE is not None:
        for k, (e, _) in enumerate(picks):  # sampled picks are lifted to the top, in order
            rank[e] = float(K + 1 - k)
    return TokenRoute(picks, probs, rank, probs, logits)


def _noisy_load(noisy: Tensor, clean: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer 2017 eq. (9): P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i)."""
    E = noisy.shape[0]
    if k == E:
        return torch.ones_like(noisy)  # every expert is always in the top-k
    values = noisy.tolist()
    probs = []
    for i in range(E):
        others = [j for j in descending(values) if j != i]
        kth_other = noisy[others[k - 1]]
        probs.append(normal_cdf((clean[i] - kth_other) / noise_std[i]))
    return torch.stack(probs)


def _route_sigmoid(moe, logits: Tensor) -> TokenRoute:
    """DeepSeek-V3 section 2.1.2: sigmoid scores, biased group-limited selection."""
    cfg = moe.config
    E, K = cfg.num_experts, cfg.top_k
    scores = sigmoid(logits)
    biased = [s + b for s, b in zip(scores.tolist(), moe.router.bias.tolist())]

    # A group's score is the sum of its two best biased scores; keep the topk_groups best.
    size = E // cfg.num_groups
    group_scores = []
    for g in range(cfg.num_groups):
        members = sorted(biased[g * size : (g + 1) * size], reverse=True)
        group_scores.append(sum(members[:2]))
    kept_groups = set(descending(group_scores)[: cfg.topk_groups])
    rank = [biased[e] if e // size in kept_groups else -math.inf for e in range(E)]

    chosen = descending(rank)[:K]
    weights = [scores[e] for e in chosen]  # the bias never enters the weights
    if cfg.renormalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    weights = [w * cfg.routed_scaling for w in weights]
    return TokenRoute(
        picks=list(zip(chosen, weights)),
        gate=scores * cfg.routed_scaling,
        rank=rank,
        probs=scores / scores.sum(),
        logits=logits,
    )


# ---------------------------------------------------------------- capacity


def reference_capacity(
    routes: list[TokenRoute], capacity: int, overflow: str, batch_priority: bool
) -> list[list[tuple[int, Tensor]]]:
    """Walk the assignments one at a time in claim order; returns the kept (expert, weight).

    Claim order: every token's first choice before any second choice; within a choice rank,
    position order, or with batch priority descending max gate value (ties: position).
    Reroute (capacity.py): in rounds, each token with an overflowed assignment moves its
    earliest one to its next-ranked unused, allowed expert; candidates claim room in claim
    order; an assignment that runs out of experts is dropped.
    """
    T = len(routes)
    E = len(routes[0].rank) if routes else 0
    if batch_priority:
        token_order = sorted(range(T), key=lambda t: -max(routes[t].gate.tolist()))
    else:
        token_order = list(range(T))
    max_k = max((len(r.picks) for r in routes), default=0)

    count = [0] * E
    kept: list[dict[int, tuple[int, Tensor]]] = [dict() for _ in range(T)]  # k -> (e, w)
    pending: list[tuple[int, int]] = []  # (t, k) in claim order
    for k in range(max_k):
        for t in token_order:
            if k >= len(routes[t].picks):
                continue
            e, w = routes[t].picks[k]
            if count[e] < capacity:
                count[e] += 1
                kept[t][k] = (e, w)
            else:
                pending.append((t, k))

    if overflow == "reroute":
        ranking = [descending(r.rank) for r in routes]
        next_rank = [len(r.picks) for r in routes]  # a token's own picks hold the top ranks
        used = [{e for e, _ in r.picks} for r in routes]
        while pending:
            this_round, seen = [], set()
            for t, k in pending:
                if t not in seen:
                    seen.add(t)
                    this_round.append((t, k))
            for t, k in this_round:
                while next_rank[t] < E and ranking[t][next_rank[t]] in used[t]:
                    next_rank[t] += 1
                if next_rank[t] >= E or routes[t].rank[ranking[t][next_rank[t]]] == -math.inf:
                    pending.remove((t, k))  # out of experts: dropped
                    continue
                candidate = ranking[t][next_rank[t]]
                next_rank[t] += 1
                if count[candidate] < capacity:
                    count[candidate] += 1
                    used[t].add(candidate)
                    old_expert, old_weight = routes[t].picks[k]
                    gate = routes[t].gate
                    kept[t][k] = (candidate, gate[candidate] * old_weight / gate[old_expert])
                    pending.remove((t, k))
    return [[kept[t][k] for k in sorted(kept[t])] for t in range(T)]


def _capacity(cfg, num_tokens: int, factor: float | None) -> int:
    """C = ceil(capacity_factor * T * top_k / E), at least 1 and at most T."""
    return min(num_tokens, max(1, math.ceil(factor * num_tokens * cfg.top_k / cfg.num_experts)))


# ---------------------------------------------------------------- the layer


def reference_moe(moe, x: Tensor) -> ReferenceOutput:
    """The MoE forward of `moe` on x (..., D), one token at a time."""
    cfg = moe.config
    if cfg.router == "soft":
        out = _soft(moe, x)
    elif cfg.router == "expert_choice":
        out = _expert_choice(moe, x.reshape(-1, cfg.d_model))
    else:
        out = _token_choice(moe, x.reshape(-1, cfg.d_model))
    hidden = out.hidden.reshape(x.shape)
    if moe.shared is not None:
        x_TD = x.reshape(-1, cfg.d_model)
        shared = torch.stack([shared_experts(moe, x_TD[t]) for t in range(x_TD.shape[0])])
        hidden = hidden + shared.reshape(x.shape)
    out.hidden = hidden
    out.aux_loss = (
        cfg.balance_loss_coef * out.parts["balance"]
        + cfg.z_loss_coef * out.parts["z"]
        + cfg.importance_loss_coef * out.parts["importance"]
        + cfg.load_loss_coef * out.parts["load"]
    )
    return out


def _token_choice(moe, x_TD: Tensor) -> ReferenceOutput:
    cfg = moe.config
    T, E = x_TD.shape[0], cfg.num_experts
    noise_TE = jitter_TD = None
    if moe.training and cfg.router == "noisy_topk":
        noise_TE = torch.randn(T, E, dtype=torch.float32)
    if moe.training and cfg.router == "switch" and cfg.jitter_eps > 0:
        eps = cfg.jitter_eps
        jitter_TD = torch.empty(T, cfg.d_model, dtype=torch.float32).uniform_(1 - eps, 1 + eps)
    uniform_T = torch.rand(T) if moe.training and cfg.router == "gshard" else None
    if moe.training and cfg.router == "sparsemixer":
        noise_TE = torch.empty(T, cfg.top_k, E, dtype=torch.float32).exponential_()
        uniform_T = torch.rand(T, cfg.top_k)

    routes = [
        route_token(
            moe,
            x_TD[t],
            None if noise_TE is None else noise_TE[t],
            None if jitter_TD is None else jitter_TD[t],
            None if uniform_T is None else uniform_T[t],
        )
        for t in range(T)
    ]
    kept = [r.picks for r in routes]
    if cfg.capacity_factor is not None and cfg.router != "dense":
        capacity = _capacity(cfg, T, cfg.capacity_factor)
        kept = reference_capacity(routes, capacity, cfg.overflow, cfg.batch_priority)

    hidden = mix_experts(moe, x_TD, kept)

    tokens_per_expert = [sum(e == expert for a in kept for e, _ in a) for expert in range(E)]
    routed = sum(len(r.picks) for r in routes)

    # Switch eq. (4): E * sum_i f_i * P_i, f_i counted before capacity.
    fraction = [sum(e == i for r in routes for e, _ in r.picks) / routed for i in range(E)]
    mean_prob = sum(r.probs for r in routes) / T
    balance = E * sum(f * p for f, p in zip(fraction, mean_prob))
    # ST-MoE eq. (5): mean over tokens of logsumexp(logits)^2.
    z = sum(logsumexp(r.logits) ** 2 for r in routes) / T
    # Shazeer 2017 eq. (6): importance is the per-expert sum of the (pre-capacity) weights.
    zero = x_TD.new_zeros(())
    importance = [sum((w for r in routes for e, w in r.picks if e == i), zero) for i in range(E)]
    if routes[0].smooth_load is not None:
        load = sum(r.smooth_load for r in routes)
    else:
        load = torch.tensor(tokens_per_expert, dtype=x_TD.dtype)
    parts = {
        "balance": balance,
        "z": z,
        "importance": cv_squared(importance),
        "load": cv_squared(load),
    }
    return ReferenceOutput(torch.stack(hidden), zero, parts, tokens_per_expert, routed, kept)


def _expert_choice(moe, x_TD: Tensor) -> ReferenceOutput:
    """Zhou et al. 2022: each expert takes the C tokens with its highest probability."""
    cfg = moe.config
    T, E = x_TD.shape[0], cfg.num_experts
    factor = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
    capacity = _capacity(cfg, T, factor)
    logits = [router_logits(moe, x_TD[t]) for t in range(T)]
    probs = [softmax(v) for v in logits]

    kept: list[list[tuple[int, Tensor]]] = [[] for _ in range(T)]
    for e in range(E):
        column = [probs[t][e].item() for t in range(T)]
        for t in descending(column)[:capacity]:
            kept[t].append((e, probs[t][e]))

    hidden = mix_experts(moe, x_TD, kept)
    zero = x_TD.new_zeros(())
    z = sum(logsumexp(v) ** 2 for v in logits) / T
    parts = {"balance": zero, "z": z, "importance": zero, "load": zero}
    return ReferenceOutput(torch.stack(hidden), zero, parts, [capacity] * E, E * capacity, kept)


def _soft(moe, x: Tensor) -> ReferenceOutput:
    """Puigcerver et al. 2023: slots are softmax(over tokens) mixes of a sequence."""
    cfg = moe.config
    E, S = cfg.num_experts, cfg.slots_per_expert
    sequences = x.reshape(-1, x.shape[-2], cfg.d_model)  # a 2-D x is one sequence
    phi = moe.router.slot_weight.to(x.dtype)  # (E*S, D)
    scale = moe.router.scale.to(x.dtype)
    phi = [scale * phi[s] / phi[s].norm() for s in range(E * S)]

    hidden, all_logits = [], []
    for seq in sequences:
        N = seq.shape[0]
        unit = [seq[n] / seq[n].norm() for n in range(N)]
        logits = torch.stack(
            [torch.stack([unit[n] @ phi[s] for s in range(E * S)]) for n in range(N)]
        )
        dispatch = torch.stack([softmax(logits[:, s]) for s in range(E * S)], dim=1)  # over tokens
        combine = torch.stack([softmax(logits[n]) for n in range(N)])  # over slots
        slot_out = []
        for s in range(E * S):
            slot_in = sum(dispatch[n, s] * seq[n] for n in range(N))
            slot_out.append(routed_expert(moe, s // S, slot_in))
        for n in range(N):
            hidden.append(sum(combine[n, s] * slot_out[s] for s in range(E * S)))
        all_logits.extend(logits[n] for n in range(N))

    zero = x.new_zeros(())
    z = sum(logsumexp(v) ** 2 for v in all_logits) / len(all_logits)
    parts = {"balance": zero, "z": z, "importance": zero, "load": zero}
    num_rows = len(sequences) * S
    return ReferenceOutput(torch.stack(hidden), zero, parts, [num_rows] * E, E * num_rows, [])
