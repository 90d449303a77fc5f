"""Hugging Face integration (imported lazily: transformers is a test/optional dependency).

A model directory is a ``config.json`` plus safetensors weights (and, for text, a tokenizer); nothing is ever
downloaded (``HF_HUB_OFFLINE=1`` for the calls made here)."""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

__all__ = ["load_hf_model", "load_tokenizer", "as_positional", "encode", "text_lines", "stdlib_docstrings"]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(path: str) -> Optional[Any]:
    _offline()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
    if len(tok) == 0:  # some transformers versions build an empty one from config.json alone
        return None
    if tok.pad_token is None:  # GPT-2 and Llama tokenizers have none: batches are padded (masked) with eos or unk
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_hf_model(path: str, length: int = 128, batch: int = 2, attn_implementation: Optional[str] = None) -> tuple:
    """(model, example inputs) for a HF model directory: ``AutoModel.from_pretrained`` in eval mode, and a dict of
    ``input_ids`` [batch, length] and ``attention_mask`` (the last sequence padded by a quarter, so key padding is
    exercised); ``length`` at most the model's position count. Token ids come from the tokenizer's vocabulary size
    (random, seeded)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"load_hf_model: {path!r} has no config.json; give a Hugging Face model directory")
    _offline()
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(path)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModel.from_pretrained(path, **kw).eval()
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(positions, int) and positions > 0:
        length = min(length, positions)  # a model with fewer positions cannot take the requested length
    g = torch.Generator().manual_seed(0)
    low = 1000 if cfg.vocab_size > 2000 else 0
    ids = torch.randint(low, cfg.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, length - max(1, length // 4):] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(cfg, "use_cache", False) or getattr(cfg, "is_decoder", False) or "gpt" in cfg.model_type or \
            "llama" in cfg.model_type:
        inputs["use_cache"] = False
    return model, inputs


def as_positional(model: Any, inputs: dict) -> tuple:
    """(fn, args) with ``fn(*args) == model(**inputs)``: for APIs that take positional inputs only
    (``hhfft.explain(fn, *args)``). Tensors become the positional arguments; other values are bound."""
    keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    static = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}

    def fn(*args):
        return model(**dict(zip(keys, args)), **static)

    return fn, tuple(inputs[k] for k in keys)


def encode(tokenizer: Any, texts: list, length: int) -> dict:
    """Tokenise to a padded batch: {"input_ids", "attention_mask"} [len(texts), <= length]."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def text_lines(path: str, min_words: int = 4) -> list:
    """Non-empty lines (paragraph chunks) of a text file with at least ``min_words`` words."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [" ".join(line.split()) for line in f]
    return [line for line in lines if len(line.split()) >= min_words]


# Standard-library modules never imported for their docstrings: they open windows or browsers, print on import,
# or are test suites and build tools.
_STDLIB_SKIP = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
                          "ensurepip", "venv", "pydoc_data", "xxsubtype", "xxlimited"})

_STDLIB_DEFAULT = ["os", "json", "collections", "functools", "itertools", "re", "string", "textwrap",
                   "argparse", "logging", "pathlib", "shutil", "subprocess", "threading", "queue", "socket",
                   "email", "http.client", "urllib.parse", "csv", "datetime", "calendar", "decimal",
                   "fractions", "random", "statistics", "heapq", "bisect", "typing", "dataclasses",
                   "contextlib", "abc", "enum", "inspect", "tempfile", "zipfile", "tarfile", "gzip",
                   "pickle", "copy", "pprint", "difflib", "unittest", "doctest", "asyncio", "sqlite3"]


def stdlib_docstrings(modules: Optional[Union[list, str]] = None, min_words: int = 6, limit: Optional[int] = None,
                      methods: bool = False) -> list:
    """First paragraphs of the docstrings of Python standard library modules, classes and functions: English text
    that ships with every Python (deterministic order; the text differs between Python versions).

    Args:
        modules: module names; None = a fixed list of 46 common modules; "all" = every public top-level module of
            ``sys.stdlib_module_names`` except GUI, test and side-effecting ones (about 200)
        min_words: shortest paragraph kept
        limit: stop after this many paragraphs
        methods: also the methods of the classes found
    """
    import importlib
    import inspect
    import sys
    import warnings

    if modules == "all":
        modules = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _STDLIB_SKIP)
    elif isinstance(modules, str):
        raise ValueError(f"stdlib_docstrings: modules must be a list of module names, None or 'all', got {modules!r}")
    modules = modules or _STDLIB_DEFAULT
    out, seen = [], set()
    for name in modules:
        try:
            with warnings.catch_warnings():  # deprecated stdlib modules warn on import; only their text is read
                warnings.simplefilter("ignore", DeprecationWarning)
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001  (platform-specific modules fail in many ways)
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        if methods:
            objs += [getattr(c, a, None) for c in list(objs) if inspect.isclass(c)
                     for a in sorted(vars(c)) if not a.startswith("_")]
        for obj in objs:
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            if len(para.split()) >= min_words and para not in seen and ">>>" not in para:
                seen.add(para)
                out.append(para)
                if limit is not None and len(out) >= limit:
                    return out
    return out
