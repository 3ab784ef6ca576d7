"""Route text through a trained model and read back each token's experts and weights.

# T tokens, K experts per token (top_k; E for expert choice), E experts, D domains

The router's decision is captured with the model's own router hook (`tap_routers`, the
one `moekit generate --show-experts` uses), so nothing is routed twice and the weights
are the combine weights the layer used. The decision is the router's, before capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import Tokenizer, TokenStream
from ..models import Transformer
from ..models.expert_ids import label_expert_counts, tap_routers
from ..routing import router_class
from ..routing.base import ExpertChoice, TokenChoice


@dataclass
class TokenRouting:
    """A text's tokens and what each MoE layer did with them.

    pieces: the text of each token (a token that ends inside a character shows "", the
        character appears with the token that completes it).
    layers: the MoE layers' indices in the model.
    ids: per MoE layer, (T, K) expert ids, best first, -1 in unused slots.
    weights: per MoE layer, (T, K) combine weights of those experts.
    """

    pieces: list[str]
    layers: list[int]
    ids: list[np.ndarray]
    weights: list[np.ndarray]

    def top1(self, position: int) -> np.ndarray:
        """(T,) the highest-weighted expert of each token in MoE layer `position`."""
        ids_TK, weights_TK = self.ids[position], self.weights[position]
        masked_TK = np.where(ids_TK >= 0, weights_TK, -np.inf)
        best_T = masked_TK.argmax(axis=1)
        return np.where(
            np.isfinite(masked_TK.max(axis=1)),
            ids_TK[np.arange(len(best_T)), best_T],
            -1,
        )


def moe_layers(model: Transformer) -> list[int]:
    """Indices of the layers whose router gives per-token experts (not Soft MoE)."""
    config = model.config
    if config.moe is None or router_class(config.moe.router).mixes_tokens:
        return []
    return config.moe_layers


@torch.no_grad()
def route_batch(
    model: Transformer, tokens_BT: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer index: (ids_BTK, weights_BTK) of a forward pass over tokens_BT."""
    B, T = tokens_BT.shape
    with tap_routers(model.layers) as routings:
        model(tokens_BT)
    decisions = {}
    for layer, routing in enumerate(routings):
        if isinstance(routing, TokenChoice):
            ids_TK, weights_TK = routing.ids_TK, routing.weights_TK
            if routing.valid_TK is not None:
                ids_TK = ids_TK.masked_fill(~routing.valid_TK, -1)
        elif isinstance(routing, ExpertChoice):
            ids_TK, weights_TK = _expert_choice_per_token(routing, B * T)
        else:
            continue
        decisions[layer] = (
            ids_TK.reshape(B, T, -1),
            weights_TK.detach().float().reshape(B, T, -1),
        )
    return decisions


def _expert_choice_per_token(
    routing: ExpertChoice, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) ids and weights: expert e in column e when it picked the token, else -1."""
    E = routing.token_ids_EC.shape[0]
    weights_TE = torch.zeros(num_tokens, E)
    expert_EC = torch.arange(E).unsqueeze(1).expand_as(routing.token_ids_EC)
    weights_TE[routing.token_ids_EC, expert_EC] = routing.weights_EC.detach().float()
    picked_TE = torch.zeros(num_tokens, E, dtype=torch.bool)
    picked_TE[routing.token_ids_EC, expert_EC] = True
    return torch.where(picked_TE, torch.arange(E).expand(num_tokens, E), -1), weights_TE


def token_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, as streamed generation shows it (whole characters only)."""
    pieces, shown = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        piece = "" if text.endswith("\ufffd") else text[len(shown) :]
        shown += piece
        pieces.append(piece)
    return pieces


def route_tokens(model: Transformer, tokenizer: Tokenizer, ids: list[int]) -> TokenRouting:
    """Route one sequence of token ids (at most the model's max_seq_len)."""
    if not ids:
        raise ValueError("the text has no tokens")
    if len(ids) > model.config.max_seq_len:
        raise ValueError(
            f"the text has {len(ids)} tokens; the model's max_seq_len is {model.config.max_seq_len}"
        )
    decisions = route_batch(model, torch.tensor([ids]))
    layers = sorted(decisions)
    return TokenRouting(
        pieces=token_pieces(tokenizer, ids),
        layers=layers,
        ids=[decisions[layer][0][0].numpy() for layer in layers],
        weights=[decisions[layer][1][0].numpy() for layer in layers],
    )


def domain_tokens(stream: TokenStream) -> dict[str, np.ndarray]:
    """Each present domain's tokens, in stream order (its documents with their end tokens)."""
    out = {}
    for index, name in enumerate(stream.domains):
        tokens = np.asarray(stream.tokens_N)[np.asarray(stream.domain_ids_N) == index]
        if len(tokens):
            out[name] = tokens.astype(np.int64)
    return out


def first_document(tokens: np.ndarray, eot_id: int, max_tokens: int) -> list[int]:
    """The first document of a domain's tokens, cut to max_tokens."""
    ends = np.flatnonzero(tokens == eot_id)
    end = ends[0] if len(ends) else len(tokens)
    return tokens[: min(end, max_tokens)].tolist()


@torch.no_grad()
def domain_expert_counts(
    model: Transformer,
    per_domain: dict[str, np.ndarray],
    *,
    seq_len: int,
    tokens_per_domain: int,
) -> dict[int, np.ndarray]:
    """Per MoE layer index, (D, E) counts of the top-k assignments of each domain's tokens.

    Each domain contributes the same number of tokens (its first tokens_per_domain, or all
    it has), in sequences of seq_len from that domain alone, so the table compares domains
    and not their sizes.
    """
    num_experts = model.config.moe.num_experts
    counts: dict[int, np.ndarray] = {}
    for d, tokens in enumerate(per_domain.values()):
        tokens = torch.from_numpy(tokens[:tokens_per_domain])
        full = len(tokens) // seq_len * seq_len
        batches = [tokens[:full].view(-1, seq_len), tokens[full:].unsqueeze(0)]
        for tokens_BT in batches:
            if tokens_BT.numel() == 0:
                continue
            labels_BT = torch.full_like(tokens_BT, d)
            for layer, (ids_BTK, _) in route_batch(model, tokens_BT).items():
                table = label_expert_counts(
                    ids_BTK, labels_BT, len(per_domain), num_experts
                ).numpy()
                counts[layer] = counts.get(layer, 0) + table
    return counts
