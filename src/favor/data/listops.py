"""ListOps (Long Range Arena): nested list expressions whose value is one digit.

An expression is a digit 0–9 or an operator applied to 2..``max_args`` sub-expressions::

    [MAX 2 9 [MIN 4 7 ] 0 ]      ->  9

Operators: ``[MAX`` and ``[MIN``; ``[MED`` the median (the lower-rounded mean of the two middle
values for an even count, i.e. ``int(np.median(...))`` as in LRA); ``[SM`` the sum modulo 10.
The label is the value (10 classes).

The generator follows the published LRA description (Tay et al., 2021, §3.1, and their generator
``lra_benchmarks/data/listops.py``): the root is at depth 1; a node below ``max_depth`` is an
operator with probability 1/4 (else a uniform digit); an operator draws its argument count
uniformly from 2..``max_args``, its arguments recursively, then its operator uniformly.  Length
counts tokens (a digit is 1, an operator node is 2 plus its arguments: its ``[OP`` and its
``]``); only expressions with ``min_length < length < max_length`` (strict, as in LRA) are kept,
duplicates are dropped, and the first ``train`` unique ones form the training split, then
validation, then test.  Defaults are LRA's: depth 10, 10 arguments, 500 < length < 2000,
96,000 / 2,000 / 2,000.

Depth (:func:`expression_depth`) counts levels with a digit at depth 1 (the LRA convention), so
``max_depth=10`` allows at most 9 nested operators.

Token ids: see :data:`VOCAB` (``<pad>`` = 0, ``<cls>`` = 1, digits, operators, ``]``).
"""

from __future__ import annotations

import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "CLS_ID",
    "END",
    "LRA_SPLITS",
    "OPERATORS",
    "PAD_ID",
    "VOCAB",
    "ListOpsSplit",
    "decode",
    "encode",
    "evaluate",
    "expression_depth",
    "generate_expression",
    "generate_splits",
    "iter_expressions",
    "load_splits",
    "save_splits",
]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(v) for v in range(10))
VOCAB = ("<pad>", "<cls>") + DIGITS + OPERATORS + (END,)
PAD_ID = 0
CLS_ID = 1
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
LRA_SPLITS = {"train": 96_000, "val": 2_000, "test": 2_000}

_OPERATOR_P = 0.25  # LRA's VALUE_P: a node is an operator when random() <= 0.25
# Consecutive duplicates among the length-accepted draws after which iter_expressions gives up
# (length rejections do not count).  The presets' expressions are hundreds of tokens long and
# practically never repeat, so they never come near it.
_MAX_FAILURES = 100_000


def _tokens(expr: str | Sequence[str]) -> list[str]:
    if isinstance(expr, str):
        return expr.split()
    return list(expr)


def evaluate(expr: str | Sequence[str]) -> int:
    """Value (0–9) of a ListOps expression given as a string or a token sequence.

    Raises ValueError naming the position of an unknown token, an operator with no arguments,
    an unbalanced ``]`` or trailing tokens.
    """
    tokens = _tokens(expr)
    if not tokens:
        raise ValueError("empty ListOps expression")
    stack: list[tuple[str, list[int]]] = []  # open operators and their evaluated arguments
    result: int | None = None
    for pos, tok in enumerate(tokens):
        if result is not None:
            raise ValueError(f"token {tok!r} at position {pos} after the end of the expression")
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == END:
            if not stack:
                raise ValueError(f"unbalanced ']' at position {pos}")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op} closed with no arguments at position {pos}")
            value = _apply(op, args)
        elif tok in DIGITS:
            value = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r} at position {pos}; expected a digit, one of "
                             f"{OPERATORS} or {END!r}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if stack:
        raise ValueError(f"{len(stack)} operator(s) not closed at the end of the expression")
    assert result is not None
    return result


def _apply(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[SM":
        return sum(args) % 10
    s = sorted(args)  # [MED: int(np.median(args)) for non-negative ints
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def expression_depth(expr: str | Sequence[str]) -> int:
    """Levels of nesting, a lone digit being depth 1 and ``[MAX 1 2 ]`` depth 2 (LRA's count)."""
    depth = deepest = 0
    for tok in _tokens(expr):
        if tok in OPERATORS:
            depth += 1
        elif tok == END:
            depth -= 1
        else:
            deepest = max(deepest, depth + 1)
    return deepest


def generate_expression(rng: random.Random, *, max_depth: int = 10, max_args: int = 10) -> list[str]:
    """One random expression (tokens), drawn as LRA's ``generate_tree`` draws it (no length filter)."""
    out: list[str] = []

    def node(depth: int) -> None:
        if depth >= max_depth or rng.random() > _OPERATOR_P:
            out.append(DIGITS[rng.randrange(10)])
            return
        slot = len(out)
        out.append("")  # the operator is drawn after its arguments, as in LRA
        for _ in range(rng.randint(2, max_args)):
            node(depth + 1)
        out[slot] = OPERATORS[rng.randrange(len(OPERATORS))]
        out.append(END)

    node(1)
    return out


def encode(tokens: Sequence[str]) -> list[int]:
    """Token strings -> ids in :data:`VOCAB` (no ``<cls>`` added)."""
    try:
        return [TOKEN_ID[t] for t in tokens]
    except KeyError as exc:
        raise ValueError(f"unknown ListOps token {exc.args[0]!r}") from None


def decode(ids: Sequence[int]) -> str:
    """Ids -> the expression string, dropping ``<pad>`` and ``<cls>``.

    Raises ValueError naming an id outside ``[0, len(VOCAB))`` (no negative indexing).
    """
    out = []
    for i in ids:
        if not 0 <= i < len(VOCAB):
            raise ValueError(f"unknown ListOps token id {int(i)}; ids lie in [0, {len(VOCAB)})")
        if i not in (PAD_ID, CLS_ID):
            out.append(VOCAB[i])
    return " ".join(out)


@dataclass
class ListOpsSplit:
    """Encoded examples stored flat: example i is ``tokens[offsets[i]:offsets[i+1]]``.

    tokens: (sum of lengths,) uint8 token ids; offsets: (N+1,) int64; labels: (N,) int64.
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.offsets.shape != (n + 1,):
            raise ValueError(f"offsets must have shape ({n + 1},) for {n} labels, got {tuple(self.offsets.shape)}")
        if int(self.offsets[-1]) != self.tokens.shape[0]:
            raise ValueError(f"offsets end at {int(self.offsets[-1])} but there are {self.tokens.shape[0]} tokens")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64 token counts."""
        return self.offsets[1:] - self.offsets[:-1]

    def example(self, i: int) -> tuple[list[str], int]:
        """Tokens and label of example ``i``."""
        ids = self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist()
        return [VOCAB[t] for t in ids], int(self.labels[i])

    def batch(self, indices: Sequence[int] | torch.Tensor, *, cls: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pad the examples ``indices`` to their longest (plus a leading ``<cls>`` when ``cls``).

        Returns ids (B, L) int64, key_padding_mask (B, L) bool (True = real token), labels (B,).
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(f"batch needs a non-empty 1-D list of example indices, got shape {tuple(idx.shape)}")
        if int(idx.min()) < 0 or int(idx.max()) >= len(self):
            raise ValueError(f"example indices must lie in [0, {len(self)}), got {idx.tolist()[:8]}")
        lens = self.lengths[idx] + int(cls)
        L = int(lens.max())
        ids = torch.full((len(idx), L), PAD_ID, dtype=torch.long)
        for row, i in enumerate(idx.tolist()):
            seq = self.tokens[self.offsets[i]:self.offsets[i + 1]]
            if cls:
                ids[row, 0] = CLS_ID
            ids[row, int(cls):int(cls) + seq.shape[0]] = seq
        mask = torch.arange(L).unsqueeze(0) < lens.unsqueeze(1)  # (B, L)
        return ids, mask, self.labels[idx]

    @classmethod
    def from_expressions(cls, expressions: Sequence[Sequence[str]]) -> "ListOpsSplit":
        lens = [len(e) for e in expressions]
        offsets = torch.zeros(len(expressions) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lens, dtype=torch.long).cumsum(0) if lens else offsets[1:]
        flat = [TOKEN_ID[t] for e in expressions for t in e]
        tokens = torch.tensor(flat, dtype=torch.uint8)
        labels = torch.tensor([evaluate(e) for e in expressions], dtype=torch.long)
        return cls(tokens, offsets, labels)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class _ExhaustedError(ValueError):
    """:func:`iter_expressions` drew ``max_failures`` consecutive length-accepted duplicates."""


def iter_expressions(seed: int, *, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
                     max_args: int = 10, max_failures: int = _MAX_FAILURES) -> Iterator[list[str]]:
    """Endless stream of unique expressions with ``min_length < len < max_length`` (LRA's filter).

    Raises ValueError naming the constraints when ``max_failures`` consecutive draws that pass the
    length filter are all duplicates: the constraints then (almost surely) allow no more unique
    expressions, e.g. only the 10 digits for ``0 < len < 2``.  Draws rejected by the length filter
    do not count, so a narrow but feasible window is slow, never an error.
    """
    _check_int("min_length", min_length, 0)
    _check_int("max_length", max_length, min_length + 2)
    _check_int("max_depth", max_depth, 2)
    _check_int("max_args", max_args, 2)
    _check_int("max_failures", max_failures, 1)
    # Longest possible expression: a full tree of max_args-ary operators down to max_depth.
    longest = 1
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest
    if longest <= min_length:
        raise ValueError(f"max_depth={max_depth}, max_args={max_args} allow at most {longest} tokens, "
                         f"not more than min_length={min_length}")
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    failures = 0  # consecutive length-accepted draws that were already seen
    while True:
        expr = generate_expression(rng, max_depth=max_depth, max_args=max_args)
        if not min_length < len(expr) < max_length:
            continue
        key = tuple(expr)
        if key not in seen:
            seen.add(key)
            failures = 0
            yield expr
            continue
        failures += 1
        if failures >= max_failures:
            raise _ExhaustedError(
                f"no new ListOps expression with {min_length} < length < {max_length} (max_depth={max_depth}, "
                f"max_args={max_args}) in {max_failures:,} consecutive accepted draws after {len(seen):,} unique ones; "
                "these constraints allow (almost) no more: widen min_length/max_length or raise "
                "max_depth/max_args")


def generate_splits(
    sizes: dict[str, int] | None = None,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    progress: bool | None = False,
) -> dict[str, ListOpsSplit]:
    """Generate the splits (default LRA's train/val/test = 96,000/2,000/2,000) from ``seed``.

    Unique expressions are drawn in order and cut into the splits in the order of ``sizes``, so no
    expression appears twice, and the same seed and arguments always give the same data.
    ``progress``: show a progress bar (None: only on a terminal).
    """
    sizes = dict(LRA_SPLITS if sizes is None else sizes)
    for name, n in sizes.items():
        _check_int(f"size of split {name!r}", n, 0)
    stream = iter_expressions(seed, min_length=min_length, max_length=max_length, max_depth=max_depth,
                              max_args=max_args)
    total = sum(sizes.values())
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="ListOps", unit="expr", disable=None if progress is None else not progress) as bar:
        out = {}
        for name, n in sizes.items():
            exprs = []
            for _ in range(n):
                try:
                    exprs.append(next(stream))
                except _ExhaustedError as exc:
                    raise ValueError(f"cannot generate ListOps splits of sizes {sizes} ({total:,} unique "
                                     f"expressions): {exc}") from None
                bar.update(1)
            out[name] = ListOpsSplit.from_expressions(exprs)
    return out


def save_splits(splits: dict[str, ListOpsSplit], path: str | Path) -> None:
    """Write splits to one ``.npz`` file (``<name>_tokens``, ``<name>_offsets``, ``<name>_labels``)."""
    arrays = {}
    for name, s in splits.items():
        arrays[f"{name}_tokens"] = s.tokens.numpy()
        arrays[f"{name}_offsets"] = s.offsets.numpy()
        arrays[f"{name}_labels"] = s.labels.numpy()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_splits(path: str | Path) -> dict[str, ListOpsSplit]:
    """Read splits written by :func:`save_splits`.  A file that is not such an ``.npz`` raises
    ValueError naming it (delete it and the splits are generated again)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = sorted({k.rsplit("_", 1)[0] for k in z.files})
            return {
                n: ListOpsSplit(torch.from_numpy(z[f"{n}_tokens"]), torch.from_numpy(z[f"{n}_offsets"]),
                                torch.from_numpy(z[f"{n}_labels"]))
                for n in names
            }
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, AttributeError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{str(path)!r} is not a ListOps splits file written by save_splits "
                         f"(delete it to regenerate): {exc}") from None
