"""passes.attention: large constant mask buffers (the demo's ``CausalSelfAttention`` keeps a max_len x max_len tril).

The proof reads the buffer's value in row blocks (``attention_mask._triangle``), so buffers above the old 1 << 24
limit are proved causal; one wrong element anywhere in them (inside the slice the model reads, or far outside it)
leaves a general attn_mask, and the output still equals eager's. A buffer above ``BUFFER_PROOF_LIMIT`` is not
checked, and the site's reason says so. Models run through the eager test backend (no Inductor).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_attention_spellings import attention_sites, check_model, compile_eager

from hhfft.passes import attention_mask


class BufferAttention(nn.Module):
    """One attention block masked by a sliced constant buffer, spelled as ``hhfft.models.hyena.CausalSelfAttention``:
    ``masked_fill(~mask[:L, :L], -inf)`` for a bool buffer, ``+ mask[:L, :L]`` for a float (0 / -inf) one; with
    ``blocked``, the bool buffer marks the masked keys instead (``masked_fill(mask[:L, :L], -inf)``, the
    ``torch.triu(ones, 1)`` spelling)."""

    def __init__(self, mask: torch.Tensor, dim: int = 16, heads: int = 2, blocked: bool = False,
                 rows: int = 0, tail: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.blocked = blocked
        self.rows, self.tail = rows, tail  # the window: mask[rows:rows + L, :L], or with tail mask[-L:, -L:]
        self.wqkv = nn.Parameter(torch.randn(dim, 3 * dim) / math.sqrt(dim))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, w = x.shape
        q, k, v = (x @ self.wqkv).view(b, length, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        m = self.mask[-length:, -length:] if self.tail else self.mask[self.rows:self.rows + length, :length]
        if self.mask.dtype == torch.bool:
            att = att.masked_fill(m if self.blocked else ~m, float("-inf"))
        else:
            att = att + m
        y = att.softmax(dim=-1) @ v
        return x + y.transpose(1, 2).reshape(b, length, w)


def _inputs(length: int = 13, dim: int = 16) -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, length, dim, generator=g, requires_grad=True),)


def _one_site(model: nn.Module) -> object:
    torch.manual_seed(0)
    sites = check_model(model, _inputs())
    assert len(sites) == 1 and sites[0].decision == "rewritten", [(s.decision, s.reason) for s in sites]
    return sites[0]


def _assert_causal(site) -> None:
    rec = site.record
    assert rec.mask_kind == "causal" and rec.causal, (rec.mask_kind, site.reason)
    assert rec.sdpa.kwargs["is_causal"] is True and rec.sdpa.kwargs["attn_mask"] is None
    assert site.reason == ""


def _assert_general(site) -> None:
    rec = site.record
    assert rec.mask_kind == "additive" and not rec.causal, rec.mask_kind
    assert rec.sdpa.kwargs["is_causal"] is False and rec.sdpa.kwargs["attn_mask"] is not None


N_BOOL = 8192  # 8192^2 = 1 << 26 elements (64 MB), above the old 1 << 24 limit; 16 row blocks of 512
N_FLOAT = 4096  # 4096^2 fp32 (64 MB); 4 row blocks of 1024


def test_large_bool_tril_buffer_is_causal():
    assert N_BOOL * N_BOOL > attention_mask._BUFFER_BLOCK
    mask = torch.tril(torch.ones(N_BOOL, N_BOOL, dtype=torch.bool))
    _assert_causal(_one_site(BufferAttention(mask)))


@pytest.mark.parametrize(
    "pos",
    [(3, 1), (N_BOOL // 2, N_BOOL // 2 + 904), (N_BOOL - 1, N_BOOL - 1), (N_BOOL - 1, 0)],
    ids=["inside-slice-3-1", "upper-middle-4096-5000", "last-diagonal-8191", "last-row-first-col"],
)
def test_large_bool_buffer_with_one_flipped_element_is_general(pos):
    mask = torch.tril(torch.ones(N_BOOL, N_BOOL, dtype=torch.bool))
    mask[pos] = ~mask[pos]
    # the output equals eager's (check_model): inside the slice the model reads, a wrong proof would show there
    _assert_general(_one_site(BufferAttention(mask)))


def test_bool_buffer_of_blocked_keys_is_causal():
    """A bool buffer whose True entries are the masked keys (``triu(ones, 1)``, top-left value False) is the
    complement of the causal pattern: proved causal as well."""
    mask = torch.triu(torch.ones(N_BOOL, N_BOOL, dtype=torch.bool), 1)
    _assert_causal(_one_site(BufferAttention(mask, blocked=True)))


@pytest.mark.parametrize(
    "mask",
    [torch.tril(torch.ones(64, 64, dtype=torch.bool), -1),  # blocks j < i: allowed j >= i, not causal
     torch.triu(torch.ones(64, 64, dtype=torch.bool), 2),  # allows j <= i + 1
     torch.triu(torch.ones(64, 64, dtype=torch.bool), 1).index_put_((torch.tensor(5), torch.tensor(2)),
                                                                    torch.tensor(True))],
    ids=["anti-causal", "diagonal-plus-1", "one-flipped-in-slice"],
)
def test_bool_buffer_of_blocked_keys_not_causal_is_general(mask):
    _assert_general(_one_site(BufferAttention(mask, blocked=True)))


def test_large_float_buffer_is_causal():
    mask = torch.triu(torch.full((N_FLOAT, N_FLOAT), float("-inf")), 1)
    _assert_causal(_one_site(BufferAttention(mask)))


@pytest.mark.parametrize(
    "pos, value",
    [((0, 5), -1e9), ((N_FLOAT - 2, N_FLOAT - 1), -1e9), ((N_FLOAT - 1, 7), float("-inf"))],
    ids=["other-not-uniform-in-slice", "other-not-uniform-last-block", "top-changed-last-row"],
)
def test_large_float_buffer_with_one_changed_element_is_general(pos, value):
    mask = torch.triu(torch.full((N_FLOAT, N_FLOAT), float("-inf")), 1)
    mask[pos] = value
    _assert_general(_one_site(BufferAttention(mask)))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_buffer_sliced_from_its_end_is_causal(dtype):
    """``mask[-L:, -L:]`` of a square tril buffer: both windows start at S - L, so the window is causal too."""
    tril = torch.tril(torch.ones(40, 40, dtype=torch.bool))
    mask = tril if dtype == torch.bool else torch.zeros(40, 40).masked_fill(~tril, float("-inf"))
    _assert_causal(_one_site(BufferAttention(mask, tail=True)))


def test_triu_buffer_with_negative_diagonal():
    """A blocked-keys buffer ``triu(ones, -2)`` read from row 3 on, ``mask[3:3 + L, :L]``, blocks c - r >= 1: causal
    (the proof reads k off column 0 when row 0 is all blocked). From row 4 on it blocks c - r >= 2: a general mask."""
    blocked = torch.triu(torch.ones(40, 40, dtype=torch.bool), -2)
    _assert_causal(_one_site(BufferAttention(blocked, blocked=True, rows=3)))
    _assert_general(_one_site(BufferAttention(blocked, blocked=True, rows=4)))


def test_buffer_above_the_limit_is_not_checked_and_the_reason_says_so(monkeypatch):
    n = 64
    monkeypatch.setattr(attention_mask, "BUFFER_PROOF_LIMIT", n * n - 1)
    site = _one_site(BufferAttention(torch.tril(torch.ones(n, n, dtype=torch.bool))))
    _assert_general(site)
    assert "BUFFER_PROOF_LIMIT" in site.reason and "64x64" in site.reason, site.reason
    # the same text in hhfft.explain's table
    compiled, reports = compile_eager(BufferAttention(torch.tril(torch.ones(n, n, dtype=torch.bool))))
    compiled(*_inputs())
    assert "BUFFER_PROOF_LIMIT" in str(reports[0]), str(reports[0])


class SdpaBufferAttention(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, q, k, v):
        n = q.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:n, :n])


def test_kept_sites_say_why_a_buffer_above_the_limit_was_not_proved(monkeypatch):
    """The reason is given wherever a site is recorded: attention='keep' and a model's own SDPA call too."""
    n = 64
    monkeypatch.setattr(attention_mask, "BUFFER_PROOF_LIMIT", n * n - 1)
    tril = torch.tril(torch.ones(n, n, dtype=torch.bool))
    compiled, reports = compile_eager(BufferAttention(tril), attention="keep")
    compiled(*_inputs())
    compiled, more = compile_eager(SdpaBufferAttention(tril))
    compiled(*(torch.randn(1, 2, 9, 8) for _ in range(3)))
    for r, why in ((reports, "attention='keep'"), (more, "already F.scaled_dot_product_attention")):
        (site,) = [s for rep in r for s in rep if s.kind == "attention"]
        assert site.decision == "kept" and why in site.reason and "BUFFER_PROOF_LIMIT" in site.reason, site.reason


def test_buffer_at_the_limit_is_checked(monkeypatch):
    n = 64
    monkeypatch.setattr(attention_mask, "BUFFER_PROOF_LIMIT", n * n)
    _assert_causal(_one_site(BufferAttention(torch.tril(torch.ones(n, n, dtype=torch.bool)))))


def _dense(t: torch.Tensor) -> bool:
    """The definition, on the whole tensor at once: t equals top = t[0, 0] exactly on tril(k) or triu(k) for some k,
    and one other (not NaN) value elsewhere."""
    rows, cols = t.shape
    top = t[0, 0]
    eq = t == top
    others = t[~eq].unique()
    if others.numel() != 1 or bool(torch.isnan(top)) or bool(torch.isnan(others[0])):
        return False
    d = torch.arange(cols)[None, :] - torch.arange(rows)[:, None]  # c - r
    return any(torch.equal(eq, d <= k) or torch.equal(eq, d >= k) for k in range(-rows - 1, cols + 2))


def _agrees(t: torch.Tensor) -> bool:
    """The block-wise proof finds a pattern exactly when the definition does, and the pattern it names is t."""
    got = attention_mask._triangle(t)
    if got is None:
        return not _dense(t)
    kind, k, top, other = got
    pattern = getattr(torch, kind)(torch.ones(t.shape, dtype=torch.bool), k)
    return torch.equal(torch.where(pattern, torch.tensor(top, dtype=t.dtype), torch.tensor(other, dtype=t.dtype)), t)


@pytest.mark.parametrize("kind", ["tril", "triu"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "fp32"])
@pytest.mark.parametrize("shape", [(7, 7), (5, 11), (11, 5)], ids=["7x7", "5x11", "11x5"])
def test_triangle_agrees_with_the_dense_definition(kind, dtype, shape, monkeypatch):
    """Every diagonal k of tril/triu, the pattern or its complement as the top value, and one changed element at the
    corners, on both sides of the diagonal k and at random places: the block-wise proof (2 rows a block here)
    agrees with the dense definition."""
    monkeypatch.setattr(attention_mask, "_BUFFER_BLOCK", 2 * shape[1])
    rows, cols = shape
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    g = torch.Generator().manual_seed(0)
    proved = 0
    for k in range(-rows - 1, cols + 2):
        pat = (c - r <= k) if kind == "tril" else (c - r >= k)
        for top_in in (True, False):
            keep = pat if top_in else ~pat
            t = keep if dtype == torch.bool else torch.where(keep, 0.0, float("-inf"))
            assert _agrees(t), (kind, k, top_in, attention_mask._triangle(t))
            proved += attention_mask._triangle(t) is not None
            i = rows // 2
            places = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (i, i + k), (i, i + k + 1),
                      (i, i + k - 1)]
            places += [(int(torch.randint(rows, (1,), generator=g)), int(torch.randint(cols, (1,), generator=g)))
                       for _ in range(2)]
            for a, b in places:
                if not (0 <= a < rows and 0 <= b < cols):
                    continue
                for v in ((not bool(t[a, b]),) if dtype == torch.bool else (-1e9, float("nan"))):
                    bad = t.clone()
                    bad[a, b] = v
                    assert _agrees(bad), (kind, k, top_in, (a, b), v)
    assert proved >= min(rows, cols)  # the sweep met proper triangles


def _small_causal(n: int = 40) -> BufferAttention:
    torch.manual_seed(0)
    return BufferAttention(torch.tril(torch.ones(n, n, dtype=torch.bool)))


def test_proved_buffer_changed_after_compile_is_checked_on_every_call():
    """Dynamo does not guard on a buffer's value, so a changed buffer reaches the graph compiled with is_causal=True:
    the backend proves it again after each change (its version counter or address moved), runs on while it holds the
    same pattern, and raises once it does not (before, the call silently used the old mask)."""
    model = _small_causal()
    compiled, reports = compile_eager(model)
    (x,) = _inputs()
    first = compiled(x)
    assert [s.record.mask_kind for s in attention_sites(reports)] == ["causal"]
    model.mask.copy_(model.mask.clone())  # in place, same values
    assert torch.equal(compiled(x), first)
    model.mask = model.mask.clone()  # replaced, same values
    assert torch.equal(compiled(x), first)
    assert len(reports) == 1  # the same compiled graph all along
    model.mask[3, 7] = True  # in place: no longer causal
    with pytest.raises(RuntimeError, match=r"buffer .*mask.* changed after compile .*tril\(k=0\)"):
        compiled(x)
    model.mask = torch.tril(torch.ones(40, 40, dtype=torch.bool), 1)  # replaced by another pattern
    with pytest.raises(RuntimeError, match="changed after compile"):
        compiled(x)


def test_buffer_kept_as_a_general_mask_is_read_at_run_time(monkeypatch):
    """A buffer that was not proved stays in the graph: a change after compile is seen, with no check needed."""
    monkeypatch.setattr(attention_mask, "BUFFER_PROOF_LIMIT", 40 * 40 - 1)
    model = _small_causal()
    compiled, reports = compile_eager(model)
    (x,) = _inputs()
    compiled(x)
    model.mask.copy_(torch.tril(torch.ones(40, 40, dtype=torch.bool), 1))
    torch.testing.assert_close(compiled(x), model(x))
    assert len(reports) == 1


def test_buffer_check_through_inductor():
    """The same check around compile_fx's compiled function (training step included)."""
    model = _small_causal()
    compiled = torch.compile(model, backend="hhfft")
    (x,) = _inputs()
    compiled(x).sum().backward()
    model.mask.fill_(True)
    with pytest.raises(RuntimeError, match="changed after compile"):
        compiled(x)


def test_inference_tensor_buffer_is_proved_and_checked_by_address():
    """A buffer made under inference_mode has no version counter: it is proved all the same, and a replaced one is
    checked (by its address)."""
    with torch.inference_mode():
        mask = torch.tril(torch.ones(40, 40, dtype=torch.bool))
    torch.manual_seed(0)
    model = BufferAttention(mask)
    compiled, reports = compile_eager(model)
    (x,) = _inputs()
    with torch.no_grad():
        compiled(x)
        assert [(s.record.mask_kind, s.reason) for s in attention_sites(reports)] == [("causal", "")]
        with torch.inference_mode():
            model.mask = torch.tril(torch.ones(40, 40, dtype=torch.bool), 1)
        with pytest.raises(RuntimeError, match="changed after compile"):
            compiled(x)
