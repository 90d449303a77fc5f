"""examples/adahessian_cnn.py, quick variant: both optimizers train, the PNG of the loss curves is written."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_adahessian_cnn_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("adahessian_cnn", ROOT / "examples" / "adahessian_cnn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--quick", "--out", str(tmp_path)])
    png = pathlib.Path(result["png"])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, r in result["best"].items():
        first = sum(r["losses"][:5]) / 5
        assert r["tail"] < first, f"{name} did not lower the loss: {first:.3f} -> {r['tail']:.3f}"
