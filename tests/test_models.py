"""Model loading: the embedded SmolLM2 offline, and one clear error for every bad name."""
from pathlib import Path

import pytest
import torch

from labkit.models import ModelUnavailableError, load_model, quantization_config, resolve_model_path


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_embedded_model_is_smollm2_with_gqa(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) \
        == ("llama", 30, 9, 3)
    assert next(model.parameters()).dtype == torch.float32
    assert not hasattr(cfg, "quantization_config"), "the cached checkpoint must be plain fp32"
    assert tok.chat_template, "the GGUF's chat template must survive the conversion"


def test_embedded_model_loads_the_converted_checkpoint_not_the_gguf(smollm2, monkeypatch):
    """Once converted, every load is a plain safetensors read: no GGUF de-quantization (~30 s),
    no rebuild of the cache."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from labkit.assets import AssetStore

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached load must not read the GGUF or rebuild the asset")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", forbidden)
    monkeypatch.setattr(AssetStore, "_build", forbidden)
    model, _ = load_model("smollm2-135m")
    path = Path(model.config._name_or_path)
    assert path == Path(resolve_model_path("smollm2-135m")[0]) and path.name == "hf"
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    reference = smollm2[0].state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items()), \
        "the cached checkpoint must hold the same weights as the first load"


def test_greedy_generation_and_eager_attention_weights(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        att = model(**ids, output_attentions=True).attentions
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
    T = ids.input_ids.shape[1]
    assert len(att) == 30 and att[0].shape == (1, 9, T, T)
    assert torch.allclose(att[0].sum(-1), torch.ones(1, 9, T), atol=1e-5)
    assert att[0][0, :, 0, 1:].abs().max() == 0, "causal: token 0 sees only itself"


@pytest.mark.parametrize("name, pattern", [
    ("gpt-7", r"unknown model 'gpt-7': use an embedded model \(smollm2-135m\)"),
    ("./no/such/dir/", r"unknown model"),
])
def test_unknown_names_fail_before_any_download(name, pattern):
    with pytest.raises(ModelUnavailableError, match=pattern):
        resolve_model_path(name)


def test_directory_without_config_is_explained(tmp_path):
    with pytest.raises(ModelUnavailableError, match="holds no config.json"):
        resolve_model_path(str(tmp_path))


def test_unreachable_hub_id_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        load_model("labkit-tests/no-such-model")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download labkit-tests/no-such-model" in msg
    assert "smollm2-135m" in msg


def test_quantize_option_is_checked():
    with pytest.raises(ValueError, match=r"quantize='fp4': use one of \(None, 'nf4', 'int8'\)"):
        quantization_config("fp4", torch.device("cpu"))
    cfg = quantization_config("nf4", torch.device("cpu"))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_compute_dtype == torch.float32, "bf16 compute is emulated (50-100x slower) on CPUs without native bf16"
