"""The EWC penalty's value and gradient, and which parameters each --train-method trains."""

import pytest
import torch

from amnesia_sd import ewc
from amnesia_sd.ewc import EWCPenalty
from amnesia_sd.forget import trainable_names
from helpers import load_parts


def make_case(count=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(1, 9, (1,), generator=g)), 3) for _ in range(count)]
    anchors = [torch.randn(s, generator=g) for s in shapes]
    params = [(a + 0.1 * torch.randn(a.shape, generator=g)).requires_grad_() for a in anchors]
    fisher = [torch.rand(s, generator=g) for s in shapes]
    params[-1] = params[-1].detach().t().contiguous().t().requires_grad_()  # a non-contiguous parameter
    return params, fisher, anchors


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """Pieces and groups far smaller than the tensors, so splitting and grouping are what is tested."""
    monkeypatch.setitem(ewc.LAYOUT, "cpu", (7, 40))


def test_penalty_value_is_exact():
    params, fisher, anchors = make_case()
    expected = 50.0 * sum((f.double() * (p.detach().double() - a.double()) ** 2).sum() for p, f, a in zip(params, fisher, anchors))
    value = EWCPenalty(params, fisher, anchors, 50.0).value()
    assert abs(value.item() - expected.item()) <= 1e-5 * expected.item()
    assert len(EWCPenalty(params, fisher, anchors, 50.0).groups) > 1  # the grouped path is the one tested


def test_half_precision_storage_of_fisher_and_anchor():
    params, fisher, anchors = make_case(seed=3)
    low = EWCPenalty(params, [f.bfloat16() for f in fisher], [a.bfloat16() for a in anchors], 50.0)
    exact = 50.0 * sum((f.bfloat16().double() * (p.detach().double() - a.bfloat16().double()) ** 2).sum()
                       for p, f, a in zip(params, fisher, anchors))
    assert abs(low.value().item() - exact.item()) <= 1e-5 * exact.item()


def test_penalty_gradient_matches_autograd():
    params, fisher, anchors = make_case(seed=1)
    reference = 50.0 * sum((f * (p - a) ** 2).sum() for p, f, a in zip(params, fisher, anchors))
    expected = torch.autograd.grad(reference, params)
    existing = [torch.full_like(p, 0.5) for p in params]  # the data loss's gradient is kept
    for p, e in zip(params, existing):
        p.grad = e.clone()
    params[0].grad = params[0].grad.t().contiguous().t()  # a gradient laid out unlike its parameter
    value = EWCPenalty(params, fisher, anchors, 50.0).add_grad_(with_value=True)
    for p, e, g in zip(params, existing, expected):
        torch.testing.assert_close(p.grad, e + g, rtol=1e-5, atol=1e-6)
    # The value read in the same pass is the penalty's value.
    assert abs(value.item() - reference.item()) <= 1e-5 * reference.item()


def test_penalty_is_zero_at_the_anchor_and_with_lambda_zero():
    params, fisher, anchors = make_case(seed=2)
    at_anchor = [a.clone().requires_grad_() for a in anchors]
    assert EWCPenalty(at_anchor, fisher, anchors, 50.0).value().item() == 0
    assert EWCPenalty(params, fisher, anchors, 0.0).value().item() == 0


def test_train_methods_select_the_papers_parameters(tiny_model):
    unet = load_parts(tiny_model)[0].unet
    names = [n for n, _ in unet.named_parameters()]
    assert trainable_names(unet, "full") == names
    xattn = trainable_names(unet, "xattn")
    assert xattn and all(".attn2." in n for n in xattn) and len(xattn) == sum(".attn2." in n for n in names)
    noxattn = set(trainable_names(unet, "noxattn"))
    frozen = set(names) - noxattn
    assert frozen == {n for n in names if ".attn2." in n or n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))}
    assert any(".attn1." in n for n in noxattn) and any("time_emb_proj" in n for n in noxattn)
