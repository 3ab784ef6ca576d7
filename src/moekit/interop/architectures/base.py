"""What one Hugging Face architecture is to moekit: the `Architecture` class every family
file subclasses, and the pieces they share (reading a config.json with transformers'
defaults, the rotary settings, the common config.json keys, the common refusals).

An architecture owns, for its model_type:
    reading      config.json -> ModelConfig (`to_moekit`), refusing in one error every
                 option moekit cannot reproduce
    writing      ModelConfig -> config.json (`to_hf`), and `inexpressible`: the settings of
                 a ModelConfig it has no way to write, by name (the closest architecture
                 is the one with fewest)
    tensors      its key tables, one per storage layout (`tables`), which layout a folder
                 uses (`stored_layout`), which it writes (`written_layout`), the tensors a
                 checkpoint may hold that are not loaded (`unloaded_prefixes`)
    PEFT         where its adapters go, derived from the tables, plus `shared_as_parameters`
    contract     `tiny`: a small transformers config for the tests every family passes
    published    the flagships `moekit inspect` counts and their published figures
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ...config import MoEConfig
from ...models import ModelConfig
from ...routing import router_class
from .rules import FUSED_MARKER, Rule

# rope_parameters (or rope_scaling) keys of YaRN -> ModelConfig.rope_scaling keys (models/rope.py)
YARN_KEYS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "attention_factor": "attention_factor",
    "truncate": "truncate",
}


class HFConfig:
    """A config.json (as a dict) read with transformers' defaults; collects what is missing
    and what moekit cannot reproduce, to raise them all in one error (`check`).

    Args:
        arch: the model_type, for messages.
        hf: the config.json.
        defaults: transformers' defaults for keys the file may leave out.
        aliases: transformers' attribute_map: {name: the same setting's other name}.
        none_is_missing: a key present as null takes the default too (most families);
            False where null is a setting of its own (DeepSeek's q_lora_rank).
    """

    def __init__(
        self,
        arch: str,
        hf: dict,
        defaults: dict,
        aliases: dict | None = None,
        none_is_missing: bool = True,
    ):
        self.arch, self.hf, self.defaults = arch, dict(hf), defaults
        for name, alias in (aliases or {}).items():
            if self.hf.get(name) is None and self.hf.get(alias) is not None:
                self.hf[name] = self.hf[alias]
        self.none_is_missing = none_is_missing
        self.problems: list[str] = []

    def __getitem__(self, key: str):
        return self.hf[key]

    def get(self, key: str, default=None):
        """The config's value, else transformers' default for this architecture."""
        present = self.hf.get(key) is not None if self.none_is_missing else key in self.hf
        return self.hf[key] if present else self.defaults.get(key, default)

    def require(self, keys) -> None:
        """ValueError naming every key of `keys` the config lacks."""
        missing = [k for k in keys if self.hf.get(k) is None and self.defaults.get(k) is None]
        if missing:
            raise ValueError(f"{self.arch} config.json lacks {missing}")

    def refuse(self, problem: str) -> None:
        """Record an option moekit cannot reproduce (raised together by `check`)."""
        self.problems.append(problem)

    def refuse_set(self, key: str, unless=(None, False, 0, 0.0)) -> None:
        """Refuse a key whose value is not one of `unless` (the no-op values)."""
        value = self.get(key)
        if value not in unless:
            self.refuse(f"{key} {value!r}")

    def check(self) -> None:
        if self.problems:
            raise ValueError(
                f"{self.arch} config.json has options moekit cannot reproduce: "
                f"{'; '.join(self.problems)}"
            )

    def rope(
        self, kinds=("default",), default_rope: dict | None = None
    ) -> tuple[float, dict | None]:
        """rope_theta and ModelConfig.rope_scaling (None or YaRN) from rope_parameters
        (transformers 5) or the older rope_scaling + rope_theta; a rope type outside
        `kinds` is refused."""
        rope = self.hf.get("rope_parameters") or self.hf.get("rope_scaling") or default_rope or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta") or self.get("rope_theta"))
        if kind not in kinds:
            self.refuse(f"rope type {kind!r} (moekit reads {' and '.join(kinds)})")
            return theta, None
        if kind == "default":
            return theta, None
        scaling = {"type": "yarn"}
        scaling |= {ours: rope[key] for key, ours in YARN_KEYS.items() if rope.get(key) is not None}
        scaling.setdefault("original_max_seq_len", self.get("max_position_embeddings"))
        if scaling.get("factor") is None:  # transformers: max_position / original
            scaling["factor"] = (
                self.get("max_position_embeddings") / scaling["original_max_seq_len"]
            )
        return theta, scaling

    def partial_rotary_factor(self) -> float:
        """The share of each head that is rotated (1.0: all of it), from either place."""
        rope = self.hf.get("rope_parameters") or self.hf.get("rope_scaling") or {}
        return float(rope.get("partial_rotary_factor") or self.get("partial_rotary_factor", 1.0))


def rope_parameters(config: ModelConfig) -> dict:
    """config.json's rope_parameters of a moekit config (default or YaRN)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        back = {ours: key for key, ours in YARN_KEYS.items()}
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta}
        rope |= {back[k]: v for k, v in config.rope_scaling.items() if k != "type"}
    return rope


def dense_layer_indices(config: ModelConfig) -> list[int]:
    return [i for i in range(config.num_layers) if not config.is_moe_layer(i)]


@dataclass(frozen=True)
class Published:
    """Figures as a source states them: total and active parameters per token (None where
    the source gives none). active_without_input_embedding: the source's active figure
    leaves out the input-embedding table (a lookup, not a matmul)."""

    total: float | None
    active: float | None
    source: str
    active_without_input_embedding: bool = False


class Architecture:
    """One Hugging Face model_type; subclass it in one file under interop/architectures/
    (docs/interop.md, "Adding a family"). Class attributes:

    name: config.json's model_type. hf_class: its architectures entry.
    defaults, aliases, none_is_missing: how `read` reads its config.json (HFConfig).
    priority: among the architectures that express a moekit config without a problem,
        the lowest is written by default (the seven original families first, in the
        order they were added).
    written_layout: the layout save_hf writes (a key of `tables`).
    shared_as_parameters: PEFT adapts the shared experts as target_parameters (DeepSeek).
    tiny: transformers config kwargs of a small random model (with the common sizes of
        tests/test_interop_contract.py), through which every contract test runs.
    flagships: {name: a function returning the flagship's ModelConfig}, counted by
        `moekit inspect`; published: {name: its published figures}.
    """

    name: ClassVar[str]
    hf_class: ClassVar[str]
    priority: ClassVar[int] = 100
    defaults: ClassVar[dict] = {}
    aliases: ClassVar[dict] = {}
    none_is_missing: ClassVar[bool] = True
    written_layout: ClassVar[str] = "per_expert"
    shared_as_parameters: ClassVar[bool] = False
    tiny: ClassVar[dict] = {}
    flagships: ClassVar[dict[str, Callable[[], ModelConfig]]] = {}
    published: ClassVar[dict[str, Published]] = {}

    # ------------------------------------------------------------ config.json

    def read(self, hf: dict) -> HFConfig:
        """hf read with this family's defaults and aliases (transformers' attribute_map)."""
        return HFConfig(self.name, hf, self.defaults, self.aliases, self.none_is_missing)

    def to_moekit(self, hf: dict) -> ModelConfig:
        """The ModelConfig of a config.json of this model_type.

        Raises:
            ValueError: in one message, every missing key and every option moekit
                cannot reproduce.
        """
        raise NotImplementedError

    def inexpressible(self, config: ModelConfig) -> list[str]:
        """The settings of config this architecture has no way to write, by name."""
        raise NotImplementedError

    def hf_keys(self, config: ModelConfig) -> dict:
        """The keys of config.json beyond `common_keys`."""
        raise NotImplementedError

    def to_hf(self, config: ModelConfig, dtype: str) -> dict:
        """config.json of config (already checked by `inexpressible`)."""
        return common_keys(self, config, dtype) | self.hf_keys(config)

    # ------------------------------------------------------------ tensors

    def tables(self, config: ModelConfig, hf: dict) -> dict[str, tuple[Rule, ...]]:
        """{layout: rules} for a model of config; hf: its config.json (a table may depend
        on how the checkpoint stores something, e.g. DeepSeek's rotary layout)."""
        raise NotImplementedError

    def stored_layout(self, hf: dict, tensor_names) -> str:
        """The layout of a folder: fused where transformers' in-memory names are stored."""
        fused = any(name.endswith(FUSED_MARKER) for name in tensor_names)
        return "fused" if fused else "per_expert"

    def unloaded_prefixes(self, hf: dict) -> tuple[str, ...]:
        """Tensor name prefixes a checkpoint may hold that are not loaded."""
        return ()

    def load_options(self, config: ModelConfig, hf: dict, *, mtp: bool) -> ModelConfig:
        """The config to load with load_hf's options (mtp: DeepSeek-V3 only)."""
        if mtp:
            raise ValueError(f"mtp=True: {self.name} checkpoints have no MTP layers")
        return config

    def quantization(self, hf: dict) -> str | None:
        """How config.json says weights are quantized: None (not), "fp8_blocks" (read by
        interop/fp8.py) or a layout name; ValueError for what moekit does not read."""
        if hf.get("quantization_config") is not None:
            raise ValueError(
                f"{self.name} checkpoints with a quantization_config "
                f"({hf['quantization_config']!r}) are not supported"
            )
        return None

    # ------------------------------------------------------------ PEFT

    def peft_expert_columns(self, lora_B_up):
        """lora_B of the experts' up projection (E, r, H), its H columns in the order the
        fused gate_up_proj stores them (moekit keeps gate and up as halves)."""
        return lora_B_up


def trailing_layers(hf: dict, depth: int | None) -> tuple[str, ...]:
    """Name prefixes of the `depth` layers a checkpoint stores after its last decoder layer
    (the multi-token-prediction modules of DeepSeek-V3, GLM-4.5, MiniMax-M2)."""
    first = hf.get("num_hidden_layers", 0)
    return tuple(f"model.layers.{first + k}." for k in range(depth or 0))


def common_keys(arch: Architecture, config: ModelConfig, dtype: str) -> dict:
    """The config.json keys the Mixtral-like architectures share."""
    moe = config.moe
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.name,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tied_embeddings,
        "initializer_range": config.init_std,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope_parameters(config),
        "attention_dropout": 0.0,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.balance_loss_coef / moe.top_k,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": dtype,
    }


def balance_coef(hf: HFConfig, top_k: int) -> float:
    """moekit's balance_loss_coef of transformers' router_aux_loss_coef: transformers' loss
    sums f_i over the top_k choices of each token, so it is top_k times Switch's
    N * sum_i f_i P_i that moekit computes."""
    return float(hf.get("router_aux_loss_coef", 0.0)) * top_k


def refuse_common(hf: HFConfig) -> None:
    """Options that change the function and that no moekit setting reproduces."""
    if hf.get("hidden_act", "silu") != "silu":
        hf.refuse(f"hidden_act {hf['hidden_act']!r} (only silu, i.e. SwiGLU experts)")
    if hf.get("attention_dropout", 0.0):
        hf.refuse(f"attention_dropout {hf['attention_dropout']}")


def decoder_options(
    config: ModelConfig,
    *,
    rotary_dim: bool = False,
    norm: str = "rms",
    multipliers: bool = False,
    lm_head_bias: bool = False,
) -> list[str]:
    """The decoder options only some architectures hold (ModelConfig.rotary_dim, norm,
    Granite's multipliers, lm_head_bias): the problems of those the caller's lacks."""
    problems = []
    if config.rotary_dim not in (None, config.head_dim) and not rotary_dim:
        problems.append(f"rotary_dim {config.rotary_dim} (partial rotary)")
    if config.norm != norm:
        problems.append(f"norm {config.norm!r} (this architecture has {norm!r})")
    scales = {
        "embedding_multiplier": config.embedding_multiplier,
        "residual_multiplier": config.residual_multiplier,
        "logits_scaling": config.logits_scaling,
    }
    changed = [f"{key} {value}" for key, value in scales.items() if value != 1.0]
    if config.attention_multiplier is not None:
        changed.append(f"attention_multiplier {config.attention_multiplier}")
    if changed and not multipliers:
        problems.append(f"{', '.join(changed)} (Granite's multipliers)")
    if config.lm_head_bias and not lm_head_bias:
        problems.append("lm_head_bias true")
    return problems


def expect(
    config: ModelConfig,
    arch: str,
    *,
    attention: str = "gqa",
    router: str = "softmax_topk",
    activation: str = "swiglu",
    selection_bias: bool = False,
    groups: bool = False,
    **options,
) -> list[str]:
    """The problems every architecture checks: attention kind, router, dropless experts,
    activations, no rope scaling but YaRN, group-limited routing or routed scaling unless
    groups, a softmax selection bias (ERNIE's) unless selection_bias, and the decoder options (decoder_options; pass its keywords for those
    the architecture holds)."""
    moe, problems = config.moe, decoder_options(config, **options)
    if config.attention != attention:
        problems.append(f"attention {config.attention!r} ({arch} has {attention!r})")
    if router_class(moe.router) is not router_class(router):
        problems.append(f"router {moe.router!r} ({arch} has {router})")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor {moe.capacity_factor} (Hugging Face MoEs are dropless)")
    if not groups and (moe.num_groups != 1 or moe.routed_scaling != 1.0):
        problems.append(
            f"num_groups {moe.num_groups}, routed_scaling {moe.routed_scaling} ({arch} has "
            "no group-limited routing or routed scaling)"
        )
    if getattr(moe, "selection_bias", False) and not selection_bias:
        problems.append(f"selection_bias true ({arch}'s {router} router has none)")
    if moe.activation != activation:
        problems.append(f"expert activation {moe.activation!r} ({arch} has {activation})")
    if dense_layer_indices(config) and config.activation != "swiglu":
        problems.append(f"dense activation {config.activation!r} (only swiglu)")
    if config.rope_scaling is not None and config.rope_scaling.get("type") != "yarn":
        problems.append(f"rope_scaling {config.rope_scaling}")
    return problems


def moe_config(hf: HFConfig, **fields) -> MoEConfig:
    """An MoEConfig with transformers' conventions: d_model hidden_size, top_k
    num_experts_per_tok (unless fields name it), no z-loss, the balance coefficient
    converted (balance_coef), the rest from fields."""
    if "top_k" not in fields:
        fields["top_k"] = hf["num_experts_per_tok"]
    fields.setdefault("balance_loss_coef", balance_coef(hf, fields["top_k"]))
    return MoEConfig(d_model=hf["hidden_size"], z_loss_coef=0.0, **fields)


# ---------------------------------------------------------------- grouped-query decoders

# the keys every grouped-query MoE config.json has
STRUCTURE = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts_per_tok",
)


def refuse_gqa_options(hf: HFConfig) -> None:
    """refuse_common plus the attention options of the Mixtral-like families that moekit's
    grouped-query attention does not have."""
    refuse_common(hf)
    hf.refuse_set("router_jitter_noise")
    hf.refuse_set("clip_qkv")
    if hf.partial_rotary_factor() != 1.0:
        hf.refuse(f"partial_rotary_factor {hf.partial_rotary_factor()}")
    if hf.get("use_sliding_window", False):
        hf.refuse("use_sliding_window true")
    layer_types = hf.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        hf.refuse(f"layer_types {sorted(set(layer_types))} (only full_attention)")


def gqa_model_config(hf: HFConfig, moe: MoEConfig, rope_theta: float, **fields) -> ModelConfig:
    """The ModelConfig of a grouped-query decoder: the structure read from hf, the rest
    (biases, q/k norm, dense layers, rope scaling, attention kind) from fields, which may
    also replace what is read (a head_dim the family derives, say)."""
    read = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"),
        max_seq_len=hf.get("max_position_embeddings"),
        rope_theta=float(rope_theta),
        norm_eps=float(hf.get("rms_norm_eps")),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        activation="swiglu",
        moe=moe,
    )
    return ModelConfig(**(read | fields))


def gqa_problems(
    config: ModelConfig, arch: str, *, qk_norm: str | None = None, yarn: bool = False, **expected
) -> list[str]:
    """`expect` (given `expected`) plus what a plain grouped-query family cannot write:
    router or expert biases, rope scaling (unless yarn), a q/k norm other than its own."""
    moe = config.moe
    problems = expect(config, arch, **expected)
    if moe.router_bias or moe.expert_bias:
        problems.append(f"router_bias {moe.router_bias}, expert_bias {moe.expert_bias}")
    if config.rope_scaling is not None and not yarn:
        problems.append(f"rope_scaling {config.rope_scaling}")
    if config.qk_norm != qk_norm:
        problems.append(f"qk_norm {config.qk_norm!r} ({arch} has {qk_norm!r})")
    return problems


def no_shared_expert(config: ModelConfig) -> list[str]:
    shared = config.moe.num_shared_experts
    return (
        [f"num_shared_experts {shared} (this architecture has no shared expert)"] if shared else []
    )


def one_attention_bias(config: ModelConfig) -> list[str]:
    """Architectures with one attention_bias switch for q/k/v and the output projection."""
    if config.qkv_bias != config.attn_out_bias:
        return [
            f"qkv_bias {config.qkv_bias} with attn_out_bias {config.attn_out_bias} "
            "(one attention_bias)"
        ]
    return []
