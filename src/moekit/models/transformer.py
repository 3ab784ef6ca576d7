"""A decoder-only language model whose feed-forward blocks are dense or MoE.

# B batch, T tokens per sequence (new tokens when decoding with a cache), S cached + new
# tokens, D model, V vocab, H query heads, G key/value heads, Dh head dim, E experts

Read top to bottom: ModelConfig, Block, Transformer. The attention kinds are beside it
(attention.py: grouped-query; mla.py: DeepSeek's multi-head latent attention), as are
RMSNorm (norm.py) and the rotary tables (rope.py). One block is pre-norm:
    x = x + m * Attention(Norm(x));  x = x + m * FFN(Norm(x))
where FFN is a dense SwiGLU `MLP` or a `MoE` layer (see `ModelConfig.is_moe_layer`), Norm
is RMSNorm (or LayerNorm, ModelConfig.norm) and m is residual_multiplier (1 but in Granite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ACTIVATIONS, MoEConfig, warn_once
from ..experts import MLP, GroupedExperts
from ..moe import MoE, MoEOutput, MoEStats
from .attention import Attention, Placement
from .expert_ids import tap_routers
from .kv_cache import KVCache, padded_positions
from .mla import MLA_FIELDS, MultiHeadLatentAttention, check_mla_fields
from .mtp import MTPModule, multi_token_prediction
from .norm import RMSNorm, block_norm
from .options import check_options
from .rope import check_rope_scaling, rope_tables
from .sink_attention import SinkAttention, check_window
from .skip_init import skipped_initialisers

QK_NORMS = (None, "head", "full")
# ModelConfig.attention -> the attention module of every block.
ATTENTION_KINDS: dict[str, type[nn.Module]] = {
    "gqa": Attention,
    "mla": MultiHeadLatentAttention,
    # gpt-oss: grouped-query attention with attention sinks and sliding windows
    "sinks": SinkAttention,
}


def _round_up(value: float, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


@dataclass(kw_only=True)
class ModelConfig:
    """Everything that defines the decoder.

    Which layers are MoE: with moe set, layer i (0-based) is an MoE layer when
    i >= first_dense_layers and (i - first_dense_layers + 1) % moe_every == 0, so
    moe_every=1 makes every layer (after the dense prefix) MoE and moe_every=2 makes the
    2nd, 4th, ... ones MoE (GShard's "every other layer"; Qwen-MoE's decoder_sparse_step).
    first_dense_layers keeps the first layers dense (DeepSeek-V3's first_k_dense_replace).
    dense_layers lists further layers that stay dense (Qwen-MoE's mlp_only_layers).
    All other layers, and every layer when moe is None, use a dense MLP of width d_hidden.

    Attention options for the Hugging Face architectures (defaults: none of them):
    head_dim None = d_model / num_heads (Qwen3-MoE sets it apart); qkv_bias adds biases to
    the q/k/v projections (Qwen2-MoE), attn_out_bias to the output projection; qk_norm
    "head" is an RMSNorm over each head's head_dim for q and k before the rotation
    (Qwen3-MoE), "full" one over the whole q and k projections (OLMoE).

    attention "mla" is DeepSeek-V2/V3's multi-head latent attention (models/mla.py), sized
    by q_lora_rank (None = a full query projection), kv_lora_rank, qk_rope_head_dim,
    qk_nope_head_dim and v_head_dim; those are used only by it, and with it head_dim is
    the query/key head width qk_nope_head_dim + qk_rope_head_dim.
    attention "sinks" (gpt-oss) adds a learned sink logit per head; with it,
    sliding_window W makes each query see itself and the W - 1 tokens before it, in the
    layers sliding_layers lists (None = every layer); see models/sink_attention.py.

    Decoder options of further families (defaults: today's decoder; see models/options.py):
    rotary_dim R rotates only the first R dims of each q/k head (None = all; GLM-4.5);
    norm "layer" makes the block and final norms LayerNorms with biases (Phi-3.5-MoE);
    embedding_multiplier, residual_multiplier, attention_multiplier (the softmax scale,
    None = 1 / sqrt(head_dim)) and logits_scaling are IBM Granite's; lm_head_bias adds a
    bias to the output head, its own parameter lm_head.bias even with tied embeddings.

    mtp_depth D > 0 adds DeepSeek-V3's multi-token prediction (models/mtp.py): D modules,
    each a block built like the last layer (its attention kind, and MoE when the last layer
    is), trained with mtp_loss_weight (lambda) / D times the sum of their cross entropies.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None = num_heads (multi-head); fewer = grouped-query
    head_dim: int | None = None  # None = d_model // num_heads
    qkv_bias: bool = False
    attn_out_bias: bool = False
    qk_norm: str | None = None  # None, "head" or "full"
    attention: str = "gqa"
    sliding_window: int | None = None  # attention "sinks" only; None = full attention
    sliding_layers: list[int] | None = None  # the layers that slide; None = all
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    norm_eps: float = 1e-5
    tied_embeddings: bool = True
    init_std: float = 0.02

    # Decoder options of further families (see the class docstring).
    rotary_dim: int | None = None  # None = the whole head
    norm: str = "rms"  # "rms" or "layer"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # None = 1 / sqrt(head_dim)
    logits_scaling: float = 1.0
    lm_head_bias: bool = False

    # Dense FFN layers. d_hidden None = 8/3 * d_model rounded up to 64 (LLaMA's SwiGLU
    # width, which keeps the parameter count of a 4x non-gated MLP).
    d_hidden: int | None = None
    activation: str = "swiglu"

    # MoE FFN layers; None = a dense model.
    moe: MoEConfig | None = None
    moe_every: int = 1
    first_dense_layers: int = 0
    dense_layers: list[int] = field(default_factory=list)

    # Multi-token prediction (DeepSeek-V3); 0 = none.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3  # the paper's lambda: 0.3, then 0.1 late in training

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "max_seq_len",
            "moe_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.d_hidden is None:
            self.d_hidden = _round_up(8 * self.d_model / 3, 64)
        self._check_attention()
        if not isinstance(self.d_hidden, int) or self.d_hidden < 1:
            raise ValueError(f"d_hidden ({self.d_hidden!r}) must be a positive integer")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) must be > 0")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps ({self.norm_eps}) must be > 0")
        if not self.init_std > 0:
            raise ValueError(f"init_std ({self.init_std}) must be > 0")
        self._check_moe()
        check_options(self)
        depth, weight = self.mtp_depth, self.mtp_loss_weight
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"mtp_depth ({depth!r}) must be an integer >= 0")
        if not (isinstance(weight, (int, float)) and weight >= 0):
            raise ValueError(f"mtp_loss_weight ({weight!r}) must be >= 0")
        if depth == 0 and weight != 0.3:
            warn_once("mtp_loss_weight has no effect with mtp_depth 0")

    def _check_attention(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTION_KINDS)}"
            )
        check_rope_scaling(self.rope_scaling)
        if self.attention == "mla":
            check_mla_fields(self)
            # derived, not a setting: a config changed to MLA (or its widths) recomputes it
            self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        elif any(getattr(self, name) is not None for name in MLA_FIELDS):
            warn_once(f'{", ".join(MLA_FIELDS)} have no effect without attention "mla"')
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})"
                )
            self.head_dim = self.d_model // self.num_heads
        head_dim = self.head_dim
        if self.attention == "gqa" and (
            not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2
        ):
            raise ValueError(
                f"head dim of the attention heads ({self.head_dim!r}) must be even for rotary "
                "embeddings"
            )
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}; choose one of {QK_NORMS}")
        check_window(self)
        kv = self.num_kv_heads
        if not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
            raise ValueError(
                f"num_kv_heads ({kv!r}) must be >= 1 and divide num_heads ({self.num_heads})"
            )

    def _check_moe(self) -> None:
        if not isinstance(self.first_dense_layers, int) or not 0 <= self.first_dense_layers:
            raise ValueError(f"first_dense_layers ({self.first_dense_layers!r}) must be >= 0")
        if self.moe is None:
            return
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"moe must be a MoEConfig or None, got {type(self.moe).__name__}")
        if self.moe.d_model != self.d_model:
            raise ValueError(
                f"moe.d_model ({self.moe.d_model}) must equal d_model ({self.d_model})"
            )
        bad = [
            i for i in self.dense_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)
        ]
        if bad:
            raise ValueError(f"dense_layers {bad} are not layer indices in [0, {self.num_layers})")
        if not self.moe_layers:
            raise ValueError(
                f"no MoE layer: first_dense_layers ({self.first_dense_layers}) and moe_every "
                f"({self.moe_every}) leave all {self.num_layers} layers dense"
            )

    def is_moe_layer(self, layer: int) -> bool:
        """True when layer `layer` (0-based) has an MoE FFN; see the class docstring."""
        if self.moe is None or layer < self.first_dense_layers or layer in self.dense_layers:
            return False
        return (layer - self.first_dense_layers + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        """The 0-based indices of the MoE layers."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a dense or MoE FFN, each residual
    (scaled by residual_multiplier)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.residual_multiplier = config.residual_multiplier
        self.attn_norm = block_norm(config.norm, config.d_model, config.norm_eps)
        self.attn = ATTENTION_KINDS[config.attention](config, layer)
        self.ffn_norm = block_norm(config.norm, config.d_model, config.norm_eps)
        if config.is_moe_layer(layer):
            self.ffn: nn.Module = MoE(config.moe)
        else:
            self.ffn = MLP(config.d_model, config.d_hidden, config.activation)

    def forward(
        self, x_BTD: Tensor, where: Placement, kv_cache: KVCache | None
    ) -> tuple[Tensor, MoEOutput | None]:
        """Returns the new x_BTD and the MoE layer's output (None for a dense FFN)."""
        x_BTD = self.residual(x_BTD, self.attn(self.attn_norm(x_BTD), where, kv_cache))
        out = self.ffn(self.ffn_norm(x_BTD))
        if isinstance(out, MoEOutput):
            return self.residual(x_BTD, out.hidden), out
        return self.residual(x_BTD, out), None

    def residual(self, x_BTD: Tensor, y_BTD: Tensor) -> Tensor:
        """x + residual_multiplier * y, as Granite's x + y * m (no multiply when it is 1)."""
        if self.residual_multiplier == 1.0:
            return x_BTD + y_BTD
        return x_BTD + y_BTD * self.residual_multiplier


@dataclass
class ModelOutput:
    """What the decoder returns.

    logits: (B, T, V). loss: mean next-token cross entropy when targets were given (targets
        of -100 are ignored), else None; it does not include aux_loss.
    aux_loss: scalar sum of the MoE layers' weighted aux losses (0 for a dense model); train
        on loss + aux_loss + mtp_loss.
    stats: one entry per layer, MoEStats for MoE layers and None for dense ones.
    mtp_loss: the multi-token-prediction loss, already weighted (models/mtp.py; 0 without
        MTP modules, targets, or with a KV cache); train on loss + aux_loss + mtp_loss. The
        MTP modules' MoE aux losses are in aux_loss, their stats in mtp_stats (one entry per
        module), never in stats.
    expert_ids: with return_expert_ids, one entry per layer: (B, T, K) ids of the experts the
        router chose for each token (-1 in unused top_p slots), (B, T, E) for expert_choice
        (expert e in column e when it picked the token, else -1), None for dense and soft
        layers. Otherwise None.
    """

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    stats: list[MoEStats | None]
    expert_ids: list[Tensor | None] | None = None
    mtp_loss: Tensor | None = None
    mtp_stats: list[MoEStats | None] = field(default_factory=list)


class Transformer(nn.Module):
    """Decoder-only language model.

    Args:
        config: the ModelConfig.

    Construct under `torch.device("meta")` to count parameters of large configs without
    memory; `model.to_empty(device=...)` then `model.init_weights()` materialises it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = block_norm(config.norm, config.d_model, config.norm_eps)
        # with tied embeddings a bias stays the head's own parameter, lm_head.bias
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        # Not persistent: recomputed from the config, never stored in checkpoints.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.tok_embed.weight
        # Built last and without drawing from the generator (init_weights sets them, after
        # the main weights), so the main model's weights for a seed do not depend on them.
        with skipped_initialisers():
            last = config.num_layers - 1
            self.mtp = nn.ModuleList(
                MTPModule(Block(config, last), config.d_model, config.norm_eps)
                for _ in range(config.mtp_depth)
            )
        # A meta model has no values to initialise (and counting a 671B config must stay
        # instant); to_empty() then init_weights() materialises it.
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2L).

        GPT-2's scaling: each block adds two residual branches, so the residual stream's
        variance stays O(1) at init. Routers get init_std too (as Mixtral and OLMoE do),
        which starts the routing near uniform. The MTP modules follow the same scheme.
        """
        cfg = self.config
        std, residual_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
        if cfg.tied_embeddings:
            # Re-tie every time: to_empty() after meta construction can untie them.
            self.lm_head.weight = self.tok_embed.weight
        # The MTP modules last, so that the main weights do not depend on mtp_depth.
        mtp = set(self.mtp.modules())
        main = [m for m in self.modules() if m not in mtp]
        for modules in (main, list(self.mtp.modules())):
            for module in modules:
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, GroupedExperts):
                    nn.init.normal_(module.w_up, std=std)
                    nn.init.normal_(module.w_down, std=residual_std)
                elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                    nn.init.ones_(module.weight)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, MoE):
                    module.router.reset_parameters(std)
                    if getattr(module.experts, "b_up", None) is not None:
                        nn.init.zeros_(module.experts.b_up)
                        nn.init.zeros_(module.experts.b_down)
                elif isinstance(module, SinkAttention):
                    nn.init.zeros_(module.sinks)
            for module in modules:
                if isinstance(module, tuple(ATTENTION_KINDS.values())):
                    nn.init.normal_(module.wo.weight, std=residual_std)
                elif isinstance(module, MLP):
                    nn.init.normal_(module.down.weight, std=residual_std)
        self.init_rope()

    def init_rope(self) -> None:
        """Recompute the rotary tables (not stored in checkpoints) on the weights' device."""
        cfg = self.config
        rotary_dim = ATTENTION_KINDS[cfg.attention].rotary_dim(cfg)
        cos, sin = rope_tables(rotary_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos, self.rope_sin = (
            cos.to(self.lm_head.weight.device),
            sin.to(self.lm_head.weight.device),
        )

    def forward(
        self,
        tokens_BT: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_expert_ids: bool = False,
        attention_mask_BT: Tensor | None = None,
        num_logits: int | None = None,
    ) -> ModelOutput:
        """Run the decoder.

        Args:
            tokens_BT: (B, T) token ids; with a kv_cache, the tokens after the cached ones.
            targets: (B, T) next-token ids for the loss, or None.
            kv_cache: a `KVCache` (models/kv_cache.py); the tokens take its next T slots and
                their positions continue from each sequence's cached tokens.
            return_expert_ids: also return each MoE layer's per-token expert ids.
            attention_mask_BT: 1 for real tokens, 0 for padding (any layout), or None (all
                real). Padding is never attended to and takes no position.
            num_logits: only the last num_logits positions get logits (generation needs
                the last one: the output head is a large share of a long prompt's time).
        Returns:
            ModelOutput (logits (B, T, V), loss, aux_loss, per-layer stats, expert_ids,
            mtp_loss and mtp_stats).
        """
        B, T = tokens_BT.shape
        where = self.place(tokens_BT, kv_cache, attention_mask_BT)

        # 1. embed, 2. blocks (collecting the MoE layers' losses and stats), 3. norm and head
        x_BTD = self.embed(tokens_BT)
        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        stats: list[MoEStats | None] = []
        with tap_routers(self.layers, enabled=return_expert_ids) as routings:
            for block in self.layers:
                x_BTD, moe_out = block(x_BTD, where, kv_cache)
                if moe_out is not None:
                    aux_loss = aux_loss + moe_out.aux_loss
                stats.append(None if moe_out is None else moe_out.stats)
        mtp_loss, mtp_stats = aux_loss.new_zeros(()), []
        if len(self.mtp) and targets is not None and kv_cache is None:
            mtp = multi_token_prediction(
                self.mtp, x_BTD, tokens_BT, targets, where, self.embed, self.head,
                self.config.mtp_loss_weight, attention_mask_BT,
            )  # fmt: skip
            aux_loss, mtp_loss, mtp_stats = aux_loss + mtp.aux_loss, mtp.loss, mtp.stats
        if num_logits is not None:
            if targets is not None:
                raise ValueError("num_logits leaves out logits the loss needs; pass one of them")
            x_BTD = x_BTD[:, -num_logits:]
        logits_BTV = self.head(self.norm(x_BTD))

        # 4. loss in fp32 (a bf16 log-softmax over V loses precision)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits_BTV.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
            )
        expert_ids = None
        if return_expert_ids:
            expert_ids = [None if r is None else r.expert_ids(B, T) for r in routings]
        return ModelOutput(
            logits=logits_BTV, loss=loss, aux_loss=aux_loss, stats=stats, expert_ids=expert_ids,
            mtp_loss=mtp_loss, mtp_stats=mtp_stats,
        )  # fmt: skip

    def embed(self, tokens_BT: Tensor) -> Tensor:
        """Token embeddings (B, T, D), times embedding_multiplier (Granite's)."""
        x_BTD = self.tok_embed(tokens_BT)
        multiplier = self.config.embedding_multiplier
        return x_BTD if multiplier == 1.0 else x_BTD * multiplier

    def head(self, x_BTD: Tensor) -> Tensor:
        """Logits (B, T, V) of final-normed hidden states, divided by logits_scaling (Granite's)."""
        logits_BTV = self.lm_head(x_BTD)
        scaling = self.config.logits_scaling
        return logits_BTV if scaling == 1.0 else logits_BTV / scaling

    def place(
        self, tokens_BT: Tensor, kv_cache: KVCache | None, attention_mask_BT: Tensor | None
    ) -> Placement:
        """Positions, attention mask and cache slots of the new tokens (claims the slots)."""
        B, T = tokens_BT.shape
        start = 0
        if kv_cache is not None and not torch.compiler.is_compiling():
            start = kv_cache.length  # compiled decode steps check the room beforehand
        if start + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence length ({start + T}) exceeds max_seq_len ({self.config.max_seq_len})"
            )
        if kv_cache is None and attention_mask_BT is None:
            return Placement(self.rope_cos[:T], self.rope_sin[:T], None, None)
        if attention_mask_BT is None:
            real_BT = torch.ones(B, T, dtype=torch.bool, device=tokens_BT.device)
        else:
            real_BT = attention_mask_BT.to(device=tokens_BT.device, dtype=torch.bool)
        slots_T = None
        if kv_cache is None:
            positions_BT, mask_B1TS = padded_positions(real_BT)
        else:
            slots_T, positions_BT, mask_B1TS = kv_cache.claim(real_BT)
        cos_B1TP = self.rope_cos[positions_BT].unsqueeze(1)
        sin_B1TP = self.rope_sin[positions_BT].unsqueeze(1)
        return Placement(cos_B1TP, sin_B1TP, mask_B1TS, slots_T)
