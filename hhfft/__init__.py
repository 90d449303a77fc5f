"""hhfft: a torch.compile backend that rewrites long convolutions into Monarch FFT convolutions and softmax attention
into Hedgehog linear attention.

    model = torch.compile(model, backend="hhfft")
    print(hhfft.explain(model, *example_inputs))

Importing hhfft registers the ``hhfft::*`` ops and the ``"hhfft"`` backend (also reachable through the
``torch_dynamo_backends`` entry point without importing hhfft). It never initialises CUDA and prints nothing.
"""
from hhfft.lowering import ops  # noqa: F401  (registers hhfft::* ops)
from hhfft.lowering.ops import fftconv

__version__ = "0.1.0"

__all__ = ["fftconv", "__version__"]
