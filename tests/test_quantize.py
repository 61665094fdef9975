"""Weight-only quantized experts (FineQuant): the op against a float64 dequantized reference, the
quantizer's error bound, adaptive granularity, checkpoints (round trip, a flipped byte), bad input."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import upcycle
from zoo.io.checkpoint import CheckpointError
from zoo.kernels import reference
from zoo.models import ModelConfig, build_model
from zoo.moe.experts import EXPERTS
from zoo.moe.quantized import QuantizationConfig, QuantizedExperts
from zoo.io.quantize import quantize_model_dir
from zoo.transforms.quantize import adaptive_group_size, expert_weight_bytes, quantize_experts

D, F_, E = 32, 48, 4


def _experts(kind: str, options: dict) -> torch.nn.Module:
    experts = EXPERTS.build(kind, options, num_experts=E, hidden_size=D, intermediate_size=F_)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    return experts


def _codes64(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes as float64, unpacked by arithmetic (independent of `unpack_int4`'s bit ops)."""
    c = codes.to(torch.int64)
    if bits == 4:
        c = torch.cat([c % 16, c // 16], dim=-1) - 8
    return c.to(torch.float64)


def _weight64(q: QuantizedExperts, proj: str) -> torch.Tensor:
    codes = _codes64(getattr(q, f"{proj}_codes"), q.bits)
    scales = getattr(q, f"{proj}_scales").to(torch.float64)
    return codes * scales.repeat_interleave(codes.shape[-1] // scales.shape[-1], dim=-1)


def _expected64(q: QuantizedExperts, x, weights, indices) -> torch.Tensor:
    """Token by token, slot by slot, in float64 from the dequantized weights."""
    from zoo.moe.activations import activation_fn

    act = activation_fn(q.activation)
    w_in, w_out = _weight64(q, q.in_proj), _weight64(q, q.out_proj)
    b_in = getattr(q, q.in_bias).double() if q.has_bias else torch.zeros(E, w_in.shape[1], dtype=torch.float64)
    b_out = getattr(q, q.out_bias).double() if q.has_bias else torch.zeros(E, D, dtype=torch.float64)
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(indices.shape[1]):
            e = int(indices[t, s])
            if e < 0:
                continue
            h = w_in[e] @ x[t].double() + b_in[e]
            h = act(h[:F_]) * h[F_:] if q.gated else act(h)
            out[t] += float(weights[t, s]) * (w_out[e] @ h + b_out[e])
    return out


CASES = [("swiglu", {}, 8, (None, None)), ("swiglu", {}, 8, (16, 16)), ("swiglu", {}, 4, (16, 8)),
         ("glu", {"activation": "gelu", "bias": True}, 4, (32, 48)), ("mlp", {"activation": "gelu_tanh", "bias": True}, 8, (8, 24)),
         ("mlp", {"activation": "gelu_tanh", "bias": True}, 4, (None, None))]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kind,options,bits,groups", CASES)
def test_quantized_layer_equals_a_float64_dequantized_reference(kind, options, bits, groups, backend, monkeypatch):
    monkeypatch.setenv("ZOO_KERNELS", backend)
    q = QuantizedExperts.from_float(_experts(kind, options), bits, groups)
    x = torch.randn(7, D)
    weights = torch.rand(7, 2)
    indices = torch.tensor([[0, 1], [2, -1], [3, 3], [-1, -1], [1, 0], [2, 3], [0, -1]])
    out = q(x, weights, indices)
    assert out.dtype == torch.float32 and out.shape == (7, D)
    torch.testing.assert_close(out.double(), _expected64(q, x, weights, indices), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[3], torch.zeros(D))  # a token with no expert gets 0
    # expert(e) and dequantized() hold the same dequantized weights
    torch.testing.assert_close(q.expert(2)(x[1]), out[1] / weights[1, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", EXPERTS.names())
def test_every_registered_expert_kind_quantizes(kind, bits):
    """Registry-driven: a new expert kind is quantized and checked against float64 with no edit here."""
    q = QuantizedExperts.from_float(_experts(kind, dict(EXPERTS.entry(kind).example)), bits, (16, 16))
    x, weights = torch.randn(5, D), torch.rand(5, 2)
    indices = torch.tensor([[0, 3], [1, -1], [2, 2], [3, 0], [-1, 1]])
    torch.testing.assert_close(q(x, weights, indices).double(), _expected64(q, x, weights, indices), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group", [(8, None), (8, 8), (4, 16), (4, None)])
def test_quantizer_error_is_at_most_half_a_step_and_int4_packs_two_codes_per_byte(bits, group):
    w = torch.randn(3, 10, 32) * torch.logspace(-3, 1, 32)  # inputs of very different ranges
    w[0, 0] = 0.0  # an all-zero row quantizes to zeros (no division by 0)
    codes, scales = reference.quantize_weight(w, bits, group)
    g = 32 if group is None else group
    assert scales.shape == (3, 10, 32 // g) and scales.dtype == torch.float32
    assert codes.shape == ((3, 10, 16) if bits == 4 else (3, 10, 32))
    assert codes.dtype == (torch.uint8 if bits == 4 else torch.int8)
    ints = _codes64(codes, bits)
    assert ints.abs().max() <= 2 ** (bits - 1) - 1
    if bits == 4:
        assert torch.equal(reference.unpack_int4(codes).double(), ints)
        assert torch.equal(reference.pack_int4(reference.unpack_int4(codes)), codes)
    step = scales.double().repeat_interleave(g, dim=-1)
    w_hat = reference.dequantize(codes, scales, bits, torch.float64)
    assert torch.all((w.double() - w_hat).abs() <= step / 2 + 1e-7)
    assert torch.equal(w_hat[0, 0], torch.zeros(32, dtype=torch.float64))
    from zoo.kernels.quantized import dequantize_fast

    torch.testing.assert_close(dequantize_fast(codes[1], scales[1], bits, torch.float32), w_hat[1].float())


def test_adaptive_granularity_splits_where_an_outlier_dominates_and_not_elsewhere():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(4, 64, 256, generator=g)
    assert adaptive_group_size(flat, 4, min_group_size=16, threshold=0.7) == 256  # Gaussian: per channel
    loud = flat.clone()
    loud[..., :128] *= 30.0  # the first half of every row is 30x louder: one split, then both halves are even
    assert adaptive_group_size(loud, 4, min_group_size=16, threshold=0.7) == 128
    assert adaptive_group_size(loud, 4, min_group_size=256, threshold=0.7) == 256  # the floor is respected
    assert adaptive_group_size(loud, 8, min_group_size=16, threshold=0.01) == 256  # and the threshold
    spiky = flat.clone()
    spiky[..., ::64] *= 30.0  # a lone outlier every 64 inputs: every split leaves a quiet half, down to the floor
    assert adaptive_group_size(spiky, 4, min_group_size=16, threshold=0.7) == 16

    quiet_loud = torch.arange(256) >= 128
    quiet_spiky = torch.arange(256) % 64 != 0

    def err(w, group, quiet):  # relative error of the quiet inputs
        codes, scales = reference.quantize_weight(w, 4, group)
        return (reference.dequantize(codes, scales, 4) - w)[..., quiet].norm() / w[..., quiet].norm()

    assert err(loud, None, quiet_loud) > 0.9 > 0.2 > err(loud, 128, quiet_loud)  # per channel rounds them to 0
    assert err(spiky, 16, quiet_spiky) < 0.5 * err(spiky, None, quiet_spiky)


def _moe_lm():
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=97))
    return upcycle(dense, num_experts=E, router_options={"top_k": 2}, method="noisy", method_options={"scale": 0.5}).eval()


@pytest.mark.parametrize("bits,group,drift", [(8, None, 0.01), (4, 16, 0.1)])
def test_quantize_experts_replaces_only_the_stacked_experts(bits, group, drift):
    model = _moe_lm()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    floats = {k: v.clone() for k, v in model.state_dict().items() if "experts" not in k}
    before = expert_weight_bytes(model)
    cfg = quantize_experts(model, bits=bits, group_size=group)
    assert sorted(cfg.group_sizes) == ["lm.model.layers.0.mlp.moe.experts", "lm.model.layers.1.mlp.moe.experts"]
    assert cfg.group_sizes["lm.model.layers.0.mlp.moe.experts"] == ([D, 64] if group is None else [group, group])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in floats.items())  # attention, embeddings, routers untouched
    after = expert_weight_bytes(model)
    assert after["codes"] * (32 // bits) == before["float32"]  # 4 bytes -> 1 byte or half a byte per weight
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert 0 < ((out - ref).norm() / ref.norm()).item() < drift
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(model, bits=8)


def _model_dir(tmp_path, name="src"):
    from zoo.io.model_dir import save_model_dir
    from zoo.tokenizer import train_tokenizer

    cfg = ModelConfig.from_dict({"name": "t", "lm": {"model_type": "llama", "config": {
        "vocab_size": 300, "hidden_size": D, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "moe": {"num_experts": E, "router": "topk", "router_options": {"top_k": 2}, "layers": "all"}})
    model = build_model(cfg).eval()
    with torch.no_grad():
        for moe in model.language_model.moe_layers().values():
            for p in [*moe.experts.parameters(), moe.router.weight]:
                p.normal_(0, 0.3)
    tok = tmp_path / "tok"
    train_tokenizer(["a red square", "what is shown", "hello there"] * 10, vocab_size=300).save_pretrained(str(tok))
    return save_model_dir(model, cfg, tmp_path / name, tok, extra={"stage": "moe-tune"}), model


def test_quantized_checkpoint_round_trips_and_a_flipped_byte_is_refused(tmp_path):
    from zoo.catalog.load import load_directory

    src, model = _model_dir(tmp_path)
    out, qcfg, before, after = quantize_model_dir(src, tmp_path / "q4", bits=4, group_size=16)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["quantization"]["bits"] == 4 and config["quantized_from"]["path"] == str(src.resolve())
    assert "stage" not in config  # the float model's records are not carried over
    loaded, processor, cfg = load_directory(out)
    assert cfg.quantization == qcfg and len(cfg.quantization.group_sizes) == 2
    layers = loaded.language_model.moe_layers()
    assert all(isinstance(m.experts, QuantizedExperts) and m.experts.bits == 4 for m in layers.values())
    # the same codes and scales as quantizing the float model in memory; the same logits
    quantize_experts(model, qcfg)
    state = loaded.state_dict()
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(5, 300, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # flip one byte of the weights: refused before a tensor is read
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors' is corrupted: sha256"):
        load_directory(out)
    with pytest.raises(CheckpointError, match="already exists"):
        quantize_model_dir(src, out, bits=8)


def test_zoo_quantize_cli(tmp_path, capsys):
    from zoo.cli import main

    src, _ = _model_dir(tmp_path)
    assert main(["quantize", str(src), "--bits", "8", "--out", str(tmp_path / "q8")]) == 0
    printed = capsys.readouterr().out
    assert "to int8" in printed and f"{2 * E * 3 * D * 64 * 4:,} -> " in printed
    assert main(["load", str(tmp_path / "q8")]) == 0
    assert main(["quantize", str(tmp_path / "q8"), "--bits", "4", "--out", str(tmp_path / "again")]) == 1
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(src), "--bits", "3", "--out", str(tmp_path / "bad")]) == 1
    assert "bits=3 is not supported; accepted: [4, 8]" in capsys.readouterr().err
    assert main(["quantize", str(src), "--bits", "4", "--group-size", "24", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "group_size=24 does not divide the matrix's input dimension 32" in err and "gate_up_proj" in err
    assert not (tmp_path / "bad").exists()


def test_bad_input_names_the_cause():
    experts = _experts("swiglu", {})
    with pytest.raises(ValueError, match=r"bits=3 is not supported; accepted: \[4, 8\]"):
        QuantizedExperts.from_float(experts, 3, (None, None))
    with pytest.raises(ValueError, match=r"bits=2 is not supported; accepted: \[4, 8\]"):
        QuantizationConfig(bits=2)
    with pytest.raises(ValueError, match="down_proj: group_size=20 does not divide the matrix.s input dimension 48"):
        QuantizedExperts.from_float(experts, 8, (16, 20))
    with pytest.raises(ValueError, match="group_size=0 must be a positive integer"):
        reference.quantize_weight(torch.randn(4, 8), 8, 0)
    with pytest.raises(ValueError, match="int4 packs two codes per byte"):
        reference.quantize_weight(torch.randn(4, 9), 4, None)
    with pytest.raises(ValueError, match="adaptive granularity chooses each matrix's group size itself"):
        QuantizationConfig(bits=4, group_size=32, adaptive=True)
    with pytest.raises(ValueError, match=r"quantization: threshold=1.5 must be a number in \(0.0, 1.0\]"):
        QuantizationConfig(threshold=1.5)
    with pytest.raises(ValueError, match="holds no stacked experts"):
        quantize_experts(torch.nn.Linear(4, 4), bits=8)
    with pytest.raises(ValueError, match=r"quantization: QuantizationConfig: unknown config key\(s\) \['group'\]"):
        ModelConfig.from_dict({"quantization": {"bits": 4, "group": 32}})


def test_build_model_builds_the_quantized_model_a_config_describes():
    lm = {"model_type": "llama", "config": {"vocab_size": 97, "hidden_size": D, "intermediate_size": 64,
                                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}
    moe = {"num_experts": E, "router": "topk", "router_options": {"top_k": 2}, "layers": [1]}
    torch.manual_seed(3)
    float_model = build_model(ModelConfig.from_dict({"lm": lm, "moe": moe}))
    torch.manual_seed(3)
    model = build_model(ModelConfig.from_dict({"lm": lm, "moe": moe, "quantization": {"bits": 4, "group_size": 16}}))
    (path, experts), = [(p, m) for p, m in model.named_modules() if isinstance(m, QuantizedExperts)]
    assert path == "language_model.lm.model.layers.1.mlp.moe.experts" and experts.group_sizes == (16, 16)
    resolved = quantize_experts(float_model, bits=4, group_size=16)  # same seed: the same codes
    assert resolved.group_sizes == {path: [16, 16]}
    assert all(torch.equal(v, float_model.state_dict()[k]) for k, v in model.state_dict().items())
