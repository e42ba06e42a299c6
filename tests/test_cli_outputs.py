"""What the commands write and print: the path printed is the file written, results are never
overwritten, output paths are checked before the work, and ``favor approx --model`` reads a protein
model's FASTA as training does.  Runs in-process through ``favor.cli.main`` on tiny inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from favor.cli import main
from favor.plotting import pyplot, save_figure

TINY_TRAIN = ["--batch-size", "2", "--seq-len", "16", "--d-model", "8", "--n-heads", "2", "--n-layers", "1",
              "--mlp-ratio", "2", "--nb-features", "4", "--eval-batches", "1", "--warmup-steps", "1",
              "--threads", "1", "--no-progress"]
FASTA = "".join(f">sp|Q{i}|P{i}\n" + "MKTAYIAKQRQISFVKSHFSRQ"[i % 5:] * 3 + "\n" for i in range(40))
QUICK_APPROX = ["approx", "--quick", "--seeds", "1", "--budgets", "4", "--projections", "iid", "--no-progress"]


def _listops_run(folder: Path) -> Path:
    """A finished ``favor lra listops`` run as far as ``favor lra plot`` reads it (metrics.json)."""
    folder.mkdir()
    history = [{"step": s, "val_accuracy": a} for s, a in ((1, 0.2), (2, 0.3))]
    (folder / "metrics.json").write_text(json.dumps({
        "config": {"model": {"attention": "favor", "features": None}},
        "result": {"history": history, "test_accuracy": 0.25, "majority_accuracy": 0.17},
    }))
    return folder


def _lm_run(folder: Path, curve: list[tuple[int, float]]) -> Path:
    """A ``favor train`` run folder as far as ``favor compat --lm-runs`` reads it (metrics.jsonl)."""
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_bits": b}) + "\n" for s, b in curve))
    return folder


def test_save_figure_adds_the_suffix_matplotlib_adds_and_returns_the_real_path(tmp_path):
    plt = pyplot()
    assert save_figure(plt.figure(), tmp_path / "a" / "plots") == tmp_path / "a" / "plots.png"
    assert (tmp_path / "a" / "plots.png").stat().st_size > 0 and not (tmp_path / "a" / "plots").exists()
    assert save_figure(plt.figure(), tmp_path / "b.svg") == tmp_path / "b.svg"


def test_lra_plot_prints_the_file_it_wrote(tmp_path, capsys):
    run = _listops_run(tmp_path / "run")
    assert main(["lra", "plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "plots.png") and Path(printed).stat().st_size > 1000


def test_compat_lm_runs_refuses_to_overwrite_and_prints_the_real_plot(tmp_path, capsys):
    runs = [str(_lm_run(tmp_path / "base", [(0, 8.0), (10, 4.0)])), str(_lm_run(tmp_path / "cont", [(0, 4.5)]))]
    out = tmp_path / "out"
    assert main(["compat", "--lm-runs", *runs, "--out", str(out), "--plot", str(out / "plot")]) == 0
    assert f"wrote {out / 'transfer.json'} and {out / 'plot.png'}" in capsys.readouterr().out
    written = (out / "transfer.json").read_text()
    assert main(["compat", "--lm-runs", *runs, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"favor compat: error: {out / 'transfer.json'} already exists; choose another --out "
                   "(results are never overwritten)")
    assert (out / "transfer.json").read_text() == written


@pytest.mark.parametrize("option, make, fragment", [
    ("--json", lambda p: p.mkdir(), "is a folder"),
    ("--plot-dir", lambda p: p.write_text("x"), "is a file"),
], ids=["json-is-a-folder", "plot-dir-is-a-file"])
def test_approx_checks_output_paths_before_the_sweep(tmp_path, capsys, monkeypatch, option, make, fragment):
    import favor.approx

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep ran before the output paths were checked")

    monkeypatch.setattr(favor.approx, "run_sweep", no_sweep)
    make(tmp_path / "out")
    assert main([*QUICK_APPROX, option, str(tmp_path / "out")]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("argv, folder, message", [
    (["approx", "--quick", "--json", "{f}/r.json"], "cannot create folder {f}", "a file of that name exists"),
    (["train", "--steps", "1", "--out", "{f}/run"], "--out: cannot create folder {f}/run", "{f} is a file, not a folder"),
], ids=["approx-json-parent-is-a-file", "train-out-below-a-file"])
def test_a_path_through_a_file_names_the_file(tmp_path, capsys, argv, folder, message):
    """Not the OS's bare \"File exists\"; and train says so before loading any data."""
    blocking = tmp_path / "plain-file"
    blocking.write_text("x")
    fill = lambda text: text.format(f=blocking)  # noqa: E731
    assert main([fill(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"favor {argv[0]}: error: {fill(folder)}: {fill(message)}"


def test_a_read_through_a_file_is_not_called_a_folder_creation(tmp_path):
    """"Not a directory" also comes from reads (e.g. --text plain-file/input.txt): the message
    names the file in the way without claiming a folder was being created."""
    from favor.cli import _describe

    blocking = tmp_path / "plain-file"
    blocking.write_text("x")
    exc = NotADirectoryError(20, "Not a directory", str(blocking / "input.txt"))
    assert _describe(exc) == f"{blocking / 'input.txt'}: {blocking} is a file, not a folder"
    assert _describe(FileNotFoundError(2, "No such file", "nope")) == "[Errno 2] No such file: 'nope'"


def test_approx_creates_output_folders_before_the_sweep(tmp_path, monkeypatch):
    import favor.approx

    seen = {}

    def sweep(*args, **kwargs):
        seen["folders"] = [(tmp_path / "j").is_dir(), (tmp_path / "p").is_dir()]
        raise ValueError("stop here")

    monkeypatch.setattr(favor.approx, "run_sweep", sweep)
    assert main([*QUICK_APPROX, "--json", str(tmp_path / "j" / "r.json"), "--plot-dir", str(tmp_path / "p")]) == 2
    assert seen["folders"] == [True, True]


def test_approx_model_reads_a_protein_models_fasta(tmp_path, capsys):
    data = tmp_path / "prot.fasta"
    data.write_text(FASTA)
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--data", str(data), "--out", str(run), "--steps", "1",
                 "--eval-every", "1"]) == 0
    capsys.readouterr()
    assert main([*QUICK_APPROX, "--length", "48", "--model", str(run), "--text", str(data),
                 "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "L=48 tokens, head dim 4, causal" in captured.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["config"]["length"] == 48 and result["config"]["causal"] is True
    assert result["model"] == {"checkpoint": str(run)}
    from favor.approx import setting_label

    assert setting_label(result) == "L=48, d=4, q, k, v of run, 1 seeds, causal"  # not "normal σ=0.5"


def test_approx_model_refuses_a_relu_kernel_checkpoint(tmp_path, capsys):
    """A relu model computes no softmax estimate: measuring one against exact softmax means nothing."""
    run = tmp_path / "relu"
    assert main(["train", *TINY_TRAIN, "--out", str(run), "--steps", "1", "--eval-every", "1",
                 "--kernel", "relu"]) == 0
    capsys.readouterr()
    assert main([*QUICK_APPROX, "--length", "32", "--model", str(run)]) == 2
    assert "uses the 'relu' kernel, not a softmax estimate" in capsys.readouterr().err
