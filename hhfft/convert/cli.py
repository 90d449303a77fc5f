"""``hhfft convert`` and ``hhfft distill`` for Hugging Face model directories (merged into ``hhfft.cli``).

    hhfft convert MODEL_DIR --out OUT_DIR [--text FILE] [--steps N]    convert; distill first when --text is given
    hhfft distill MODEL_DIR --out OUT_DIR --text FILE [--steps N]      distill (from OUT_DIR's maps if present)

OUT_DIR receives ``hedgehog.safetensors`` and ``hhfft_manifest.json``; MODEL_DIR is only read.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["COMMANDS"]


def _parser(prog: str, text_required: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="directory for the converted checkpoint")
    p.add_argument("--text", required=text_required, help="UTF-8 text file: one sentence or paragraph per line")
    from hhfft.cli import _positive_int

    p.add_argument("--steps", type=_positive_int, default=200, help="distillation steps (with --text)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=_positive_int, default=16)
    p.add_argument("--length", type=_positive_int, default=64, help="tokens per sequence")
    from hhfft.nn.hedgehog import FeatureMapKind

    p.add_argument("--kind", default="softmax_split", choices=[k.value for k in FeatureMapKind],
                   help="feature map kind")
    p.add_argument("--feature-dim", type=_positive_int, default=None)
    p.add_argument("--picture", default=None, help="PNG of one head's attention before/after distillation")
    return p


def _run(argv: list, prog: str, always_distill: bool) -> int:
    args = _parser(prog, always_distill).parse_args(argv)
    import torch

    from hhfft.convert.checkpoint import MANIFEST, load_converted, save_converted
    from hhfft.convert.core import convert
    from hhfft.convert.distill import distill
    from hhfft.convert.hf import encode, load_hf_model, load_tokenizer, text_lines
    from hhfft.convert.modules import HedgehogConfig

    if os.path.abspath(args.out) == os.path.abspath(args.model):
        print(f"{prog}: --out must differ from the model directory (the original checkpoint is never written)",
              file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"{prog}: {args.model} has no config.json; give a Hugging Face model directory", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"{prog}: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    lines = None
    if args.text and not os.path.isfile(args.text):
        print(f"{prog}: --text {args.text} is not a file", file=sys.stderr)
        return 2
    if args.text:  # checked before the (slow) conversion
        lines = text_lines(args.text)
        if not lines:
            print(f"{prog}: {args.text} has no line of at least 4 words (one sentence or paragraph per line)",
                  file=sys.stderr)
            return 2
    torch.manual_seed(0)
    model, inputs = load_hf_model(args.model, length=min(args.length, 64))
    if always_distill and os.path.exists(os.path.join(args.out, MANIFEST)):
        load_converted(model, args.out)
        print(f"loaded the feature maps from {args.out} (--kind and --feature-dim apply to new conversions only; "
              "give a new --out to convert with other maps)")
    else:
        report = convert(model, inputs, HedgehogConfig(kind=args.kind, feature_dim=args.feature_dim))
        print(report)
    if args.text:
        tok = load_tokenizer(args.model)
        if tok is None:
            print(f"{prog}: {args.model} has no tokenizer; --text needs one", file=sys.stderr)
            return 2
        batches = [encode(tok, lines[i:i + args.batch], args.length) for i in range(0, len(lines), args.batch)]
        if "use_cache" in inputs:
            for b in batches:
                b["use_cache"] = False
        res = distill(model, batches, steps=args.steps, lr=args.lr, stream=sys.stdout, picture=args.picture)
        print(res)
    save_converted(model, args.out)
    print(f"wrote {os.path.join(args.out, MANIFEST)}")
    return 0


def _convert(argv: list) -> int:
    return _run(argv, "hhfft convert", always_distill=False)


def _distill(argv: list) -> int:
    return _run(argv, "hhfft distill", always_distill=True)


COMMANDS = {"convert": _convert, "distill": _distill}
