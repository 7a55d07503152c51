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


def test_a_4bit_base_still_trains_correctly_after_an_evaluation(tmp_path):
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks Linear4bit weights at the first no-grad eval forward into a
    bf16 layout whose kernel has no backward; load_model switches that off, so the LoRA gradients after an
    evaluation equal those of a model that was never evaluated (and, on such a CPU, differ without the switch)."""
    import warnings

    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    from labkit.lora import add_lora, lora_modules
    torch.manual_seed(0)      # a tiny random Llama: width 64 (bitsandbytes' packing wants multiples of 32)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    from labkit.assets import asset_dir
    AutoTokenizer.from_pretrained(asset_dir("smollm2-135m") / "hf").save_pretrained(tmp_path)   # load_model wants one
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))

    def lora_grads(model, evaluate_first):
        torch.manual_seed(0)
        add_lora(model, r=4, alpha=8)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            if evaluate_first:
                model.eval()(input_ids=ids)
        model.train()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
            model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for m in lora_modules(model).values() for p in (m.A, m.B)])

    loaded = load_model(str(tmp_path), quantize="nf4", device="cpu")[0]
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in loaded.modules())
    never_evaluated = lora_grads(load_model(str(tmp_path), quantize="nf4", device="cpu")[0], evaluate_first=False)
    assert torch.allclose(lora_grads(loaded, evaluate_first=True), never_evaluated, atol=1e-6)
    if bnb.functional.has_avx512bf16():       # negative control: without the switch an evaluation repacks for good
        from transformers import AutoModelForCausalLM
        raw = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config("nf4", torch.device("cpu")),
                                                   device_map={"": "cpu"}, dtype=torch.float32)
        with torch.no_grad():
            raw.eval()(input_ids=ids)
        state = raw.model.layers[0].self_attn.q_proj.weight.quant_state
        assert state.packing_format_for_cpu, "the cause: the evaluation repacked the weights for good"
        with pytest.raises(ValueError, match="repacked by bitsandbytes"):
            add_lora(raw, r=4)                 # refused with the fix, never trained with wrong gradients
