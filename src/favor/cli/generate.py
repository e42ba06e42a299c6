"""``favor generate``: sample from a checkpoint of ``favor train`` with recurrent decoding,
streaming the text to stdout as it is produced."""

from __future__ import annotations

import argparse
import sys

from . import CLIError

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a trained checkpoint (streams to stdout)",
        description=(
            "Load a checkpoint written by `favor train` (a run folder or one of its step-* folders), "
            "encode --prompt with the checkpoint's tokenizer, and print the prompt followed by the "
            "sampled continuation as it is produced.  Protein models stop at the end-of-sequence token."
        ),
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run folder or checkpoint folder")
    p.add_argument("--prompt", default="", metavar="TEXT",
                   help="text to continue (byte models need at least one character; protein models "
                        "may start from nothing)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to sample (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="softmax temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint, load_weights
    from ..data.corpus import tokenizer_from_name
    from ..models import PerformerConfig, PerformerLM

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise CLIError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    if not 0 <= args.seed < 1 << 63:
        raise CLIError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(args.checkpoint, optimizer=False)
    tok = tokenizer_from_name(ckpt.config["tokenizer"])
    model = PerformerLM(PerformerConfig.from_dict(ckpt.config["model"]))
    load_weights(model, ckpt, strict_buffers=True)
    model.eval()
    ids = tok.encode(args.prompt)
    if not ids:
        raise CLIError("--prompt is empty; a byte-level model needs at least one character to continue")
    if args.top_k is not None and args.top_k > tok.vocab_size:
        raise CLIError(f"--top-k {args.top_k} exceeds the vocabulary size {tok.vocab_size}")
    prompt = torch.tensor([ids], dtype=torch.long)  # (1, L0)
    g = torch.Generator().manual_seed(args.seed)
    # generate_stream checks its arguments (e.g. prompt + new tokens <= max_len) when called, so
    # a bad request fails before anything is printed
    stream = model.generate_stream(prompt, args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, generator=g)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    dec = tok.decode_stream()
    eos = getattr(tok, "eos", None)
    with torch.no_grad():
        for t in stream:
            token = int(t[0])
            out.write(dec.feed(token))
            out.flush()
            if token == eos:
                break
    out.write(dec.flush())
    if eos is None:
        out.write("\n")
    out.flush()
    return 0
