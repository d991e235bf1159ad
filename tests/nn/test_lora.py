"""LoRAMixtureLinear, D-LoRA (apply_dlora) and peft-format adapters (mmts_fast.nn.lora).

Everything runs on tiny randomly initialised models (no downloads); the ops run their torch backend
except in the one Triton test (interpreter on CPU, set up by tests/conftest.py).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmts_fast
from mmts_fast.nn.lora import (DLoRARouter, LoRAMixtureLinear, apply_dlora, apply_lora, load_adapters,
                               save_adapters)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0, layers=2):
    """hidden 64, 2 layers, 4 heads, 2 kv heads: real GQA, random weights, no download.

    intermediate 128, a multiple of NF4's blocksize 64: bitsandbytes 0.50's native CPU ``dequantize_4bit``
    treats quantisation blocks as per row, which is wrong when in_features % 64 != 0 (K2's reference,
    flat blocks as bnb quantised them, is the correct one there), so the bnb comparisons avoid such shapes."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


class Tiny(nn.Module):
    def __init__(self, d_in=24, d_out=20, bias=True):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


def randomize_b(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def nf4_copy(module):
    """A deep copy of ``module`` with its nn.Linear layers as bitsandbytes NF4 Linear4bit."""
    pytest.importorskip("bitsandbytes")
    from mmts_fast.text.encoders import _quantize_linears_nf4

    q = copy.deepcopy(module)
    assert _quantize_linears_nf4(q, torch.float32) > 0
    return q


# ---------------------------------------------------------------------------------------------
# LoRAMixtureLinear vs peft
# ---------------------------------------------------------------------------------------------
def test_init_like_peft():
    lin = nn.Linear(40, 12)
    mod = LoRAMixtureLinear(lin, n_experts=3, rank=4, alpha=8)
    assert mod.scale == 2.0 and not mod.base.weight.requires_grad and not mod.base.bias.requires_grad
    assert torch.equal(mod.lora_B, torch.zeros(3, 12, 4))
    # kaiming-uniform(a=sqrt(5)) with fan_in = d_in per expert: bound 1 / sqrt(d_in)
    assert mod.lora_A.abs().max() <= 1 / math.sqrt(40) and mod.lora_A.abs().max() > 0.5 / math.sqrt(40)
    assert not torch.equal(mod.lora_A[0], mod.lora_A[1])
    x = torch.randn(5, 40)
    torch.testing.assert_close(mod(x, torch.rand(5, 3)), lin(x))


def test_peft_equivalence_output_and_grads():
    """One expert, gate 1 == peft's LoRA on the same weights: output, dA, dB and dx."""
    torch.manual_seed(0)
    base = Tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    randomize_b(pm)
    ours = copy.deepcopy(base)
    mod = apply_lora(ours, ["proj"], rank=4, alpha=8)["proj"]
    mod.load_peft_state_dict(pm.state_dict(), "base_model.model.proj")
    assert mod.scale == pm.base_model.model.proj.scaling["default"]

    x = torch.randn(3, 7, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = pm(x1), ours(x2)
    torch.testing.assert_close(y2, y1, atol=1e-6, rtol=1e-6)
    dy = torch.randn_like(y1)
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    pl = pm.base_model.model.proj
    torch.testing.assert_close(mod.lora_A.grad[0], pl.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.lora_B.grad[0], pl.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-6)
    assert base.proj.weight.grad is None and ours.proj.base.weight.grad is None

    # and back: our weights in peft's in-memory layout
    sd = mod.to_peft_state_dict("base_model.model.proj")
    assert set(sd) == {"base_model.model.proj.lora_A.default.weight", "base_model.model.proj.lora_B.default.weight"}
    torch.testing.assert_close(sd["base_model.model.proj.lora_A.default.weight"], pl.lora_A["default"].weight)


def test_gate_shapes():
    torch.manual_seed(0)
    mod = LoRAMixtureLinear(nn.Linear(16, 8), n_experts=3, rank=4)
    randomize_b(mod)
    x = torch.randn(2, 5, 16)
    g = torch.tensor([[0.7, 0.0, 0.3], [0.0, 0.4, 0.0]])
    per_token = g[:, None, :].expand(2, 5, 3)
    y = mod(x, g)                                               # [B, M] per sample
    torch.testing.assert_close(y, mod(x, per_token))            # x's leading dims + [M]
    torch.testing.assert_close(y, mod(x, per_token.reshape(10, 3)))   # [T, M]
    want = mod.base(x) + sum(g[:, None, m, None] * mod.scale * (x @ mod.lora_A[m].T) @ mod.lora_B[m].T
                             for m in range(3))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gates are required"):
        mod(x)
    with pytest.raises(ValueError, match="do not fit"):
        mod(x, torch.rand(3, 3))
    one = LoRAMixtureLinear(nn.Linear(16, 8), n_experts=1, rank=2)
    randomize_b(one)
    torch.testing.assert_close(one(x), one(x, torch.ones(2, 1)))
    # unbatched input, a drop-in for nn.Linear: [d_in] -> [d_out]
    torch.testing.assert_close(one(x[0, 0]), one(x[:1, :1])[0, 0])
    torch.testing.assert_close(mod(x[0, 0], g[0]), mod(x[:1, :1], g[:1])[0, 0])


def test_linear4bit_base():
    """NF4 Linear4bit base: the output equals the math on bitsandbytes' dequantised weight."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    q = nf4_copy(Tiny(64, 48))
    w = q.proj.weight
    w_deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    mod = LoRAMixtureLinear(q.proj, n_experts=3, rank=4, alpha=8)
    assert mod.is_nf4 and "nf4" in repr(mod)
    randomize_b(mod)
    x = torch.randn(2, 6, 64, requires_grad=True)
    g = torch.zeros(2, 3)
    g[0, :2] = torch.tensor([0.6, 0.4])
    g[1, 1:] = torch.tensor([0.5, 0.5])
    y = mod(x, g)
    gt = g[:, None, :]
    want = F.linear(x, w_deq, q.proj.bias) + sum(
        gt[..., m, None] * mod.scale * (x @ mod.lora_A[m].T) @ mod.lora_B[m].T for m in range(3))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert mod.lora_A.grad.abs().sum() > 0 and mod.lora_B.grad.abs().sum() > 0 and x.grad is not None


def test_linear4bit_after_bnb_cpu_inference():
    """bitsandbytes repacks a Linear4bit for its own CPU kernel on the first eval/no-grad forward (AVX512-BF16
    CPUs); wrapping it afterwards goes back to the standard NF4 layout."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    q = nf4_copy(Tiny(64, 64)).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = q(x)                         # repacks where the CPU has AVX512-BF16
    repacked = getattr(q.proj.weight.quant_state, "packing_format_for_cpu", False)
    mod = LoRAMixtureLinear(q.proj, rank=4)
    assert not getattr(mod.base.weight.quant_state, "packing_format_for_cpu", False)
    with torch.no_grad():
        y = mod(x)
    if repacked:     # bnb's CPU kernel computes in bf16 (input, weights and output rounded to bf16); K2 in fp32
        torch.testing.assert_close(y, ref, atol=2 ** -7 * ref.abs().max().item(), rtol=0)
    else:
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def _nf4_layer(lin, nested):
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4",
                          compress_statistics=nested)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=nested)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu").eval()


def _held_weight(w):
    """The weights a Linear4bit holds after bitsandbytes' CPU repack: its codes, the absmax rounded to bf16."""
    bf = pytest.importorskip("bitsandbytes.functional")
    qs = w.quant_state
    absmax = bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    held = bf.QuantState(absmax=absmax.to(torch.bfloat16).float(), shape=qs.shape, code=qs.code,
                         blocksize=qs.blocksize, quant_type="nf4", dtype=qs.dtype)
    return bf.dequantize_4bit(w.data, held)


@pytest.mark.parametrize("nested", [False, True])
def test_linear4bit_in_bnb_cpu_layout(nested):
    """A Linear4bit in bitsandbytes' CPU-only layout (made with bitsandbytes' own conversion, so on any CPU),
    then wrapped: the base goes back to the standard layout and computes exactly the weights the repacked layer
    held (codes exact; absmax = the repack's bf16 values, a rounding that cannot be undone, kept as fp32 and not
    re-nested). It crashed without double quantisation (absmax left bf16 [K/64, N]) and re-quantised the absmax
    with it (5e-3 off on outputs ~2)."""
    bnb = pytest.importorskip("bitsandbytes")
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU repacking (_convert_weight_packed_for_cpu)")
    torch.manual_seed(0)
    q = _nf4_layer(nn.Linear(256, 96), nested)
    w_held, std_bytes = _held_weight(q.weight), q.weight.data.clone()
    q.weight.data, q.weight.quant_state = convert(q.weight.data, q.weight.quant_state)
    mod = LoRAMixtureLinear(q, rank=4)
    st = mod.base.weight.quant_state
    assert not st.packing_format_for_cpu and not st.nested and st.dtype == torch.float32
    assert st.absmax.dtype == torch.float32 and st.absmax.shape == (96 * 256 // 64,)
    assert torch.equal(mod.base.weight.data, std_bytes) and mod.base.weight.shape == std_bytes.shape
    assert torch.equal(mmts_fast.ops.dequantize_nf4(mod.base.weight), w_held)
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        y = mod(x)
        torch.testing.assert_close(y, F.linear(x, w_held, q.bias), atol=1e-6, rtol=1e-6)
        # bitsandbytes itself reads the restored state (standard layout, its CPU repacking off for this layer)
        torch.testing.assert_close(mod.base(x), y, atol=1e-5, rtol=1e-5)
    assert not getattr(mod.base.weight.quant_state, "packing_format_for_cpu", False)
    assert "weight.absmax" in mod.base.state_dict()


@pytest.mark.parametrize("nested", [False, True])
def test_linear4bit_after_bnb_cpu_kernel_weights(nested):
    """On AVX512-BF16 CPUs (where bitsandbytes really repacks in eval/no-grad): the unpacked weights are those
    bnb's own CPU kernel multiplies by (x = identity reads them back, rounded to bf16 by the kernel)."""
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks Linear4bit for its CPU kernel only on CPUs with AVX512-BF16")
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    q, probe = _nf4_layer(lin, nested), _nf4_layer(lin, nested)
    probe.bias.zero_()
    x = torch.randn(3, 256)
    with torch.no_grad():
        ref = q(x)
        kernel_w = probe(torch.eye(256)).T
    assert q.weight.quant_state.packing_format_for_cpu
    mod = LoRAMixtureLinear(q, rank=4)
    w = mmts_fast.ops.dequantize_nf4(mod.base.weight)
    torch.testing.assert_close(w, _held_weight(_nf4_layer(lin, nested).weight), atol=0, rtol=0)
    # bnb's kernel rounds to bf16 (one ulp at most)
    torch.testing.assert_close(kernel_w, w, atol=2 ** -7 * w.abs().max().item(), rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), ref, atol=2 ** -7 * ref.abs().max().item(), rtol=0)


def test_amr():
    """LoRA-AMR: starts at the base; A = C D; only C trains; exported to peft as A = C D."""
    torch.manual_seed(0)
    base = Tiny(32, 24)
    ours = copy.deepcopy(base)
    mod = apply_lora(ours, ["proj"], rank=8, alpha=16, amr=True)["proj"]
    assert mod.lora_C.shape == (1, 8, 4) and mod.lora_D.shape == (4, 32) and mod.lora_B.shape == (1, 24, 8)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["proj.lora_C"]
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), base(x))
    with torch.no_grad():
        mod.lora_C.normal_()
    y = ours(x)
    want = base(x) + mod.scale * ((x @ mod.lora_D.T) @ mod.lora_C[0].T) @ mod.lora_B[0].T
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert mod.lora_C.grad.abs().sum() > 0
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    pm.load_state_dict(mod.to_peft_state_dict("base_model.model.proj"), strict=False)
    torch.testing.assert_close(pm(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="LoRA-AMR"):
        mod.load_peft_state_dict(pm.state_dict(), "base_model.model.proj")


def test_amr_unselected_module_backward():
    """A D-LoRA module that no sample selects (all gates 0): the base alone, and backward still works."""
    torch.manual_seed(0)
    mod = LoRAMixtureLinear(nn.Linear(32, 24), n_experts=2, rank=8, amr=True)
    with torch.no_grad():
        mod.lora_C.normal_()
    x = torch.randn(3, 4, 32, requires_grad=True)
    gates = torch.zeros(3, 2, requires_grad=True)
    y = mod(x, gates)
    torch.testing.assert_close(y, mod.base(x))
    y.sum().backward()
    torch.testing.assert_close(x.grad, mod.base.weight.sum(0).expand(3, 4, 32))


# ---------------------------------------------------------------------------------------------
# peft adapter files
# ---------------------------------------------------------------------------------------------
TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_adapter_round_trip_through_peft(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    ours = copy.deepcopy(base)
    mods = apply_lora(ours, TARGETS, rank=4, alpha=8)
    assert len(mods) == 6
    randomize_b(ours)
    with torch.no_grad():
        y_ours = ours(input_ids=ids).logits
        assert (y_ours - base(input_ids=ids).logits).abs().max() > 1e-3   # the adapters do something
    save_adapters(ours, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    assert not (tmp_path / "ad" / "mmts_extra.safetensors").exists()

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, y_ours, atol=1e-5, rtol=1e-5)

    # ours -> ours
    fresh = copy.deepcopy(base)
    apply_lora(fresh, TARGETS, rank=4, alpha=8)
    rep = load_adapters(fresh, tmp_path / "ad")
    assert len(rep["loaded"]) == 6 and not rep["unused"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, y_ours, atol=1e-6, rtol=1e-6)

    # peft's own save -> ours (alpha from the config sets the scale)
    pm2 = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS))
    randomize_b(pm2, seed=5)
    pm2.save_pretrained(str(tmp_path / "peft"))
    fresh2 = copy.deepcopy(base)
    apply_lora(fresh2, TARGETS, rank=4, alpha=8)
    load_adapters(fresh2, tmp_path / "peft")
    assert all(m.scale == 3.0 for m in fresh2.modules() if isinstance(m, LoRAMixtureLinear))
    with torch.no_grad():
        torch.testing.assert_close(fresh2(input_ids=ids).logits, pm2.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")   # "proj", on purpose
def test_load_adapters_regex_patterns(tmp_path):
    """peft's rank_pattern / alpha_pattern keys are regexes, matched against the module name at a "." boundary,
    the first matching key winning (peft.utils.other.get_pattern_key); load_adapters matched them as exact names
    or dotted suffixes only (a silently wrong scale, a valid rank refused). save_adapters writes the module names
    escaped, so peft and load_adapters read them back as those names."""
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          rank_pattern={r"layers\.0\.self_attn\.q_proj": 2},
                          alpha_pattern={"proj": 100, r"layers\.[01]\.self_attn\.v_proj": 32, "v_proj": 4})
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    randomize_b(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    mods = apply_lora(ours, ["layers.0.self_attn.q_proj"], rank=2)
    mods.update(apply_lora(ours, ["layers.1.self_attn.q_proj", "v_proj"], rank=4))
    load_adapters(ours, tmp_path / "peft")
    layers = pm.base_model.model.model.layers
    for n, m in mods.items():
        i, kind = int(n.split(".")[2]), n.rsplit(".", 1)[1]
        pl = getattr(layers[i].self_attn, kind)
        assert (m.rank, m.scale) == (pl.r["default"], pl.scaling["default"]), n
    assert mods["model.layers.0.self_attn.v_proj"].scale == 8.0          # 32 / 4: the first match, not "v_proj"
    assert mods["model.layers.0.self_attn.q_proj"].scale == 4.0          # 8 / 2: "proj" is no "." boundary
    with torch.no_grad():
        y = ours(input_ids=ids).logits
        torch.testing.assert_close(y, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    save_adapters(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)


def test_multi_expert_adapters(tmp_path):
    """Expert m > 0 is peft adapter 'expertM' in dir/expertM: peft can load and select it."""
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 7))
    ours = copy.deepcopy(base)
    apply_lora(ours, ["q_proj", "v_proj"], rank=4, alpha=8, n_experts=2)
    randomize_b(ours)
    save_adapters(ours, tmp_path)
    assert (tmp_path / "expert1" / "adapter_model.safetensors").is_file()
    fresh = copy.deepcopy(base)
    apply_lora(fresh, ["q_proj", "v_proj"], rank=4, alpha=8, n_experts=2)
    load_adapters(fresh, tmp_path)
    for (n, a), (_, b) in zip(ours.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    pm.load_adapter(str(tmp_path / "expert1"), adapter_name="expert1")
    pm.set_adapter("expert1")
    for m in ours.modules():
        if isinstance(m, LoRAMixtureLinear):
            m.routed_gates = torch.tensor([[0.0, 1.0]] * 2)     # per sample: expert 1 only
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# D-LoRA
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def dlora():
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    state = apply_dlora(model, rank=4, top_n=2, alpha=8)
    return model, state, ids, ref


def test_dlora_injection(dlora):
    model, state, ids, ref = dlora
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".dlora_router." in n for n in trainable)
    assert sum(".lora_A" in n for n in trainable) == 2 * 7 and sum(".dlora_router." in n for n in trainable) == 2 * 2
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any(".base.weight" in n for n in frozen)
    assert set(state.trainable_parameters()) == {p for p in model.parameters() if p.requires_grad}
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)       # B = 0: unchanged right after injection


def test_dlora_top_n_and_aux(dlora):
    model, state, ids, _ = dlora
    model(input_ids=ids)
    assert len(state.last_gates) == 2
    for i, (g, p) in enumerate(zip(state.last_gates, state.last_probs)):
        assert g.shape == (4, 7)
        assert ((g != 0).sum(1) == 2).all(), f"layer {i}: not exactly top-2 per sample"
        top = p.topk(2, dim=1).indices
        torch.testing.assert_close(g.gather(1, top), p.gather(1, top))
        for j, t in enumerate(state.targets):
            assert torch.equal(state.modules[i][t].routed_gates, g[:, j:j + 1])
    aux = state.aux_loss()
    assert torch.isfinite(aux) and aux > 0
    want = sum(7 * ((g != 0).float().mean(0) * p.mean(0)).sum() for g, p in zip(state.last_gates, state.last_probs))
    torch.testing.assert_close(aux, want)
    assert aux.requires_grad


def test_dlora_gradients(dlora):
    """With B nonzero (one optimiser step's worth), gradients reach A, B of the selected modules and routers."""
    model, state, ids, ref = dlora
    randomize_b(model, std=0.05)
    out = model(input_ids=ids).logits
    assert (out - ref).abs().max() > 1e-4
    (out.square().mean() + 0.01 * state.aux_loss()).backward()
    for i, mods in enumerate(state.modules):
        router = state.routers[i]
        assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0
        used = (state.last_gates[i] != 0).any(0)
        for j, t in enumerate(state.targets):
            m = mods[t]
            if used[j]:
                assert m.lora_A.grad.abs().sum() > 0 and m.lora_B.grad.abs().sum() > 0, (i, t)
            else:                                    # no sample routed here: no work, no gradient
                assert m.lora_A.grad is None or m.lora_A.grad.abs().sum() == 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)

    # the LoRA gradient also reaches the router (dgates), not only the balance loss
    model.zero_grad()
    model(input_ids=ids).logits.square().mean().backward()
    assert state.routers[1].proj.weight.grad.abs().sum() > 0


def test_dlora_deepcopy_and_pickle_after_training_step(dlora, tmp_path):
    """Keeping the best model with copy.deepcopy (or torch.save of the whole model) works after a training
    step (the last gates are in that step's graph), and the copy routes its own modules: its hooks are not
    bound to the original's routers."""
    import copy
    model, state, ids, _ = dlora
    randomize_b(model, std=0.05)
    (model(input_ids=ids).logits.square().mean() + 0.01 * state.aux_loss()).backward()
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        gates = [m.routed_gates.clone() for m in state.modules[0].values()]
        torch.testing.assert_close(twin(input_ids=ids).logits, ref)
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)
        for layer in twin.model.layers:          # change the copy's routing only
            layer.dlora_router.proj.weight.normal_(0, 5.0, generator=torch.Generator().manual_seed(7))
        assert (twin(input_ids=ids).logits - ref).abs().max() > 1e-4
        assert all(torch.equal(m.routed_gates, g) for m, g in zip(state.modules[0].values(), gates))
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_dlora_router_reads_last_real_token():
    """Right padding: the router pools the last non-padding token (the model call's attention_mask)."""
    model = tiny_llama()
    state = apply_dlora(model, rank=2, top_n=3)
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        model(input_ids=ids)
        alone = state.last_gates[0].clone()
        padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        mask = torch.tensor([[1] * 5 + [0] * 3])
        model(input_ids=padded, attention_mask=mask)
        torch.testing.assert_close(state.last_gates[0], alone)
        model(input_ids=padded)                        # no mask: the last position (a pad token)
        assert not torch.allclose(state.last_gates[0], alone)


def test_dlora_subset_amr_save_load_remove(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = copy.deepcopy(base)
    state = apply_dlora(model.model, targets=("q", "v", "up"), rank=4, top_n=1, amr=True)   # LlamaModel works
    assert state.n_mod == 3 and isinstance(model.model.layers[0].dlora_router, DLoRARouter)
    assert all(".lora_C" in n or ".dlora_router." in n for n, p in model.model.named_parameters() if p.requires_grad)
    model.lm_head.requires_grad_(False)     # apply_dlora froze what it was given: the LlamaModel
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=1e-6)
        for p in state.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        y = model(input_ids=ids).logits
    assert ((state.last_gates[0] != 0).sum(1) == 1).all()
    save_adapters(model, tmp_path)
    assert (tmp_path / "mmts_extra.safetensors").is_file()

    other = copy.deepcopy(base)
    apply_dlora(other.model, targets=("q", "v", "up"), rank=4, top_n=1, amr=True)
    load_adapters(other, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, y, atol=1e-6, rtol=1e-6)

    state.remove()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not hasattr(model.model.layers[0], "dlora_router")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=1e-6)


def test_dlora_nf4():
    """D-LoRA over NF4 Linear4bit projections: unchanged at injection (vs the same model with the
    dequantised weights, dense), trainable after."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = tiny_llama()
    q = nf4_copy(dense)
    with torch.no_grad():        # the dense twin holds exactly the NF4 weights
        for (n, m), (_, mq) in zip(dense.named_modules(), q.named_modules()):
            if isinstance(mq, bnb.nn.Linear4bit):
                m.weight.copy_(bnb.functional.dequantize_4bit(mq.weight.data, mq.weight.quant_state))
    ids = torch.randint(0, 97, (2, 8))
    state = apply_dlora(q, rank=4, top_n=2)
    assert all(m.is_nf4 for mods in state.modules for m in mods.values())
    out = q(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(out, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    randomize_b(q, std=0.05)
    (q(input_ids=ids).logits.square().mean() + state.aux_loss()).backward()
    assert any(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0
               for mods in state.modules for m in mods.values())


# ---------------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU)
# ---------------------------------------------------------------------------------------------
def test_triton_backend_matches_torch():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    mod = LoRAMixtureLinear(nn.Linear(24, 20), n_experts=3, rank=4, alpha=8)
    randomize_b(mod)
    x = torch.randn(2, 5, 24)
    g = torch.tensor([[0.7, 0.0, 0.3], [0.0, 0.4, 0.6]])
    results = {}
    for be in ("torch", "triton"):
        mod.zero_grad()
        xl = x.clone().requires_grad_()
        with mmts_fast.use_backend(be):
            assert mmts_fast.backend.resolve(xl) == be
            y = mod(xl, g)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[be] = (y.detach(), xl.grad, mod.lora_A.grad.clone(), mod.lora_B.grad.clone())
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# The LoRA-AMR memory benchmark (tiny shapes): AMR keeps D x, not x
# ---------------------------------------------------------------------------------------------
def test_amr_memory_bench_tiny(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_lora_amr_memory.py"
    spec = importlib.util.spec_from_file_location("_bench_lora_amr_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "amr.jsonl"
    rows = bench.main(["--tokens", "64", "--d", "96", "--rank", "8", "--experts", "1,4", "--bases", "dense",
                       "--out", str(out)])
    assert len(rows) == 4 and len(out.read_text().splitlines()) == 4
    by = {(r["M"], r["variant"]): r for r in map(json.loads, out.read_text().splitlines())}
    for M in (1, 4):
        lora, amr = by[(M, "lora")], by[(M, "amr")]
        x_bytes = 64 * 96 * 4
        assert lora["kept_bytes"] >= x_bytes                      # plain LoRA keeps (a copy of) x
        assert amr["input_bytes"] == 0 and amr["kept_bytes"] < x_bytes / 4   # AMR keeps D x: 64 x 4 floats
    assert "| amr |" in capsys.readouterr().out
