"""The demo and the CLI run end to end (small sizes)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hhfft
from hhfft.cli import main as cli_main
from hhfft.models import HyenaConfig, HyenaLM


def test_demo_model_sites_are_all_found():
    model = HyenaLM(HyenaConfig(width=32, n_layers=4, attention_layers=(3,)))
    report = hhfft.explain(model, torch.randint(0, 256, (2, 300)))
    assert report.count("longconv", "rewritten") == 3  # two Hyena FFT convolutions, one long Conv1d
    assert report.count("longconv", "skipped") == 2  # the two short filters (K=3), with their reason
    assert all("min_kernel_size" in s.reason for s in report.select("longconv", "skipped"))
    assert [s.module_path for s in report.select("longconv", "rewritten")] == [
        "blocks.0.mixer", "blocks.1.mixer.conv", "blocks.2.mixer"]


def test_cli_explain_prints_the_table(capsys):
    assert cli_main(["explain", "--length", "128"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.mixer.conv" in out and "rewritten" in out and "sites" in out


@pytest.mark.parametrize("flag", ["--length", "--min-kernel-size"])
def test_cli_explain_refuses_a_non_positive_size(flag, capsys):
    with pytest.raises(SystemExit):  # argparse's usage error, not a traceback from inside Dynamo
        cli_main(["explain", flag, "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_cli_demo_runs_and_checks(capsys):
    rc = cli_main(["demo", "--length", "96", "--layers", "2", "--width", "32", "--batch", "2", "--steps", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all within 2x" in out and "hhfft" in out and "ms" in out


def test_cli_usage_on_unknown_command():
    r = subprocess.run([sys.executable, "-m", "hhfft.cli", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: hhfft" in r.stderr
