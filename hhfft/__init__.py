"""hhfft: a torch.compile backend that rewrites long convolutions into Monarch FFT convolutions and softmax attention
into Hedgehog linear attention.

    model = torch.compile(model, backend="hhfft")
    print(hhfft.explain(model, *example_inputs))

Importing hhfft registers the ``hhfft::*`` ops and the ``"hhfft"`` backend (also reachable through the
``torch_dynamo_backends`` entry point without importing hhfft). It never initialises CUDA and prints nothing.
"""
from hhfft import nn, optim
from hhfft.convert import HedgehogConfig, convert, distill, load_converted, save_converted
from hhfft.lowering import ops  # noqa: F401  (registers hhfft::* ops)
from hhfft.lowering.backend import Options, explain, hhfft_backend, last_report
from hhfft.lowering.ops import fftconv, hedgehog_linear_attention, linear_attention
from hhfft.passes.report import Report, Site

__version__ = "0.1.0"

__all__ = [
    "HedgehogConfig",
    "Options",
    "Report",
    "Site",
    "__version__",
    "convert",
    "distill",
    "explain",
    "fftconv",
    "hedgehog_linear_attention",
    "hhfft_backend",
    "last_report",
    "linear_attention",
    "load_converted",
    "nn",
    "optim",
    "save_converted",
]


def _register_backend() -> None:
    # An install provides the torch_dynamo_backends entry point, which torch loads on demand; a checkout used
    # without an install (PYTHONPATH) has none, so register by name here.
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "hhfft" not in _COMPILER_FNS and not entry_points(group="torch_dynamo_backends", name="hhfft"):
        register_backend(name="hhfft")(hhfft_backend)


_register_backend()
