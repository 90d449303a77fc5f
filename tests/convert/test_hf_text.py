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


def test_cli_convert_a_gpt2_directory_whose_tokenizer_has_no_pad_token(tmp_path):
    """GPT-2 and Llama tokenizers have no pad token: `hhfft convert --text` failed on them after converting
    ("Asking to pad but the tokenizer does not have a padding token"). Batches are now padded with eos."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    import torch

    from hhfft.cli import main

    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tk.train_from_iterator(stdlib_docstrings(limit=100),
                           tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert tok.pad_token is None
    model_dir = tmp_path / "gpt2"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                   vocab_size=len(tok))).save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(stdlib_docstrings(limit=40)))
    out = tmp_path / "out"
    assert main(["convert", str(model_dir), "--out", str(out), "--text", str(text), "--steps", "1", "--batch", "4",
                 "--length", "16"]) == 0
    assert (out / "hhfft_manifest.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["convert", "/nonexistent", "--out", "o"], "has no config.json"),
    (["convert", "MODEL", "--out", "o", "--text", "/nonexistent.txt"], "is not a file"),
    (["convert", "MODEL", "--out", "FILE"], "is not a directory"),
])
def test_cli_convert_bad_paths_are_usage_errors(args, message, tmp_path, capsys):
    """Checked before the model loads: rc 2 and one line, not a traceback after the conversion."""
    from hhfft.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "f").write_text("")
    args = [str(tmp_path / "m") if a == "MODEL" else str(tmp_path / "f") if a == "FILE" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--length"])
def test_cli_convert_refuses_non_positive_sizes(flag, capsys):
    from hhfft.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "m", "--out", "o", flag, "0"])
    assert "expected a positive integer" in capsys.readouterr().err
