"""Parameter accounting: the parts sum to count_parameters, the formula parts match
transformers' own models, the published MoEs land on their published figures, and the KV
cache's bytes per token show what MLA saves."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.interop import famous
from moekit.interop.accounting import PARTS, count_by_part
from moekit.interop.cli import inspect_main
from moekit.models import PRESETS, count_parameters


@pytest.mark.parametrize(
    "name",
    [
        *PRESETS,
        "mixtral_8x7b",
        "qwen1_5_moe_a2_7b",
        "olmoe_1b_7b",
        "grok_1",
        "deepseek_v2",
        "gpt_oss_120b",
        "gpt_oss_20b",
    ],
)
def test_parts_sum_to_count_parameters(name):
    config = PRESETS[name]() if name in PRESETS else getattr(famous, name)()
    accounting = count_by_part(config)
    assert set(accounting.total) == set(PARTS)
    assert (accounting.total_params, accounting.active_params) == tuple(count_parameters(config))


def test_parts_of_a_small_config_by_hand():
    # tiny: V=4096, D=128, 4 layers, 4 heads, 2 kv heads (Dh 32), 16 experts of width 128,
    # top 2, one shared expert of width 256, tied embeddings.
    a = count_by_part(PRESETS["tiny"]())
    assert a.total["embeddings"] == 4096 * 128
    assert a.total["attention"] == 4 * (128 * 128 * 2 + 128 * 64 * 2)
    assert a.total["router"] == 4 * 16 * 128
    assert a.total["routed_experts"] == 4 * 16 * 3 * 128 * 128
    assert a.active["routed_experts"] == 4 * 2 * 3 * 128 * 128
    assert a.total["shared_experts"] == 4 * 3 * 128 * 256
    assert a.total["norms"] == 9 * 128
    assert a.input_embedding == 0  # tied: the table is also the head


# Published figures and their sources are in moekit.interop.famous.PUBLISHED:
#   Mixtral 8x7B 46.7B / 12.9B   Mistral AI, "Mixtral of experts" (Dec 2023)
#   Mixtral 8x22B 141B / 39B     Mistral AI, "Cheaper, Better, Faster, Stronger" (Apr 2024)
#   Qwen1.5-MoE-A2.7B 14.3B / 2.7B  Qwen team blog (Mar 2024)
#   DeepSeek-V3 671B             DeepSeek-V3 Technical Report, arXiv:2412.19437
#   DeepSeek-V2 236B / 21B       DeepSeek-V2, arXiv:2405.04434 (abstract)
#   OLMoE-1B-7B 6.9B             Muennighoff et al., arXiv:2409.02060
#   Grok-1 314B                  xAI, "Open Release of Grok-1" (Mar 2024)
#   Switch-Base-128 7.4B, T5-Base 223M   Fedus et al. 2022 (JMLR), distillation tables
#   GPT-4 (rumoured) 16 x 111B + 55B, ~280B per token   SemiAnalysis (Jul 2023)
#   Phi-3.5-MoE 41.9B / 6.6B      Phi-3 Technical Report, arXiv:2404.14219; the Hub's count
#   GLM-4.5 355B, GLM-4.5-Air 106B   arXiv:2508.06471; the Air model card (MTP layer excluded)
#   MiniMax-M2 230B              MiniMax-M2 model card, Hugging Face Hub (Oct 2025); its
#                                10B active is two digits (10.42B counted: tests/test_interop_minimax_m2.py)
#   ERNIE-4.5-300B-A47B 300B / 47B  Baidu, ERNIE 4.5 Technical Report (Jun 2025); 47B leaves
#                                out the input table (tests/test_interop_ernie4_5_moe.py)
#   Granite 3.1 3B-A800M 3.3B     IBM, granite-3.1-3b-a800m-base model card (Dec 2024); its 800M
#                                active and the 1B-A400M's 1.3B / 400M leave the tied table out
#                                or round coarser (tests/test_interop_granitemoe.py)
WITHIN_1_PERCENT = [
    ("mixtral_8x7b", "total"),
    ("mixtral_8x7b", "active"),
    ("mixtral_8x22b", "total"),
    ("mixtral_8x22b", "active"),
    ("qwen1_5_moe_a2_7b", "total"),
    ("qwen1_5_moe_a2_7b", "active"),
    ("deepseek_v3", "total"),
    ("deepseek_v2", "total"),
    ("deepseek_v2", "active"),
    ("olmoe_1b_7b", "total"),
    ("grok_1", "total"),
    ("switch_base_8", "active"),
    ("switch_base_128", "total"),
    ("switch_base_128", "active"),
    ("gpt4_rumoured", "total"),
    ("gpt4_rumoured", "active"),
    ("gpt_oss_120b", "total"),
    ("gpt_oss_120b", "active"),
    ("gpt_oss_20b", "total"),
    ("gpt_oss_20b", "active"),
    ("phi_3_5_moe", "total"),
    ("phi_3_5_moe", "active"),
    ("minimax_m2", "total"),
    ("ernie_4_5_300b_a47b", "total"),
    ("ernie_4_5_300b_a47b", "active"),
    ("glm_4_5", "total"),
    ("glm_4_5_air", "total"),
    ("granite_3_1_3b_a800m", "total"),
]


@pytest.mark.parametrize("name, figure", WITHIN_1_PERCENT)
def test_published_figures_within_one_percent(name, figure):
    error = _report(name)["published"][f"{figure}_error"]
    assert abs(error) < 0.01, f"{name} {figure}: {error:+.2%}"


def test_figures_the_sources_round_coarser_than_one_percent():
    """Two active figures are stated to two significant figures and sit just outside 1%.

    OLMoE: 1,282,017,280 active, stated as 1.3B (-1.4%), its rounding to that precision.
    DeepSeek-V3: 36,625,603,584 active without the input-embedding lookup, stated as 37B
    (-1.01%), again its rounding; with the input table it would be 37.55B, which does not
    round to 37B, so the report's figure leaves the lookup out.
    """
    olmoe, deepseek = _report("olmoe_1b_7b"), _report("deepseek_v3")
    assert (
        round(olmoe["active"] / 1e9, 1) == 1.3 and abs(olmoe["published"]["active_error"]) < 0.015
    )
    assert round(deepseek["active_without_input_embedding"] / 1e9) == 37
    assert round(deepseek["active"] / 1e9) == 38
    assert abs(deepseek["published"]["active_error"]) < 0.0105


@pytest.mark.parametrize(
    "name, mlp, attention",
    [("gpt_oss_120b", 114.71e9, 0.96e9), ("gpt_oss_20b", 19.12e9, 0.64e9)],
)
def test_gpt_oss_parts_match_the_model_card(name, mlp, attention):
    """The model card's Table 1 splits the count: MLP (experts and router), attention,
    embedding + unembedding 1.16B; its active count has the unembedding, not the embedding."""
    report = _report(name)
    parts = {p: v["total"] for p, v in report["parts"].items()}
    assert (parts["routed_experts"] + parts["router"]) / mlp == pytest.approx(1, abs=1e-3)
    assert parts["attention"] / attention == pytest.approx(1, abs=5e-3)
    assert parts["embeddings"] / 1.16e9 == pytest.approx(1, abs=5e-3)
    assert report["input_embedding"] == 201088 * 2880
    assert report["published"]["active_without_input_embedding"]


def test_grok_1_active_share_is_two_of_eight_experts():
    """xAI gives Grok-1's active share as "25% of the weights": top 2 of 8 experts."""
    a = famous.FAMOUS["grok_1"]()
    assert a.active["routed_experts"] * 4 == a.total["routed_experts"]


def test_deepseek_v3_counts_the_moe_after_three_dense_layers_and_excludes_mtp():
    a = famous.deepseek_v3()
    expert = 3 * 7168 * 2048
    assert a.total["routed_experts"] == 58 * 256 * expert
    assert a.active["routed_experts"] == 58 * 8 * expert
    assert a.total["shared_experts"] == 58 * expert
    assert a.total["dense_ffn"] == 3 * 3 * 7168 * 18432
    # DeepSeek-V3's README: the Hub checkpoint (685B) = 671B main model + 14B MTP module
    stored = a.total_params + a.excluded["mtp_module_with_stored_embedding_and_head"]
    assert stored / 685e9 == pytest.approx(1, abs=0.01)


def test_deepseek_counts_come_from_the_runnable_mla_model():
    """No formula: the attention part is our MLA module's parameters, which equal
    transformers' DeepseekV3Attention's (tests/test_mla.py), 61 layers of them."""
    from moekit.models import meta_model
    from moekit.models.published import deepseek_v3

    a = famous.deepseek_v3()
    layer = meta_model(deepseek_v3()).layers[0].attn
    assert type(layer).__name__ == "MultiHeadLatentAttention"
    projections = sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n)
    assert a.total["attention"] == 61 * projections
    # q: 7168 x 1536, 1536 x 128 * 192; kv: 7168 x (512 + 64), 512 x 128 * 256; out: 128 * 128 x 7168
    per_layer = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert projections == per_layer


def test_kv_cache_bytes_per_token_show_what_mla_saves():
    """bf16: DeepSeek-V3 caches 512 + 64 values per layer; Mixtral 8x7B 8 heads x 128 x 2."""
    v3, mixtral = _report("deepseek_v3"), _report("mixtral_8x7b")
    assert v3["kv_cache_bytes_per_token"] == dict(
        per_layer=(512 + 64) * 2, layers=61, total=61 * 576 * 2, dtype="bfloat16"
    )
    assert mixtral["kv_cache_bytes_per_token"]["total"] == 32 * 8 * 128 * 2 * 2
    assert _report("deepseek_v2")["kv_cache_bytes_per_token"]["total"] == 60 * 576 * 2


def test_switch_formula_matches_transformers_switch_transformers():
    transformers = pytest.importorskip("transformers")
    sizes = dict(
        d_model=32, num_heads=4, head_dim=8, d_ff=48, num_layers=4, vocab_size=100, buckets=32
    )
    config = transformers.SwitchTransformersConfig(
        d_model=32,
        num_heads=4,
        d_kv=8,
        d_ff=48,
        num_layers=4,
        num_decoder_layers=4,
        vocab_size=100,
        num_experts=8,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        relative_attention_num_buckets=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    ours = famous.switch_transformer(8, **sizes)
    assert ours.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_hf_config_counts_equal_transformers_model(arch, tmp_path):
    pytest.importorskip("transformers")
    from builders import hf_model

    model = hf_model(arch)
    model.config.save_pretrained(tmp_path)
    assert inspect_main([str(tmp_path / "config.json"), "--json"]) == 0
    from moekit.interop.inspect import inspect_target

    report = inspect_target(str(tmp_path / "config.json"))
    assert report["kind"] == f"Hugging Face {arch}"
    assert report["total"] == sum(p.numel() for p in model.parameters())


def _report(name: str) -> dict:
    from moekit.interop.inspect import inspect_target

    return inspect_target(name)


def test_inspect_json_parts_sum_to_totals(capsys):
    assert inspect_main(["mixtral_8x22b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(p["total"] for p in report["parts"].values()) == report["total"]
    assert sum(p["active"] for p in report["parts"].values()) == report["active"]
    assert report["published"]["source"].startswith("Mistral AI")


def test_inspect_prints_a_table_and_reads_run_configs(tmp_path, capsys):
    from moekit.train.config import model_config_to_dict

    (tmp_path / "config.json").write_text(
        json.dumps({"format": 1, "model": model_config_to_dict(PRESETS["tiny"]())})
    )
    assert inspect_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(moekit run)" in out and "4,269,184" in out and "routed_experts" in out
    # tiny: 2 key/value heads of 32, keys and values, 2 bytes each
    assert "KV cache per token (bf16): 256 bytes per layer, 1,024 bytes in all 4 layers" in out


def test_inspect_unknown_target_is_an_error(capsys):
    assert inspect_main(["mixtral_9x9b"]) == 2
    assert "moekit inspect: error: 'mixtral_9x9b' is not a preset" in capsys.readouterr().err


# The Hub config.json files in their older (transformers 4) form: top-level rope_theta,
# torch_dtype, sliding-window keys that are off. Each counts as its hand-written preset.
HUB_CONFIGS = {
    "mixtral_8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "router_aux_loss_coef": 0.02,
        "torch_dtype": "bfloat16",
    },
    "qwen1_5_moe_a2_7b": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "max_position_embeddings": 8192,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 21,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
    # deepseek-ai/DeepSeek-V3's config.json for the original code (its FP8 quantization
    # config left out: it does not change the count).
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "ep_size": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "olmoe_1b_7b": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_config_json_counts_as_the_preset(name, tmp_path):
    from moekit.interop.inspect import inspect_target

    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[name]))
    from_hub = inspect_target(str(tmp_path / "config.json"))
    preset = inspect_target(name)
    assert (from_hub["total"], from_hub["active"]) == (preset["total"], preset["active"])
    assert from_hub["kv_cache_bytes_per_token"] == preset["kv_cache_bytes_per_token"]


def test_deepseek_v3_hub_config_maps_to_the_published_config():
    from moekit.interop import model_config_from_hf
    from moekit.models.published import deepseek_v3

    hub, ours = model_config_from_hf(HUB_CONFIGS["deepseek_v3"]), deepseek_v3()
    for name in ("rope_scaling", "max_seq_len", "norm_eps", "first_dense_layers", "q_lora_rank"):
        assert getattr(hub, name) == getattr(ours, name), name
    for name in ("router", "num_groups", "topk_groups", "routed_scaling", "renormalize"):
        assert getattr(hub.moe, name) == getattr(ours.moe, name), name
