"""Text inputs for the text-conditioned models, served per batch from cached embeddings.

``attach_text(model_type, splits, table, texts, spec)`` encodes every text the splits can need ONCE
(through :class:`~mmts_fast.text.cache.EmbeddingCache`: a warm cache never loads the LLM), then sets
``split.extras(indices) -> dict`` on each split, which the training loop passes to the model as
keyword inputs. Training never runs the LLM per batch.

- LeMoLE: ``static_emb [B, d]``: the dataset description, or on Time-MMD the latest report/search
  text each window may see (the description before the first one); the dynamic prompts (one
  AutoTimes-style timestamp prompt per lookback step) as ``dynamic_table [T, d]`` (the rows the batch
  spans) with ``dynamic_index [B, L]``, i.e. ``dynamic_emb = dynamic_table[dynamic_index]`` ``[B, L, d]``.
- MoME and LLM-TS Net (its frozen-encoder variant): ``text_hidden [B, T, d]`` and ``text_mask [B, T]``:
  the token states of the same static text (on ETT-style data: the description, the same for every window).
- LLM-TS Net with ``spec["text_lm"]`` (its LoRA-AMR fine-tuned LM, which runs in every step by design):
  ``text_ids [B, T]`` and ``text_mask [B, T]`` of each window's own text (Time-MMD record, or the
  window's timestamps + description).
"""
from __future__ import annotations

from typing import Optional

import torch

from mmts_fast.text.cache import EmbeddingCache
from mmts_fast.text.encoders import TextEncoder
from mmts_fast.text.prompts import DATASET_DESCRIPTIONS, dynamic_prompts, static_prompt

TEXT_MODELS = {"lemole", "mome", "llm_ts_net"}


def make_encoder(spec: dict) -> TextEncoder:
    return TextEncoder.from_name(spec["encoder"], layers=spec.get("layers"),
                                 load_in_4bit=spec.get("load_in_4bit", False))


def describe(spec: dict, data_name: Optional[str], columns: list) -> str:
    """The static prompt: given text/file, else the built-in description of the data set, else a generic one."""
    if spec.get("static_prompt"):
        return static_prompt(spec["static_prompt"])
    if data_name in DATASET_DESCRIPTIONS:
        return DATASET_DESCRIPTIONS[data_name]
    return f"A multivariate time series with {len(columns)} channels: {', '.join(map(str, columns))}."


def attach_text(model_type: str, splits: list, table, texts, spec: dict, data_name: Optional[str]) -> int:
    """Sets ``extras`` on every split for ``model_type``; returns the embedding width d_llm (None for
    LLM-TS Net with ``spec["text_lm"]``: its LM sets it)."""
    if model_type == "llm_ts_net" and spec.get("text_lm"):
        _attach_text_ids(splits, table, texts, spec, describe(spec, data_name, splits[0].columns))
        return None
    encoder = make_encoder(spec)
    cache = EmbeddingCache(spec.get("cache_dir"))
    progress = spec.get("progress", True)
    desc = describe(spec, data_name, splits[0].columns)
    window_texts = list(texts.texts) if texts is not None else []
    if model_type == "lemole":
        static = cache.encode(encoder, window_texts + [desc], progress=progress)      # [N_texts + 1, d]
        r0, r1 = min(s.start for s in splits), max(s.end for s in splits)
        # the prompts' step is the data's real step, inferred from its dates: never ``split.freq``, the
        # time-feature letter, which drops the count ("t" for 15 minutes); nor a given --freq, which a saved
        # run's data.json holds as that letter, so eval/export would build other prompts than training
        dyn = cache.encode(encoder, dynamic_prompts(table.dates[r0:r1]), progress=progress)
        for s in splits:
            s.extras = _lemole_extras(s, static, dyn, r0)
    elif model_type in ("mome", "llm_ts_net"):   # frozen token states (LLM-TS Net: its cached-text variant)
        hidden, mask = cache.encode(encoder, window_texts + [desc], pooling="tokens",
                                    max_length=spec.get("max_tokens", 64), progress=progress)
        for s in splits:
            s.extras = _mome_extras(s, hidden, mask)
    else:
        raise ValueError(f"model {model_type!r} takes no text; text models: {sorted(TEXT_MODELS)}")
    return encoder.dim


def _attach_text_ids(splits: list, table, texts, spec: dict, desc: str) -> None:
    """LLM-TS Net with its LoRA-AMR fine-tuned LM (``spec["text_lm"]``): the LM runs in every training
    step, so each window gets the token ids of its own text (:func:`~mmts_fast.text.tokens.window_texts`:
    the Time-MMD record it may see, else its timestamps followed by the description)."""
    from mmts_fast.llm import load_tokenizer
    from mmts_fast.text.tokens import token_inputs, window_texts

    tok = load_tokenizer(spec["text_lm"])
    for s in splits:
        ids, mask = token_inputs(window_texts(s, table, texts, desc), tok, max_length=spec.get("max_tokens", 64))
        s.extras = _token_extras(ids, mask)


def _token_extras(ids: torch.Tensor, mask: torch.Tensor):
    def extras(indices: torch.Tensor) -> dict:
        return {"text_ids": ids[indices], "text_mask": mask[indices]}
    return extras


def _text_index(split, indices: torch.Tensor) -> torch.Tensor:
    """Each window's text (-1 = none yet, which selects the description stored last)."""
    idx = getattr(split, "text_idx", None)
    return idx[indices] if idx is not None else torch.full((len(indices),), -1, dtype=torch.long)


def _lemole_extras(split, static: torch.Tensor, dyn: torch.Tensor, r0: int):
    """The dynamic prompts as the table rows the batch spans (a view, no copy) and each step's row in
    it: overlapping windows share timestamps, so LeMoLE projects each row once, not once per window."""
    steps = torch.arange(split.lookback)

    def extras(indices: torch.Tensor) -> dict:
        rows = split.start - r0 + indices[:, None] + steps
        lo, hi = int(rows.min()), int(rows.max())
        return {"static_emb": static[_text_index(split, indices)], "dynamic_table": dyn[lo:hi + 1],
                "dynamic_index": rows - lo}
    return extras


def _mome_extras(split, hidden: torch.Tensor, mask: torch.Tensor):
    def extras(indices: torch.Tensor) -> dict:
        k = _text_index(split, indices)
        return {"text_hidden": hidden[k], "text_mask": mask[k]}
    return extras


__all__ = ["TEXT_MODELS", "attach_text", "describe", "make_encoder"]
