"""Language-modelling corpora: the embedded standard-library corpus, text files and FASTA files.

A :class:`Corpus` is two flat token streams (train and validation, ``torch.uint8``) plus the
:class:`Tokenizer` that made them.  Splits are deterministic and made by *document* (a file, or a
FASTA record): a document goes to validation when the first 8 bytes of the sha256 of its name, read
as an integer, fall in the lowest ``val_percent`` percent.  Documents are joined with a separator
(``"\\n\\n"`` for text, ``<eos>``/``<bos>`` markers for proteins).

Sources (:func:`load_corpus`):

* ``None``: the running interpreter's standard library ``.py`` sources (``sysconfig.get_paths()
  ["stdlib"]``), minus installed packages, tests, IDLE, lib2to3 and the generated codec tables;
  about 8 MB of real Python.  Bytes, vocabulary 256.
* a text file or a folder of text files (recursively, hidden files skipped): UTF-8 bytes,
  vocabulary 256.  A folder is split by file; a single file (or a folder whose files all land in
  one split) is split by position, the last ``val_percent`` percent going to validation.
* a FASTA file (extension ``.fa``, ``.fasta`` or ``.faa``, or first character ``>``), or a folder
  of them: one protein per record, tokens ``<pad> <bos> <eos>`` and the 25 letters of
  :data:`AMINO_ACIDS`; lower case is read as upper case and one trailing ``*`` (stop) is dropped.

Batches (:func:`get_batch`) are random windows whose positions depend only on ``(seed, step)``, so
the data order needs no state beyond the step counter, which is what makes resuming exact.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "AMINO_ACIDS",
    "FASTA_EXTENSIONS",
    "ByteTokenizer",
    "Corpus",
    "ProteinTokenizer",
    "Tokenizer",
    "batch_generator",
    "eval_windows",
    "get_batch",
    "load_corpus",
    "stdlib_corpus",
    "tokenizer_from_name",
]

#: The 20 standard residues, then X (unknown), B (D/N), Z (E/Q), U (selenocysteine), O (pyrrolysine).
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWYXBZUO"
FASTA_EXTENSIONS = (".fa", ".fasta", ".faa")
DEFAULT_VAL_PERCENT = 5.0

# Directories of the standard library that are not "the library": installed packages, test suites,
# the IDLE GUI, the deprecated lib2to3, bundled wheels, generated codec tables and help text.
_STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
    "ensurepip", "__pycache__", "encodings", "pydoc_data",
})


class Tokenizer:
    """Maps text to token ids and back.  Subclasses set ``name``, ``vocab_size`` and ``unit``
    (what one token is, for reporting: bits per ``unit``)."""

    name: str
    vocab_size: int
    unit: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_stream(self) -> "StreamDecoder":
        """A decoder fed one token at a time (``feed(token) -> str``), for streaming output."""
        raise NotImplementedError

    def decode(self, tokens: Iterable[int]) -> str:
        dec = self.decode_stream()
        return "".join(dec.feed(int(t)) for t in tokens) + dec.flush()


class StreamDecoder:
    def feed(self, token: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self) -> str:
        return ""


class _Utf8StreamDecoder(StreamDecoder):
    """Bytes -> text across token boundaries: a multi-byte character is printed when complete."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._dec.decode(bytes((token,)))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, vocabulary 256."""

    name = "bytes"
    vocab_size = 256
    unit = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_stream(self) -> StreamDecoder:
        return _Utf8StreamDecoder()


class _ProteinStreamDecoder(StreamDecoder):
    def __init__(self, tok: "ProteinTokenizer") -> None:
        self._tok = tok

    def feed(self, token: int) -> str:
        if not 0 <= token < self._tok.vocab_size:
            raise ValueError(f"token id {token} is outside the protein vocabulary [0, {self._tok.vocab_size})")
        if token == self._tok.eos:
            return "\n"
        if token < len(self._tok.SPECIALS):
            return ""
        return self._tok.itos[token]


class ProteinTokenizer(Tokenizer):
    """``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the residues of :data:`AMINO_ACIDS`."""

    name = "protein"
    unit = "token"
    SPECIALS = ("<pad>", "<bos>", "<eos>")
    pad, bos, eos = 0, 1, 2

    def __init__(self) -> None:
        self.itos = list(self.SPECIALS) + list(AMINO_ACIDS)
        self.stoi = {c: i for i, c in enumerate(self.itos) if len(c) == 1}
        self.vocab_size = len(self.itos)

    def encode_sequence(self, seq: str, *, record: str = "<prompt>") -> list[int]:
        """Residues (upper or lower case, whitespace ignored) -> ids, without markers.  Raises
        ValueError naming ``record`` and the first character that is not a residue."""
        out = []
        for pos, ch in enumerate(seq):
            if ch.isspace():
                continue
            i = self.stoi.get(ch.upper())
            if i is None:
                raise ValueError(
                    f"invalid residue {ch!r} at position {pos + 1} of FASTA record {record!r}; "
                    f"expected one of {AMINO_ACIDS}"
                )
            out.append(i)
        return out

    def encode(self, text: str) -> list[int]:
        """A prompt: ``<bos>`` followed by its residues."""
        return [self.bos] + self.encode_sequence(text)

    def decode_stream(self) -> StreamDecoder:
        return _ProteinStreamDecoder(self)


def tokenizer_from_name(name: str) -> Tokenizer:
    """``"bytes"`` -> :class:`ByteTokenizer`, ``"protein"`` -> :class:`ProteinTokenizer`."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "protein":
        return ProteinTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; expected 'bytes' or 'protein'")


@dataclass(frozen=True)
class Corpus:
    """Train and validation token streams.

    Attributes:
        source: ``"stdlib"`` or the resolved path that was read.
        tokenizer: how the streams were made (and how to decode samples).
        train, val: (N_train,), (N_val,) ``torch.uint8`` token ids.
        documents: (train, val) number of documents (files or FASTA records).
        split: ``"by-document"`` or ``"by-position"``.
    """

    source: str
    tokenizer: Tokenizer
    train: torch.Tensor
    val: torch.Tensor
    documents: tuple[int, int]
    split: str

    def fingerprint(self) -> str:
        """sha256 over both streams: a checkpoint stores it so that a resume on changed data fails."""
        h = hashlib.sha256()
        h.update(self.tokenizer.name.encode())
        for t in (self.train, self.val):
            h.update(len(t).to_bytes(8, "little"))
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.train):,} train / {len(self.val):,} val {self.tokenizer.unit}s "
            f"({self.documents[0]} / {self.documents[1]} documents, split {self.split})"
        )


def _in_val(name: str, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h < val_percent / 100.0 * 2**64


def _to_tensor(chunks: Sequence[bytes | list[int]]) -> torch.Tensor:
    buf = bytearray()
    for c in chunks:
        buf += bytes(c)
    if not buf:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def _split(
    docs: list[tuple[str, bytes | list[int]]], sep: bytes | list[int], val_percent: float
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], str]:
    """docs: (name, tokens) in a fixed order -> (train, val, (n_train, n_val), split kind)."""
    train = [d for d in docs if not _in_val(d[0], val_percent)]
    val = [d for d in docs if _in_val(d[0], val_percent)]

    def join(ds):
        out: list = []
        for i, (_, toks) in enumerate(ds):
            if i:
                out.append(sep)
            out.append(toks)
        return out

    if train and val:
        return _to_tensor(join(train)), _to_tensor(join(val)), (len(train), len(val)), "by-document"
    whole = _to_tensor(join(docs))
    cut = len(whole) - max(1, int(len(whole) * val_percent / 100.0))
    return whole[:cut].clone(), whole[cut:].clone(), (len(docs), 0), "by-position"


def _read_text(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"data file {str(path)!r} is empty")
    if b"\x00" in data:
        raise ValueError(f"data file {str(path)!r} looks binary (contains NUL bytes); expected text or FASTA")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text (byte {exc.start}); expected text or FASTA"
        ) from None
    return data


def _is_fasta(path: Path, data: bytes) -> bool:
    return path.suffix.lower() in FASTA_EXTENSIONS or data.lstrip()[:1] == b">"


def _fasta_records(path: Path, text: str, tok: ProteinTokenizer) -> list[tuple[str, list[int]]]:
    """``<bos> residues <eos>`` per record; the record name is the header line without '>'."""
    records: list[tuple[str, list[int]]] = []
    header: str | None = None
    seq: list[str] = []

    def close() -> None:
        if header is None:
            return
        s = "".join(seq)
        if s.endswith("*"):
            s = s[:-1]
        ids = tok.encode_sequence(s, record=header)
        if not ids:
            raise ValueError(f"FASTA record {header!r} in {str(path)!r} has no residues")
        records.append((f"{path.name}:{header}", [tok.bos] + ids + [tok.eos]))

    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            close()
            header, seq = line[1:].strip() or f"line {lineno}", []
        elif header is None:
            raise ValueError(f"FASTA file {str(path)!r} has residues before the first '>' header (line {lineno})")
        else:
            seq.append(line)
    close()
    if not records:
        raise ValueError(f"FASTA file {str(path)!r} has no records")
    return records


def _data_files(root: Path) -> list[Path]:
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"data folder {str(root)!r} contains no files")
    return files


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``.py`` files of the standard library at ``root`` (default: the running interpreter's),
    sorted by relative path, without the directories in ``_STDLIB_SKIP_DIRS``."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                out.append(Path(dirpath) / f)
    return sorted(out, key=lambda p: p.relative_to(base).as_posix())


def stdlib_corpus(*, val_percent: float = DEFAULT_VAL_PERCENT, root: str | os.PathLike | None = None) -> Corpus:
    """The embedded default corpus: standard-library sources, split by file (hash of relative path)."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_files(base)
    if not files:
        raise FileNotFoundError(f"no standard-library .py sources found under {str(base)!r}")
    docs = [(p.relative_to(base).as_posix(), p.read_bytes()) for p in files]
    train, val, n, split = _split(docs, b"\n\n", val_percent)
    return Corpus("stdlib", ByteTokenizer(), train, val, n, split)


def load_corpus(path: str | os.PathLike | None = None, *, val_percent: float = DEFAULT_VAL_PERCENT) -> Corpus:
    """``None`` -> :func:`stdlib_corpus`; a text file, a folder of text files, a FASTA file or a
    folder of FASTA files -> their corpus (see the module docstring).  Raises FileNotFoundError for
    a missing path and ValueError (naming the file) for empty, binary or malformed data."""
    if isinstance(val_percent, bool) or not isinstance(val_percent, (int, float)) or not 0 < val_percent < 100:
        raise ValueError(f"val_percent must be a number in (0, 100), got {val_percent!r}")
    if path is None:
        return stdlib_corpus(val_percent=val_percent)
    if not str(path).strip():
        raise ValueError("data path is empty; give a file or folder, or leave it out for the embedded corpus")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    files = _data_files(p) if p.is_dir() else [p]
    raw = [(f, _read_text(f)) for f in files]
    fasta = [_is_fasta(f, d) for f, d in raw]
    if any(fasta) and not all(fasta):
        first_text = next(f for (f, _), is_f in zip(raw, fasta) if not is_f)
        raise ValueError(
            f"data folder {str(p)!r} mixes FASTA and plain-text files (e.g. {str(first_text)!r}); use one kind"
        )
    base = p if p.is_dir() else p.parent
    if fasta[0]:
        tok = ProteinTokenizer()
        docs: list = []
        for f, d in raw:
            docs.extend(_fasta_records(f, d.decode("utf-8"), tok))
        # Records are already wrapped in <bos> ... <eos>: join them directly.
        train, val, n, split = _split(docs, [], val_percent)
        return Corpus(str(p), tok, train, val, n, split)
    docs = [(f.relative_to(base).as_posix(), d) for f, d in raw]
    train, val, n, split = _split(docs, b"\n\n", val_percent)
    return Corpus(str(p), ByteTokenizer(), train, val, n, split)


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed that is a function of (seed, step, stream name) only (sha256), for the random
    draws of one training step: its batch (``"train"``), each rank's dropout (``"dropout:RANK"``)."""
    digest = hashlib.sha256(f"favor-data:{stream}:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator that draws the batch of ``step``: a function of (seed, step) only."""
    return torch.Generator().manual_seed(step_seed(seed, step, "train"))


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.unsqueeze(1) + torch.arange(seq_len + 1).unsqueeze(0)  # (B, L+1)
    w = tokens[idx].long()
    return w[:, :-1], w[:, 1:]


def _check_length(tokens: torch.Tensor, seq_len: int, what: str) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"the {what} tokens must be a 1-D tensor (a token stream), got {shape}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the {what} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use more data or a shorter --seq-len"
        )


def get_batch(
    tokens: torch.Tensor,
    step: int,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of ``step``: ``batch_size`` windows at uniformly random positions drawn
    from :func:`batch_generator` ``(seed, step)``.

    ``batch_size`` is the *global* batch: with ``world_size`` > 1 it must be divisible by it and
    rank r gets rows ``[r·b, (r+1)·b)`` with b = batch_size / world_size, so that the union over
    ranks is the same batch whatever the number of processes.

    Returns:
        inputs, targets: (b, seq_len) long, targets shifted by one.
    """
    _check_length(tokens, seq_len, "training")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or world_size < 1 \
            or batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    g = batch_generator(seed, step)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)  # (B,)
    b = batch_size // world_size
    return _windows(tokens, starts[rank * b:(rank + 1) * b], seq_len)


def eval_windows(tokens: torch.Tensor, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` validation windows at evenly spaced positions across ``tokens`` (no randomness, so
    every evaluation of every run sees the same text).  Returns (n, seq_len) inputs and targets."""
    _check_length(tokens, seq_len, "validation")
    if n < 1:
        raise ValueError(f"need at least one evaluation window, got n={n}")
    starts = torch.linspace(0, len(tokens) - seq_len - 1, n).round().long()  # (n,)
    return _windows(tokens, starts, seq_len)
