"""``hhfft convert`` and ``hhfft distill`` for Hugging Face model directories (merged into ``hhfft.cli``).

    hhfft convert MODEL_DIR --out OUT_DIR [--text FILE] [--steps N]    convert; distill first when --text is given
    hhfft distill MODEL_DIR --out OUT_DIR --text FILE [--steps N]      distill (from OUT_DIR's maps if present)

Which sites and what they become: ``--layers``, ``--exclude``, ``--kind``, ``--feature-dim``, ``--window``,
``--sinks`` (``HedgehogConfig``). With ``--text``: attention transfer (``--steps``, ``--lr``, ``--schedule``), then,
with ``--tune-steps``, the maps tuned so that the converted model's last hidden states follow the original's on the
same text (``tune_maps``; 1 - cosine per token; the original is loaded a second time for it).
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
    from hhfft.cli import _int_at_least, _positive_int

    _non_negative_int = _int_at_least(0, "an integer >= 0")

    p.add_argument("--steps", type=_positive_int, default=200, help="distillation steps (with --text)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=_positive_int, default=16)
    p.add_argument("--length", type=_positive_int, default=64, help="tokens per sequence")
    from hhfft.nn.hedgehog import FeatureMapKind

    p.add_argument("--kind", default="softmax_split", choices=[k.value for k in FeatureMapKind],
                   help="feature map kind")
    p.add_argument("--feature-dim", type=_positive_int, default=None)
    p.add_argument("--layers", type=_site_indices, default=None,
                   help="comma-separated attention sites to convert, by index in forward order (default: all)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="module paths that stay softmax (fnmatch; repeatable)")
    p.add_argument("--window", type=_non_negative_int, default=0,
                   help="softmax over the keys within this many positions, Hedgehog for the rest (0: none)")
    p.add_argument("--sinks", type=_non_negative_int, default=0,
                   help="softmax over the first N keys, Hedgehog for the rest (0: none)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="lr schedule (with --text)")
    p.add_argument("--tune-steps", type=_non_negative_int, default=0,
                   help="second stage (with --text): maps tuned on the last hidden states (0: none)")
    p.add_argument("--tune-lr", type=float, default=2e-3)
    p.add_argument("--picture", default=None, help="PNG of one head's attention before/after distillation")
    return p


def _site_indices(text: str) -> tuple:
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated site indices such as 1,2,3, got {text!r}") from None


def _hidden_state_loss(original):
    """loss_fn of tune_maps: 1 - cosine of the converted model's last hidden state to the original's, per token,
    averaged over the tokens the attention mask keeps."""
    import torch

    def loss_fn(model, batch):
        with torch.no_grad():
            ref = original(**batch).last_hidden_state
        got = model(**batch).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(ref.float(), got.float(), dim=-1)
        mask = batch["attention_mask"].to(cos.dtype)
        return ((1 - cos) * mask).sum() / mask.sum().clamp_min(1)
    return loss_fn


def _run(argv: list, prog: str, always_distill: bool) -> int:
    args = _parser(prog, always_distill).parse_args(argv)
    import torch

    from hhfft.convert.checkpoint import MANIFEST, load_converted, save_converted
    from hhfft.convert.core import convert
    from hhfft.convert.distill import distill, tune_maps
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
    try:
        config = HedgehogConfig(kind=args.kind, feature_dim=args.feature_dim, layers=args.layers,
                                exclude=tuple(args.exclude), window=args.window, sinks=args.sinks)
    except ValueError as e:  # --window with --sinks
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.tune_steps and not args.text:
        print(f"{prog}: --tune-steps needs --text (the maps are tuned on that text)", file=sys.stderr)
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
        print(f"loaded the feature maps from {args.out} (--kind, --feature-dim, --layers, --exclude, --window and "
              "--sinks apply to new conversions only; give a new --out to convert with other maps)")
    else:
        print(convert(model, inputs, config))
    if args.text:
        tok = load_tokenizer(args.model)
        if tok is None:
            print(f"{prog}: {args.model} has no tokenizer; --text needs one", file=sys.stderr)
            return 2
        batches = [encode(tok, lines[i:i + args.batch], args.length) for i in range(0, len(lines), args.batch)]
        if "use_cache" in inputs:
            for b in batches:
                b["use_cache"] = False
        res = distill(model, batches, steps=args.steps, lr=args.lr, lr_schedule=args.schedule, stream=sys.stdout,
                      picture=args.picture)
        print(res)
        if args.tune_steps:
            original, _ = load_hf_model(args.model, length=min(args.length, 64))
            hist = tune_maps(model, batches, _hidden_state_loss(original), steps=args.tune_steps, lr=args.tune_lr,
                             lr_schedule=args.schedule, stream=sys.stdout)
            print(f"tuning: hidden-state loss {hist[0]:.5f} (first step) -> {hist[-1]:.5f} (last step)")
    save_converted(model, args.out)
    print(f"wrote {os.path.join(args.out, MANIFEST)}")
    return 0


def _convert(argv: list) -> int:
    return _run(argv, "hhfft convert", always_distill=False)


def _distill(argv: list) -> int:
    return _run(argv, "hhfft distill", always_distill=True)


COMMANDS = {"convert": _convert, "distill": _distill}
