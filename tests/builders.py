"""Tiny models for the tests, built in one place.

`hf_model(name)`: a tiny random transformers model of any registered Hugging Face
architecture, from the family's `tiny` settings (interop/architectures/) over COMMON: offline,
seeded, fp32, three layers, eager attention, weights drawn wide (std 0.3; attention sinks
std 1; selection biases std 0.1) so that routing, norms and biases all matter.
"""

from __future__ import annotations

import torch

from moekit.interop import ARCHITECTURES

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def hf_model(name: str, **overrides):
    """The family's tiny random transformers model, in eval mode (overrides: config keys)."""
    import transformers

    settings = COMMON | ARCHITECTURES[name].tiny | overrides
    config = transformers.AutoConfig.for_model(name, **settings)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.normal_(0.0, 1.0 if param_name.endswith("sinks") else 0.3)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model
