"""favor.data.corpus: stdlib/text/FASTA corpora, deterministic splits and batches."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from favor.data.corpus import (
    AMINO_ACIDS,
    ByteTokenizer,
    ProteinTokenizer,
    eval_windows,
    get_batch,
    load_corpus,
    stdlib_corpus,
    stdlib_files,
    tokenizer_from_name,
)


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- stdlib corpus

def test_stdlib_files_skip_packages_tests_and_generated_tables(tmp_path):
    root = tmp_path / "lib"
    for rel in ("os.py", "json/decoder.py", "site-packages/numpy/core.py", "test/test_os.py",
                "idlelib/editor.py", "encodings/cp1252.py", "_sysconfigdata__linux.py", "json/tests/t.py",
                "notes.txt"):
        _write(root / rel, "x = 1\n")
    names = [p.relative_to(root).as_posix() for p in stdlib_files(root)]
    assert names == ["json/decoder.py", "os.py"]


def test_stdlib_corpus_split_is_by_file_and_deterministic(tmp_path):
    root = tmp_path / "lib"
    for i in range(60):
        _write(root / f"mod{i:02d}.py", f"# module {i}\n" + "def f():\n    return %d\n" % i)
    a = stdlib_corpus(root=root, val_percent=20)
    b = stdlib_corpus(root=root, val_percent=20)
    assert a.split == "by-document"
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert sum(a.documents) == 60 and 0 < a.documents[1] < 60
    # Every file is whole in exactly one split.
    train_text, val_text = bytes(a.train.tolist()).decode(), bytes(a.val.tolist()).decode()
    for i in range(60):
        marker = f"# module {i}\n"
        assert (marker in train_text) != (marker in val_text), i
    assert a.fingerprint() == b.fingerprint()


def test_real_stdlib_corpus_is_megabytes_of_python():
    c = load_corpus()
    assert c.source == "stdlib" and c.tokenizer.name == "bytes" and c.split == "by-document"
    assert len(c.train) > 2_000_000 and len(c.val) > 50_000
    assert b"def " in bytes(c.val[:20000].tolist())
    assert all("site-packages" not in p.as_posix() for p in stdlib_files())
    assert Path(sysconfig.get_paths()["stdlib"]).is_dir()


# ----------------------------------------------------------------------------- text files

def test_single_text_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    c = load_corpus(_write(tmp_path / "a.txt", text), val_percent=10)
    assert c.split == "by-position" and c.tokenizer.vocab_size == 256
    assert bytes(torch.cat([c.train, c.val]).tolist()).decode() == text
    assert len(c.val) == len(text) // 10


def test_folder_of_text_files_recurses_and_skips_hidden(tmp_path):
    for i in range(40):
        _write(tmp_path / "d" / f"sub{i % 3}" / f"f{i}.txt", f"file {i}\n")
    _write(tmp_path / "d" / ".git" / "HEAD", b"\x00binary")
    c = load_corpus(tmp_path / "d", val_percent=25)
    assert sum(c.documents) == 40
    assert c.split == "by-document"


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(b"", "is empty", id="empty"),
        pytest.param(b"   \n\n", "is empty", id="whitespace-only"),
        pytest.param(b"PK\x03\x04\x00\x00binary", "looks binary", id="nul-bytes"),
        pytest.param("caf\xe9".encode("latin-1"), "not UTF-8", id="latin-1"),
    ],
)
def test_bad_text_file_raises_naming_the_file(tmp_path, content, message):
    path = _write(tmp_path / "bad.txt", content)
    with pytest.raises(ValueError, match=message) as info:
        load_corpus(path)
    assert "bad.txt" in str(info.value)


def test_binary_file_in_folder_is_named(tmp_path):
    _write(tmp_path / "d" / "a.txt", "hello\n")
    _write(tmp_path / "d" / "img.png", b"\x89PNG\x00\x00")
    with pytest.raises(ValueError, match="img.png"):
        load_corpus(tmp_path / "d")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        load_corpus(tmp_path / "empty")


def test_utf8_stream_decoding_waits_for_whole_characters():
    tok = ByteTokenizer()
    ids = tok.encode("é€x")
    dec = tok.decode_stream()
    pieces = [dec.feed(t) for t in ids]
    assert pieces == ["", "é", "", "", "€", "x"]
    assert tok.decode(ids) == "é€x"


# ----------------------------------------------------------------------------- FASTA

FASTA = """>sp|P1|ONE some protein
MKTAYIAKQR
QISFVKSHFS*
>sp|P2|TWO
mkvlaag
;comment line
>sp|P3|THREE
ACDEFGHIKLMNPQRSTVWYXBZUO
"""


def test_fasta_records_become_bos_residues_eos(tmp_path):
    c = load_corpus(_write(tmp_path / "p.fasta", FASTA), val_percent=1)
    tok = c.tokenizer
    assert isinstance(tok, ProteinTokenizer) and tok.unit == "token"
    assert tok.vocab_size == 3 + len(AMINO_ACIDS) == 28
    stream = torch.cat([c.train, c.val]).tolist()
    assert stream.count(tok.bos) == 3 and stream.count(tok.eos) == 3
    text = tok.decode(stream)
    assert "MKTAYIAKQRQISFVKSHFS\n" in text  # lines joined, trailing '*' dropped
    assert "MKVLAAG\n" in text  # lower case read as upper case
    assert "ACDEFGHIKLMNPQRSTVWYXBZUO\n" in text


def test_fasta_detected_by_leading_header_without_extension(tmp_path):
    c = load_corpus(_write(tmp_path / "seqs.txt", FASTA))
    assert c.tokenizer.name == "protein"


@pytest.mark.parametrize(
    "body, message",
    [
        pytest.param(">rec1\nMKT\n>rec2\nMKJLA\n", r"invalid residue 'J' at position 3 of FASTA record 'rec2'",
                     id="invalid-residue"),
        pytest.param(">rec1\nMK-T\n", r"invalid residue '-'.*'rec1'", id="gap-character"),
        pytest.param("MKT\n>rec1\nMKT\n", "before the first '>' header", id="residues-before-header"),
        pytest.param(">rec1\n\n>rec2\nMK\n", "'rec1'.*has no residues", id="empty-record"),
    ],
)
def test_bad_fasta_raises_naming_record_and_character(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(_write(tmp_path / "bad.fa", body))


def test_folder_mixing_fasta_and_text_is_refused(tmp_path):
    _write(tmp_path / "d" / "a.fa", ">r\nMK\n")
    _write(tmp_path / "d" / "b.txt", "text\n")
    with pytest.raises(ValueError, match="mixes FASTA and plain-text"):
        load_corpus(tmp_path / "d")


def test_protein_prompt_encoding_and_tokenizer_names():
    tok = tokenizer_from_name("protein")
    assert tok.encode("mk") == [tok.bos, tok.stoi["M"], tok.stoi["K"]]
    assert isinstance(tokenizer_from_name("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer 'words'"):
        tokenizer_from_name("words")


# ----------------------------------------------------------------------------- batches

def test_batch_depends_on_seed_and_step_only():
    tokens = torch.arange(10_000, dtype=torch.int64).remainder(251).to(torch.uint8)
    x1, y1 = get_batch(tokens, 7, seed=3, batch_size=5, seq_len=33)
    x2, y2 = get_batch(tokens, 7, seed=3, batch_size=5, seq_len=33)
    x3, _ = get_batch(tokens, 8, seed=3, batch_size=5, seq_len=33)
    x4, _ = get_batch(tokens, 7, seed=4, batch_size=5, seq_len=33)
    assert x1.shape == y1.shape == (5, 33) and x1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one


def test_ranks_slice_the_same_global_batch():
    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    whole, _ = get_batch(tokens, 2, seed=0, batch_size=6, seq_len=17)
    parts = [get_batch(tokens, 2, seed=0, batch_size=6, seq_len=17, rank=r, world_size=3)[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="multiple of world_size=4"):
        get_batch(tokens, 0, seed=0, batch_size=6, seq_len=17, rank=0, world_size=4)


def test_eval_windows_are_fixed_and_cover_the_split():
    tokens = torch.arange(1000, dtype=torch.int64).remainder(256).to(torch.uint8)
    x, y = eval_windows(tokens, 4, 99)
    assert x.shape == (4, 99)
    assert x[0, 0] == 0 and y[-1, -1] == tokens[-1]
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 1 = 1001"):
        eval_windows(tokens, 1, 1000)
