"""Language-model training loop (the library behind ``favor train``).

Typical use (what the CLI does)::

    corpus = load_corpus(path)                           # favor.data.corpus
    model = PerformerLM(model_config)
    optimizer = make_optimizer(model, train_config)
    start = 0
    if resuming:
        ckpt = load_checkpoint(dir); start = restore_training_state(model, optimizer, ckpt)
    result = train(model, optimizer, corpus, train_config, out_dir=out, start_step=start,
                   checkpoint_config=describe_run(model_config, train_config, corpus))

:func:`train` is one function with hooks for data-parallel training: ``forward`` (the module
to call, e.g. a ``DistributedDataParallel`` wrapper of ``model``), ``rank``/``world_size`` (each
rank takes its slice of the global batch of the step; rank 0 alone logs, plots and saves),
``reduce_mean`` (averages a scalar tensor over ranks, for logging and evaluation) and
``sync_stop`` (ranks agree on stopping after a Ctrl-C).

Exact resume: the batch of step s depends only on (seed, s); the learning rate is a function of s;
the global torch RNG is reseeded from (seed, s, rank) before each training forward, so dropout
masks are a function of the step and differ between ranks; the optimizer state, the global
torch/python RNG states and the step are checkpointed;
FAVOR projection redraws are a function of (seed, s).  So N steps, a checkpoint, and M more steps
give the same weights, bit for bit, as N + M steps in one go (same thread count and build).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, load_weights, restore_rng_state, save_checkpoint
from .data.corpus import Corpus, eval_windows, get_batch, step_seed

__all__ = [
    "TrainConfig",
    "TrainResult",
    "describe_run",
    "evaluate",
    "lr_at",
    "make_optimizer",
    "plot_metrics",
    "read_metrics",
    "restore_training_state",
    "train",
]

LN2 = math.log(2.0)


def _f(default: Any, help: str, *, fixed: bool = True) -> Any:
    """A TrainConfig field; ``fixed``: must agree with the checkpoint when resuming (it changes
    the result), otherwise it may be changed on ``--resume``."""
    return field(default=default, metadata={"help": help, "fixed_on_resume": fixed})


@dataclass
class TrainConfig:
    """Trainer options (``favor train`` builds its options from these fields)."""

    steps: int = _f(600, "total optimisation steps (the cosine schedule ends here)", fixed=False)
    batch_size: int = _f(16, "sequences per step (global, over all ranks)")
    seq_len: int = _f(256, "tokens per training sequence")
    lr: float = _f(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr")
    warmup_steps: int = _f(50, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only; not norms, biases)")
    grad_clip: float = _f(1.0, "clip the gradient norm to this value (0: no clipping)")
    eval_every: int = _f(100, "validate every this many steps (and at the end)", fixed=False)
    eval_batches: int = _f(4, "validation batches of --batch-size windows each", fixed=False)
    save_every: int = _f(200, "checkpoint every this many steps (and at the end)", fixed=False)
    stop_at: int = _f(0, "stop (with a checkpoint) after this step although --steps is larger; 0: run to "
                      "--steps; not carried over by --resume",
                      fixed=False)
    seed: int = _f(0, "seed of initialisation, data order and dropout")
    redraw_every: int = _f(0, "redraw FAVOR projections every this many steps (0: never)")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "stop_at", "redraw_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0 and math.isfinite(self.weight_decay)
                and math.isfinite(self.grad_clip)):
            raise ValueError(f"weight_decay and grad_clip must be finite and >= 0, got {self.weight_decay}, {self.grad_clip}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}")
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` did: last completed step, whether it stopped on Ctrl-C, the last
    checkpoint, the last validation (loss in nats/token and bits per unit), mean training
    throughput, and where the metrics/plot went (None on ranks other than 0)."""

    step: int
    interrupted: bool
    checkpoint: Path | None
    val_loss: float | None
    val_bits: float | None
    tokens_per_s: float
    metrics: Path | None
    plot: Path | None
    val_step: int | None = None  # the step of the last validation (not ``step`` after a Ctrl-C)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``,
    then cosine decay to ``min_lr_ratio·lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2 or more dimensions only."""
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def describe_run(model_config: dict[str, Any], cfg: TrainConfig, corpus: Corpus) -> dict[str, Any]:
    """The ``config.json`` content of this run's checkpoints."""
    return {
        "model": model_config,
        "tokenizer": corpus.tokenizer.name,
        "train": cfg.to_dict(),
        "data": {"source": corpus.source, "fingerprint": corpus.fingerprint(), "split": corpus.split,
                 "train_tokens": len(corpus.train), "val_tokens": len(corpus.val)},
    }


def restore_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> int:
    """Load weights (strictly), optimizer state and RNG states from ``ckpt``; return its step.
    Call this last before :func:`train`: it sets the global RNG."""
    load_weights(model, ckpt, strict_buffers=True)
    optimizer.load_state_dict(ckpt.optimizer_state_dict())
    restore_rng_state(ckpt)
    return ckpt.step


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    corpus: Corpus,
    *,
    batch_size: int,
    batches: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Mean cross-entropy (nats per token) over ``batches·batch_size`` fixed validation windows
    (:func:`favor.data.corpus.eval_windows`); each rank evaluates every ``world_size``-th batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # a CUDA rank's GPU under torchrun + nccl
    x_all, y_all = (t.to(device) for t in eval_windows(corpus.val, batches * batch_size, seq_len))
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for b in range(rank, batches, world_size):
            x = x_all[b * batch_size:(b + 1) * batch_size]
            y = y_all[b * batch_size:(b + 1) * batch_size]
            logits = model(x)  # (b, L, V)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
            count += y.numel()
    finally:
        model.train(was_training)
    if reduce_mean is not None:
        total, count = reduce_mean(total), reduce_mean(count)
    return float(total / count)


class _StopOnSigint:
    """While active, the first SIGINT sets ``requested`` (the loop saves and stops at the end of
    the step); a second one raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopOnSigint":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python; restore the default.
            signal.signal(signal.SIGINT, signal.default_int_handler if self._previous is None else self._previous)
            self._installed = False


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (written by a run that went past its last checkpoint)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot_metrics(runs: dict[str, str | Path], png: str | Path, *, unit: str = "byte", title: str = "") -> Path:
    """Loss curves (bits per ``unit``) of one or more runs: training loss (centred moving average,
    with the raw values faint) and validation points.  ``runs``: label -> metrics.jsonl.  Returns ``png``."""
    from .plotting import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, path) in enumerate(runs.items()):
        c = colours[i % len(colours)]
        recs = read_metrics(path)
        tr = [(r["step"], r["train_loss"] / LN2) for r in recs if "train_loss" in r]
        va = [(r["step"], r["val_bits"]) for r in recs if "val_bits" in r]
        prefix = f"{label}: " if label else ""
        if tr:
            steps, bits = zip(*tr)
            half = max(1, len(bits) // 60)  # centred moving average over 2·half + 1 steps (no lag)
            smooth = [sum(bits[max(0, i - half):i + half + 1]) / len(bits[max(0, i - half):i + half + 1])
                      for i in range(len(bits))]
            ax.plot(steps, bits, color=c, alpha=0.15, lw=0.8)
            ax.plot(steps, smooth, color=c, lw=1.5, label=f"{prefix}train (mean of {2 * half + 1} steps)")
        if va:
            steps, bits = zip(*va)
            ax.plot(steps, bits, "o--", color=c, ms=4, label=f"{prefix}validation")
    ax.set_xlabel("step")
    ax.set_ylabel(f"bits per {unit}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: Corpus,
    cfg: TrainConfig,
    *,
    out_dir: str | Path,
    checkpoint_config: dict[str, Any],
    start_step: int = 0,
    forward: torch.nn.Module | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sync_stop: Callable[[bool], bool] | None = None,
    progress: bool | None = None,
    keep_checkpoints: int = 2,
) -> TrainResult:
    """Train ``model`` from update ``start_step`` to ``cfg.steps`` (or ``cfg.stop_at``).

    Each update s: redraw FAVOR projections if ``cfg.redraw_every`` divides s (from (seed, s)),
    set the learning rate :func:`lr_at` (s), take the batch :func:`get_batch` (seed, s) (this rank's
    slice), step AdamW with gradient clipping.  After update s (s+1 done): log to
    ``out_dir/metrics.jsonl``; validate every ``eval_every``; checkpoint every ``save_every``, at
    the end, and on Ctrl-C (then stop, ``interrupted=True``).  At the end, ``loss.png`` and
    ``summary.json``.  Only rank 0 writes files.

    Args:
        model: the model; its ``forward(idx (B, L) long) -> (B, L, V)`` logits.
        optimizer: from :func:`make_optimizer` (restored with :func:`restore_training_state`).
        corpus: token streams; batches of ``cfg.batch_size`` windows of ``cfg.seq_len``.
        out_dir: the run folder (checkpoints, metrics, plot).
        checkpoint_config: ``config.json`` of the checkpoints (:func:`describe_run`).
        start_step: updates already done (the checkpoint's step when resuming).
        forward: the module to call for training (default ``model``; a DDP wrapper of it).
        rank, world_size: this process's slice of each batch; rank 0 logs and saves.
        reduce_mean: averages a scalar tensor over ranks (default: identity).
        sync_stop: turns this rank's stop request into the collective decision (default identity).
        progress: tqdm bar; None = only on a terminal.
        keep_checkpoints: how many checkpoints to keep in ``out_dir``.
    """
    from .nn import ProjectionRedraw

    out = Path(out_dir)
    main = rank == 0
    forward = model if forward is None else forward
    reduce = reduce_mean if reduce_mean is not None else (lambda t: t)
    agree = sync_stop if sync_stop is not None else (lambda flag: flag)
    end = cfg.steps if cfg.stop_at == 0 else min(cfg.steps, cfg.stop_at)
    unit = corpus.tokenizer.unit
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, start_step)
    redraw = ProjectionRedraw(model, cfg.redraw_every, cfg.seed) if cfg.redraw_every else None
    local_batch = cfg.batch_size // world_size
    device = next(model.parameters()).device
    tokens_per_step = cfg.batch_size * cfg.seq_len

    def validate(step: int) -> tuple[float, float]:
        loss = evaluate(model, corpus, batch_size=local_batch * world_size, batches=cfg.eval_batches,
                        seq_len=cfg.seq_len, rank=rank, world_size=world_size, reduce_mean=reduce_mean)
        bits = loss / LN2
        if main:
            _append_jsonl(metrics_path, {"step": step, "val_loss": loss, "val_bits": bits})
            tqdm.write(f"step {step}: validation {bits:.4f} bits per {unit}")
        return loss, bits

    def save(step: int) -> Path | None:
        if not main:
            return None
        return save_checkpoint(
            out, step=step, model=model, optimizer=optimizer, config=checkpoint_config,
            state={"data_order": {"scheme": "uniform-windows/v1", "seed": cfg.seed, "next_step": step}},
            keep=keep_checkpoints,
        )

    wall_start = time.perf_counter()
    val_loss = val_bits = val_step = None
    checkpoint: Path | None = None
    interrupted = False
    train_time = 0.0
    steps_timed = 0
    model.train()
    if start_step == 0:
        (val_loss, val_bits), val_step = validate(0), 0
    bar = tqdm(total=end, initial=start_step, unit="step", dynamic_ncols=True,
               disable=(None if progress is None else not progress) if main else True)
    step = start_step
    with _StopOnSigint() as sigint, bar:
        while step < end:
            t0 = time.perf_counter()
            if redraw is not None and step > 0:
                redraw.maybe_redraw(step)  # from (seed, step): the same after a resume
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(corpus.train, step, seed=cfg.seed, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                             rank=rank, world_size=world_size)
            x, y = x.to(device), y.to(device)  # no-op on the CPU
            # dropout masks from (seed, step, rank): independent across ranks, the same after a resume
            torch.manual_seed(step_seed(cfg.seed, step, f"dropout:{rank}"))
            logits = forward(x)  # (b, L, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            loss_value = float(reduce(loss.detach()))
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {step}; lower --lr")
            dt = time.perf_counter() - t0
            train_time += dt
            steps_timed += 1
            tok_s = tokens_per_step * steps_timed / train_time
            if main:
                _append_jsonl(metrics_path, {"step": step, "train_loss": loss_value, "lr": lr,
                                             "tokens_per_s": tokens_per_step / dt})
                bar.update(1)
                bar.set_postfix_str(f"loss {loss_value / LN2:.3f} bits/{unit}, {tok_s:,.0f} tok/s", refresh=False)
            stop = agree(sigint.requested)
            if step % cfg.eval_every == 0 or step == end:
                (val_loss, val_bits), val_step = validate(step), step
            if stop or step % cfg.save_every == 0 or step == end:
                checkpoint = save(step) or checkpoint
            if stop:
                interrupted = True
                if main:
                    tqdm.write(f"interrupted: saved step {step}")
                break
    tokens_per_s = tokens_per_step * steps_timed / train_time if train_time else 0.0
    plot = None
    if main:
        plot = plot_metrics({"": metrics_path}, out / "loss.png", unit=unit,
                            title=f"{checkpoint_config['model'].get('attention', '')} LM on {Path(corpus.source).name}")
        n_params = sum(p.numel() for p in model.parameters())
        (out / "summary.json").write_text(json.dumps({
            "step": step, "interrupted": interrupted, "val_step": val_step, "val_loss": val_loss,
            f"val_bits_per_{unit}": val_bits,
            "tokens_per_s": tokens_per_s, "train_seconds": train_time,
            "wall_seconds": time.perf_counter() - wall_start, "threads": torch.get_num_threads(), "parameters": n_params,
            "checkpoint": None if checkpoint is None else str(checkpoint),
        }, indent=1) + "\n")
    return TrainResult(step, interrupted, checkpoint, val_loss, val_bits, tokens_per_s,
                       metrics_path if main else None, plot, val_step)
