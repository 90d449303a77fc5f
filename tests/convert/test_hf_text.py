"""Calibration text that ships with Python (``hhfft.convert.hf.stdlib_docstrings``): the options the MiniLM example
uses, without the MiniLM weights."""
from __future__ import annotations

import warnings

import pytest

from hhfft.convert.hf import stdlib_docstrings


def test_stdlib_docstrings_all_modules_and_methods():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = stdlib_docstrings("all", methods=True, limit=300)
    # deprecated modules (aifc, asynchat, ... on Python 3.11/3.12) are imported quietly (when not imported before)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]
    assert len(text) == 300 and len(set(text)) == 300
    assert all(len(p.split()) >= 6 and ">>>" not in p and "\n" not in p for p in text)
    plain, with_methods = stdlib_docstrings(["json"]), stdlib_docstrings(["json"], methods=True)
    assert set(plain) < set(with_methods)  # methods add paragraphs (json.JSONDecoder.decode, ...)


def test_stdlib_docstrings_refuses_a_module_name_string():
    with pytest.raises(ValueError, match="a list of module names, None or 'all', got 'json'"):
        stdlib_docstrings("json")


def _gpt2_directory(tmp_path):
    """A tiny GPT-2 directory (1 layer, a BPE tokenizer trained on docstrings, no pad token) and a calibration file."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    import torch

    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tk.train_from_iterator(stdlib_docstrings(limit=100),
                           tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert tok.pad_token is None
    model_dir = tmp_path / "gpt2"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   vocab_size=len(tok))).save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(stdlib_docstrings(limit=40)))
    return model_dir, text


def test_cli_convert_a_gpt2_directory_whose_tokenizer_has_no_pad_token(tmp_path):
    """GPT-2 and Llama tokenizers have no pad token: `hhfft convert --text` failed on them after converting
    ("Asking to pad but the tokenizer does not have a padding token"). Batches are now padded with eos."""
    from hhfft.cli import main

    model_dir, text = _gpt2_directory(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(model_dir), "--out", str(out), "--text", str(text), "--steps", "1", "--batch", "4",
                 "--length", "16"]) == 0
    assert (out / "hhfft_manifest.json").is_file()


def test_cli_convert_takes_the_config_options_and_tunes_the_maps(tmp_path, capsys):
    """--layers, --sinks and --schedule reach the manifest; --tune-steps lowers the hidden-state loss; the checkpoint
    loads into a fresh model, whose converted layer then computes the sink hybrid, not softmax."""
    import json

    import torch

    from hhfft.cli import main
    from hhfft.convert import hedgehog_sites, load_converted
    from hhfft.convert.hf import load_hf_model

    model_dir, text = _gpt2_directory(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(model_dir), "--out", str(out), "--text", str(text), "--steps", "3", "--batch", "8",
                 "--length", "16", "--layers", "1", "--sinks", "1", "--schedule", "cosine", "--tune-steps", "6",
                 "--tune-lr", "1e-2"]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("tuning: hidden-state loss"))
    first, last = float(line.split()[3]), float(line.split()[7])
    assert last < first, line
    manifest = json.loads((out / "hhfft_manifest.json").read_text())
    assert manifest["config"]["sinks"] == 1 and manifest["config"]["layers"] == [1]
    assert [s["module_path"] for s in manifest["sites"]] == ["h.1.attn"]
    fresh, inputs = load_hf_model(str(model_dir), length=16)
    with torch.no_grad():
        softmax = fresh(**inputs).last_hidden_state
        load_converted(fresh, str(out))
        converted = fresh(**inputs).last_hidden_state
    (_, _, _, hh), = hedgehog_sites(fresh)
    assert hh.sinks == 1 and hh.lse.abs().sum() > 0  # the log-normaliser was trained and saved
    assert not torch.allclose(converted, softmax, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["convert", "/nonexistent", "--out", "o"], "has no config.json"),
    (["convert", "MODEL", "--out", "o", "--text", "/nonexistent.txt"], "is not a file"),
    (["convert", "MODEL", "--out", "FILE"], "is not a directory"),
    (["convert", "MODEL", "--out", "o", "--window", "4", "--sinks", "1"], "together are not supported"),
    (["convert", "MODEL", "--out", "o", "--tune-steps", "3"], "--tune-steps needs --text"),
])
def test_cli_convert_usage_errors(args, message, tmp_path, capsys):
    """Checked before the model loads: rc 2 and one line, not a traceback after the conversion."""
    from hhfft.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "f").write_text("")
    args = [str(tmp_path / "m") if a == "MODEL" else str(tmp_path / "f") if a == "FILE" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "expected a positive integer"), ("--batch", "0", "expected a positive integer"),
    ("--length", "0", "expected a positive integer"), ("--sinks", "-1", "expected an integer >= 0"),
    ("--layers", "1,a", "expected comma-separated site indices"),
])
def test_cli_convert_refuses_bad_numbers(flag, value, message, capsys):
    from hhfft.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "m", "--out", "o", flag, value])
    assert message in capsys.readouterr().err
