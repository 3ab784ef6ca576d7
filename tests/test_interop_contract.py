"""The contract every registered Hugging Face architecture keeps, one suite parametrized
over the registry (interop/architectures/): a family gets these tests by being registered.

For each, a tiny random model built with transformers' own classes from the family's
`tiny` settings (tests/builders.py: offline, seeded, fp32, three layers, weights drawn
wide so that routing, norms and biases all matter):
    - load_hf gives transformers' logits;
    - save_hf of that model reloads in transformers with the same logits;
    - HF -> moekit -> HF is bit-exact, tensor by tensor;
    - greedy generation (moekit's KV cache) picks transformers' tokens;
    - LoRA adapters on every part the family has exported with save_peft give, in
      transformers + peft, the logits of the adapted moekit model;
    - the token ids written into config.json reach transformers' config;
    - the chosen architecture of the loaded config is one that expresses it.
"""

from __future__ import annotations

import pytest
import torch
from builders import VOCAB, hf_model
from helpers import folder_tensors

from moekit.generate import generate
from moekit.interop import ARCHITECTURES, hf_config, load_hf, save_hf
from moekit.interop.architectures import problems_by_architecture
from moekit.interop.peft import save_peft
from moekit.models.lora import LoRAConfig, add_lora, remove_lora

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = tuple(ARCHITECTURES)
TOKENS_BT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{name: (transformers model, the folder it was saved to)}."""
    folders = {}
    for name in NAMES:
        model = hf_model(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        folders[name] = (model, folder)
    return folders


def _logits(model, tokens_BT=TOKENS_BT) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens_BT).logits


@pytest.mark.parametrize("name", NAMES)
def test_loaded_model_computes_transformers_logits(hf_folders, name):
    hf_model, folder = hf_folders[name]
    torch.testing.assert_close(_logits(load_hf(folder)), _logits(hf_model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_reloads_in_transformers_with_equal_logits(hf_folders, tmp_path, name):
    hf_model, folder = hf_folders[name]
    ours = load_hf(folder)
    save_hf(ours, tmp_path / "out", architecture=name)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf_model)
    torch.testing.assert_close(_logits(back), _logits(ours), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_exact(hf_folders, tmp_path, name):
    _, folder = hf_folders[name]
    save_hf(load_hf(folder), tmp_path / "out", architecture=name)
    original, again = folder_tensors(folder), folder_tensors(tmp_path / "out")
    assert sorted(again) == sorted(original)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_picks_transformers_tokens(hf_folders, name):
    hf_model, folder = hf_folders[name]
    prompt_BT = TOKENS_BT[:, :5]
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt_BT,
            attention_mask=torch.ones_like(prompt_BT),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    mine = generate(load_hf(folder), prompt_BT, max_new_tokens=8, temperature=0.0)
    torch.testing.assert_close(mine.tokens_BN, theirs[:, 5:])


@pytest.mark.parametrize("name", NAMES)
def test_peft_gives_the_adapted_logits(hf_folders, tmp_path, name):
    peft = pytest.importorskip("peft")
    _, folder = hf_folders[name]
    base = load_hf(folder)
    targets = "attention,experts,router" + (",shared" if base.config.moe.num_shared_experts else "")
    lora = LoRAConfig(rank=2, alpha=4.0, targets=targets)
    model = add_lora(base, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.eval()
    ours = _logits(model)
    save_peft(model, tmp_path / "adapter", lora, architecture=name)
    save_hf(remove_lora(model), tmp_path / "hf", architecture=name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not torch.allclose(_logits(hf_model), ours, atol=1e-3)  # the adapters matter
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(adapted), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_token_ids_reach_transformers_config(hf_folders, tmp_path, name):
    _, folder = hf_folders[name]
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    save_hf(load_hf(folder), tmp_path / "out", architecture=name, config_extra=ids)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert {key: getattr(config, key) for key in ids} == ids


@pytest.mark.parametrize("name", NAMES)
def test_the_loaded_config_is_expressed_by_its_own_architecture(hf_folders, name):
    _, folder = hf_folders[name]
    config = load_hf(folder).config
    assert problems_by_architecture(config)[name] == []
    assert hf_config(config, name)["model_type"] == name
    assert hf_config(config)["model_type"] in {
        other for other, problems in problems_by_architecture(config).items() if not problems
    }


def _compared_names(tree, names: set[str]) -> list[int]:
    """Line numbers of comparisons (==, !=, in, not in) involving an architecture name."""
    import ast

    def literals(node) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literals(item) for item in node.elts)) if node.elts else set()
        return set()

    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(literals(side) & names for side in (node.left, *node.comparators))
    ]


def test_no_module_outside_the_registry_compares_an_architecture_name():
    import ast
    import pathlib

    import moekit

    root = pathlib.Path(moekit.__file__).parent
    registry = root / "interop" / "architectures"
    names = set(ARCHITECTURES)
    offenders = [
        f"{path.relative_to(root)}:{line}"
        for path in sorted(root.rglob("*.py"))
        if registry not in path.parents
        for line in _compared_names(ast.parse(path.read_text()), names)
    ]
    assert not offenders, offenders


def test_the_name_check_finds_a_comparison():
    import ast

    tree = ast.parse('if arch == "mixtral" or name in ("olmoe", "x"):\n    pass\n')
    assert _compared_names(tree, {"mixtral", "olmoe"}) == [1, 1]
