"""Per-window texts and their token-level inputs (LLM-TS Net, SPEC 1.6).

``window_texts(split, table, texts, description)`` gives the text of every window of a split:

- Time-MMD (the split has ``text_idx``): the latest report/search text the window may see (SPEC 3's
  leakage rule, already applied by :class:`~mmts_fast.data.timemmd.TimeMMDDataset`), or ``description``
  before the first one;
- any other data (ETT style): the window's timestamp description, AutoTimes style,
  ``"This is Time Series from {first step} to {last step}."``, followed by ``description`` when given
  (timestamps first, so that truncation to a token budget cuts the constant part).

``token_inputs(texts, tokenizer, max_length)`` turns them into ``text_ids [N, T]`` / ``text_mask [N, T]``
(each distinct text tokenized once). Index both by window to build a batch's keyword inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from mmts_fast.text.prompts import DATE_FORMAT

__all__ = ["window_texts", "token_inputs"]


def window_texts(split, table=None, texts=None, description: Optional[str] = None) -> list[str]:
    """One text per window of ``split`` (a ``ForecastDataset`` or ``TimeMMDDataset``), in window order.

    Args:
        split: the windows; ``split.start`` (first row) and ``split.lookback`` are read, and on Time-MMD
            ``split.text_idx`` (``-1`` = no text yet).
        table: the :class:`~mmts_fast.data.tslib.TimeSeriesTable` the split was cut from (its dates);
            default ``split.table`` (Time-MMD datasets keep theirs).
        texts: Time-MMD texts (``TimeMMDTexts`` or a list of strings) that ``text_idx`` indexes; default
            ``split.texts``.
        description: the dataset description (fallback text on Time-MMD, suffix elsewhere).
    """
    n = len(split)
    idx = getattr(split, "text_idx", None)
    if idx is not None:
        texts = texts if texts is not None else getattr(split, "texts", None)
        if texts is None:
            raise ValueError("window_texts: the split has text_idx but no texts were given")
        pool = list(texts.texts) if hasattr(texts, "texts") else list(texts)
        fallback = description or ""
        return [pool[k] if k >= 0 else fallback for k in idx[:n].tolist()]
    table = table if table is not None else getattr(split, "table", None)
    if table is None:
        raise ValueError("window_texts: pass the table the split was cut from (for its dates)")
    dates, L = table.dates, split.lookback
    tail = f" {description.strip()}" if description else ""
    out = []
    for i in range(n):
        r0 = split.start + i
        out.append(f"This is Time Series from {dates[r0].strftime(DATE_FORMAT)} to "
                   f"{dates[r0 + L - 1].strftime(DATE_FORMAT)}.{tail}")
    return out


def token_inputs(texts: Sequence[str], tokenizer, max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_ids [N, T] long, text_mask [N, T] bool)`` for ``texts``, right-padded to the longest (at most
    ``max_length`` tokens, truncated on the right). Distinct texts are tokenized once. A tokenizer without a
    pad token pads with its EOS id (the mask marks padding either way)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    uniq = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(uniq)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("token_inputs: the tokenizer has neither a pad nor an EOS token")
    enc = tokenizer(uniq, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    T = max(1, max((len(e) for e in enc), default=1))
    ids = torch.full((len(uniq), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(uniq), T, dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, :len(e)] = True
    rows = torch.tensor([where[t] for t in texts], dtype=torch.long)
    return ids[rows], mask[rows]
