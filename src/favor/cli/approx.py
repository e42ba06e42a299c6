"""``favor approx``: how closely each feature kind × projection approximates softmax attention.

A thin wrapper over :mod:`favor.approx`: builds an :class:`favor.approx.ApproxConfig`, runs the sweep,
prints a compact table, and writes JSON and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import CLIError

__all__ = ["register"]

QUICK = dict(length=512, budgets=(16, 64, 256), seeds=3, rows=128, pairs=256)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(subparsers) -> None:
    from ..approx import DISTRIBUTIONS, ApproxConfig
    from ..feature_maps import KEY_ESTIMATORS

    d = ApproxConfig()
    p = subparsers.add_parser(
        "approx",
        help="approximation error of every feature kind x projection vs exact softmax attention",
        description=(
            "Sweep the number of output features M for every feature kind and projection on random "
            "q, k, v (default: the Performer paper's setting L=4096, d=16, 15 seeds, q,k,v ~ N(0, sigma^2) "
            f"with sigma={d.sigma}: logits of std sigma^2, so attention is neither uniform nor one-hot), "
            "and report the MSE of the attention matrix, the relative error of the attention output "
            "and the per-entry MSE of the kernel estimate (mean and std over seeds).  Budgets count "
            "output features: hyperbolic, trig and hyperbolic_oprf use M/2 projections."
        ),
    )
    p.add_argument("--quick", action="store_true",
                   help=f"a run of seconds: L={QUICK['length']}, M in {QUICK['budgets']}, {QUICK['seeds']} seeds "
                        "(options given explicitly still win)")
    p.add_argument("--against", choices=("theory",), default=None,
                   help="theory: also plot the i.i.d. per-entry MSE against Lemma 2's closed form")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON to FILE")
    p.add_argument("--plot-dir", metavar="DIR", default=None, help="write approx_<projection>.png (and "
                   "approx_theory.png) to DIR")
    p.add_argument("--prefix", default=None, help="file-name prefix of the plots (with --plot-dir; default: approx)")
    p.add_argument("--seeds", type=int, default=None, metavar="S", help=f"seeds (default: {d.seeds})")
    p.add_argument("--dist", choices=DISTRIBUTIONS, default=None,
                   help=f"distribution of the entries of q, k, v, all with std sigma (default: {d.distribution})")
    p.add_argument("--sigma", type=float, default=None, help=f"std of the entries of q, k, v (default: {d.sigma})")
    p.add_argument("--length", type=int, default=None, metavar="L", help=f"sequence length (default: {d.length})")
    p.add_argument("--dim", type=int, default=None, metavar="D",
                   help=f"head dim (default: {d.dim}; with --model: the model's)")
    p.add_argument("--budgets", type=_ints, default=None, metavar="M1,M2,...",
                   help=f"output-feature budgets (default: {','.join(map(str, d.budgets))})")
    p.add_argument("--features", type=_names, default=None, metavar="K1,K2,...",
                   help=f"feature kinds (default: {','.join(d.features)})")
    p.add_argument("--projections", type=_names, default=None, metavar="P1,P2,...",
                   help=f"projection kinds (default: {','.join(d.projections)})")
    p.add_argument("--key-estimator", choices=KEY_ESTIMATORS, default=None,
                   help="keys' features: plain (default, unbiased) or the self-normalised normalized/calibrated "
                        "(small bias, vanishing as M grows; not with trig: give --features)")
    p.add_argument("--causal", action="store_true",
                   help="causal attention (query t sees keys 0..t; with --model: as the model is)")
    p.add_argument("--rows", type=int, default=None, metavar="R",
                   help=f"query rows sampled for the errors (default: {d.rows}; >= L means all)")
    p.add_argument("--pairs", type=int, default=None, metavar="P",
                   help=f"(query, key) pairs sampled for the kernel MSE (default: {d.pairs})")
    p.add_argument("--precision", choices=("float32", "float64"), default=None,
                   help=f"dtype of the features (default: {d.precision}; references are float64)")
    p.add_argument("--base-seed", type=int, default=None, help=f"salt of the seed streams: seed s draws from (BASE_SEED, s), so another value gives other "
                        f"draws; it does not pick a seed of the default run (default: {d.base_seed})")
    p.add_argument("--model", metavar="CHECKPOINT", default=None,
                   help="use the real queries and keys of a `favor train` checkpoint's attention layers "
                        "(run folder or step folder) instead of random inputs")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="with --model: the text fed to the model, a FASTA file for a protein model "
                        "(default: this module's own source; a protein model needs --text)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from ..approx import ApproxConfig

    fields = dict(QUICK) if args.quick else {}
    explicit = {
        "seeds": args.seeds, "distribution": args.dist, "sigma": args.sigma, "length": args.length,
        "dim": args.dim, "budgets": args.budgets, "features": args.features, "projections": args.projections,
        "rows": args.rows, "pairs": args.pairs, "precision": args.precision, "base_seed": args.base_seed,
        "key_estimator": args.key_estimator,
    }
    fields.update({k: v for k, v in explicit.items() if v is not None})
    if args.causal:
        fields["causal"] = True
    return ApproxConfig(**fields)


def _prepare_outputs(args: argparse.Namespace) -> None:
    """Check (and create the folders of) --json and --plot-dir before the sweep, not after it."""
    if args.json is not None:
        path = Path(args.json)
        if path.is_dir():
            raise CLIError(f"--json {args.json} is a folder; give a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
    if args.plot_dir is not None:
        folder = Path(args.plot_dir)
        if folder.exists() and not folder.is_dir():
            raise CLIError(f"--plot-dir {args.plot_dir} is a file; give a folder")
        folder.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..approx import format_table, format_theory_table, plot_sweep, run_sweep

    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.text is not None and args.model is None:
        raise CLIError("--text needs --model")
    if args.prefix is not None and args.plot_dir is None:
        raise CLIError("--prefix names the plots: give --plot-dir")
    if args.prefix is not None and not args.prefix.strip():
        raise CLIError("--prefix must not be empty")
    if args.against == "theory":
        if args.key_estimator not in (None, "plain"):
            raise CLIError("--against theory compares with Lemma 2's closed form, which is for plain key features")
        if args.projections is not None and "iid" not in args.projections:
            raise CLIError("--against theory needs the iid projection (add iid to --projections)")
        if args.plot_dir is None:
            raise CLIError("--against theory draws a plot: give --plot-dir")
    if args.model is not None:
        if args.dist is not None or args.sigma is not None:
            raise CLIError("--dist and --sigma describe random inputs; they do not apply with --model")
        given = [name for name, value in (("--dim", args.dim is not None), ("--causal", args.causal)) if value]
        if given:
            raise CLIError(f"with --model the model sets the head dim and causality; drop {' and '.join(given)}")
    config = _config(args)
    inputs = None
    if args.model is not None:
        from ..approx import model_inputs

        config, inputs, about = model_inputs(args.model, config, text_path=args.text)
        print(about, file=sys.stderr)
    _prepare_outputs(args)
    result = run_sweep(config, inputs=inputs, progress=args.progress)
    if args.model is not None:
        result["model"] = {"checkpoint": str(args.model)}
    stats = result["input_statistics"]
    print("exact attention: "
          + ", ".join(f"{k} {v['mean']:.3g}" for k, v in stats.items())
          + f"  ({'causal' if config.causal else 'bidirectional'}, L={config.length}, d={config.dim})")
    print(format_table(result))
    print(format_table(result, quantity="attention_mse"))
    if args.against == "theory":
        print(format_theory_table(result))
    if args.json is not None:
        path = Path(args.json)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    if args.plot_dir is not None:
        prefix = "approx" if args.prefix is None else args.prefix
        for path in plot_sweep(result, args.plot_dir, prefix=prefix, against_theory=args.against == "theory"):
            print(f"wrote {path}")
    return 0
