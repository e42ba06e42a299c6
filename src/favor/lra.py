"""Long Range Arena ListOps: train and evaluate a bidirectional Performer classifier.

Dimension key: B batch, L padded length (longest expression in the batch, plus 1 for ``<cls>``
with ``pooling="cls"``).

:func:`train_listops` runs one experiment described by a :class:`ListOpsConfig` (the data, the
:class:`favor.models.PerformerConfig`, the pooling and the optimisation), writes checkpoints and a
``metrics.json`` into a run directory, resumes from the checkpoint there, and returns the test
accuracy and the training speed.  Two presets: :data:`PRESETS` ``"lra"`` (the LRA paper's
configuration, for a GPU) and ``"cpu"`` (a reduced one that finishes in well under an hour on
2 CPU cores; it classifies the expression's first token instead of a ``<cls>`` token, because a
``<cls>`` classifier first has to learn to find that token, which takes more steps than the
budget allows; see docs/results.md).

Batches are drawn per epoch from a permutation seeded by ``(seed, epoch)``; within windows of
``50·batch_size`` examples they are grouped by length so that padding stays small (padding is
masked, so grouping changes speed, not results in expectation).  The batch at step t is a function
of (seed, t) only, so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_weights, restore_rng_state, save_checkpoint
from .data import listops as lo
from .models import PerformerClassifier, PerformerConfig

__all__ = [
    "POOLINGS",
    "PRESETS",
    "ListOpsConfig",
    "ListOpsData",
    "ListOpsResult",
    "baseline_accuracies",
    "evaluate_classifier",
    "load_data",
    "listops_config",
    "lr_at",
    "plot_listops",
    "predict",
    "stored_config",
    "train_listops",
]

#: "cls": a <cls> token is prepended and its final state classified (LRA); "first": the final state of
#: the expression's own first token (its outermost operator) is classified, no token added;
#: "mean": the mean of the final states of the real tokens.
POOLINGS = ("cls", "first", "mean")
_BUCKET_WINDOW = 50  # batches per length-sorting window
_EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s draws its batch order from seed s * stride + e
# Largest seed + 1: s * stride + e must fit a torch.Generator seed (< 2**64) for any reachable epoch
# (2**44 * stride < 2**64 - 8e17).  The derivation is kept, not hashed, so that existing runs
# (docs/results.md: seed 0) keep their batch order.
_SEED_LIMIT = 1 << 44
METRICS = "metrics.json"


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {name}={value}")


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
       choices: tuple | None = None) -> Any:
    meta = {"help": help} if choices is None else {"help": help, "choices": choices}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ListOpsData:
    """Which ListOps data to generate (defaults: LRA's)."""

    # Examples in each split (LRA: 96,000 / 2,000 / 2,000).
    train_size: int = _f(96_000, "training examples (LRA: 96000)")
    val_size: int = _f(2_000, "validation examples (LRA: 2000)")
    test_size: int = _f(2_000, "test examples (LRA: 2000)")
    # Kept lengths: min_length < tokens < max_length (strict, as LRA).
    min_length: int = _f(500, "keep expressions longer than this many tokens (LRA: 500)")
    max_length: int = _f(2000, "keep expressions shorter than this many tokens (LRA: 2000)")
    # Deepest nesting (a digit is depth 1) and most arguments per operator.
    max_depth: int = _f(10, "deepest nesting, a digit being depth 1 (LRA: 10)")
    max_args: int = _f(10, "most arguments per operator (LRA: 10)")
    # Seed of the generator.
    data_seed: int = _f(0, "seed of the ListOps generator")

    def __post_init__(self) -> None:
        for name, minimum in (("train_size", 1), ("val_size", 1), ("test_size", 1), ("min_length", 0),
                              ("max_depth", 2), ("max_args", 2), ("data_seed", 0)):
            _check_int("ListOpsData", name, getattr(self, name), minimum)
        _check_int("ListOpsData", "max_length", self.max_length, self.min_length + 2)

    @property
    def cache_name(self) -> str:
        """File name that identifies this data (used by :func:`load_data`'s cache)."""
        return (f"listops_seed{self.data_seed}_len{self.min_length}-{self.max_length}_depth{self.max_depth}"
                f"_args{self.max_args}_{self.train_size}-{self.val_size}-{self.test_size}.npz")


@dataclass(frozen=True)
class ListOpsConfig:
    """One ListOps experiment: data, model, pooling and optimisation."""

    # The generated data.
    data: ListOpsData = _f(factory=ListOpsData)
    # The encoder (vocab_size must be len(VOCAB); max_len at least data.max_length, + 1 with cls).
    model: PerformerConfig = _f(factory=lambda: PerformerConfig(vocab_size=len(lo.VOCAB), max_len=2000))
    # "cls": classify a <cls> token prepended to each sequence; "first": the expression's first token
    # (no <cls>); "mean": mean over real tokens.
    pooling: str = _f("cls", "classify a prepended <cls> token (LRA), the first token of the expression, or the "
                      "mean over real tokens", choices=POOLINGS)
    # Examples per optimisation step.
    batch_size: int = _f(32, "examples per step")
    # Optimisation steps.
    steps: int = _f(5000, "optimisation steps")
    # Peak learning rate, reached after `warmup` linear steps, then decayed as sqrt(warmup / t)
    # (LRA's "constant * linear_warmup * rsqrt_decay" with constant 0.05 and warmup 1000 peaks at
    # 0.05 / sqrt(1000) = 1.58e-3).
    lr: float = _f(0.05 / math.sqrt(1000), "peak learning rate (after warmup; then decays as sqrt(warmup/step))")
    warmup: int = _f(1000, "linear warmup steps")
    # AdamW (decoupled) weight decay and betas/eps (LRA: 0.1, (0.9, 0.98), 1e-9).
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-9, "AdamW epsilon")
    # Clip the global gradient norm to this value; None = no clipping (LRA).
    grad_clip: float | None = _f(None, "clip the global gradient norm (none = no clipping)")
    # Validate every `eval_every` steps on the first `eval_examples` validation examples.
    eval_every: int = _f(250, "validate every this many steps")
    eval_examples: int = _f(500, "validation examples used at each periodic validation")
    # Save a checkpoint every `checkpoint_every` steps (and at the end).
    checkpoint_every: int = _f(250, "checkpoint every this many steps (and at the end)")
    # Seed of weight initialisation, batch order and dropout.
    seed: int = _f(0, "seed of weight init, batch order and dropout (< 2**44)")

    def __post_init__(self) -> None:
        if not isinstance(self.data, ListOpsData):
            raise TypeError(f"ListOpsConfig.data must be a ListOpsData, got {type(self.data).__name__}")
        if not isinstance(self.model, PerformerConfig):
            raise TypeError(f"ListOpsConfig.model must be a PerformerConfig, got {type(self.model).__name__}")
        if self.model.vocab_size != len(lo.VOCAB):
            raise ValueError(f"ListOpsConfig.model.vocab_size must be {len(lo.VOCAB)} (the ListOps vocabulary), "
                             f"got {self.model.vocab_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"ListOpsConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        longest = self.data.max_length - 1 + (self.pooling == "cls")
        if self.model.max_len < longest:
            raise ValueError(f"ListOpsConfig.model.max_len={self.model.max_len} is shorter than the longest input "
                             f"({longest} tokens with pooling={self.pooling!r})")
        for name, minimum in (("batch_size", 1), ("steps", 1), ("warmup", 0), ("eval_every", 1),
                              ("eval_examples", 1), ("checkpoint_every", 1), ("seed", 0)):
            _check_int("ListOpsConfig", name, getattr(self, name), minimum)
        if self.seed >= _SEED_LIMIT:
            raise ValueError(f"ListOpsConfig.seed must be < 2**44 = {_SEED_LIMIT} (it seeds each epoch's batch "
                             f"order as seed * {_EPOCH_SEED_STRIDE} + epoch), got seed={self.seed}")
        for name in ("lr", "weight_decay", "beta1", "beta2", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ListOpsConfig.{name} must be a finite non-negative float, got {v!r}")
        if self.lr == 0:
            raise ValueError("ListOpsConfig.lr must be > 0")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(f"ListOpsConfig betas must be < 1, got ({self.beta1}, {self.beta2})")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"ListOpsConfig.grad_clip must be None or > 0, got {self.grad_clip!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (the model as its own dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["data"] = dataclasses.asdict(self.data)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ListOpsConfig:
        d = dict(d)
        d["data"] = ListOpsData(**d["data"])
        d["model"] = PerformerConfig.from_dict(d["model"])
        return cls(**d)

    def replace(self, **changes: Any) -> ListOpsConfig:
        """A new validated config; keys ``data.X`` / ``model.X`` change fields of the parts."""
        data = {k[5:]: v for k, v in changes.items() if k.startswith("data.")}
        model = {k[6:]: v for k, v in changes.items() if k.startswith("model.")}
        top = {k: v for k, v in changes.items() if "." not in k}
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(top) - known)
        if unknown:
            raise ValueError(f"unknown ListOpsConfig keys: {unknown}; known keys: {sorted(known)}")
        new_data = dataclasses.replace(self.data, **data) if data else self.data
        new_model = self.model.replace(**model) if model else self.model
        return dataclasses.replace(self, data=new_data, model=new_model, **top)


def _lra_preset() -> ListOpsConfig:
    # lra_benchmarks/listops/configs/base_listops_config.py: 6 layers, emb 512, 8 heads, MLP 2048,
    # CLS pooling, batch 32, 5000 steps, lr 0.05 * warmup(1000) * rsqrt, weight decay 0.1, length 2000.
    model = PerformerConfig(vocab_size=len(lo.VOCAB), d_model=512, n_heads=8, n_layers=6, mlp_ratio=4.0,
                            dropout=0.1, max_len=2000, attention="favor", nb_features=256, rotary=False)
    return ListOpsConfig(data=ListOpsData(), model=model, pooling="cls", batch_size=32, steps=5000,
                         lr=0.05 / math.sqrt(1000), warmup=1000, weight_decay=0.1, eval_every=250,
                         eval_examples=2000, checkpoint_every=500)


def _cpu_preset() -> ListOpsConfig:
    # Sized for 2 shared CPU cores (~1-3 s per step single-threaded): a 2-layer width-32 model,
    # expressions of 500-1000 tokens, 20,000 training examples (about one epoch of 1200 x 16).
    # pooling="first": with a <cls> token, all three attention kinds stayed at the majority class
    # for the first 200-400 steps (docs/results.md).
    model = PerformerConfig(vocab_size=len(lo.VOCAB), d_model=32, n_heads=2, n_layers=2, mlp_ratio=2.0,
                            dropout=0.0, max_len=1000, attention="favor", nb_features=32, rotary=False)
    data = ListOpsData(train_size=20_000, val_size=500, test_size=2_000, min_length=500, max_length=1000)
    return ListOpsConfig(data=data, model=model, pooling="first", batch_size=16, steps=1200, lr=2e-3, warmup=100,
                         weight_decay=0.1, grad_clip=1.0, eval_every=100, eval_examples=500,
                         checkpoint_every=100)


PRESETS = {"lra": _lra_preset, "cpu": _cpu_preset}


def lr_at(step: int, cfg: ListOpsConfig) -> float:
    """Learning rate for optimisation step ``step`` (1-based): linear warmup, then rsqrt decay."""
    if cfg.warmup == 0:
        return cfg.lr
    return cfg.lr * min(step / cfg.warmup, math.sqrt(cfg.warmup / step))


def load_data(data: ListOpsData, cache_dir: str | Path | None = None, *, progress: bool | None = False
              ) -> dict[str, lo.ListOpsSplit]:
    """Generate the splits, or read them from ``cache_dir/<data.cache_name>`` (written on first use).
    ``progress``: show the generation's progress bar (None: only on a terminal)."""
    sizes = {"train": data.train_size, "val": data.val_size, "test": data.test_size}
    kwargs = dict(seed=data.data_seed, min_length=data.min_length, max_length=data.max_length,
                  max_depth=data.max_depth, max_args=data.max_args)
    if cache_dir is None:
        return lo.generate_splits(sizes, progress=progress, **kwargs)
    path = Path(cache_dir) / data.cache_name
    if path.exists():
        return lo.load_splits(path)
    splits = lo.generate_splits(sizes, progress=progress, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    lo.save_splits(splits, path)
    return splits


def _epoch_batches(split: lo.ListOpsSplit, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The batches (index tensors) of one epoch, length-grouped within windows, in random order."""
    g = torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)
    perm = torch.randperm(len(split), generator=g)
    n_full = len(split) // batch_size  # drop the last partial batch
    perm = perm[: n_full * batch_size]
    lengths = split.lengths
    batches = []
    window = _BUCKET_WINDOW * batch_size
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(chunk.split(batch_size))
    order = torch.randperm(len(batches), generator=g)
    return [batches[i] for i in order.tolist()]


def _batch_for_step(split: lo.ListOpsSplit, cfg: ListOpsConfig, step: int, cache: dict) -> torch.Tensor:
    per_epoch = len(split) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the training split has {len(split)} examples, fewer than batch_size={cfg.batch_size}")
    epoch, i = divmod(step - 1, per_epoch)
    if cache.get("epoch") != epoch:
        cache["epoch"], cache["batches"] = epoch, _epoch_batches(split, cfg.batch_size, cfg.seed, epoch)
    return cache["batches"][i]


def baseline_accuracies(train: lo.ListOpsSplit, test: lo.ListOpsSplit) -> dict[str, float]:
    """Test accuracy of two rules fitted on ``train``, the floor any learned model should clear.

    ``majority``: always the most frequent training label.  ``root_operator``: the most frequent
    training label given the expression's first token (its outermost operator: MAX -> 9,
    MIN -> 0, ...), which reads one token and computes nothing.
    """
    majority = int(torch.bincount(train.labels, minlength=10).argmax())
    first = train.tokens[train.offsets[:-1]].long()  # (N,) id of each expression's first token
    table = torch.zeros(len(lo.VOCAB), 10, dtype=torch.long)
    table.index_put_((first, train.labels), torch.ones_like(first), accumulate=True)
    rule = table.argmax(1)  # (V,) most frequent label per first token
    rule[table.sum(1) == 0] = majority
    test_first = test.tokens[test.offsets[:-1]].long()
    return {"majority": float((test.labels == majority).float().mean()),
            "root_operator": float((rule[test_first] == test.labels).float().mean())}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, split: lo.ListOpsSplit, *, cls: bool, batch_size: int = 32,
                        limit: int | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on the first ``limit`` examples of ``split``."""
    n = len(split) if limit is None else min(limit, len(split))
    order = torch.argsort(split.lengths[:n], stable=True)  # similar lengths together: less padding
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for idx in order.split(batch_size):
            ids, mask, labels = split.batch(idx, cls=cls)
            logits = model(ids, key_padding_mask=mask)  # (B, 10)
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
    finally:  # the caller's mode back even if a batch raises
        model.train(was_training)
    return correct / n, loss / n


@dataclass
class ListOpsResult:
    """Outcome of :func:`train_listops`."""

    test_accuracy: float
    test_loss: float
    val_accuracy: float
    steps: int
    steps_per_second: float  # optimisation steps per second of training time (evaluation excluded)
    train_seconds: float
    majority_accuracy: float  # test accuracy of always predicting the most frequent training label
    parameters: int
    history: list[dict[str, float]]


def _save(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, cfg: ListOpsConfig,
          history: list, train_seconds: float, loss_sum: float, loss_n: int) -> None:
    """Checkpoint ``step``; ``loss_sum``/``loss_n``: the training losses summed since the last
    history entry, so that a resumed run's next entry averages the same steps."""
    save_checkpoint(run_dir, step=step, model=model, optimizer=opt,
                    config={"model": cfg.model.to_dict(), "tokenizer": {"kind": "listops", "vocab": list(lo.VOCAB)},
                            "listops": cfg.to_dict()},
                    state={"history": history, "train_seconds": train_seconds, "loss_sum": loss_sum,
                           "loss_n": loss_n})


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """'name: old -> new' for every differing field except steps, nested dicts as 'data.x'."""
    out = []
    for k in old:
        if isinstance(old[k], dict) and isinstance(new.get(k), dict):
            sub = _config_diff(old[k], new[k], f"{prefix}{k}.")
            out += [sub] if sub else []
        elif k != "steps" and old[k] != new.get(k):
            out.append(f"{prefix}{k}: {old[k]!r} -> {new.get(k)!r}")
    return ", ".join(out)


def train_listops(
    cfg: ListOpsConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data_cache: str | Path | None = None,
    progress: bool | None = None,
) -> ListOpsResult:
    """Train a :class:`PerformerClassifier` on ListOps as ``cfg`` says; evaluate on the test split.

    Writes a checkpoint every ``cfg.checkpoint_every`` steps and at the end, and
    ``run_dir/metrics.json`` (config, history, result); checkpoints are :mod:`favor.checkpoint`
    folders (``run_dir/LATEST``, ``run_dir/step-NNNNNNN/``).  With ``resume=True`` the latest checkpoint
    in ``run_dir`` is continued (its config must equal ``cfg`` except ``steps``); without it an
    existing checkpoint is an error, so runs are never overwritten by accident.  ``progress``:
    show progress bars (None: only on a terminal).
    """
    run_dir = Path(run_dir)
    has_checkpoint = (run_dir / "LATEST").exists()
    if has_checkpoint and not resume:
        raise ValueError(f"{run_dir} already holds a checkpoint; pass resume=True (--resume) to continue it "
                         "or choose another run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = load_data(cfg.data, data_cache, progress=progress)
    train, val, test = splits["train"], splits["val"], splits["test"]
    cls = cfg.pooling == "cls"

    torch.manual_seed(cfg.seed)
    # PerformerClassifier's "cls" pooling reads position 0: the <cls> token, or the first token.
    model = PerformerClassifier(cfg.model, num_classes=10, pooling="mean" if cfg.pooling == "mean" else "cls")
    # Decoupled weight decay on every parameter, as LRA's flax Adam(weight_decay=...) applies it.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    step, history, train_seconds = 0, [], 0.0
    loss_sum, loss_n = 0.0, 0  # training losses since the last history entry
    if has_checkpoint:
        ck = load_checkpoint(run_dir)
        if not isinstance(ck.config.get("listops"), dict):
            raise ValueError(f"checkpoint {str(ck.path)!r} has no ListOps configuration; it was not written by "
                             "favor lra listops")
        saved = ListOpsConfig.from_dict(ck.config["listops"])
        if saved.replace(steps=cfg.steps) != cfg:
            raise ValueError(f"{ck.path} was written with a different configuration "
                             f"({_config_diff(saved.to_dict(), cfg.to_dict())}); only steps may change on resume")
        if cfg.steps <= ck.step:
            raise ValueError(f"{ck.path} is at step {ck.step}: training to step {cfg.steps} has nothing to do; "
                             f"pass --steps above {ck.step}")
        load_weights(model, ck)
        opt.load_state_dict(ck.optimizer_state_dict())
        restore_rng_state(ck)
        step, history, train_seconds = ck.step, ck.state["history"], ck.state["train_seconds"]
        # absent from checkpoints written before they were saved: start the average afresh
        loss_sum, loss_n = float(ck.state.get("loss_sum", 0.0)), int(ck.state.get("loss_n", 0))

    from tqdm.auto import tqdm

    model.train()
    batch_cache: dict = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=f"listops {cfg.model.attention}", unit="step",
               disable=None if progress is None else not progress)
    while step < cfg.steps:
        step += 1
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids, mask, labels = train.batch(_batch_for_step(train, cfg, step, batch_cache), cls=cls)
        logits = model(ids, key_padding_mask=mask)  # (B, 10)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_seconds += time.perf_counter() - t0
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_acc, val_loss = evaluate_classifier(model, val, cls=cls, batch_size=cfg.batch_size,
                                                    limit=cfg.eval_examples)
            history.append({"step": step, "train_loss": loss_sum / loss_n, "val_accuracy": val_acc,
                            "val_loss": val_loss, "lr": lr_at(step, cfg), "train_seconds": train_seconds})
            loss_sum, loss_n = 0.0, 0
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_acc=f"{val_acc:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(run_dir, model, opt, step, cfg, history, train_seconds, loss_sum, loss_n)
    bar.close()

    test_acc, test_loss = evaluate_classifier(model, test, cls=cls, batch_size=cfg.batch_size)
    val_acc, _ = evaluate_classifier(model, val, cls=cls, batch_size=cfg.batch_size)
    majority = int(torch.bincount(train.labels, minlength=10).argmax())
    result = ListOpsResult(
        test_accuracy=test_acc, test_loss=test_loss, val_accuracy=val_acc, steps=step,
        steps_per_second=step / train_seconds if train_seconds > 0 else float("nan"),
        train_seconds=train_seconds, majority_accuracy=float((test.labels == majority).float().mean()),
        parameters=sum(p.numel() for p in model.parameters()), history=history,
    )
    metrics = {"config": cfg.to_dict(), "result": dataclasses.asdict(result), "threads": torch.get_num_threads()}
    tmp = run_dir / (METRICS + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, run_dir / METRICS)
    return result


@torch.no_grad()
def predict(run_dir: str | Path, split: str = "test", *, attention: str | None = None,
            data_cache: str | Path | None = None, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions of the latest checkpoint in ``run_dir`` on one split of its data.

    ``attention``: evaluate the same weights with another attention kind ("favor" or "softmax"),
    e.g. to see whether a FAVOR-trained model depends on the approximation.
    Returns (predictions (N,), labels (N,)) as int64.
    """
    ck = load_checkpoint(run_dir, optimizer=False)
    cfg = ListOpsConfig.from_dict(ck.config["listops"])
    splits = load_data(cfg.data, data_cache)
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(splits)}")
    data = splits[split]
    model_cfg = cfg.model if attention is None else cfg.model.replace(attention=attention)
    model = PerformerClassifier(model_cfg, num_classes=10, pooling="mean" if cfg.pooling == "mean" else "cls")
    load_weights(model, ck, strict_buffers=attention is None or attention == cfg.model.attention)
    model.eval()
    out = torch.empty(len(data), dtype=torch.long)
    for idx in torch.arange(len(data)).split(batch_size):
        ids, mask, _ = data.batch(idx, cls=cfg.pooling == "cls")
        out[idx] = model(ids, key_padding_mask=mask).argmax(-1)
    return out, data.labels.clone()


def listops_config(preset: str = "cpu", *, data: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                   **changes: Any) -> ListOpsConfig:
    """A preset (:data:`PRESETS`) with changes to its data, model and training fields.

    The model's ``max_len`` follows the data (longest expression, plus 1 for ``<cls>``) and its
    projection ``seed`` is the experiment's ``seed``, unless given in ``model``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown ListOps preset {preset!r}; expected one of {tuple(PRESETS)}")
    base = PRESETS[preset]()
    new_data = dataclasses.replace(base.data, **(data or {}))
    pooling = changes.get("pooling", base.pooling)
    model_changes = {"max_len": new_data.max_length - 1 + (pooling == "cls"), "seed": changes.get("seed", base.seed)}
    model_changes.update(model or {})
    new_model = base.model.replace(**model_changes)
    return dataclasses.replace(base, data=new_data, model=new_model, **changes)


def stored_config(run_dir: str | Path) -> ListOpsConfig | None:
    """The configuration of the latest checkpoint in ``run_dir``, or None when there is none."""
    if not (Path(run_dir) / "LATEST").exists():
        return None
    ck = load_checkpoint(run_dir, optimizer=False)
    if not isinstance(ck.config.get("listops"), dict):
        raise ValueError(f"checkpoint {str(ck.path)!r} has no ListOps configuration; it was not written by "
                         "favor lra listops")
    return ListOpsConfig.from_dict(ck.config["listops"])


def plot_listops(run_dirs: list[str | Path], out: str | Path, *, labels: list[str] | None = None,
                 reference: dict[str, float] | None = None) -> Path:
    """Plot validation accuracy against training step from each run's ``metrics.json`` into ``out``.

    ``reference``: name -> accuracy drawn as horizontal lines (e.g. LRA's published numbers).
    """
    from .plotting import pyplot, save_figure

    plt = pyplot()

    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    majority = None
    for i, run in enumerate(run_dirs):
        path = Path(run) / METRICS
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (the run has not finished)")
        try:
            m = json.loads(path.read_text())
            res, c = m["result"], m["config"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a ListOps metrics.json (no 'result'/'config'): {exc!r}") from None
        name = labels[i] if labels else (f"{c['model']['attention']}"
                                          + (f" {c['model']['features'] or 'positive'}" if c["model"]["attention"] == "favor" else ""))
        steps = [h["step"] for h in res["history"]]
        acc = [100 * h["val_accuracy"] for h in res["history"]]
        # distinct styles, so that runs with equal curves stay visible on top of each other
        ax.plot(steps, acc, marker="os^D"[i % 4], ms=7 - 1.5 * (i % 4), ls=("-", "--", "-.", ":")[i % 4],
                lw=2.5 - 0.6 * (i % 4), label=f"{name} (test {100 * res['test_accuracy']:.1f}%)")
        majority = res["majority_accuracy"]
    if majority is not None:
        ax.axhline(100 * majority, color="gray", ls=":", label=f"majority class ({100 * majority:.1f}%)")
    for j, (name, acc) in enumerate((reference or {}).items()):
        ax.axhline(100 * acc, color=f"C{len(run_dirs) + j}", ls="--", lw=1, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("ListOps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)
