"""labkit.quant: round trips within each format's bound, exact packing, = bitsandbytes NF4,
= gguf's Q8_0 / Q4_0 / Q4_1 byte for byte, the shipped SmolLM2 GGUF re-quantized bit-exactly,
and the low-bit linear layers (storage counted exactly, outputs = their fake-quantized model)."""
import collections
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import labkit
from labkit import quant
from labkit.gpt import GPT, GPTConfig
from labkit.quant import (NF4_LEVELS, Int4Linear, Int8Linear, absmax_quantize, fake_quantize, fake_quantized,
                          nf4_dequantize, nf4_quantize, pack_int4, quantize_model, unpack_int4,
                          zeropoint_quantize)

GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
EPS = 1e-6          # relative slack for fp32 arithmetic in w / s


def weights(out=48, n_in=256, seed=0):
    """Heavy-tailed rows (outliers, as real weights have) plus the awkward cases: a zero row,
    an all-positive row, an all-negative row, a row of exact halves, a tiny row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.randn(out, n_in, generator=g).exp() * 0.02
    w[0] = 0
    w[1] = w[1].abs() + 0.01
    w[2] = -w[2].abs()
    w[3] = (torch.arange(n_in) % 16 - 8) / 16
    w[4] *= 1e-6
    w[5, :32] = torch.tensor([-1.0, 1.0] * 16)            # ties for the largest |w| in a block
    return w


@pytest.fixture(scope="module")
def smollm2():
    model, _ = labkit.load_model()
    return model


@pytest.fixture(scope="module")
def gguf_file():
    import gguf
    files = sorted(Path(labkit.asset_dir("smollm2-135m")).glob("*.gguf"))
    assert files, "the SmolLM2 asset ships its GGUF file"
    return gguf.GGUFReader(files[0])


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", ["tensor", "row", 32, 100])
@pytest.mark.parametrize("method", [absmax_quantize, zeropoint_quantize])
def test_round_trip_error_within_half_a_step(bits, group_size, method):
    w = weights()
    q = method(w, bits, group_size)
    err = (w - q.dequantize()).abs()
    bound = q.error_bound() * (1 + EPS) + EPS * w.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{method.__name__} {bits} bits, groups {group_size}: error exceeds scale/2 by {worst:.2e}"
    assert torch.equal(q.dequantize()[0], torch.zeros(w.size(1))), "0 must stay exactly 0"
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if q.zero is None else (0, 2 ** bits - 1)
    assert q.q.min() >= lo and q.q.max() <= hi, f"codes outside [{lo}, {hi}]"


def test_finer_groups_give_smaller_errors_and_cost_bits():
    w = weights()
    errors = {g: (w - absmax_quantize(w, 4, g).dequantize()).pow(2).mean().item() for g in ["tensor", "row", 128, 32]}
    assert errors["tensor"] > errors["row"] > errors[128] > errors[32], errors
    assert absmax_quantize(w, 4, 32).bits_per_weight == 4 + 16 / 32
    assert zeropoint_quantize(w, 4, 32).bits_per_weight == 4 + (16 + 4) / 32


def test_zero_point_uses_twice_the_resolution_on_a_one_sided_row():
    w = weights()[1:2]                                                    # all positive
    e_abs = (w - absmax_quantize(w, 4, "row").dequantize()).abs().max()
    e_zp = (w - zeropoint_quantize(w, 4, "row").dequantize()).abs().max()
    assert e_zp < 0.6 * e_abs, f"zero-point {e_zp:.2e} vs absmax {e_abs:.2e}"


def stored_fp16(blob, offset, block_bytes):
    """The fp16 number at ``offset`` of every block of a llama.cpp blob, as fp32, (n, 1)."""
    return quant._fp16_from_bytes(blob.reshape(-1, block_bytes)[:, offset:offset + 2])


def test_gguf_blocks_within_their_bounds():
    """Half a step, plus what the fp16 rounding of the stored scale (and min) moves: |q| times
    |d16 - d|. Q4_0 on the side opposite the largest |w|: code 15 (= 7 d) is the last one, so
    values beyond 7.5 d clip and the bound is one full step there."""
    w = weights()
    blocks = w.reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    blob = quant.q8_0_quantize(w)
    d = amax / 127
    rounding = 127 * (stored_fp16(blob, 0, 34) - d).abs()
    err = (blocks - quant.q8_0_dequantize(blob).reshape(-1, 32)).abs()
    assert (err <= d / 2 + rounding + EPS * amax).all(), "Q8_0 outside d/2 + fp16 rounding"
    tiny = amax.flatten() < 127 * 2 ** -25                               # the 1e-6 row: d16 underflows to 0
    assert tiny.any() and (quant.q8_0_dequantize(blob).reshape(-1, 32)[tiny] == 0).all()

    blob = quant.q4_0_quantize(w)
    d = amax / 8
    rounding = 8 * (stored_fp16(blob, 0, 18).abs() - d).abs()
    err = (blocks - quant.q4_0_dequantize(blob).reshape(-1, 32)).abs()
    assert (err <= d + rounding + EPS * amax).all(), "Q4_0 outside one step"
    sign = torch.sign(blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)))       # (n, 1)
    clipped = blocks * sign <= -7.5 / 8 * amax                          # opposite side, beyond 7.5 d
    half_step = (d / 2 + rounding + EPS * amax).expand_as(err)
    assert (err[~clipped] <= half_step[~clipped]).all(), "Q4_0 outside d/2 where nothing clips"
    assert clipped.any(), "the edge cases include values in the clipped strip"

    blob = quant.q4_1_quantize(w)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    rounding = 15 * (stored_fp16(blob, 0, 20) - d).abs() + (stored_fp16(blob, 2, 20) - lo).abs()
    err = (blocks - quant.q4_1_dequantize(blob).reshape(-1, 32)).abs()
    assert (err <= d / 2 + rounding + EPS * (hi - lo)).all(), "Q4_1 outside d/2 + fp16 rounding"


def test_nf4_rounds_to_the_nearest_level():
    w = weights()
    packed, absmax = nf4_quantize(w)
    w_hat = nf4_dequantize(packed, absmax, w.shape)
    x = (w.reshape(-1, 64) / absmax.clamp(min=1e-38)[:, None]).reshape(-1)
    nearest = (x[:, None] - NF4_LEVELS[None]).abs().min(-1).values
    got = (x - (w_hat.reshape(-1, 64) / absmax.clamp(min=1e-38)[:, None]).reshape(-1)).abs()
    assert (got <= nearest + 1e-6).all(), "every weight takes the level nearest to w / absmax"
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2                 # 0.139, between 0.72 and 1
    assert ((w - w_hat).abs().reshape(-1, 64) <= half_gap * absmax[:, None] * (1 + EPS)).all()


# ----------------------------------------------------------------------------- packing

def test_int4_packing_is_exact_for_every_byte():
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert pack_int4(torch.tensor([0x3, 0xA], dtype=torch.uint8)).item() == 0xA3, "even index in the low nibble"


def test_gguf_nibble_layout_and_nf4_nibble_layout():
    w = torch.arange(32, dtype=torch.float32)[None] - 8                    # 32 distinct codes' worth
    blob = quant.q4_0_quantize(w)
    codes = quant._unpack_halves(blob[:, 2:])
    assert torch.equal(quant._pack_halves(codes), blob[:, 2:]), "llama.cpp: byte j = q[j] | q[j+16] << 4"
    assert torch.equal(blob[0, 2] & 0xF, codes[0, 0]) and torch.equal(blob[0, 2] >> 4, codes[0, 16])
    packed, _ = nf4_quantize(torch.tensor([1.0, -1.0]), block_size=2)
    assert packed.item() == 0xF0, "bitsandbytes: the first code in the high nibble"


# ----------------------------------------------------------------------------- = the libraries

def smollm2_sample_weights(model):
    layer = model.model.layers[0]
    return {"down_proj": layer.mlp.down_proj.weight.detach(), "k_proj": layer.self_attn.k_proj.weight.detach()}


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gguf_quantizer_bit_for_bit(smollm2, fmt):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    qtype = GGMLQuantizationType[GGUF_TYPES[fmt]]
    quantize_fn, dequantize_fn = quant.GGUF_QUANTIZERS[fmt]
    cases = {"edge cases": weights(), "random": torch.randn(16, 96) * 3,
             **{f"SmolLM2 {k}": v for k, v in smollm2_sample_weights(smollm2).items()}}
    for name, w in cases.items():
        mine, ref = quantize_fn(w).numpy(), quantize(w.numpy(), qtype)
        assert mine.shape == ref.shape and np.array_equal(mine, ref), (
            f"{fmt} on {name}: {int((mine != ref).sum())} of {ref.size} bytes differ from gguf's")
        assert np.array_equal(dequantize_fn(torch.from_numpy(ref)).numpy(), dequantize(ref, qtype)), (
            f"{fmt} on {name}: de-quantized values differ from gguf's")


def test_nf4_equals_bitsandbytes(smollm2):
    import bitsandbytes.functional as bnb
    cases = {"edge cases": weights(), **{f"SmolLM2 {k}": v for k, v in smollm2_sample_weights(smollm2).items()}}
    for name, w in cases.items():
        packed, absmax = nf4_quantize(w, 64)
        ref_packed, state = bnb.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
        assert torch.equal(packed, ref_packed.flatten()), f"NF4 codes differ from bitsandbytes' on {name}"
        assert torch.equal(absmax, state.absmax), f"NF4 absmax differs from bitsandbytes' on {name}"
        assert torch.equal(nf4_dequantize(packed, absmax, w.shape), bnb.dequantize_4bit(ref_packed, state)), \
            f"NF4 de-quantized values differ from bitsandbytes' on {name}"


# ----------------------------------------------------------------------------- the shipped GGUF

def test_the_shipped_gguf_holds_q4_1_linears_a_q8_0_embedding_and_f32_norms(gguf_file):
    types = collections.Counter(t.tensor_type.name for t in gguf_file.tensors)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}, types
    by_type = {t.name: t.tensor_type.name for t in gguf_file.tensors}
    assert by_type["token_embd.weight"] == "Q8_0" and by_type["blk.0.ffn_down.weight"] == "Q4_1"
    assert all(v == "F32" for k, v in by_type.items() if "norm" in k)


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.7.attn_q.weight", "blk.29.ffn_gate.weight",
                                  "token_embd.weight"])
def test_requantizing_the_shipped_gguf_is_bit_exact(gguf_file, name):
    """SmolLM2 here *is* a Q4_1 (Q8_0 embedding) file de-quantized: its values already sit on
    the format's grid, so quantizing them again to the same type gives back the same bytes."""
    t = next(t for t in gguf_file.tensors if t.name == name)
    fmt = t.tensor_type.name.lower()
    quantize_fn, dequantize_fn = quant.GGUF_QUANTIZERS[fmt]
    blob = torch.from_numpy(np.array(t.data[:4096]))                     # (rows, bytes per row); 4096 rows
    assert torch.equal(quantize_fn(dequantize_fn(blob)), blob), f"{name} ({fmt}) re-quantized to other bytes"


def test_smollm2_weights_are_fixed_points_of_q4_1(smollm2, gguf_file):
    """The fp32 checkpoint the lab loads: every linear weight of a layer comes back unchanged
    from a Q4_1 round trip (q and k rows are permuted for HF's RoPE layout; blocks stay whole)."""
    layer = smollm2.model.layers[11]
    for name, lin in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
        if isinstance(lin, nn.Linear):
            w_hat, bits = fake_quantize(lin.weight, "q4_1")
            assert torch.equal(w_hat, lin.weight), f"layer 11 {name} moved under a Q4_1 round trip"
            assert bits == 5.0
    embedding = smollm2.model.embed_tokens.weight[:4096]                    # 4096 of 49152 rows: time
    assert torch.equal(fake_quantize(embedding, "q8_0")[0], embedding), "the embedding is a Q8_0 fixed point"
    ffn_down = next(t for t in gguf_file.tensors if t.name == "blk.11.ffn_down.weight")
    assert torch.equal(quant.q4_1_dequantize(torch.from_numpy(np.array(ffn_down.data))),
                       layer.mlp.down_proj.weight), "the HF checkpoint = the GGUF de-quantized"


# ----------------------------------------------------------------------------- low-bit layers

def tiny_gpt(seed=0, bias=False):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    pos="rope", norm="rmsnorm", act="swiglu", bias=bias)
    return GPT(cfg).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_and_int4_layers_compute_linear_with_their_dequantized_weight(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    x = torch.randn(3, 5, 96)
    for layer, fmt in [(Int8Linear.from_linear(lin), "int8-row"), (Int4Linear.from_linear(lin, 32), "int4-g32"),
                       (Int4Linear.from_linear(lin, 40), "int4-g40")]:
        w_hat, _ = fake_quantize(lin.weight, fmt)
        assert torch.equal(layer.dequantize_weight(), w_hat), f"{layer} stores other values than {fmt}"
        ref = nn.functional.linear(x, w_hat, lin.bias)
        assert torch.allclose(layer(x), ref, atol=1e-5), f"{layer}: output differs from F.linear(x, w_hat)"


def test_the_reused_weight_buffer_never_mixes_layers_or_breaks_autograd():
    torch.manual_seed(0)
    lins = [nn.Linear(64, 96), nn.Linear(96, 64), nn.Linear(64, 32)]
    for make, fmt in [(Int8Linear.from_linear, "int8-row"), (lambda l: Int4Linear.from_linear(l, 32), "int4-g32")]:
        layers = [make(lin) for lin in lins]
        refs = [(fake_quantize(lin.weight, fmt)[0], lin.bias.detach()) for lin in lins]
        x = torch.randn(5, 64, requires_grad=True)
        y, y_ref = x, x
        for layer, (w, b) in zip(layers, refs):
            y, y_ref = layer(y).relu(), nn.functional.linear(y_ref, w, b).relu()
        assert torch.allclose(y, y_ref, atol=1e-5)
        grad, = torch.autograd.grad(y.square().sum(), x)
        grad_ref, = torch.autograd.grad(y_ref.square().sum(), x)
        assert torch.allclose(grad, grad_ref, atol=1e-5), f"{fmt}: gradients through the layers are wrong"
        with torch.no_grad():                                            # the buffer path, layer after layer
            y = x.detach()
            for layer in layers:
                y = layer(y).relu()
        assert torch.allclose(y, y_ref.detach(), atol=1e-5), f"{fmt}: reusing the buffer changed the output"


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"), reason="no aten._weight_int8pack_mm")
def test_int8pack_kernel_equals_the_dequantize_path():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(576, 192))
    x = torch.randn(2, 3, 576)
    slow = layer(x)
    layer.kernel = "int8pack"
    fast = layer(x)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-4), (fast - slow).abs().max()


def test_storage_bytes_are_exact():
    lin = nn.Linear(576, 192)
    assert Int8Linear.from_linear(lin).nbytes == 192 * 576 + 192 * 2 + 192 * 4
    assert Int4Linear.from_linear(lin, 32).nbytes == 192 * 576 // 2 + 192 * 18 * 2 + 192 * 4
    assert Int4Linear.from_linear(lin, 128).nbytes == 192 * 576 // 2 + 192 * 5 * 2 + 192 * 4   # 576 = 4.5 x 128
    model = tiny_gpt(bias=True)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    report = quantize_model(model, bits=4, group_size=32)
    assert sorted(report.replaced) == sorted(linears) and report.skipped == ["lm_head"]
    assert report.bytes_before == sum(m.weight.numel() * 4 + m.bias.numel() * 4 for m in linears.values())
    assert report.bytes_after == sum(model.get_submodule(n).nbytes for n in linears)
    assert report.bytes_after == sum(m.out_features * (m.in_features // 2 + math.ceil(m.in_features / 32) * 2 + 4)
                                     for m in linears.values())


@pytest.mark.parametrize("bits, fmt", [(8, "int8-row"), (4, "int4-g32")])
def test_quantized_model_equals_its_fake_quantized_model(bits, fmt):
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), fake_quantized(model, fmt):
        fake = model(idx)[0]
    quantized = copy.deepcopy(model)
    quantize_model(quantized, bits=bits, group_size=32)
    with torch.no_grad():
        real, fp32 = quantized(idx)[0], model(idx)[0]
    assert torch.allclose(real, fake, atol=1e-4), f"{bits}-bit layers differ from {fmt} fake quantization"
    assert not torch.equal(real, fp32), "quantization should move the logits a little"


def test_fake_quantized_restores_the_weights_even_after_an_error():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with fake_quantized(model, "int3-g32") as report:
            assert report.bits_per_weight == 3.5 and "lm_head" not in report.layers
            assert not torch.equal(model.blocks[0].mlp.up.weight, before["blocks.0.mlp.up.weight"])
            raise RuntimeError("inside")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantize_model_on_smollm2_reports_its_bytes(smollm2):
    model = copy.deepcopy(smollm2)
    report = quantize_model(model, bits=8)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    assert len(report.replaced) == 30 * 7 and report.skipped == ["lm_head"]
    assert report.bytes_before == 30 * sum(o * i * 4 for o, i in shapes)
    assert report.bytes_after == 30 * sum(o * i + o * 2 for o, i in shapes)
    with torch.no_grad():
        out = model(torch.tensor([[1, 504, 3458, 282]])).logits
    assert torch.isfinite(out).all()


def test_bad_input_gets_one_clear_error():
    with pytest.raises(ValueError, match="group_size must be"):
        absmax_quantize(torch.randn(4, 8), 8, "column")
    with pytest.raises(ValueError, match="bits must be 2..8"):
        zeropoint_quantize(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="blocks of 32"):
        quant.q4_0_quantize(torch.randn(4, 48))
    with pytest.raises(ValueError, match="unknown format 'int4'"):
        fake_quantize(torch.randn(4, 32), "int4")
    with pytest.raises(ValueError, match="exclude="):
        quantize_model(tiny_gpt(), bits=8, exclude=())
    with pytest.raises(ValueError, match="fake_quantize"):
        quantize_model(tiny_gpt(), bits=3)
