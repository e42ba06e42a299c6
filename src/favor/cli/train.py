"""``favor train``: train a byte-level (or protein) PerformerLM; a thin wrapper over
:func:`favor.training.train`.

The model options are generated from the fields of :class:`favor.models.PerformerConfig` and the
trainer options from :class:`favor.training.TrainConfig` (their help is the fields' metadata), with
the few defaults in :data:`MODEL_DEFAULTS` changed so that the default run takes about 5 minutes
on 2 CPU cores.  Exit status: 0 when done, 130 after Ctrl-C (a checkpoint is saved first), 2 on a
usage or data error (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

from . import CLIError, folder_blocker

__all__ = ["MODEL_DEFAULTS", "add_dataclass_options", "register"]

#: Defaults of ``favor train`` that differ from PerformerConfig's: the small model that trains
#: in about 5 minutes on 2 CPU cores.  ``vocab_size`` comes from the data.
MODEL_DEFAULTS: dict[str, Any] = {}
_FROM_DATA = ("vocab_size",)  # set from the tokenizer
_FROM_TRAINER = ("seed",)  # the model's projection seed is the trainer's --seed
EXIT_INTERRUPTED = 130


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _none_or(tp: type) -> Any:
    def convert(text: str) -> Any:
        return None if text.lower() == "none" else tp(text)

    convert.__name__ = tp.__name__  # argparse names the type in its error messages
    return convert


def add_dataclass_options(
    parser: argparse.ArgumentParser | Any, cls: type, *, exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """Add one ``--field-name`` option per field of dataclass ``cls``: type, ``choices`` and help
    from the field's annotation and metadata; ``bool`` fields get ``--x/--no-x``; fields that may be
    None accept ``none``.  Options not given stay absent from the namespace (so that
    :func:`explicit_values` can tell what the user typed); the help shows the field's default (or
    ``defaults[name]``).  Returns the field names."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        default = (defaults or {}).get(f.name, f.default)
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if optional:
            tp = args[0]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _none_or(tp) if optional else tp
            choices = f.metadata.get("choices")
            if choices is not None:
                kwargs["choices"] = tuple(choices) + ((None,) if optional else ())
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + (",none" if optional else "") + "}"
            else:
                kwargs["metavar"] = f.name.upper()
        kwargs["help"] = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        parser.add_argument(_option(f.name), **kwargs)
        names.append(f.name)
    return names


def explicit_values(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def register(subparsers) -> None:
    from ..models import PerformerConfig
    from ..training import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train a byte-level Performer LM (default data: this Python's standard library)",
        description=(
            "Train a PerformerLM on bytes (text) or amino acids (FASTA).  Without --data the corpus "
            "is the running interpreter's standard-library .py sources.  Outputs go to --out "
            "(default runs/<data>-<attention>[-N]): checkpoints step-NNNNNNN/ (LATEST names the "
            "newest), metrics.jsonl, loss.png, summary.json.  Ctrl-C saves a checkpoint and exits "
            "with status 130; --resume continues exactly where it stopped."
        ),
    )
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data", metavar="PATH", default=None,
                   help="text file, folder of text files, or FASTA file/folder (default: the embedded stdlib corpus)")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="run folder (default: runs/<data>-<attention>, with -2, -3, ... if taken)")
    g.add_argument("--resume", metavar="PATH", nargs="?", const="", default=None,
                   help="continue a run from its checkpoint (a run folder or a step-* folder; "
                        "without PATH: --out); options given explicitly must agree with the checkpoint, "
                        "except --steps (extends the run; the learning-rate schedule then ends at the new --steps), "
                        "--eval-*, --save-every and --stop-at")
    g.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                   help="start from these weights (fresh optimizer, step 0); the model options default to the "
                        "checkpoint's, and attention options may differ (e.g. softmax -> favor)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")
    tg = p.add_argument_group("training (favor.training.TrainConfig)")
    train_names = add_dataclass_options(tg, TrainConfig)
    mg = p.add_argument_group("model (favor.models.PerformerConfig)")
    model_names = add_dataclass_options(mg, PerformerConfig, exclude=_FROM_DATA + _FROM_TRAINER, defaults=MODEL_DEFAULTS)
    p.set_defaults(func=run, _train_names=train_names, _model_names=model_names)
    from ..distributed import add_distributed_options

    add_distributed_options(p)


def _conflicts(explicit: dict[str, Any], stored: dict[str, Any], where: str, fixed: set[str]) -> None:
    for name, value in explicit.items():
        if name in fixed and name in stored and stored[name] != value:
            raise CLIError(
                f"{_option(name)} {value} conflicts with the checkpoint's {name}={stored[name]!r} ({where}); "
                "drop the option to resume, or start a new run"
            )


def _default_out(corpus_source: str, attention: str) -> Path:
    name = "stdlib" if corpus_source == "stdlib" else Path(corpus_source).stem or "data"
    base = Path("runs") / f"{name}-{attention}"
    out, n = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{n}")
        n += 1
    return out


def run(args: argparse.Namespace) -> int:
    from ..distributed import command_line, init_distributed, launch, shutdown

    if args.nproc != 1:  # relaunch this command under torchrun
        _check_before_launch(args)
        return launch(["train", *command_line(args._parser, args, drop=("nproc",))], args.nproc)
    dist_ctx = init_distributed(args.backend)  # single-process context outside torchrun
    code = None
    try:
        code = _run(args, dist_ctx)
        return code
    finally:
        shutdown(dist_ctx, synchronize=code == 0)


def _check_before_launch(args: argparse.Namespace) -> None:
    """What can be checked before torchrun starts the workers (whose errors come back as its
    multi-line reports): the batch split and a new run's --out (launch itself rejects a bad
    --nproc)."""
    from ..training import TrainConfig

    batch = getattr(args, "batch_size", None)  # absent unless given (argparse.SUPPRESS)
    if batch is None and args.resume is None:
        batch = TrainConfig.batch_size
    if batch is not None and args.nproc >= 1 and batch % args.nproc:
        raise CLIError(f"--batch-size {batch} must be divisible by --nproc {args.nproc}")
    if args.resume is None and args.out is not None:
        _check_new_out(Path(args.out))


def _check_new_out(out: Path) -> None:
    """A new run never writes into a folder that holds something, nor below a file."""
    reason = folder_blocker(out)
    if reason is not None:
        raise CLIError(f"--out: {reason}")
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"--out {out} is not empty; pass --resume to continue that run, or another --out")


def _run(args: argparse.Namespace, dist_ctx: Any) -> int:
    import torch

    from ..checkpoint import find_checkpoint, load_checkpoint, load_weights
    from ..data.corpus import load_corpus
    from ..distributed import data_parallel
    from ..models import PerformerConfig, PerformerLM
    from ..training import TrainConfig, describe_run, make_optimizer, restore_training_state, train

    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.resume is not None and args.init_from is not None:
        raise CLIError("--resume and --init-from exclude each other")
    model_explicit = explicit_values(args, args._model_names)
    train_explicit = explicit_values(args, args._train_names)
    fixed_train = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("fixed_on_resume")}

    ckpt = None
    if args.resume is not None:
        resume_path = args.resume or args.out
        if not resume_path:
            raise CLIError("--resume without a PATH needs --out")
        ckpt = load_checkpoint(resume_path)
        where = str(ckpt.path)
        if not isinstance(ckpt.config.get("data"), dict) or "fingerprint" not in ckpt.config["data"] \
                or not isinstance(ckpt.config.get("train"), dict):
            raise CLIError(f"checkpoint {where} has no training description (config.json 'data'/'train'); "
                           "it was not written by favor train")
        stored_source = ckpt.config["data"]["source"]
        # against the stored configs with defaults filled in: an option added after the checkpoint
        # was written (e.g. key_estimator) must agree with the default the checkpoint was run with
        stored_model = dataclasses.asdict(PerformerConfig.from_dict(ckpt.config["model"]))
        stored_train = dataclasses.asdict(TrainConfig.from_dict(ckpt.config["train"]))
        _conflicts(model_explicit, stored_model, where, set(model_explicit))
        _conflicts(train_explicit, stored_train, where, fixed_train)
        data = args.data if args.data is not None else (None if stored_source == "stdlib" else stored_source)
        if args.data is not None and str(Path(args.data).expanduser().resolve()) != stored_source:
            raise CLIError(f"--data {args.data} conflicts with the checkpoint's data {stored_source!r} ({where})")
        corpus = load_corpus(data)
        if corpus.fingerprint() != ckpt.config["data"]["fingerprint"]:
            raise CLIError(f"the data at {stored_source!r} changed since checkpoint {where} was written")
        model_cfg = PerformerConfig.from_dict(ckpt.config["model"])
        # --stop-at belongs to one invocation: a resumed run goes on to --steps unless told otherwise.
        train_cfg = TrainConfig.from_dict({**ckpt.config["train"], "stop_at": 0, **train_explicit})
        out = Path(args.out) if args.out else ckpt.path.parent
        if out.resolve() != ckpt.path.parent.resolve() and out.exists() and any(out.iterdir()):
            raise CLIError(f"--out {out} is not empty and is not the run of checkpoint {where}; "
                           "leave --out out to continue in that run, or give an empty folder")
        # the trainer stops at min(steps, stop_at): a --stop-at beyond --steps does not extend the run
        target = min(train_cfg.steps, train_cfg.stop_at) if train_cfg.stop_at else train_cfg.steps
        if target <= ckpt.step:
            raise CLIError(f"checkpoint {where} is at step {ckpt.step}: training to step {target} has nothing "
                           f"to do; pass --steps above {ckpt.step}")
    else:
        corpus = load_corpus(args.data)
        base: dict[str, Any] = dict(MODEL_DEFAULTS)
        init = None
        if args.init_from is not None:
            init = load_checkpoint(args.init_from, optimizer=False)
            base = dict(init.config["model"])
            if init.config["tokenizer"] != corpus.tokenizer.name:
                raise CLIError(
                    f"--init-from {args.init_from} was trained on {init.config['tokenizer']} tokens, "
                    f"the data gives {corpus.tokenizer.name} tokens"
                )
        base.update(model_explicit)
        base["vocab_size"] = corpus.tokenizer.vocab_size
        base["seed"] = train_explicit.get("seed", TrainConfig.seed)
        model_cfg = PerformerConfig(**base) if init is None else PerformerConfig.from_dict(base)
        train_cfg = TrainConfig(**train_explicit)
        if args.out is not None:
            out = Path(args.out)
            _check_new_out(out)
        else:
            out = _default_out(corpus.source, model_cfg.attention)

    if train_cfg.seq_len > model_cfg.max_len:
        raise CLIError(f"--seq-len {train_cfg.seq_len} exceeds the model's max_len {model_cfg.max_len}; "
                       "raise --max-len")
    for what, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) < train_cfg.seq_len + 1:  # checked before anything is printed or built
            raise CLIError(f"the {what} split of {corpus.source} has {len(tokens)} tokens, fewer than "
                           f"--seq-len + 1 = {train_cfg.seq_len + 1}; use more data or a shorter --seq-len")
    torch.manual_seed(train_cfg.seed)
    model = PerformerLM(model_cfg).to(dist_ctx.device)
    optimizer = make_optimizer(model, train_cfg)
    start = 0
    if ckpt is not None:
        start = restore_training_state(model, optimizer, ckpt)
    elif args.init_from is not None:
        skipped = load_weights(model, init, strict_buffers=False)
        if skipped:
            print(f"init-from {init.path}: kept this model's own {', '.join(skipped)}", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    if dist_ctx.is_main:
        print(f"data: {corpus.describe()}", file=sys.stderr)
        print(f"model: {n_params:,} parameters, attention={model_cfg.attention}; run folder: {out}"
              + (f"; resuming at step {start}" if ckpt is not None else ""), file=sys.stderr)
    result = train(model, optimizer, corpus, train_cfg, out_dir=out,
                   checkpoint_config=describe_run(model_cfg.to_dict(), train_cfg, corpus),
                   start_step=start, progress=args.progress,
                   **data_parallel(model, dist_ctx, batch_size=train_cfg.batch_size,
                                   data_fingerprint=corpus.fingerprint()))
    if not dist_ctx.is_main:
        return EXIT_INTERRUPTED if result.interrupted else 0
    unit = corpus.tokenizer.unit
    if result.val_bits is not None:
        print(f"validation: {result.val_bits:.4f} bits per {unit} at step {result.val_step}")
    print(f"throughput: {result.tokens_per_s:,.0f} tokens/s")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics: {result.metrics}")
    print(f"loss curve: {result.plot}")
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: favor train --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
