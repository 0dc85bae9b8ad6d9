"""Task 2's chunked full-softmax cross-entropy (accel/softmax_ce.py) is the plain cross-entropy:
the same value and gradients in float32, over one chunk or many."""
import pytest
import torch
import torch.nn.functional as F

from vlm2rec_lab.accel import softmax_ce as chunked


@pytest.mark.parametrize("logits_per_chunk", [3_000_000, 7 * 50])  # one chunk; chunks of 8 rows (the floor)
def test_chunked_cross_entropy_equals_the_plain_one(monkeypatch, logits_per_chunk):
    monkeypatch.setattr(chunked, "_CE_CHUNK", logits_per_chunk)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    W = torch.randn(50, 16, generator=g).requires_grad_()
    t = torch.randint(0, 50, (37,), generator=g)
    got = chunked.softmax_ce(h, W, t)
    got.backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad, W.grad = None, None
    want = F.cross_entropy(h @ W.T, t)
    want.backward()
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gW, W.grad, atol=1e-6)


def test_a_bfloat16_matmul_stays_close_and_a_named_precision_is_taken_as_named():
    g = torch.Generator().manual_seed(1)
    h, W, t = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g), torch.randint(0, 30, (20,), generator=g)
    assert abs(float(chunked.softmax_ce(h, W, t, torch.bfloat16)) - float(F.cross_entropy(h @ W.T, t))) < 0.05
    assert chunked.matmul_dtype("cpu", "float32") == torch.float32
    assert chunked.matmul_dtype("cuda:0", "bfloat16") == torch.bfloat16
    assert chunked.matmul_dtype("cuda:0") == torch.float32  # auto: bfloat16 only on a CPU with bf16 units
