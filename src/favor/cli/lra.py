"""``favor lra``: Long Range Arena tasks; a thin wrapper over :mod:`favor.lra`.

``favor lra listops``: generate ListOps (cached under ``--data-cache``), train a bidirectional
Performer classifier, print the test accuracy and the training speed.  ``--preset cpu`` (default) is
the reduced configuration that fits 2 CPU cores; ``--preset lra`` is LRA's (for a GPU).  Every field
of the preset can be changed with its option.  ``favor lra plot``: validation curves of finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import CLIError
from .train import add_dataclass_options, explicit_values

__all__ = ["register"]

_MODEL_FROM_EXPERIMENT = ("vocab_size", "max_len", "seed")  # set by favor.lra.listops_config
_LRA_PUBLISHED = {"LRA Performer 18.01%": 0.1801, "LRA Transformer 36.37%": 0.3637}
_DEFAULT_PRESET = "cpu"


def _preset_defaults(part: Callable[[Any], Any]) -> dict[str, str]:
    """Field name -> the default shown in its option's help, read from the presets themselves:
    ``part`` picks the dataclass (the config, its data or its model) out of a preset's
    ListOpsConfig.  A field equal in every preset shows its value; one that differs shows
    ``from --preset: cpu -> X, lra -> Y`` (the default preset first)."""
    from ..lra import PRESETS

    names = sorted(PRESETS, key=lambda name: name != _DEFAULT_PRESET)
    parts = {name: part(PRESETS[name]()) for name in names}
    shown = {}
    for f in dataclasses.fields(parts[_DEFAULT_PRESET]):
        values = {name: getattr(obj, f.name) for name, obj in parts.items()}
        if len({repr(v) for v in values.values()}) == 1:
            shown[f.name] = str(values[_DEFAULT_PRESET])
        else:
            shown[f.name] = "from --preset: " + ", ".join(f"{name} -> {v}" for name, v in values.items())
    return shown


def register(subparsers) -> None:
    from ..lra import PRESETS, ListOpsConfig, ListOpsData
    from ..models import PerformerConfig

    p = subparsers.add_parser("lra", help="Long Range Arena tasks (ListOps)",
                              description="Long Range Arena tasks.")
    sub = p.add_subparsers(dest="task", metavar="TASK")
    sub.required = True

    q = sub.add_parser(
        "listops", help="train and test a Performer classifier on generated ListOps",
        description=(
            "Generate ListOps as LRA did (nested [MAX/[MIN/[MED/[SM expressions, 10 classes), train a "
            "bidirectional Performer (or softmax Transformer) classifier, report the test accuracy and "
            "steps/s.  Checkpoints and metrics.json go to --out; --resume continues from its checkpoint.  "
            "Options not given take the --preset's values."
        ),
    )
    g = q.add_argument_group("run")
    g.add_argument("--preset", choices=tuple(PRESETS), default=_DEFAULT_PRESET,
                   help=f"cpu: reduced model and data for 2 CPU cores; lra: LRA's configuration "
                        f"(default: {_DEFAULT_PRESET})")
    g.add_argument("--out", metavar="DIR", required=True, help="run folder (checkpoints, metrics.json)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (its configuration; only --steps may differ)")
    g.add_argument("--data-cache", metavar="DIR", default=str(Path.home() / ".cache" / "favor" / "listops"),
                   help="folder for generated datasets (default: ~/.cache/favor/listops); 'none' to not cache")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")
    tg = q.add_argument_group("training (favor.lra.ListOpsConfig)")
    top_names = add_dataclass_options(tg, ListOpsConfig, exclude=("data", "model"),
                                      defaults=_preset_defaults(lambda cfg: cfg))
    dg = q.add_argument_group("data (favor.lra.ListOpsData)")
    data_names = add_dataclass_options(dg, ListOpsData, defaults=_preset_defaults(lambda cfg: cfg.data))
    mg = q.add_argument_group("model (favor.models.PerformerConfig)")
    model_names = add_dataclass_options(mg, PerformerConfig, exclude=_MODEL_FROM_EXPERIMENT,
                                        defaults=_preset_defaults(lambda cfg: cfg.model))
    q.set_defaults(func=run_listops, _names=(top_names, data_names, model_names))

    pl = sub.add_parser("plot", help="plot validation accuracy of finished ListOps runs",
                        description="Validation accuracy against step of finished runs (their metrics.json).")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", metavar="PNG", required=True)
    pl.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    pl.add_argument("--lra-reference", action=argparse.BooleanOptionalAction, default=True,
                    help="draw LRA's published Performer/Transformer accuracies (default: yes)")
    pl.set_defaults(func=run_plot)


def run_listops(args: argparse.Namespace) -> int:
    import torch

    from ..lra import listops_config, stored_config, train_listops

    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    top_names, data_names, model_names = args._names
    top, data, model = (explicit_values(args, n) for n in (top_names, data_names, model_names))
    stored = stored_config(args.out) if args.resume else None
    if args.resume and stored is None:
        raise CLIError(f"--resume: {args.out} holds no checkpoint")
    if stored is not None:
        cfg = stored.replace(**top, **{f"data.{k}": v for k, v in data.items()},
                             **{f"model.{k}": v for k, v in model.items()})
    else:
        cfg = listops_config(args.preset, data=data, model=model, **top)
    cache = None if args.data_cache.lower() == "none" else args.data_cache
    result = train_listops(cfg, args.out, resume=args.resume, data_cache=cache, progress=args.progress)
    summary = {
        "test_accuracy": round(result.test_accuracy, 4), "val_accuracy": round(result.val_accuracy, 4),
        "majority_accuracy": round(result.majority_accuracy, 4), "steps": result.steps,
        "steps_per_second": round(result.steps_per_second, 4), "train_seconds": round(result.train_seconds, 1),
        "parameters": result.parameters, "out": str(args.out),
    }
    print(f"ListOps test accuracy {100 * result.test_accuracy:.2f}% "
          f"(majority class {100 * result.majority_accuracy:.2f}%), {result.steps} steps at "
          f"{result.steps_per_second:.3f} steps/s")
    print(json.dumps(summary))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from ..lra import plot_listops

    out = plot_listops(args.runs, args.out, labels=args.labels,
                       reference=_LRA_PUBLISHED if args.lra_reference else None)
    print(out)
    return 0
