"""The ``"hhfft"`` torch.compile backend: hhfft's passes on the Dynamo graph, then Inductor.

    torch.compile(model, backend="hhfft", options={"min_kernel_size": 32, "attention": "keep"})
    torch.compile(model, backend="hhfft", mode="reduce-overhead")     # and CUDA graphs, as Inductor's modes
    torch.compile(model, backend="hhfft", options={"attention": "keep", "mode": "reduce-overhead"})  # both

Registered under the ``torch_dynamo_backends`` entry point (found without importing hhfft) and, for checkouts used
without an install, when ``hhfft`` is imported. Inductor runs through ``compile_fx`` with per-compile
``config_patches``; no global config is touched.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
import torch.fx as fx

from hhfft.passes.report import Report

__all__ = ["Options", "capture", "explain", "hhfft_backend", "last_report", "run_passes"]

_graph_ids = itertools.count(1)
_recent: collections.deque[Report] = collections.deque(maxlen=32)


@dataclass(frozen=True)
class Options:
    """Backend options, given as ``torch.compile(..., options={...})``.

    min_kernel_size: conv1d spellings with a kernel shorter than this stay as they are (direct convolution wins
        there); a convolution the model already computes with FFTs is rewritten at any length.
    longconv: rewrite long convolutions to ``hhfft::fftconv``.
    attention: "canonical" rewrites every proved softmax attention to F.scaled_dot_product_attention; "keep" only
        reports it (and so leaves converted sites softmax: Hedgehog replaces the canonical sites).
    linearize: sites whose owner module carries Hedgehog feature maps (``hhfft.convert``) become
        ``hhfft::linear_attention``.
    compiler: "inductor" (default) compiles the rewritten graph with Inductor; "eager" runs it as it is (the passes
        without Inductor: fast to compile, used by the property tests).
    mode: Inductor's mode ("default", "reduce-overhead", "max-autotune", ...), as ``torch.compile(mode=...)``, which
        torch.compile refuses together with ``options``: this is how to give both (no effect with compiler="eager").
    """

    min_kernel_size: int = 64
    longconv: bool = True
    attention: Literal["canonical", "keep"] = "canonical"
    linearize: bool = True
    compiler: Literal["inductor", "eager"] = "inductor"
    mode: Optional[str] = None

    @classmethod
    def parse(cls, options: Optional[dict] = None) -> "Options":
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise TypeError(f"hhfft: options must be a dict, got {type(options).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in options.items():
            if key not in names:
                raise ValueError(f"hhfft: unknown option {key!r}; valid options are: {', '.join(names)}")
            hint = hints[key]
            if typing.get_origin(hint) is Literal:
                if value not in typing.get_args(hint):
                    raise ValueError(f"hhfft: option {key!r} must be one of {typing.get_args(hint)}, got {value!r}")
            elif hint is bool and not isinstance(value, bool):
                raise TypeError(f"hhfft: option {key!r} must be True or False, got {value!r}")
            elif hint is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"hhfft: option {key!r} must be a positive int, got {value!r}")
            elif hint == Optional[str] and value is not None and not isinstance(value, str):
                raise TypeError(f"hhfft: option {key!r} must be a string, got {value!r}")
        _config_patches(options.get("mode"))  # an unknown mode is refused here too (it has no effect without Inductor)
        return cls(**options)


def _passes(opts: Options) -> list[Callable[[fx.GraphModule, Options, Report], None]]:
    """The pass pipeline for these options, in order. Each pass mutates the graph and records sites in the report."""
    from hhfft.passes import attention, linearize, longconv

    pipeline = [longconv.run if opts.longconv else longconv.analyze, attention.run]
    if opts.linearize:
        pipeline.append(linearize.run)
    return pipeline


def run_passes(gm: fx.GraphModule, opts: Options) -> Report:
    """Run hhfft's passes on a Dynamo graph in place; return what they found."""
    report = Report()
    graph_id = next(_graph_ids)
    for p in _passes(opts):
        p(gm, opts, report)
    for site in report:
        site.graph_id = graph_id
    gm.graph.lint()
    gm.recompile()
    return report


def last_report() -> Report:
    """Sites of the graphs the backend compiled most recently (up to 32 graphs), newest last."""
    merged = Report()
    for r in _recent:
        merged.extend(r)
    return merged


def _config_patches(mode: Optional[str]) -> dict:
    """Inductor config for this compile only: what ``torch.compile(mode=...)`` sets for Inductor (reduce-overhead:
    CUDA graphs; max-autotune: autotuned templates and CUDA graphs)."""
    if not mode:  # Inductor's list_mode_options("") would return its whole table of modes
        return {}
    from torch._inductor import list_mode_options

    try:
        return dict(list_mode_options(mode))
    except RuntimeError as e:  # Inductor's message lists the modes it knows
        raise ValueError(f"hhfft: unknown mode {mode!r}: {e}") from None


def hhfft_backend(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Optional[dict] = None,
    mode: Optional[str] = None,
    *,
    report_sink: Optional[Callable[[Report], None]] = None,
):
    """torch.compile backend: passes, then Inductor (or the rewritten graph as is, with compiler="eager").

    ``torch.compile(model, backend="hhfft", mode="reduce-overhead")`` replays the compiled graphs from CUDA graphs, as
    with Inductor's own backend (``mode`` is Inductor's: "default", "reduce-overhead", "max-autotune", ...).
    torch.compile refuses ``mode`` and ``options`` together: with options, give the mode as ``options["mode"]``."""
    opts = Options.parse(options)
    patches = _config_patches(mode or opts.mode)
    report = run_passes(gm, opts)
    _recent.append(report)
    if report_sink is not None:
        report_sink(report)
    if opts.compiler == "eager":
        return _check_buffers(gm, gm.forward)
    from torch._inductor.compile_fx import compile_fx

    return _check_buffers(gm, compile_fx(gm, example_inputs, config_patches=patches))


def _check_buffers(gm: fx.GraphModule, fn: Callable) -> Callable:
    """``fn``, checking first on every call the mask buffers that a rewrite proved from their value (an attention whose
    tril buffer became ``is_causal=True``): Dynamo does not guard on a buffer's value. A buffer changed in place
    (its version counter moved) or replaced (another address) is proved again, once per change; if it no longer holds
    the pattern, the call raises rather than compute with the mask the graph was compiled for. An inference tensor
    (made under ``torch.inference_mode``) has no version counter: only its replacement is seen, not an in-place
    change (passes/README.md)."""
    proofs = gm.meta.get("hhfft_buffer_proofs")
    if not proofs:
        return fn
    slot = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    seen = {slot[name]: (pr.version, pr.data_ptr) for name, pr in proofs.items()}
    by_slot = {slot[name]: pr for name, pr in proofs.items()}

    @functools.wraps(fn)  # Dynamo calls fn(*args); its attributes (compile_fx's serialize, ...) stay visible
    def call(*args: Any, **kwargs: Any) -> Any:
        for i, (version, ptr) in seen.items():
            t = args[i]
            pr = by_slot[i]
            if pr.version_of(t) == version and t.data_ptr() == ptr:
                continue
            if not pr.holds(t):
                kind, k = pr.tri[:2]
                raise RuntimeError(
                    f"hhfft: buffer {pr.name} changed after compile and no longer holds the {kind}(k={k}) pattern "
                    "that the compiled attention assumed (it was rewritten to is_causal=True); compile again after "
                    "changing mask buffers (torch._dynamo.reset(), or a new torch.compile)")
            seen[i] = (pr.version_of(t), t.data_ptr())
        return fn(*args, **kwargs)

    return call


def capture(model: Callable, run: Callable[[Callable], Any], opts: Options) -> Report:
    """Run ``run(compiled_model)`` once through Dynamo with hhfft's passes and no Inductor; return every graph's sites.

    A fresh Dynamo cache before and after, so the capture happens even if the model was compiled before and leaves
    nothing behind. The model runs under no_grad.
    """
    opts = dataclasses.replace(opts, compiler="eager")
    reports: list[Report] = []

    def backend(gm, example_inputs):
        report = run_passes(gm, opts)
        reports.append(report)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            run(torch.compile(model, backend=backend))
    finally:
        torch._dynamo.reset()
    merged = Report()
    for r in reports:
        merged.extend(r)
    return merged


def explain(model: Callable, *example_inputs: Any, **options: Any) -> Report:
    """Every long-convolution and attention site hhfft finds in ``model``, and what it would do with each.

    Runs the model once through Dynamo with hhfft's passes (no Inductor), on the given inputs. Options are the
    backend options (``min_kernel_size=32``, ``attention="keep"``, ...). It resets Dynamo before and after
    (``torch._dynamo.reset()``), so models compiled earlier in the process compile again on their next call.

    Example:
        >>> import torch, hhfft
        >>> conv = torch.nn.Conv1d(8, 8, 129, padding=64, groups=8)
        >>> print(hhfft.explain(conv, torch.randn(2, 8, 256)).count("longconv", "rewritten"))
        1
    """
    opts = Options.parse(options)
    counts = torch._dynamo.utils.counters["hhfft"]
    before = dict(counts)
    try:
        return capture(model, lambda compiled: compiled(*example_inputs), opts)
    finally:  # a dry run: the rewrite counters (read by tests and tools) count real compiles only
        counts.clear()
        counts.update(before)
