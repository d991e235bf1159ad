"""``mmts_fast._gguf.parse_once``: transformers' GGUF loading reads each file once and builds the same things.

A tiny Llama GGUF (random fp32 weights, a 12-token BPE vocabulary) written here loads in about a second, so
the plain and the shared loads can be compared whole: config, tokenizer and every weight.
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from mmts_fast._gguf import parse_once  # noqa: E402

TOKENS = ["<s>", "</s>", "a", "b", "c", "Ġ", "ab", "Ġa", "Ġb", "Ġc", "abc", "Ġab"]


def write_tiny_llama(path, layers=2, d=16, ff=24, heads=2, kv_heads=1, seed=0):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    w.add_token_merges(["a b", "Ġ a", "Ġ b", "Ġ c", "ab c", "Ġ ab"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    kv = kv_heads * d // heads

    def tensor(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", len(TOKENS), d)
    tensor("output_norm.weight", d)
    for i in range(layers):
        for name, shape in (("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (kv, d)),
                            ("attn_v", (kv, d)), ("attn_output", (d, d)), ("ffn_gate", (ff, d)),
                            ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            tensor(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_llama(tmp_path / "tiny.gguf")
    return tmp_path


def load_all(folder):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file="tiny.gguf", local_files_only=True)
    return (AutoConfig.from_pretrained(folder, **kw).to_dict(), AutoTokenizer.from_pretrained(folder, **kw),
            AutoModelForCausalLM.from_pretrained(folder, **kw))


def test_one_reader_and_the_same_model(tiny, monkeypatch):
    made = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            made.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    config, tok, model = load_all(tiny)
    plain_reads, made[:] = len(made), []
    with parse_once():
        config2, tok2, model2 = load_all(tiny)
    assert plain_reads >= 3 and len(made) == 1          # config, tokenizer config, weights: one reader
    assert gguf.GGUFReader is CountingReader            # put back after the block
    assert config2 == config
    for text in ("abc ab a", "c b a abc", "ab"):
        assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and len(sd) == 2 + 9 * 2 + 1    # + the tied LM head
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.tensor([tok("abc ab a")["input_ids"]])
    assert torch.equal(model(ids).logits, model2(ids).logits)


def test_nests_restores_and_hands_out_copies(tiny):
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    before = (gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint)
    file = str(tiny / "tiny.gguf")
    with pytest.raises(RuntimeError, match="inside"):
        with parse_once():
            patched = hf_gguf.load_gguf_checkpoint
            assert patched is not before[2]
            with parse_once():                          # nested: the same patches, kept after the inner block
                assert hf_gguf.load_gguf_checkpoint is patched
            assert hf_gguf.load_gguf_checkpoint is patched
            first = hf_gguf.load_gguf_checkpoint(file)
            first["config"]["num_hidden_layers"] = 99   # a caller editing what it got
            first["tokenizer"]["tokens"].append("x")
            again = hf_gguf.load_gguf_checkpoint(file)
            assert again["config"]["num_hidden_layers"] == 2 and again["tokenizer"]["tokens"] == TOKENS
            raise RuntimeError("inside")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint) == before

    write_tiny_llama(tiny / "tiny.gguf", layers=3)      # a rewritten file is read again, not served stale
    with parse_once():
        assert hf_gguf.load_gguf_checkpoint(file)["config"]["num_hidden_layers"] == 3
