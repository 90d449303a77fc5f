"""A byte-level English corpus that installs offline: the HTML documentation of Python 3.11 (Debian's
``python3.11-doc`` package), turned into plain text with the standard library's ``html.parser``.

What goes in: the main body (``<div class="body" role="main">``) of every page under ``html/`` except the indexes
(``genindex*``, ``py-modindex``, ``search``, ``contents``) and the ``_sources``/``_static`` folders, scripts and
styles dropped, block elements ending lines, whitespace inside a paragraph collapsed (``<pre>`` kept as is).

Split, fixed and documented: the pages are sorted by path and every ``heldout_every``-th page (index % k == k - 1,
default k = 10) is held out, so the held-out text comes from whole documents the model never sees. Tokens are the
UTF-8 bytes (vocabulary 256, no tokenizer files); pages are joined with a blank line.

    python -m hhfft.data.pydocs OUT_DIR            # or: hhfft gpt prepare --data OUT_DIR

writes ``OUT_DIR/train.bin``, ``OUT_DIR/val.bin`` (uint8) and ``OUT_DIR/manifest.json`` (the source package's name,
the page lists, sizes and SHA-256 digests). ``apt-get download python3.11-doc`` fetches the package when no
``--deb``/``--root`` is given.
"""
from __future__ import annotations

import glob
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

__all__ = ["PACKAGE", "build_corpus", "doc_pages", "html_to_text", "load_split", "prepare"]

PACKAGE = "python3.11-doc"
HTML_DIR = "usr/share/doc/python3.11/html"
_SKIP_DIRS = ("_sources", "_static", "_images", "_downloads")
_SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents)\.html$")
_BLOCK = {"p", "div", "section", "pre", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
          "table", "tr", "blockquote", "br", "hr"}


class _BodyText(html.parser.HTMLParser):
    """Collects the text inside the Sphinx main body div; ignores everything else."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # div nesting inside the body (0 = outside)
        self.skip = 0  # inside <script>/<style>
        self.pre = 0
        self.parts: list = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main" and "body" in (a.get("class") or "").split():
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style"):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag == "div":
            self.depth -= 1
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth == 0 or self.skip:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(page: str) -> str:
    """The plain text of a Sphinx page's main body: one paragraph per line, at most one blank line in a row.

    Example:
        >>> html_to_text('<div class="body" role="main"><h1>Title¶</h1><p>Some  <b>bold</b>\\ntext.</p></div>')
        'Title¶\\n\\nSome bold text.'
    """
    p = _BodyText()
    p.feed(page)
    p.close()
    text = "".join(p.parts)
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(ln if ln.strip() else "" for ln in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def doc_pages(html_root: str) -> list:
    """Paths (relative to ``html_root``, sorted) of the pages that make the corpus."""
    out = []
    for path in glob.glob(os.path.join(html_root, "**", "*.html"), recursive=True):
        rel = os.path.relpath(path, html_root)
        if rel.split(os.sep)[0] in _SKIP_DIRS or _SKIP_PAGES.match(os.path.basename(rel)):
            continue
        out.append(rel)
    return sorted(out)


def build_corpus(html_root: str, heldout_every: int = 10) -> tuple:
    """(train bytes, held-out bytes, manifest dict) from the pages under ``html_root``."""
    if not isinstance(heldout_every, int) or heldout_every < 2:
        raise ValueError(f"build_corpus: heldout_every must be an int >= 2, got {heldout_every!r}")
    pages = doc_pages(html_root)
    if not pages:
        raise ValueError(f"build_corpus: no HTML pages under {html_root!r}; expected the {HTML_DIR} folder of an "
                         f"unpacked {PACKAGE} package (dpkg-deb -x {PACKAGE}_*.deb DIR)")
    train, val, files = [], [], {"train": [], "val": []}
    for i, rel in enumerate(pages):
        with open(os.path.join(html_root, rel), encoding="utf-8", errors="replace") as f:
            text = html_to_text(f.read())
        if not text:
            continue
        split = "val" if i % heldout_every == heldout_every - 1 else "train"
        (val if split == "val" else train).append(text.encode("utf-8"))
        files[split].append(rel)
    sep = b"\n\n"
    tr, va = sep.join(train) + sep, sep.join(val) + sep
    manifest = {"source": PACKAGE, "heldout_every": heldout_every, "files": files,
                "bytes": {"train": len(tr), "val": len(va)},
                "sha256": {"train": hashlib.sha256(tr).hexdigest(), "val": hashlib.sha256(va).hexdigest()}}
    return tr, va, manifest


def _fetch_package(workdir: str) -> str:
    """apt-get download + dpkg-deb -x; returns the html root."""
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", None) or str(e)).strip()
        raise RuntimeError(f"apt-get download {PACKAGE} failed ({why}); download the .deb elsewhere and pass "
                           f"--deb FILE, or pass --root with an unpacked {HTML_DIR} folder") from e
    debs = sorted(glob.glob(os.path.join(workdir, f"{PACKAGE}_*.deb")))
    if not debs:
        raise RuntimeError(f"apt-get download {PACKAGE} left no .deb in {workdir}")
    return _unpack(debs[-1], workdir)


def _unpack(deb: str, workdir: str) -> str:
    dest = os.path.join(workdir, "unpacked")
    subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)
    return os.path.join(dest, HTML_DIR)


def prepare(out_dir: str, *, deb: str | None = None, root: str | None = None, heldout_every: int = 10) -> dict:
    """Write ``train.bin``, ``val.bin`` (uint8 bytes) and ``manifest.json`` under ``out_dir``; returns the manifest.

    Args:
        out_dir: output folder (created)
        deb: a downloaded ``python3.11-doc_*.deb`` (default: ``apt-get download`` it into a temporary folder)
        root: an already unpacked html folder (takes precedence over ``deb``)
        heldout_every: every k-th page (sorted by path) is held out
    """
    if root is None and deb is not None and not os.path.isfile(deb):
        raise FileNotFoundError(f"prepare: deb {deb!r} is not a file; expected a downloaded {PACKAGE}_*.deb")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            root = _unpack(deb, tmp) if deb else _fetch_package(tmp)
        tr, va, manifest = build_corpus(root, heldout_every)
    for name, data in (("train", tr), ("val", va)):
        with open(os.path.join(out_dir, f"{name}.bin"), "wb") as f:
            f.write(data)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load_split(data_dir: str, split: str) -> np.ndarray:
    """The uint8 token array of ``split`` ("train" or "val") written by :func:`prepare` (memory-mapped)."""
    if split not in ("train", "val"):
        raise ValueError(f"load_split: split must be 'train' or 'val', got {split!r}")
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `hhfft gpt prepare --data {data_dir}` first")
    return np.memmap(path, dtype=np.uint8, mode="r")


def main(argv=None, prog: str = "python -m hhfft.data.pydocs", out_option: str | None = None) -> int:
    """The command line; ``hhfft gpt prepare`` is this with ``out_option="--data"`` (the folder as an option)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    if out_option:
        p.add_argument(out_option, dest="out", metavar="DIR", required=True, help="output folder")
    else:
        p.add_argument("out", help="output folder")
    p.add_argument("--deb", default=None, help=f"a downloaded {PACKAGE}_*.deb (default: apt-get download it)")
    p.add_argument("--root", default=None, help=f"an unpacked {HTML_DIR} folder")
    p.add_argument("--heldout-every", type=int, default=10, help="every k-th page (sorted by path) is held out")
    a = p.parse_args(argv)
    m = prepare(a.out, deb=a.deb, root=a.root, heldout_every=a.heldout_every)
    print(f"{len(m['files']['train'])} train pages ({m['bytes']['train']} bytes), {len(m['files']['val'])} held-out "
          f"pages ({m['bytes']['val']} bytes) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
