"""favor.checkpoint: round trip, atomic replacement, checksums, weight loading across attention kinds."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

from favor.checkpoint import (
    PAUSE_ENV,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from favor.models import PerformerConfig, PerformerLM
from favor.training import TrainConfig, make_optimizer

CONFIG = {"model": {}, "tokenizer": "bytes", "train": {}, "data": {}}


def _tiny(attention: str = "favor", **kw) -> PerformerLM:
    torch.manual_seed(0)
    cfg = PerformerConfig(vocab_size=32, d_model=12, n_heads=2, n_layers=2, nb_features=6,
                          attention=attention, **kw)
    return PerformerLM(cfg)


def _step(model, optimizer, seed: int = 0) -> None:
    x = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(seed))
    loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _saved(tmp_path, step: int = 1, **kw):
    model = _tiny(**kw)
    opt = make_optimizer(model, TrainConfig())
    _step(model, opt)
    path = save_checkpoint(tmp_path / "run", step=step, model=model, optimizer=opt,
                           config={**CONFIG, "model": model.cfg.to_dict()}, state={"data_order": {"seed": 0}})
    return model, opt, path


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt, path = _saved(tmp_path, step=5)
    expected_rng = torch.get_rng_state()
    expected_py = random.random()
    random.seed(123)
    torch.manual_seed(99)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.path == path and ckpt.step == 5 and ckpt.state["data_order"] == {"seed": 0}
    assert ckpt.config["format"] == "favor-checkpoint" and ckpt.config["version"] == 1

    other = _tiny()
    other_opt = make_optimizer(other, TrainConfig())
    _step(other, other_opt, seed=1)
    load_weights(other, ckpt)
    other_opt.load_state_dict(ckpt.optimizer_state_dict())
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    # Same optimizer state: one more identical step gives identical weights.
    _step(model, opt, seed=2)
    _step(other, other_opt, seed=2)
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n
    restore_rng_state(ckpt)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    # expected_py was drawn after the save: restoring rewinds the python RNG to just before it.
    assert random.random() == expected_py


def test_latest_points_to_newest_and_old_ones_are_pruned(tmp_path):
    model = _tiny()
    paths = [save_checkpoint(tmp_path, step=s, model=model, optimizer=None, config=CONFIG, keep=2)
             for s in (10, 20, 30)]
    assert (tmp_path / "LATEST").read_text().strip() == "step-0000030"
    assert not paths[0].exists() and paths[1].exists() and paths[2].exists()
    assert find_checkpoint(tmp_path) == paths[2]
    # Saving the same step again never replaces the existing folder in place: the new one is
    # written beside it, and the old one removed only once the new one is complete.
    again = save_checkpoint(tmp_path, step=30, model=model, optimizer=None, config=CONFIG, keep=2)
    assert again.name == "step-0000030-1"
    assert find_checkpoint(tmp_path) == again
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-0000020", "step-0000030-1"]


def test_resuming_from_an_earlier_checkpoint_rewinds_the_run(tmp_path):
    """Saves at 2, 4, 6; then the run resumes from 4 and saves 5 and 6 again: the abandoned
    timeline's 6 goes at the first new save, and pruning keeps the current timeline's newest two
    (the former step-order pruning kept the old 6 and deleted the new 5)."""
    model = _tiny()
    for s in (2, 4, 6):
        save_checkpoint(tmp_path, step=s, model=model, optimizer=None, config=CONFIG, keep=2)
    save_checkpoint(tmp_path, step=5, model=model, optimizer=None, config=CONFIG, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-0000004", "step-0000005"]
    last = save_checkpoint(tmp_path, step=6, model=model, optimizer=None, config=CONFIG, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-0000005", last.name]
    assert find_checkpoint(tmp_path) == last


def test_stale_temporary_folder_of_a_dead_save_is_removed(tmp_path):
    model = _tiny()
    stale = tmp_path / ".tmp-step-0000005-999999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path, step=6, model=model, optimizer=None, config=CONFIG)
    assert not stale.exists()


def test_pause_hook_sleeps_inside_the_save(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setenv(PAUSE_ENV, "0.25")
    monkeypatch.setattr("favor.checkpoint.time.sleep", lambda s: slept.append(s))
    save_checkpoint(tmp_path, step=1, model=_tiny(), optimizer=None, config=CONFIG)
    assert slept == [0.25]


@pytest.mark.parametrize(
    "damage, message",
    [
        pytest.param("flip-weights", r"model.safetensors' is corrupt \(sha256", id="flipped-byte"),
        pytest.param("delete-optimizer", "incomplete: optimizer.safetensors is missing", id="missing-file"),
        pytest.param("delete-manifest", "not a checkpoint", id="missing-manifest"),
        pytest.param("garble-manifest", "cannot read checkpoint manifest", id="garbled-manifest"),
        pytest.param("latest-dangling", "names 'step-0000099'", id="dangling-latest"),
    ],
)
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, damage, message):
    _, _, path = _saved(tmp_path)
    if damage == "flip-weights":
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (path / "model.safetensors").write_bytes(bytes(data))
    elif damage == "delete-optimizer":
        (path / "optimizer.safetensors").unlink()
    elif damage == "delete-manifest":
        (path / "MANIFEST.json").unlink()
    elif damage == "garble-manifest":
        (path / "MANIFEST.json").write_text("{not json")
    elif damage == "latest-dangling":
        (path.parent / "LATEST").write_text("step-0000099\n")
    target = path if damage != "latest-dangling" else path.parent
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(target)
    assert str(path.parent) in str(info.value)


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")


def test_nothing_is_pickled(tmp_path):
    _, _, path = _saved(tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["MANIFEST.json", "config.json", "model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "state.json"]
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == set(names) - {"MANIFEST.json"}


def test_softmax_weights_load_into_favor_model_keeping_its_projections(tmp_path):
    soft, _, path = _saved(tmp_path, attention="softmax")
    ckpt = load_checkpoint(path, optimizer=False)
    fav = _tiny("favor", seed=7)
    projections = {n: b.clone() for n, b in fav.named_buffers() if n.endswith("projection")}
    assert projections
    with pytest.raises(CheckpointError, match="projection missing"):
        load_weights(fav, ckpt, strict_buffers=True)
    skipped = load_weights(fav, ckpt, strict_buffers=False)
    assert set(projections) <= set(skipped)
    for n, p in soft.named_parameters():
        assert torch.equal(dict(fav.named_parameters())[n], p), n
    for n, b in projections.items():
        assert torch.equal(dict(fav.named_buffers())[n], b), n


def test_favor_weights_load_into_softmax_model(tmp_path):
    fav, _, path = _saved(tmp_path, attention="favor")
    soft = _tiny("softmax")
    skipped = load_weights(soft, load_checkpoint(path, optimizer=False), strict_buffers=False)
    assert any(n.endswith("projection") for n in skipped)
    for n, p in fav.named_parameters():
        assert torch.equal(dict(soft.named_parameters())[n], p), n


def test_shape_mismatch_names_the_parameter(tmp_path):
    _, _, path = _saved(tmp_path)
    torch.manual_seed(0)
    wider = PerformerLM(PerformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, nb_features=6))
    with pytest.raises(CheckpointError, match=r"tok_emb.weight has shape \(32, 12\), model has \(32, 16\)"):
        load_weights(wider, load_checkpoint(path, optimizer=False), strict_buffers=False)


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    m = _Tied()
    path = save_checkpoint(tmp_path, step=0, model=m, optimizer=None, config=CONFIG)
    ckpt = load_checkpoint(path)
    assert len(ckpt.weights) == 1 and len(ckpt.aliases) == 1
    fresh = _Tied()
    load_weights(fresh, ckpt)
    assert torch.equal(fresh.emb.weight, m.emb.weight)
    assert fresh.head.weight is fresh.emb.weight
    assert os.path.getsize(path / "model.safetensors") < 400


def test_optimizer_state_of_a_checkpoint_loaded_without_it_is_an_error(tmp_path):
    """optimizer=False must not hand back an empty optimizer state that load_state_dict accepts."""
    _, opt, path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="loaded without its optimizer state"):
        load_checkpoint(path, optimizer=False).optimizer_state_dict()
    restored = load_checkpoint(path).optimizer_state_dict()
    assert restored["state"] and len(restored["state"]) == len(opt.state_dict()["state"])
