"""How two traces of the same tokens differ: per MoE layer, which tokens changed experts,
how much the weights moved, and whether the router's margins explain the flips.

# T tokens, L MoE layers, K top_k, E experts

For each layer, over the tokens both traces routed:
    top1     fraction of tokens whose first expert differs
    set      fraction whose set of experts differs
    order    fraction with the same set in a different order
    weights  mean and max |w_a - w_b| over the experts both chose for a token
Margins (from the logits of trace a, else b): m = s_(K) - s_(K+1), the gap between the
K-th and (K+1)-th router logit, which the selection is monotone in for every family moekit
records. A set flip needs a perturbation that closes the gap. With the logits of both
traces, their difference per layer gives the perturbation's spread sigma, and a token
flips with probability Phi(-m / (sqrt(2) sigma)) (two independent N(0, sigma^2) errors on
the two boundary logits): `predicted`. `rounding` is the same with only the rounding of
the two boundary logits to the lower-precision trace's dtype (uniform errors of one ulp,
variance ulp^2 / 12): a floor, since a bf16 engine's logits also carry the error of
every layer below.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .format import Trace

MARGIN_EDGES = (0.0, 1e-3, 1e-2, 1e-1, 1.0, math.inf)
POSITION_EDGES = (0, 1, 4, 16, 64, 256, math.inf)


@dataclass
class LayerDiff:
    """One layer's differences; fractions are of `tokens` (those both traces routed)."""

    layer: str
    tokens: int
    top1: float
    set: float
    order: float
    weight_mean: float | None
    weight_max: float | None
    predicted: float | None = None
    rounding: float | None = None
    sigma: float | None = None
    margins: list[dict] = field(default_factory=list)
    positions: list[dict] = field(default_factory=list)


@dataclass
class TraceDiff:
    """The per-layer differences of trace b against trace a (labels say which is which)."""

    a: str
    b: str
    layers: list[LayerDiff]

    def mean(self, name: str) -> float | None:
        """The token-weighted mean of a LayerDiff field over the layers (None if unknown)."""
        values = [(getattr(d, name), d.tokens) for d in self.layers]
        if any(v is None for v, _ in values) or not values:
            return None
        total = sum(n for _, n in values)
        return sum(v * n for v, n in values) / max(total, 1)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "layers": [asdict(d) for d in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> TraceDiff:
        return cls(data["a"], data["b"], [LayerDiff(**layer) for layer in data["layers"]])

    def table(self) -> str:
        """A terminal table: one row per layer, then the mean over layers."""
        head = f"{'layer':28s} {'tokens':>7s} {'top1':>7s} {'set':>7s} {'order':>7s} "
        head += f"{'w mean':>9s} {'w max':>9s} {'pred':>7s} {'round':>7s}"
        lines = [f"a: {self.a}", f"b: {self.b}", head]
        for d in self.layers:
            lines.append(
                f"{d.layer[-28:]:28s} {d.tokens:7d} {_pct(d.top1)} {_pct(d.set)} "
                f"{_pct(d.order)} {_num(d.weight_mean)} {_num(d.weight_max)} "
                f"{_pct(d.predicted)} {_pct(d.rounding)}"
            )
        n = sum(d.tokens for d in self.layers)
        lines.append(
            f"{'mean':28s} {n:7d} {_pct(self.mean('top1'))} {_pct(self.mean('set'))} "
            f"{_pct(self.mean('order'))} {_num(self.mean('weight_mean'))} "
            f"{_num(max((d.weight_max or 0.0) for d in self.layers) if self.layers else None)} "
            f"{_pct(self.mean('predicted'))} {_pct(self.mean('rounding'))}"
        )
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return f"{'-':>7s}" if value is None else f"{100 * value:6.2f}%"


def _num(value: float | None) -> str:
    return f"{'-':>9s}" if value is None else f"{value:9.2e}"


def check_comparable(a: Trace, b: Trace) -> None:
    """Raise ValueError naming the field if a and b are not traces of the same tokens of
    the same model structure."""
    if len(a.model.layers) != len(b.model.layers):
        raise ValueError(
            f"model.layers: a has {len(a.model.layers)} MoE layers, b has {len(b.model.layers)}"
        )
    problem = a.model.mismatch(b.model)
    if problem is not None:
        raise ValueError(f"the traces are of different models: {problem.replace('trace', 'a')}")
    if a.num_tokens != b.num_tokens:
        raise ValueError(f"tokens: a has {a.num_tokens} tokens, b has {b.num_tokens}")
    if not torch.equal(a.offsets, b.offsets):
        raise ValueError("offsets: the traces split their tokens into different sequences")
    if not torch.equal(a.tokens, b.tokens):
        first = int((a.tokens != b.tokens).nonzero()[0])
        raise ValueError(f"tokens: the traces differ first at token {first}")


def diff_traces(a: Trace, b: Trace, label_a: str = "a", label_b: str = "b") -> TraceDiff:
    """Compare trace b against trace a, layer by layer (the same tokens, same model)."""
    check_comparable(a, b)
    both_T = a.routed_mask() & b.routed_mask()
    logits = a.logits if a.logits is not None else b.logits
    sigma_L = None
    if a.logits is not None and b.logits is not None:
        delta = (a.logits - b.logits)[both_T]
        sigma_L = delta.transpose(0, 1).reshape(len(a.model.layers), -1).std(dim=1)
    eps = _coarser_eps(a, b)
    layers = []
    for i, name in enumerate(a.model.layers):
        ids_a, ids_b = a.ids[both_T, i].long(), b.ids[both_T, i].long()
        valid_a, valid_b = a.valid_mask()[both_T, i], b.valid_mask()[both_T, i]
        diff = _layer(name, ids_a, ids_b, valid_a, valid_b, a.model.num_experts)
        w_a = None if a.weights is None else a.weights[both_T, i]
        w_b = None if b.weights is None else b.weights[both_T, i]
        if w_a is not None and w_b is not None:
            E = a.model.num_experts
            diff.weight_mean, diff.weight_max = _weights(
                ids_a, ids_b, valid_a, valid_b, w_a, w_b, E
            )
        flips_T = _set_flips(ids_a, ids_b, valid_a, valid_b, a.model.num_experts)
        if logits is not None and a.model.top_k < a.model.num_experts:
            sigma = None if sigma_L is None else float(sigma_L[i])
            _margins(diff, logits[both_T, i], a.model.top_k, flips_T, sigma, eps)
        diff.positions = _by_position(a.positions[both_T], flips_T)
        layers.append(diff)
    return TraceDiff(label_a, label_b, layers)


def _multi_hot(ids_TK: Tensor, valid_TK: Tensor, E: int) -> Tensor:
    hot_TE = torch.zeros(ids_TK.shape[0], E, dtype=torch.bool)
    rows = torch.arange(ids_TK.shape[0]).unsqueeze(1).expand_as(ids_TK)
    hot_TE[rows[valid_TK], ids_TK[valid_TK]] = True
    return hot_TE


def _set_flips(ids_a, ids_b, valid_a, valid_b, E: int) -> Tensor:
    return (_multi_hot(ids_a, valid_a, E) != _multi_hot(ids_b, valid_b, E)).any(dim=1)


def _layer(name: str, ids_a, ids_b, valid_a, valid_b, E: int) -> LayerDiff:
    T = ids_a.shape[0]
    set_T = _set_flips(ids_a, ids_b, valid_a, valid_b, E)
    top1_T = (ids_a[:, 0] != ids_b[:, 0]) | (valid_a[:, 0] != valid_b[:, 0])
    same_slots_T = ((ids_a == ids_b) | ~(valid_a & valid_b)).all(1) & (valid_a == valid_b).all(1)
    order_T = ~set_T & ~same_slots_T
    frac = lambda flags: float(flags.float().mean()) if T else 0.0  # noqa: E731
    return LayerDiff(name, T, frac(top1_T), frac(set_T), frac(order_T), None, None)


def _weights(ids_a, ids_b, valid_a, valid_b, w_a, w_b, E: int) -> tuple[float | None, float | None]:
    """Mean and max |w_a - w_b| over (token, expert) pairs both traces chose."""
    ids_a, ids_b = ids_a.masked_fill(~valid_a, 0), ids_b.masked_fill(~valid_b, 0)
    dense_a = torch.zeros(ids_a.shape[0], E).scatter_add_(1, ids_a, w_a * valid_a)
    dense_b = torch.zeros(ids_b.shape[0], E).scatter_add_(1, ids_b, w_b * valid_b)
    agree = _multi_hot(ids_a, valid_a, E) & _multi_hot(ids_b, valid_b, E)
    if not bool(agree.any()):
        return None, None
    gaps = (dense_a - dense_b).abs()[agree]
    return float(gaps.mean()), float(gaps.max())


def _coarser_eps(a: Trace, b: Trace) -> float | None:
    """Machine epsilon of the coarser of the two recording dtypes (None for fp32 and up)."""
    eps = []
    for trace in (a, b):
        name = str(trace.recording.get("dtype", trace.model.dtype))
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            eps.append(torch.finfo(dtype).eps)
    worst = max(eps, default=None)
    return worst if worst is not None and worst > torch.finfo(torch.float32).eps else None


def _phi(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def _margins(diff: LayerDiff, logits_TE: Tensor, K: int, flips_T, sigma, eps) -> None:
    """Fill the predicted flip rates and the per-margin-bin table of one layer."""
    top_TK1 = logits_TE.topk(K + 1, dim=1).values
    kth_T, next_T = top_TK1[:, K - 1], top_TK1[:, K]
    margin_T = kth_T - next_T
    pred_T = None
    if sigma is not None:
        diff.sigma = sigma
        pred_T = _phi(-margin_T / (math.sqrt(2.0) * max(sigma, 1e-30)))
        diff.predicted = float(pred_T.mean()) if margin_T.numel() else 0.0
    round_T = None
    if eps is not None:
        ulp_k, ulp_n = _ulp(kth_T, eps), _ulp(next_T, eps)
        spread_T = ((ulp_k**2 + ulp_n**2) / 12).sqrt().clamp_min(1e-30)
        round_T = _phi(-margin_T / spread_T)
        diff.rounding = float(round_T.mean()) if margin_T.numel() else 0.0
    for lo, hi in zip(MARGIN_EDGES[:-1], MARGIN_EDGES[1:]):
        inside = (margin_T >= lo) & (margin_T < hi)
        n = int(inside.sum())
        row = {"lo": lo, "hi": hi, "tokens": n, "measured": _rate(flips_T, inside)}
        row["predicted"] = None if pred_T is None else _rate(pred_T, inside)
        row["rounding"] = None if round_T is None else _rate(round_T, inside)
        diff.margins.append(row)


def _ulp(x: Tensor, eps: float) -> Tensor:
    """The spacing of the floats with machine epsilon eps around x."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(1e-30)))
    return eps * torch.exp2(exponent)


def _rate(values_T: Tensor, inside_T: Tensor) -> float | None:
    n = int(inside_T.sum())
    return float(values_T[inside_T].float().mean()) if n else None


def _by_position(positions_T: Tensor, flips_T: Tensor) -> list[dict]:
    rows = []
    for lo, hi in zip(POSITION_EDGES[:-1], POSITION_EDGES[1:]):
        inside = (positions_T >= lo) & (positions_T < hi)
        n = int(inside.sum())
        if n:
            rows.append({"lo": lo, "hi": hi, "tokens": n, "set": _rate(flips_T, inside)})
    return rows
