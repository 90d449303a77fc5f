"""The public surface: import side effects, the backend found by name, option validation, explain."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hhfft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)


def test_import_initialises_no_cuda_and_prints_nothing():
    r = _python(
        """
        import torch
        import hhfft
        assert not torch.cuda.is_initialized(), "importing hhfft initialised CUDA"
        print("OK")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "OK\n", f"importing hhfft printed: {r.stdout!r}"
    assert "hhfft" not in r.stderr, r.stderr


def test_backend_is_found_by_name_without_importing_hhfft():
    r = _python(
        """
        import sys, torch
        conv = torch.nn.Conv1d(4, 4, 65, padding=32, groups=4)
        x = torch.randn(2, 4, 100)
        y = torch.compile(conv, backend="hhfft", options={"compiler": "eager"})(x)
        torch.testing.assert_close(y, conv(x), rtol=1e-4, atol=1e-5)
        from torch._dynamo.utils import counters
        assert counters["hhfft"]["longconv_rewritten"] == 1, dict(counters["hhfft"])
        assert "hhfft" in sys.modules  # loaded by the entry point, not by us
        print("OK")
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "OK"


def test_unknown_option_lists_the_valid_ones():
    conv = torch.nn.Conv1d(4, 4, 65, padding=32, groups=4)
    with pytest.raises(Exception) as e:
        torch.compile(conv, backend="hhfft", options={"min_kernal_size": 3})(torch.randn(1, 4, 80))
    msg = str(e.value)
    assert "min_kernal_size" in msg and "min_kernel_size" in msg and "compiler" in msg


def test_inductor_modes_pass_through_and_unknown_modes_are_refused():
    """``mode=`` reaches Inductor as its own backend's config (reduce-overhead: CUDA graphs, which Inductor leaves off
    for CPU graphs), and a misspelt mode is refused with the modes Inductor knows."""
    from hhfft.lowering.backend import _config_patches

    assert _config_patches("reduce-overhead") == {"triton.cudagraphs": True}
    assert _config_patches(None) == _config_patches("") == _config_patches("default") == {}
    conv = torch.nn.Conv1d(4, 4, 65, padding=32, groups=4)
    x = torch.randn(2, 4, 100)
    torch.testing.assert_close(torch.compile(conv, backend="hhfft", mode="reduce-overhead")(x), conv(x),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception) as e:
        torch.compile(conv, backend="hhfft", mode="reduce_overhead")(x)
    assert "reduce_overhead" in str(e.value) and "reduce-overhead" in str(e.value)


def test_mode_given_with_other_options(monkeypatch):
    """torch.compile refuses mode= with options=: ``options["mode"]`` gives both, and reaches compile_fx as the
    same config patches; a misspelt or non-string mode is refused."""
    import torch._inductor.compile_fx as cf

    seen = []
    real = cf.compile_fx
    monkeypatch.setattr(cf, "compile_fx", lambda gm, ex, **kw: seen.append(kw) or real(gm, ex, **kw))
    conv = torch.nn.Conv1d(4, 4, 33, padding=16, groups=4)
    x = torch.randn(2, 4, 100)
    opts = {"mode": "reduce-overhead", "min_kernel_size": 32}
    torch.testing.assert_close(torch.compile(conv, backend="hhfft", options=opts)(x), conv(x), rtol=1e-4, atol=1e-5)
    assert seen and seen[0]["config_patches"] == {"triton.cudagraphs": True}
    site = hhfft.last_report().sites[-1]  # min_kernel_size 32 took effect (the default, 64, keeps K = 33)
    assert site.kind == "longconv" and site.decision == "rewritten", site
    with pytest.raises(Exception, match="unknown mode .reduce_overhead.* reduce-overhead"):
        torch.compile(conv, backend="hhfft", options={"mode": "reduce_overhead"})(x)
    with pytest.raises(Exception, match="option .mode. must be a string"):
        torch.compile(conv, backend="hhfft", options={"mode": 1})(x)


@pytest.mark.parametrize(
    "options, words",
    [({"attention": "fast"}, "attention"), ({"longconv": "yes"}, "True or False"), ({"min_kernel_size": 0}, "positive")],
)
def test_bad_option_values_are_refused(options, words):
    with pytest.raises((ValueError, TypeError), match=words):
        hhfft.Options.parse(options)


def test_longconv_pass_can_be_switched_off():
    conv = torch.nn.Conv1d(4, 4, 65, padding=32, groups=4)
    report = hhfft.explain(conv, torch.randn(2, 4, 100), longconv=False)
    assert report.count("longconv", "kept") == 1 and report.count("longconv", "rewritten") == 0
    assert "longconv pass is off" in str(report)


def test_explain_names_the_module_and_prints_a_table():
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 65, padding=32, groups=4), torch.nn.Conv1d(4, 4, 3, padding=1))
    report = hhfft.explain(model, torch.randn(2, 4, 100))
    table = str(report)
    assert [s.module_path for s in report.select("longconv")] == ["0", "1"]
    assert "rewritten" in table and "not depthwise" in table and "2 sites" in table


def test_explain_is_a_dry_run_for_the_rewrite_counters():
    """explain() rewrites nothing for real: the counters that count rewrites (read by tests and tools) stay put."""
    conv = torch.nn.Conv1d(4, 4, 65, padding=32, groups=4)
    torch._dynamo.utils.counters.clear()
    hhfft.explain(conv, torch.randn(2, 4, 100))
    assert torch._dynamo.utils.counters["hhfft"]["longconv_rewritten"] == 0
