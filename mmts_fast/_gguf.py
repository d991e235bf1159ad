"""GGUF helpers: a header reader that needs no model code, and :func:`parse_once` for transformers' loader.

transformers (5.x) reads a GGUF file from scratch for each thing it builds: the config (``AutoConfig``),
the tokenizer's config and the weights each construct a ``gguf.GGUFReader`` (which indexes every field part:
~294k for SmolLM2's vocabulary, seconds) and convert all fields again, and mapping the weights' names builds
gguf's whole ``TensorNameMap`` once per submodule (~400 times for SmolLM2). :func:`parse_once` removes the
repeats without changing what is built; :func:`gguf_arch_values` reads header scalars in milliseconds.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

__all__ = ["gguf_arch_values", "parse_once"]

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_arch_values(file: str | Path, *keys: str) -> dict[str, Any]:
    """``{key: value}`` of the architecture's scalar header entries ``<architecture>.<key>`` of a GGUF file
    (``"block_count"``, ``"embedding_length"``, ...), read straight from its key-value header, which comes
    first in the file: milliseconds, where ``gguf.GGUFReader`` indexes every tensor and transformers'
    ``AutoConfig`` also converts the tokenizer's vocabulary (seconds for SmolLM2). Reading stops once every key
    is found; keys the file lacks are left out, and a file that is not GGUF (v2 or later) gives ``{}``."""
    import struct

    found: dict[str, Any] = {}
    with open(file, "rb") as f:
        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string():
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:                                 # array: element type, count, elements
                sub, n = read("I"), read("Q")
                if sub in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[sub]), 1)
                else:
                    for _ in range(n):
                        value(sub)
                return None
            return read(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF" or read("I") < 2:
            return found
        read("Q")                                         # tensor count
        arch = None
        for _ in range(read("Q")):                        # key-value pairs
            key = string()
            v = value(read("I"))
            if key == "general.architecture":
                arch = v
            elif arch is not None and key.startswith(arch + ".") and key[len(arch) + 1:] in keys:
                found[key[len(arch) + 1:]] = v
                if len(found) == len(set(keys)):
                    break
    return found


#: load_gguf_checkpoint(file, return_tensors=False) results (config, tokenizer and their settings; no
#: tensors, a few MB), by (real path, size, mtime_ns): reused by every later parse_once block of the process
_METADATA: OrderedDict[tuple, dict] = OrderedDict()
_METADATA_FILES = 4
_lock = threading.RLock()
_depth = 0


def _file_key(path) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _patches() -> list[tuple[Any, str, Any]]:
    """(module, attribute, replacement) for one parse_once block; [] where the internals differ."""
    try:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:
        return []
    if not (isinstance(getattr(gguf, "GGUFReader", None), type) and callable(getattr(gguf, "get_tensor_name_map", None))
            and callable(getattr(hf_gguf, "load_gguf_checkpoint", None))):
        return []
    base_reader, base_name_map, base_load = gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint
    readers: dict[str, Any] = {}
    name_maps: dict[tuple, Any] = {}

    class SharedReader(base_reader):
        """A read-only reader made once per file within the block (it only memory-maps the file)."""

        def __new__(cls, path, mode="r", *args, **kwargs):
            if mode == "r" and os.path.realpath(path) in readers:
                return readers[os.path.realpath(path)]
            return super().__new__(cls)

        def __init__(self, path, mode="r", *args, **kwargs):
            if mode == "r" and readers.get(os.path.realpath(path)) is self:
                return
            super().__init__(path, mode, *args, **kwargs)
            if mode == "r":
                readers[os.path.realpath(path)] = self

    def tensor_name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = base_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    def load_gguf_checkpoint(path, return_tensors=False, model_to_load=None, torch_dtype=None):
        if return_tensors or model_to_load is not None or torch_dtype is not None:
            return base_load(path, return_tensors, model_to_load, torch_dtype)
        key = _file_key(path)
        if key not in _METADATA:
            _METADATA[key] = base_load(path, return_tensors=False)
            while len(_METADATA) > _METADATA_FILES:
                _METADATA.popitem(last=False)
        _METADATA.move_to_end(key)
        return copy.deepcopy(_METADATA[key])   # callers edit the dicts they get

    return [(gguf, "GGUFReader", SharedReader), (gguf, "get_tensor_name_map", tensor_name_map),
            (hf_gguf, "load_gguf_checkpoint", load_gguf_checkpoint)]


@contextlib.contextmanager
def parse_once() -> Iterator[None]:
    """Within the block, transformers' GGUF loading reads each file once: one ``GGUFReader`` per file, one
    name map per architecture, and the metadata conversion (config + tokenizer fields) once per file and
    process. The same objects are built from the same data; only repeats are skipped (SmolLM2's 30-layer
    encoder on 2 cores: ~30 s -> ~14 s, and ~8 s for a later load in the same process). Blocks nest and are
    serialised by a lock; outside them nothing is changed. Where the installed transformers or gguf lack
    these internals, the block changes nothing."""
    global _depth
    with _lock:
        patches = [] if _depth else _patches()
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
        for mod, name, new in patches:
            setattr(mod, name, new)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            for mod, name, old in saved:
                setattr(mod, name, old)
