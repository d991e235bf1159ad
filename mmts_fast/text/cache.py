"""On-disk cache of text embeddings: every (model, text, pooling, dtype, max_length) is encoded once.

Layout: ``<directory>/<h[:2]>/<h>.safetensors`` with ``h`` the sha256 of the JSON key; each file
holds one fp32 tensor (``[d]`` pooled, ``[T, d]`` token states) and its full key in the metadata.

* Writes are atomic: a temporary file in the same folder, flushed and fsync'ed, then
  ``os.replace``. A crash or two writers racing for one key never leave a partial entry.
* Reads are checked: an unreadable/truncated file, a key mismatch or a wrong shape is reported
  with a warning and recomputed (and rewritten).
* Only misses reach the encoder: a full hit never loads the model (:class:`TextEncoder` is lazy).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from mmts_fast._files import plain_file_mode
from mmts_fast.text.encoders import pad_tokens

__all__ = ["EmbeddingCache", "default_cache_dir"]

POOLINGS = ("pooled", "tokens")
_FORMAT = 1  # bump to invalidate every entry written by an older layout


class Encoder(Protocol):
    """What the cache needs from an encoder (:class:`~mmts_fast.text.encoders.TextEncoder` fits)."""

    model_id: str
    max_length: int

    def encode(self, texts: Sequence[str], batch_size: int = ..., progress: bool = ...,
               max_length: int | None = ...) -> torch.Tensor: ...

    def encode_tokens(self, texts: Sequence[str], max_length: int = ..., batch_size: int = ...,
                      progress: bool = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


def default_cache_dir() -> Path:
    """``$MMTS_FAST_CACHE`` or ``~/.cache/mmts_fast/embeddings``."""
    env = os.environ.get("MMTS_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mmts_fast" / "embeddings"


class EmbeddingCache:
    """Embeddings stored on disk, one file per (model, text, pooling, dtype, max_length).

    ``hits``/``misses`` count unique texts looked up (a corrupt entry counts as a miss).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------------------- entries

    @staticmethod
    def key(model_id: str, text: str, pooling: str, max_length: int | None, dtype: str = "float32") -> str:
        """The canonical JSON key of one entry (stored in the file and hashed for its name)."""
        return json.dumps({"v": _FORMAT, "model": model_id, "text": text, "pooling": pooling,
                           "dtype": dtype, "max_length": max_length}, sort_keys=True, ensure_ascii=False)

    def path(self, key: str) -> Path:
        h = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.directory / h[:2] / f"{h}.safetensors"

    def get(self, key: str, ndim: int | None = None) -> torch.Tensor | None:
        """The stored tensor, or None when absent or invalid (then with a warning)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                stored = (f.metadata() or {}).get("key")
                if stored != key:
                    raise ValueError("the stored key does not match")
                t = f.get_tensor("embedding")
            if ndim is not None and t.ndim != ndim:
                raise ValueError(f"{t.ndim}-D tensor, expected {ndim}-D")
            if t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise ValueError(f"bad values (dtype {t.dtype}, non-finite entries?)")
        except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed
            warnings.warn(f"embedding cache: corrupt entry {p} ({e}); recomputing", RuntimeWarning,
                          stacklevel=3)
            return None
        return t

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (as fp32) atomically."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = st_save({"embedding": tensor.detach().to("cpu", torch.float32).contiguous().clone()},
                       metadata={"key": key})
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            plain_file_mode(tmp)   # shareable as the umask allows (mkstemp makes it 0600)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ----------------------------------------------------------------------------- encode

    def encode(
        self,
        encoder: Encoder,
        texts: Sequence[str],
        pooling: str = "pooled",
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool = True,
        chunk_size: int = 256,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``texts`` (in order, duplicates allowed), encoding only the misses.

        ``pooling="pooled"``: ``[N, d]``. ``pooling="tokens"``: ``(hidden [N, T, d], mask [N, T])``
        right-padded to the longest text (``max_length`` defaults to 64 there, else to the
        encoder's). Misses are encoded ``chunk_size`` texts at a time and stored after each chunk.
        ``texts`` may be any iterable of strings (an iterator is read once).

        An embedding with a NaN/inf value is a ``ValueError`` naming the text, the model and its dtype;
        it is never stored.
        """
        from tqdm.auto import tqdm

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        texts = list(texts)   # an iterator/generator is read once, here
        ml = max_length if max_length is not None else (64 if pooling == "tokens" else encoder.max_length)
        ndim = 1 if pooling == "pooled" else 2
        unique = list(dict.fromkeys(texts))
        model_id = encoder.model_id
        keys = {t: self.key(model_id, t, pooling, ml) for t in unique}

        found: dict[str, torch.Tensor] = {}
        for t in unique:
            v = self.get(keys[t], ndim)
            if v is not None:
                found[t] = v
        missing = [t for t in unique if t not in found]
        self.hits += len(found)
        self.misses += len(missing)

        with tqdm(total=len(missing), disable=not (progress and missing), unit="text",
                  desc=f"embed {encoder.model_id.split('|')[0]}") as bar:
            for c in range(0, len(missing), chunk_size):
                chunk = missing[c:c + chunk_size]
                if pooling == "pooled":
                    rows = list(encoder.encode(chunk, batch_size=batch_size, progress=False, max_length=ml))
                else:
                    hidden, mask = encoder.encode_tokens(chunk, max_length=ml, batch_size=batch_size)
                    rows = [h[m] for h, m in zip(hidden, mask)]
                if len(rows) != len(chunk):
                    raise RuntimeError(f"the encoder returned {len(rows)} rows for {len(chunk)} texts")
                rows = [r.detach().to("cpu", torch.float32) for r in rows]
                for t, r in zip(chunk, rows):   # checked before any row of the chunk is stored
                    if not torch.isfinite(r).all():
                        raise ValueError(_non_finite_message(encoder, model_id, t, r))
                for t, r in zip(chunk, rows):
                    self.put(keys[t], r)
                    found[t] = r
                bar.update(len(chunk))

        rows = [found[t] for t in texts]
        if pooling == "pooled":
            return torch.stack(rows) if rows else torch.empty(0, getattr(encoder, "dim", 0))
        if not rows:
            return torch.empty(0, 0, getattr(encoder, "dim", 0)), torch.empty(0, 0, dtype=torch.bool)
        return pad_tokens(rows)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r}, hits={self.hits}, misses={self.misses})"


def _non_finite_message(encoder: Encoder, model_id: str, text: str, row: torch.Tensor) -> str:
    short = text if len(text) <= 80 else text[:77] + "..."
    dtype = getattr(encoder, "dtype", None)
    dtype = str(dtype).removeprefix("torch.") if dtype is not None else "unknown"
    n_bad = int((~torch.isfinite(row)).sum())
    hint = "; float16 may overflow: try dtype=torch.float32 or torch.bfloat16" if dtype == "float16" else ""
    return (f"the embedding of the text {short!r} has {n_bad} non-finite (NaN/inf) value(s) (model {model_id}, "
            f"dtype {dtype}); it is not cached{hint}")
