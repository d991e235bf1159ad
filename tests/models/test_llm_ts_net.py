"""LLM-TS Net (SPEC 1.6): shapes, gradients (prompt pool, GQA layers), ablation, batching, top-K selection,
the LoRA-AMR LM path with a tiny random Llama, ONNX parity of the text_hidden variant, save/load, window texts."""
from datetime import datetime, timedelta

import pytest
import torch
from safetensors.torch import load_file

from mmts_fast.export import export_onnx, verify_onnx
from mmts_fast.models.llm_ts_net import LLMTSNet, LLMTSNetConfig, PromptPool
from mmts_fast.nn import GQAttention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

B, L, H, C, D = 4, 45, 12, 3, 20


def cfg(**kw):
    base = dict(lookback=L, horizon=H, channels=C, d_llm=D, patch_len=8, d_model=32, n_heads=4, n_kv_heads=2,
                n_layers=1, d_ff=48, pool_size=6, pool_top_k=2)
    base.update(kw)
    return LLMTSNetConfig(**base)


def inputs(seed=0, T=7):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, L, C, generator=g) * 2 + 1, hidden=torch.randn(B, T, D, generator=g),
                mask=torch.rand(B, T, generator=g) > 0.3)


@pytest.mark.parametrize("mode, selection, prompt_len", [("prepend", "straight_through", 2),
                                                         ("add", "weighted", 1)])
def test_shapes_and_gradients(mode, selection, prompt_len):
    torch.manual_seed(0)
    m = LLMTSNet(cfg(pool_mode=mode, pool_selection=selection, prompt_len=prompt_len))
    t = inputs()
    t["mask"][0] = False                        # a sample without any text token stays finite
    y = m(t["x"], text_hidden=t["hidden"], text_mask=t["mask"])
    assert y.shape == (B, H, C) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    pool = m.prompt_pool
    assert pool.keys.grad.abs().sum() > 0 and pool.values.grad.abs().sum() > 0       # selection trains
    assert pool.w_query.weight.grad.abs().sum() > 0 and pool.score.weight.grad.abs().sum() > 0
    gqa = [mod for mod in m.modules() if isinstance(mod, GQAttention)]
    assert len(gqa) == 4 and all(a.n_kv_heads < a.n_heads for a in gqa)             # time, variate, pool, fusion
    for a in gqa:
        for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
            assert proj.weight.grad.abs().sum() > 0, a


def test_without_text_and_errors():
    m = LLMTSNet(cfg(use_text=False))
    assert m.extra_inputs == () and not hasattr(m, "fuse_attn")
    y = m(inputs()["x"])
    assert y.shape == (B, H, C)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m2 = LLMTSNet(cfg())
    assert m2.extra_inputs == ("text_hidden", "text_mask")
    with pytest.raises(ValueError, match="needs text_hidden"):
        m2(inputs()["x"])
    with pytest.raises(ValueError, match="pool_top_k=7 is larger"):
        LLMTSNetConfig(pool_size=6, pool_top_k=7)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LLMTSNetConfig(n_heads=4, n_kv_heads=3)


def test_batched_equals_per_sample_and_text_matters():
    torch.manual_seed(1)
    m = LLMTSNet(cfg(n_layers=2)).eval()
    t = inputs(1)
    with torch.no_grad():
        batched = m(t["x"], text_hidden=t["hidden"], text_mask=t["mask"])
        single = torch.cat([m(t["x"][i:i + 1], text_hidden=t["hidden"][i:i + 1], text_mask=t["mask"][i:i + 1])
                            for i in range(B)])
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
        other = m(t["x"], text_hidden=torch.randn_like(t["hidden"]), text_mask=t["mask"])
    assert (other - batched).abs().max() > 1e-5            # the fusion is wired in


def test_prompt_pool_selects_top_k():
    torch.manual_seed(2)
    W, K, Lp, d, N = 7, 3, 2, 16, 10
    pool = PromptPool(d, W, K, Lp, "straight_through")
    q = torch.randn(N, d)
    prompts, idx, probs = pool(q)
    assert prompts.shape == (N, K * Lp, d) and idx.shape == (N, K) and probs.shape == (N, W)
    assert all(len(set(r)) == K for r in idx.tolist())                      # K distinct prompts per row
    ref = pool.scores(q).topk(K, dim=-1).indices
    assert torch.equal(idx, ref)
    assert (probs.gather(1, idx).min(1).values >= probs.topk(K + 1, dim=-1).values[:, -1]).all()
    # straight-through: the forward value is exactly the selected values
    torch.testing.assert_close(prompts, pool.values[idx].reshape(N, K * Lp, d))
    # weighted: the values times their probability
    pool.selection = "weighted"
    p2, idx2, probs2 = pool(q)
    torch.testing.assert_close(p2, (probs2.gather(1, idx2)[..., None, None] * pool.values[idx2]).reshape(N, -1, d))


def test_text_mask_shape_is_checked():
    m = LLMTSNet(cfg())
    t = inputs()
    with pytest.raises(ValueError, match=r"LLMTSNet: text_mask must be \[B, T\]=\(4, 7\) like text_hidden, got \(4, 5\)"):
        m(t["x"], text_hidden=t["hidden"], text_mask=t["mask"][:, :5])
    with pytest.raises(ValueError, match="text_mask must be"):
        m(t["x"], text_hidden=t["hidden"], text_mask=t["mask"][0])


def test_onnx_parity_and_save_load(tmp_path):
    torch.manual_seed(3)
    m = LLMTSNet(cfg()).eval()
    t = inputs(3)
    xm = torch.rand(B, L, 4) - 0.5
    extra = {"text_hidden": t["hidden"], "text_mask": t["mask"]}
    path = export_onnx(m, tmp_path / "llm_ts_net.onnx", extra_inputs={k: v[:2] for k, v in extra.items()})
    err = verify_onnx(m, path, t["x"], xm, extra_inputs=extra, atol=1e-4)
    assert err <= 1e-4
    g = torch.Generator().manual_seed(6)   # the text length is a dynamic axis of the file too
    T2 = t["hidden"].shape[1] + 4
    longer = {"text_hidden": torch.randn(B, T2, D, generator=g), "text_mask": torch.rand(B, T2, generator=g) > 0.3}
    assert verify_onnx(m, path, t["x"], xm, extra_inputs=longer, atol=1e-4) <= 1e-4
    m.save_pretrained(tmp_path / "saved")
    loaded = LLMTSNet.from_pretrained(tmp_path / "saved")
    assert not loaded.training and loaded.config == m.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(t["x"], **extra), m(t["x"], **extra))


def test_triton_backend_matches_torch():
    """The K3 kernels (Triton; the interpreter on CPU) give the reference's outputs and gradients."""
    pytest.importorskip("triton")
    import mmts_fast
    from conftest import DEVICE, TOL

    torch.manual_seed(5)
    m = LLMTSNet(cfg(lookback=24, horizon=6, channels=2, d_ff=32, pool_size=4, dropout=0.0)).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    x, h = torch.randn(2, 24, 2, generator=g).to(DEVICE), torch.randn(2, 5, D, generator=g).to(DEVICE)
    mk = (torch.rand(2, 5, generator=g) > 0.3).to(DEVICE)
    mk[0] = False
    res = []
    for be in ("torch", "triton"):
        m.zero_grad()
        with mmts_fast.use_backend(be):
            y = m(x, text_hidden=h, text_mask=mk)
            y.square().mean().backward()
        res.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(res[1][0], res[0][0], **TOL[torch.float32])
    for a, b in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# The paper's path: a small LM fine-tuned with LoRA-AMR (a tiny random Llama here)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lcfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(lcfg).save_pretrained(d)
    return str(d)


def test_lora_amr_lm_path(tiny_llama, tmp_path, monkeypatch):
    from mmts_fast import models
    from mmts_fast.models import ForecastModel
    from mmts_fast.nn import LoRAMixtureLinear

    torch.manual_seed(4)
    m = LLMTSNet(cfg(text_lm=tiny_llama, text_lm_layers=2, lora_rank=4))
    assert m.config.d_llm == 64 and m.extra_inputs == ("text_ids", "text_mask")
    lora = [mod for mod in m.text_lm.modules() if isinstance(mod, LoRAMixtureLinear)]
    assert len(lora) == 14 and all(mod.amr for mod in lora)                  # 7 projections x 2 layers
    train_lm = {n for n, p in m.text_lm.named_parameters() if p.requires_grad}
    assert train_lm and all(n.endswith("lora_C") for n in train_lm)          # only LoRA-AMR C in the LM
    outside = [n for n, p in m.named_parameters() if not n.startswith("text_lm.")]
    assert all(p.requires_grad for n, p in m.named_parameters() if n in outside)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, L, C, generator=g)
    ids = torch.randint(0, 97, (B, 9), generator=g)
    mask = torch.ones(B, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False                                                          # no text at all: still finite
    y = m(x, text_ids=ids, text_mask=mask)
    assert y.shape == (B, H, C) and torch.isfinite(y).all()
    y.square().mean().backward()
    for n, p in m.text_lm.named_parameters():
        if n.endswith("lora_C"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert m.text_pool.k_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs text_ids"):
        m(x, text_hidden=torch.randn(B, 9, 64))

    # save without the frozen base LM; reload it from config.text_lm
    with torch.no_grad():
        for mod in lora:                                                     # make the adapters matter
            mod.lora_C.normal_(0, 0.1)
    m.eval()
    m.save_pretrained(tmp_path / "lm")
    keys = load_file(str(tmp_path / "lm" / "model.safetensors")).keys()
    lm_keys = [k for k in keys if k.startswith("text_lm.")]
    assert lm_keys and all(k.rsplit(".", 1)[-1] in ("lora_C", "lora_D", "lora_B") for k in lm_keys)
    loaded = LLMTSNet.from_pretrained(tmp_path / "lm")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, text_ids=ids, text_mask=mask), m(x, text_ids=ids, text_mask=mask))
    # through the registry (ForecastModel.from_pretrained) as well, once llm_ts_net is registered there
    monkeypatch.setitem(models.MODELS, "llm_ts_net", LLMTSNet)
    again = ForecastModel.from_pretrained(tmp_path / "lm")
    assert type(again) is LLMTSNet
    with torch.no_grad():
        torch.testing.assert_close(again(x, text_ids=ids, text_mask=mask), m(x, text_ids=ids, text_mask=mask))
    # ONNX with the LM inside: exported with 9 tokens, run with 13
    ids2 = torch.randint(0, 97, (B, 13), generator=g)
    mask2 = torch.ones(B, 13, dtype=torch.bool)
    mask2[0, 10:] = False
    path = export_onnx(m, tmp_path / "lm.onnx", extra_inputs={"text_ids": ids[:2], "text_mask": mask[:2]})
    assert verify_onnx(m, path, x, torch.rand(B, L, 4) - 0.5, extra_inputs={"text_ids": ids2, "text_mask": mask2},
                       atol=1e-4) <= 1e-4
    # what PyTorch takes, verify_onnx feeds ONNX Runtime as the graph needs it: int32 ids, an int 0/1 mask
    assert verify_onnx(m, path, x, torch.rand(B, L, 4) - 0.5,
                       extra_inputs={"text_ids": ids2.int(), "text_mask": mask2.int()}, atol=1e-4) <= 1e-4
    # ids outside the LM's vocabulary and a misshapen mask, in the user's terms (were an IndexError and
    # gqa_attention's key_padding_mask message)
    with pytest.raises(ValueError, match=r"text_ids hold ids \d+\.\.97, outside the vocabulary .*\[0, 97\)"):
        m(x, text_ids=torch.cat([ids, torch.full((B, 1), 97)], 1))
    with pytest.raises(ValueError, match=r"text_ids hold ids -1\.\."):
        m(x, text_ids=torch.cat([ids, torch.full((B, 1), -1)], 1))
    with pytest.raises(ValueError, match="text_ids must be integer token ids"):
        m(x, text_ids=ids.float())
    with pytest.raises(ValueError, match=r"text_mask must be \[B, T\]=\(4, 9\) like text_ids, got \(4, 5\)"):
        m(x, text_ids=ids, text_mask=mask[:, :5])
    # a state dict missing anything but frozen LM weights is still an error
    sd = {k: v for k, v in m.state_dict().items() if k != "head.weight"}
    with pytest.raises(RuntimeError, match="missing keys"):
        loaded.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# Window texts and token inputs (mmts_fast.text.tokens)
# ---------------------------------------------------------------------------------------------
class _WordTokenizer:
    pad_token_id, eos_token_id = None, 1

    def __call__(self, texts, truncation=True, max_length=None, add_special_tokens=True):
        ids = [[2 + (hash(w) % 50) for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids}


def test_window_texts_and_tokens():
    from mmts_fast.data.timemmd import TextRecord, TimeMMDDataset, TimeMMDTexts
    from mmts_fast.data.tslib import ForecastDataset, TimeSeriesTable
    from mmts_fast.text.tokens import token_inputs, window_texts

    n = 60
    dates = [datetime(2020, 1, 1) + timedelta(days=i) for i in range(n)]
    table = TimeSeriesTable(dates=dates, columns=["a", "OT"], values=torch.randn(n, 2).numpy())
    ds = ForecastDataset(table, "train", lookback=8, horizon=4, borders="custom", freq="d")
    txt = window_texts(ds, table, None, "Toy data.")
    assert len(txt) == len(ds)
    assert txt[0] == "This is Time Series from 2020-01-01 00:00 to 2020-01-08 00:00. Toy data."
    recs = [TextRecord(dates[5], dates[10], "first report", "report"),
            TextRecord(dates[20], dates[25], "second report", "report")]
    mmd = TimeMMDDataset((table, TimeMMDTexts(recs)), "train", lookback=8, horizon=4, freq="d")
    t2 = window_texts(mmd, description="Toy data.")
    for i, s in enumerate(t2):
        k = int(mmd.text_idx[i])
        assert s == ("Toy data." if k < 0 else recs[k].text)
    assert {"Toy data.", "first report", "second report"} <= set(t2)
    ids, mask = token_inputs(t2, _WordTokenizer(), max_length=3)
    assert ids.shape == mask.shape == (len(t2), 2) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len(s.split()[:3]) for s in t2]
    assert (ids[~mask] == 1).all()                                            # EOS pads when there is no pad


def test_cli_trains_the_lora_amr_lm_path(tiny_llama, tmp_path, monkeypatch, capsys):
    """`mmts-fast train --model llm_ts_net --text-lm LM`: each window's own text as token ids, the LM with
    LoRA-AMR trains, eval reloads the LM from its folder, the ONNX export (LM included) matches in ORT."""
    import mmts_fast.llm
    from mmts_fast.cli import main
    from mmts_fast.models import ForecastModel

    monkeypatch.setattr(mmts_fast.llm, "load_tokenizer", lambda name: _WordTokenizer())
    csv = tmp_path / "toy.csv"
    csv.write_text("date,a,OT\n" + "".join(f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00,{i % 7},{(i * 3) % 11}\n"
                                           for i in range(300)))
    out = tmp_path / "run"
    args = ["--model", "llm_ts_net", "--text-lm", tiny_llama, "--data", str(csv), "--lookback", "24",
            "--horizon", "12", "--epochs", "1", "--batch-size", "32", "--quiet", "--out", str(out)]
    main(["train", *args])
    m = ForecastModel.from_pretrained(out)
    assert m.config.text_lm == tiny_llama and m.config.d_llm == 64 and m.text_lm is not None
    c_after = dict((n, p) for n, p in m.named_parameters() if n.endswith("lora_C"))
    assert c_after and any(p.abs().sum() > 0 for p in c_after.values())        # C starts at zero, then trains

    from mmts_fast.cli import _load_spec, build_datasets
    _, _, test, _ = build_datasets(_load_spec(out))
    batch = test.extras(torch.arange(2))
    assert set(batch) == {"text_ids", "text_mask"}
    assert not torch.equal(batch["text_ids"][0], batch["text_ids"][1])        # per-window (timestamp) texts
    main(["eval", str(out)])
    assert "test  mse" in capsys.readouterr().out
    main(["export", str(out), "--out", str(tmp_path / "m.onnx")])         # the LM with LoRA-AMR traces too
    line = [ln for ln in capsys.readouterr().out.splitlines() if "max abs error" in ln][0]
    assert float(line.split("max abs error ")[1].split()[0]) <= 1e-4
    with pytest.raises(SystemExit, match="--text-lm is for --model llm_ts_net"):
        main(["train", "--model", "mome", "--text-lm", tiny_llama, "--out", str(tmp_path / "x")])
