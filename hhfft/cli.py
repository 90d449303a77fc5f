"""The ``hhfft`` command line: ``hhfft demo | explain | bench | gpt | convert | distill``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum``, else a usage error that says "expected <what>"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")


def _explain(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hhfft explain", description="Print every site hhfft finds in a model.")
    p.add_argument("model", nargs="?", default="demo", help="'demo' (the built-in HyenaLM) or a Hugging Face model directory")
    p.add_argument("--length", type=_positive_int, default=512)
    p.add_argument("--min-kernel-size", type=_positive_int, default=64)
    args = p.parse_args(argv)
    import torch

    import hhfft

    if args.model == "demo":
        from hhfft.models import HyenaLM

        from hhfft.models import HyenaConfig

        model = HyenaLM(HyenaConfig(max_len=max(2048, args.length)))  # as `hhfft demo` builds it
        inputs = (torch.randint(0, 256, (2, args.length)),)
    else:
        from hhfft.convert.hf import as_positional, load_hf_model  # lazily: transformers is optional

        hf_model, hf_inputs = load_hf_model(args.model, length=args.length)
        model, inputs = as_positional(hf_model, hf_inputs)
    print(hhfft.explain(model, *inputs, min_kernel_size=args.min_kernel_size))
    return 0


def _bench(argv: list[str]) -> int:
    import runpy

    p = argparse.ArgumentParser(prog="hhfft bench", description="Run a benchmark from benchmarks/ (GPU).")
    p.add_argument("name", choices=["fftconv", "linear_attention", "adahessian"])
    args, rest = p.parse_known_args(argv)
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{args.name}.py")
    if not os.path.exists(path):
        print(f"hhfft bench: {path} not found (benchmarks ship with the source checkout, not the wheel)", file=sys.stderr)
        return 2
    sys.argv = [path, *rest]
    runpy.run_path(path, run_name="__main__")
    return 0


def _gpt(argv: list[str]) -> int:
    from hhfft.models.gpt_pipeline import main as gpt_main  # the GPT conversion experiment (issue #8)

    return gpt_main(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": None, "explain": _explain, "bench": _bench, "gpt": _gpt}
    try:
        from hhfft.convert import cli as convert_cli  # conversion commands, when present
        commands.update(convert_cli.COMMANDS)
    except ImportError:
        pass
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: hhfft {" + ",".join(commands) + "} [args]\n\n"
              "  demo     find, rewrite, check and time the long convolutions of a Hyena-style LM\n"
              "  explain  print every site hhfft finds in a model (the demo model, or a HF model directory)\n"
              "  bench    run a GPU benchmark from benchmarks/\n"
              "  gpt      the GPT conversion experiment: prepare | train | finetune | table", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from hhfft.demo import main as demo_main

        return demo_main(argv[1:])
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
