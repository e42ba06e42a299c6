"""Training checkpoints: atomic, checksummed directories of safetensors and JSON.

Layout of a run folder (``favor train --out DIR``)::

    DIR/
      LATEST                 name of the newest complete checkpoint (replaced atomically)
      step-0000500/          one checkpoint (the newest ``keep`` are kept)
        model.safetensors    weights and persistent buffers; metadata: aliases of tied tensors,
                             names of buffers
        optimizer.safetensors  optimizer tensors (AdamW moments, step counts) as ``state.<i>.<key>``
        rng.safetensors      torch CPU (and CUDA) generator states
        config.json          {"format", "version", "model": PerformerConfig.to_dict(),
                              "tokenizer", "train": TrainConfig, "data": {...}}
        state.json           {"step", "data_order", "python_rng", "optimizer": non-tensor state}
        MANIFEST.json        sha256 and size of every file above; written last
      metrics.jsonl, loss.png, summary.json   (written by the trainer)

Nothing is pickled: a checkpoint can be loaded from an untrusted source without running code.

A save writes everything into ``DIR/.tmp-step-...-<pid>/`` (each file fsync'ed), then renames the
folder to ``DIR/step-NNNNNNN`` (``os.replace``, atomic) and only then replaces ``LATEST``; so a
crash or SIGKILL at any point leaves the previous checkpoint and ``LATEST`` intact, and at worst a
stale ``.tmp-*`` folder that the next save removes.  Loading verifies every checksum first.

Test hook: with ``FAVOR_TEST_PAUSE_IN_SAVE=<seconds>`` in the environment a save sleeps that long
after writing the weights and before the manifest (so that a test can kill the process mid-save).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "PAUSE_ENV",
    "capture_rng_state",
    "find_checkpoint",
    "load_checkpoint",
    "load_weights",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "favor-checkpoint"
CHECKPOINT_VERSION = 1
PAUSE_ENV = "FAVOR_TEST_PAUSE_IN_SAVE"
LATEST = "LATEST"
MANIFEST = "MANIFEST.json"
_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "config.json", "state.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible (the message names the
    path and what is wrong)."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint.

    Attributes:
        path: the checkpoint folder.
        config: config.json (``model``, ``tokenizer``, ``train``, ``data``, ...).
        state: state.json (``step``, ``data_order``, ...).
        weights: name -> tensor as stored (tied tensors once; see ``aliases``).
        aliases: alias name -> stored name, for tensors shared between modules.
        buffers: names of the stored tensors that are buffers, not parameters.
        optimizer_tensors, rng_tensors: the other two safetensors files (empty if not loaded).
        optimizer_loaded: whether they were loaded (``load_checkpoint(..., optimizer=True)``).
    """

    path: Path
    config: dict[str, Any]
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    aliases: dict[str, str]
    buffers: list[str]
    optimizer_tensors: dict[str, torch.Tensor]
    rng_tensors: dict[str, torch.Tensor]
    optimizer_loaded: bool = True

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def optimizer_state_dict(self) -> dict[str, Any]:
        """Rebuild ``optimizer.state_dict()`` from the stored tensors and JSON."""
        if not self.optimizer_loaded:
            raise CheckpointError(f"checkpoint {str(self.path)!r} was loaded without its optimizer state")
        if "optimizer" not in self.state:
            raise CheckpointError(f"checkpoint {str(self.path)!r} holds no optimizer state")
        opt = self.state["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for key, t in self.optimizer_tensors.items():
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
        for idx, extra in opt["scalars"].items():
            state.setdefault(int(idx), {}).update(extra)
        return {"state": state, "param_groups": opt["param_groups"]}


# ----------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> tuple[dict[str, torch.Tensor], list]:
    """(tensors, python_state): the global torch CPU/CUDA generator states and ``random``'s."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, [py[0], list(py[1]), py[2]]


def restore_rng_state(ckpt: Checkpoint) -> None:
    """Set the global generators to the states saved in ``ckpt``."""
    if "torch_cpu" not in ckpt.rng_tensors:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} has no torch RNG state (rng.safetensors)")
    torch.set_rng_state(ckpt.rng_tensors["torch_cpu"])
    cuda = [ckpt.rng_tensors[k] for k in sorted(ckpt.rng_tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = ckpt.state.get("python_rng")
    if py is not None:
        random.setstate((py[0], tuple(py[1]), py[2]))


# ----------------------------------------------------------------------------------- saving

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _split_weights(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """state_dict -> (unique tensors, alias -> stored name, buffer names).  safetensors refuses
    tensors that share memory (tied embeddings), so each storage is written once."""
    sd = model.state_dict()
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    buffers = [n for n in tensors if n not in param_names]
    return tensors, aliases, buffers


def _optimizer_payload(optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict]:
    if optimizer is None:
        return {}, {"scalars": {}, "param_groups": []}
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (by step, then by suffix)."""
    out = []
    for p in run_dir.glob("step-*"):
        if p.is_dir() and (p / MANIFEST).is_file():
            parts = p.name.split("-")
            try:
                out.append(((int(parts[1]), int(parts[2]) if len(parts) > 2 else 0), p))
            except ValueError:
                continue
    return [p for _, p in sorted(out)]


def _remove_stale_tmp(run_dir: Path) -> None:
    for p in run_dir.glob(".tmp-step-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another live process is writing there
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict[str, Any],
    state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint of ``model``/``optimizer`` at ``step`` into ``run_dir`` atomically and
    point ``run_dir/LATEST`` at it; then delete all but the newest ``keep`` checkpoints.  A run
    resumed from an earlier checkpoint rewinds it: its checkpoints at steps >= ``step`` (the
    abandoned timeline) are deleted too.

    Args:
        config: JSON-able description (``model`` config dict, ``tokenizer``, ``train``, ``data``).
        state: extra JSON-able training state (e.g. ``data_order``); ``step``, the python RNG
            state and the optimizer's non-tensor state are added here.
        keep: how many complete checkpoints to keep (>= 1).

    Returns:
        The checkpoint folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(run)
    tmp = run / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    tensors, aliases, buffers = _split_weights(model)
    save_file(tensors, tmp / "model.safetensors",
              metadata={"aliases": json.dumps(aliases, sort_keys=True), "buffers": json.dumps(buffers)})
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))  # test hook: a window in which the save is incomplete
    opt_tensors, opt_json = _optimizer_payload(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, python_rng = capture_rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    _write_json(tmp / "config.json", {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **config})
    _write_json(tmp / "state.json", {**(state or {}), "step": int(step), "python_rng": python_rng,
                                     "optimizer": opt_json})
    manifest = {}
    for name in _FILES:
        _fsync_file(tmp / name)
        manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    _write_json(tmp / MANIFEST, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "files": manifest})
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)

    final = run / f"step-{step:07d}"
    n = 1
    while final.exists():  # never replace an existing checkpoint in place
        final = run / f"step-{step:07d}-{n}"
        n += 1
    os.replace(tmp, final)
    _fsync_dir(run)
    latest_tmp = run / f".{LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, run / LATEST)
    _fsync_dir(run)

    # checkpoints at steps >= this one belong to a timeline abandoned by resuming this run from an
    # earlier checkpoint: they go first, so that pruning keeps the newest of the current timeline
    others = [p for p in _checkpoint_dirs(run) if p != final]
    rewound = [p for p in others if int(p.name.split("-")[1]) >= step]
    timeline = [p for p in others if p not in rewound]
    for old in rewound + timeline[: max(0, len(timeline) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------- loading

def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder whose ``LATEST`` names one -> the checkpoint folder.
    Raises FileNotFoundError / CheckpointError naming the path and what is missing."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} is a file; expected a checkpoint or run folder")
    if (p / MANIFEST).exists():
        return p
    if (p / LATEST).is_file():
        try:
            name = (p / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {str(p / LATEST)!r} (expected a checkpoint folder name): {exc}") from None
        target = p / name
        if not name or "/" in name or not target.is_dir():
            raise CheckpointError(f"{str(p / LATEST)!r} names {name!r}, which is not a checkpoint folder in {str(p)!r}")
        return target
    if any(p.glob(".tmp-step-*")) or any(p.glob("step-*")):
        raise CheckpointError(f"checkpoint folder {str(p)!r} is incomplete (no {MANIFEST}, no {LATEST})")
    raise CheckpointError(f"{str(p)!r} is not a checkpoint (no {MANIFEST}) nor a run folder (no {LATEST})")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {str(path)!r} is not a JSON object")
    return obj


def _verify(ckpt_dir: Path) -> None:
    man_path = ckpt_dir / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} is incomplete: {MANIFEST} is missing")
    manifest = _read_json(man_path, "checkpoint manifest")
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(man_path)!r} is not a {CHECKPOINT_FORMAT} manifest")
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} has format version {manifest.get('version')}, "
            f"this favor reads version {CHECKPOINT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{str(man_path)!r} has no 'files' table")
    for name in _FILES:
        if name not in files:
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {MANIFEST} does not list {name}")
        f = ckpt_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} is incomplete: {name} is missing")
        entry = files[name] if isinstance(files[name], dict) else {}
        if f.stat().st_size != entry.get("bytes") or _sha256(f) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt (sha256 does not match {MANIFEST})")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from None


def load_checkpoint(path: str | os.PathLike, *, optimizer: bool = True) -> Checkpoint:
    """Find (see :func:`find_checkpoint`), verify (sha256 of every file) and load a checkpoint.
    ``optimizer=False`` skips the optimizer and RNG tensors (for generation)."""
    ckpt_dir = find_checkpoint(path)
    _verify(ckpt_dir)
    config = _read_json(ckpt_dir / "config.json", "checkpoint config")
    state = _read_json(ckpt_dir / "state.json", "checkpoint state")
    for key in ("model", "tokenizer"):
        if key not in config:
            raise CheckpointError(f"checkpoint config {str(ckpt_dir / 'config.json')!r} has no {key!r} entry")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint state {str(ckpt_dir / 'state.json')!r} has no integer 'step'")
    from safetensors import safe_open

    try:
        with safe_open(ckpt_dir / "model.safetensors", framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {str(ckpt_dir / 'model.safetensors')!r}: {exc}") from None
    return Checkpoint(
        path=ckpt_dir,
        config=config,
        state=state,
        weights=_load_safetensors(ckpt_dir / "model.safetensors"),
        aliases=json.loads(meta.get("aliases", "{}")),
        buffers=json.loads(meta.get("buffers", "[]")),
        optimizer_tensors=_load_safetensors(ckpt_dir / "optimizer.safetensors") if optimizer else {},
        rng_tensors=_load_safetensors(ckpt_dir / "rng.safetensors") if optimizer else {},
        optimizer_loaded=bool(optimizer),
    )


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, *, strict_buffers: bool = True) -> list[str]:
    """Copy the checkpoint's weights into ``model``.

    Every parameter of ``model`` must be in the checkpoint with the same shape, and the checkpoint
    may hold no other parameters.  Buffers (e.g. FAVOR projection matrices) must match too when
    ``strict_buffers``; otherwise (``--init-from`` a model with other attention options) a buffer
    missing on either side, or of another shape, keeps the model's own value.

    Returns:
        The names of the buffers that were not loaded (empty when ``strict_buffers``).
    """
    sd = model.state_dict()
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    stored_buffers = set(ckpt.buffers)

    def stored(name: str) -> torch.Tensor | None:
        if name in ckpt.weights:
            return ckpt.weights[name]
        if name in ckpt.aliases:
            return ckpt.weights.get(ckpt.aliases[name])
        return None

    skipped: list[str] = []
    new_sd: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name, t in sd.items():
        src = stored(name)
        is_param = name in param_names
        if src is None or tuple(src.shape) != tuple(t.shape):
            what = "missing" if src is None else f"has shape {tuple(src.shape)}, model has {tuple(t.shape)}"
            if is_param or strict_buffers:
                problems.append(f"{name} {what}")
            else:
                skipped.append(name)
                new_sd[name] = t
            continue
        new_sd[name] = src
    names_in_model = set(sd)
    for name in list(ckpt.weights) + list(ckpt.aliases):
        if name in names_in_model:
            continue
        if name in stored_buffers or (name in ckpt.aliases and ckpt.aliases[name] in stored_buffers):
            if strict_buffers:
                problems.append(f"{name} is in the checkpoint but not in the model")
            else:
                skipped.append(name)
        else:
            problems.append(f"parameter {name} is in the checkpoint but not in the model")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {str(ckpt.path)!r} does not fit the model: {'; '.join(problems[:3])}{more}"
        )
    model.load_state_dict(new_sd, strict=True)
    return sorted(skipped)
