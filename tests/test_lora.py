"""LoRA by hand = peft's LoRA (outputs and gradients), also on an NF4 / int8 base; merge; save/load."""
import copy
import json
import warnings

import pytest
import torch

import labkit
from labkit.gpt import GPT, GPTConfig
from labkit.lora import (GPT_ATTENTION, GPT_MLP, HF_ATTENTION, AdapterError, LoRALinear, add_lora,
                         adapter_paths, load_adapter, lora_modules, merge_lora, remove_lora,
                         save_adapter, trainable_parameters, unmerge_lora)


def tiny_llama(seed=0, hidden=64):
    """A 2-layer random Llama (GQA 4q/2kv): no download, a few ms per step."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def peft_and_hand(ref, hand, r=4, alpha=8.0, dropout=0.0, targets=HF_ATTENTION):
    """Wrap ``ref`` with peft and ``hand`` with labkit; give both the same A and a random, nonzero B
    (B = 0 at init would make every gradient on A zero and the comparison weak)."""
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(ref, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                        target_modules=list(targets)))
    add_lora(hand, r=r, alpha=alpha, dropout=dropout, targets=targets)
    ours = lora_modules(hand)
    pairs = {}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in pm.named_modules():
            if type(m).__module__.startswith("peft") and hasattr(m, "lora_A") and "default" in m.lora_A:
                mine = ours[name.removeprefix("base_model.model.")]
                assert m.scaling["default"] == mine.scaling
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g))
                mine.A.copy_(m.lora_A["default"].weight)
                mine.B.copy_(m.lora_B["default"].weight)
                pairs[name.removeprefix("base_model.model.")] = (m, mine)
    assert set(pairs) == set(ours), "peft and labkit must wrap the same modules"
    return pm, pairs


def assert_same_outputs_and_grads(pm, hand, pairs, ids, train=False, atol=1e-6):
    pm.train(train)
    hand.train(train)
    torch.manual_seed(7)            # the same dropout masks (both draw one mask per wrapped layer, in order)
    out_p = pm(input_ids=ids, labels=ids)
    torch.manual_seed(7)
    out_h = hand(input_ids=ids, labels=ids)
    diff = (out_p.logits - out_h.logits).abs().max().item()
    assert diff <= atol, f"logits differ by {diff:.2e} (tolerance {atol:.0e})"
    out_p.loss.backward()
    out_h.loss.backward()
    for name, (m, mine) in pairs.items():
        ga, gb = m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad
        assert mine.A.grad is not None and mine.A.grad.abs().sum() > 0, f"{name}: no gradient on A"
        for ours, theirs, which in [(mine.A.grad, ga, "A"), (mine.B.grad, gb, "B")]:
            d = (ours - theirs).abs().max().item()
            scale = theirs.abs().max().item()
            assert d <= atol * max(1.0, scale), f"{name}: grad on {which} differs by {d:.2e} (max {scale:.2e})"


def test_init_matches_peft_and_starts_as_the_base():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(96, 40), r=4, alpha=8)
    assert layer.B.abs().sum() == 0, "B starts at zero so the wrapped layer equals the base"
    bound = 1 / 96 ** 0.5            # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), as peft
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.scaling == 2.0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_hand_lora_equals_peft_on_a_tiny_llama(dropout):
    base = tiny_llama()
    pm, pairs = peft_and_hand(copy.deepcopy(base), hand := copy.deepcopy(base), dropout=dropout)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert_same_outputs_and_grads(pm, hand, pairs, ids, train=dropout > 0)
    assert trainable_parameters(hand) == trainable_parameters(pm)
    # every base weight stays frozen; only A and B of the 8 wrapped layers train
    assert {n.rsplit(".", 1)[-1] for n, p in hand.named_parameters() if p.requires_grad} == {"A", "B"}


def test_hand_lora_equals_peft_on_smollm2():
    ref, _ = labkit.load_model()
    hand, _ = labkit.load_model()
    pm, pairs = peft_and_hand(ref, hand, r=8, alpha=16)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    assert_same_outputs_and_grads(pm, hand, pairs, ids, atol=1e-5)


def test_trainable_parameters_on_smollm2_follow_the_formula():
    model, _ = labkit.load_model()
    c = model.config
    d, q_out, kv_out = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    # A (r x in) + B (out x r) = r (in + out) per layer: q and o are d x d, k and v are d x (kv heads * head_dim)
    per_layer = (d + q_out) + (d + kv_out) + (d + kv_out) + (q_out + d)
    per_rank = c.num_hidden_layers * per_layer
    print(f"\nLoRA on q,k,v,o: {c.num_hidden_layers} layers x [({d}+{q_out}) + 2 x ({d}+{kv_out}) + "
          f"({q_out}+{d})] = {per_rank:,} x r")
    assert per_rank == 115_200
    base_total = trainable_parameters(model)[1]
    for r in (1, 8):
        m = copy.deepcopy(model) if r == 1 else model
        add_lora(m, r=r, alpha=2 * r)
        trainable, total = trainable_parameters(m)
        assert trainable == 115_200 * r and total == base_total + trainable


def test_labkit_gpt_module_names_and_merge():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32,
                          pos="rope", norm="rmsnorm", act="swiglu", n_kv_head=2)).eval()
    names = add_lora(model, r=4, alpha=8, targets=GPT_ATTENTION + GPT_MLP)
    assert names == [f"blocks.{i}.{m}" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")]
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.B.normal_()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(idx)[0]
        merge_lora(model)
        merged = model(idx)[0]
        unmerge_lora(model)
        again = model(idx)[0]
    diff = (merged - unmerged).abs().max().item()
    assert diff < 1e-4 * unmerged.abs().max().item(), f"merged model differs by {diff:.2e}"
    assert (again - unmerged).abs().max() < 1e-4 * unmerged.abs().max().item()
    with torch.no_grad():
        remove_lora(model, merge=True)
        assert not lora_modules(model) and (model(idx)[0] - unmerged).abs().max() < 1e-4 * unmerged.abs().max()


def test_merge_equals_unmerged_on_a_tiny_llama():
    model = tiny_llama()
    add_lora(model, r=4, alpha=8, targets=HF_ATTENTION + ("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.B.normal_(std=0.1)
        ids = torch.randint(0, 128, (2, 12))
        before = model(ids).logits
        merge_lora(model)
        assert all(m.merged for m in lora_modules(model).values())
        after = model(ids).logits
    assert (after - before).abs().max() < 1e-5


def test_bad_targets_and_double_wrapping_say_what_to_do():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"no Linear module matches targets \['qproj'\].*q_proj"):
        add_lora(model, targets=["qproj"])
    add_lora(model)
    with pytest.raises(ValueError, match="already carries LoRA.*remove_lora"):
        add_lora(model)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qlora_on_a_bitsandbytes_base_equals_peft(tmp_path, quantize):
    from transformers import AutoModelForCausalLM

    from labkit.models import quantization_config
    tiny_llama().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")  # int8 on CPU: a warning per matmul
        def load():
            return AutoModelForCausalLM.from_pretrained(
                tmp_path, quantization_config=quantization_config(quantize, torch.device("cpu")),
                device_map={"": "cpu"}, dtype=torch.float32)
        ref, hand = load(), load()
        from labkit.lora import keep_4bit_trainable
        keep_4bit_trainable(ref)    # as add_lora does for hand; peft alone lets bitsandbytes switch to
        #                             its bf16 CPU kernel (no backward) at the first eval forward
        base_cls = type(hand.model.layers[0].self_attn.q_proj)
        assert base_cls.__name__ == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quantize]
        pm, pairs = peft_and_hand(ref, hand)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
        assert_same_outputs_and_grads(pm, hand, pairs, ids)
    q = lora_modules(hand)["model.layers.0.self_attn.q_proj"]
    assert type(q.base) is base_cls, "the quantized base stays as it is"
    assert not q.base.weight.dtype.is_floating_point and not q.base.weight.requires_grad
    assert {n.rsplit(".", 1)[-1] for n, p in hand.named_parameters() if p.requires_grad} == {"A", "B"}
    with pytest.raises(ValueError, match="cannot merge LoRA into a quantized.*Fix"):
        merge_lora(hand)


# ----------------------------------------------------------------------------- save / load

def trained_adapter(seed=0):
    model = tiny_llama()
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for m in lora_modules(model).values():
            m.B.copy_(torch.randn(m.B.shape, generator=g))
    return model


def test_save_load_round_trip(tmp_path):
    model = trained_adapter()
    ids = torch.randint(0, 128, (2, 12))
    path = save_adapter(model, tmp_path / "sft" / "adapter", note="test")
    assert path.name == "adapter.safetensors" and path.with_suffix(".json").is_file()
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["trainable_parameters"] == trainable_parameters(model)[0]
    assert set(config["layers"]) == set(lora_modules(model)) and config["note"] == "test"
    fresh = tiny_llama()                                 # the same base, no LoRA yet
    assert load_adapter(fresh, path) == list(config["layers"])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert {n.rsplit(".", 1)[-1] for n, p in fresh.named_parameters() if p.requires_grad} == {"A", "B"}
    # loading into a model that already has matching LoRA layers (also merged) replaces A and B
    other = trained_adapter(seed=1)
    merge_lora(other)
    load_adapter(other, path)
    with torch.no_grad():
        assert (other(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_an_existing_adapter_is_never_overwritten_silently(tmp_path):
    model = trained_adapter()
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"nothing was written.*adapter-2\.safetensors.*overwrite=True"):
        save_adapter(trained_adapter(seed=1), path)
    assert path.read_bytes() == before
    save_adapter(trained_adapter(seed=1), path, overwrite=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "tensors-missing", "config-missing", "config-garbled"])
def test_a_damaged_adapter_is_refused(tmp_path, damage):
    path = save_adapter(trained_adapter(), tmp_path / "adapter")
    tensors, config = adapter_paths(path)
    data = tensors.read_bytes()
    if damage == "flip":
        tensors.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    elif damage == "truncate":
        tensors.write_bytes(data[: len(data) // 2])
    elif damage == "tensors-missing":
        tensors.unlink()
    elif damage == "config-missing":
        config.unlink()
    else:
        config.write_text("{not json")
    fresh = tiny_llama()
    with pytest.raises(AdapterError, match="Fix: save the adapter again"):
        load_adapter(fresh, path)
    assert not lora_modules(fresh), "nothing is changed by a refused load"


def test_an_adapter_for_another_model_is_refused(tmp_path):
    path = save_adapter(trained_adapter(), tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"layer model\.layers\.0\.self_attn\.q_proj is \(32, 32\) here "
                                           r"but \(64, 64\).*Fix: load the base model"):
        load_adapter(tiny_llama(hidden=32), path)
    rank2 = tiny_llama()
    add_lora(rank2, r=2)
    with pytest.raises(AdapterError, match="already carries LoRA layers that differ.*remove_lora"):
        load_adapter(rank2, path)
    gpt = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32))
    with pytest.raises(AdapterError, match="has no layer model.layers.0.self_attn.q_proj"):
        load_adapter(gpt, path)


def test_hooks_read_a_lora_model_under_the_same_names():
    """B1 compares base vs fine-tuned attention: the hook names must survive the wrapping."""
    from labkit.hooks import run_with_cache
    base = tiny_llama()
    base.set_attn_implementation("eager")                 # SDPA never materialises the pattern
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, before = run_with_cache(base, ids, ["attn.hook_z", "attn.hook_pattern"])
        add_lora(base, r=4, alpha=8)                      # B = 0: the same model so far
        _, same = run_with_cache(base, ids, ["attn.hook_z", "attn.hook_pattern"])
        for m in lora_modules(base).values():
            m.B.normal_()
        _, moved = run_with_cache(base, ids, ["attn.hook_z", "attn.hook_pattern"])
    for name in ("blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern"):
        assert torch.allclose(before[name], same[name], atol=1e-6)
        assert not torch.allclose(before[name], moved[name], atol=1e-3)


def test_a_4bit_base_keeps_its_backward_after_an_evaluation(tmp_path):
    """bitsandbytes repacks NF4 weights for a bf16 CPU inference kernel (no backward) at the first
    no-grad eval forward on AVX512-BF16 CPUs; add_lora turns that off, so LoRA gradients after an
    evaluation are the gradients before it (on CPUs without AVX512-BF16 this holds trivially)."""
    from transformers import AutoModelForCausalLM

    from labkit.lora import keep_4bit_trainable
    from labkit.models import quantization_config
    tiny_llama().save_pretrained(tmp_path)
    load = lambda: AutoModelForCausalLM.from_pretrained(   # noqa: E731
        tmp_path, quantization_config=quantization_config("nf4", torch.device("cpu")),
        device_map={"": "cpu"}, dtype=torch.float32)
    model = load()
    add_lora(model, r=4)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.B.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)                       # an evaluation: where bitsandbytes would repack
    after = grads()
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-7), f"{name}: gradient changed after an evaluation"
    assert before["model.layers.0.self_attn.q_proj.A"].abs().max() > 1e-6, "layer 0 must get a gradient"

    fresh = load()                                 # a model repacked before LoRA is refused, with the fix
    qs = fresh.model.layers[0].self_attn.q_proj.weight.quant_state
    qs.packing_format_for_cpu = True               # what the repacking leaves behind
    with pytest.raises(ValueError, match="repacked by bitsandbytes.*no backward.*Fix: load the model"):
        add_lora(fresh)
    qs.packing_format_for_cpu = False
    assert keep_4bit_trainable(fresh) == 2 * 7     # 2 layers x (q, k, v, o, gate, up, down)
