import pytest
import torch
import torch.nn.functional as F

from kdarch.ops.linear_ce import linear_cross_entropy


def reference(h, w, y, ignore_index=-100):
    return F.cross_entropy((h.float() @ w.float().T), y, ignore_index=ignore_index)


@pytest.mark.parametrize("n, chunk", [(1, 4), (37, 8), (64, 64), (50, 1024)])
def test_matches_unfused_loss_and_grads(n, chunk):
    torch.manual_seed(0)
    h = torch.randn(n, 24, requires_grad=True)
    w = torch.randn(97, 24, requires_grad=True)
    y = torch.randint(0, 97, (n,))
    if n > 3:
        y[::3] = -100
    loss, logits = linear_cross_entropy(h, w, y, chunk=chunk, return_logits=True)
    (2.5 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = reference(h, w, y)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits, (h @ w.T).detach())
    assert not logits.requires_grad
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_all_rows_ignored_gives_zero_and_zero_grads():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_no_grad_and_frozen_weight():
    torch.manual_seed(1)
    h, w, y = torch.randn(9, 8), torch.randn(11, 8), torch.randint(0, 11, (9,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=4), reference(h, w, y))
    h.requires_grad_()
    linear_cross_entropy(h, w, y, chunk=4).backward()
    g = h.grad.clone()
    h.grad = None
    reference(h, w, y).backward()
    torch.testing.assert_close(g, h.grad)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"expected h \[N, D\] and w \[V, D\]"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected labels \[4\]"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
