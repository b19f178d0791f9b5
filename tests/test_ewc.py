"""The EWC penalty's value and gradient, and which parameters each --train-method trains."""

import pytest
import torch

from amnesia_sd.model import ewc
from amnesia_sd.model.ewc import EWCPenalty
from amnesia_sd.model.trainable import trainable_names
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


def lora_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for out_f, in_f, r in ((6, 5, 2), (3, 7, 4), (8, 8, 1)):
        a = torch.randn((r, in_f), generator=g).requires_grad_()
        b = torch.randn((out_f, r), generator=g).requires_grad_()
        layers.append((a, b, torch.rand((out_f, in_f), generator=g), 0.75))
    # a convolution's adapter: A a 3x3 convolution to r channels, B a 1x1 one back
    a, b = torch.randn((2, 4, 3, 3), generator=g).requires_grad_(), torch.randn((5, 2, 1, 1), generator=g).requires_grad_()
    layers.append((a, b, torch.rand((5, 4, 3, 3), generator=g), 2.0))
    return layers


def merged_delta(a, b, s):
    return s * (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])


def test_lora_penalty_value_and_gradient_match_autograd():
    from amnesia_sd.model.ewc import LoraPenalty

    layers = lora_case()
    reference = 50.0 * sum((f * merged_delta(a, b, s) ** 2).sum() for a, b, f, s in layers)
    params = [p for a, b, _, _ in layers for p in (a, b)]
    expected = torch.autograd.grad(reference, params)
    for p in params:
        p.grad = torch.full_like(p, 0.5)  # the data loss's gradient is kept
    layers[0][0].grad = None  # and a parameter without one gets it
    value = LoraPenalty(layers, 50.0).add_grad_(with_value=True)
    for p, e in zip(params, expected):
        base = 0 if p is layers[0][0] else 0.5
        torch.testing.assert_close(p.grad, base + e, rtol=1e-5, atol=1e-5)
    assert abs(value.item() - reference.item()) <= 1e-5 * reference.item()
    # lambda 0: no gradient, no value; zero B (a fresh adapter): zero penalty
    assert LoraPenalty(layers, 0.0).add_grad_(with_value=True).item() == 0
    fresh = [(a, torch.zeros_like(b), f, s) for a, b, f, s in layers]
    assert LoraPenalty(fresh, 50.0).add_grad_(with_value=True).item() == 0


def test_lora_penalty_is_ewc_on_the_adapted_weights_of_a_unet(tiny_model):
    """On a real UNet with peft adapters: the penalty equals full EWC on the merged weights, anchored
    at the base weights, counting only the adapted ones."""
    from types import SimpleNamespace

    from amnesia_sd.model.trainable import LoraAdapters

    unet = load_parts(tiny_model)[0].unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    fisher = {k: torch.rand(p.shape, generator=g) for k, p in unet.named_parameters()}
    config = SimpleNamespace(train_method="full", lora_rank=2, lora_alpha_value=lambda: 4.0,
                             lora_target_list=lambda: ["attn2.to_q", "attn2.to_v", "conv1"], fim_dtype="fp32",
                             lambda_ewc=50.0)
    asked = []
    adapters = LoraAdapters(unet, config)
    adapters.anchor(unet, lambda rows: asked.extend(rows) or {n: fisher[n] for n in rows}, "cpu")
    assert sorted(asked) == sorted(f"{m}.weight" for m in adapters.modules)  # only the adapted weights' entries
    assert {m.rsplit(".", 1)[-1] for m in adapters.modules} == {"to_q", "to_v", "conv1"}
    assert all(".attn2." in m for m in adapters.modules if not m.endswith("conv1"))
    with torch.no_grad():
        for p in adapters.params:
            p.normal_(generator=g)
    value = adapters.penalty.add_grad_(with_value=True)
    unet.fuse_lora()
    merged = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    expected = 50.0 * sum((fisher[k] * (merged[k] - base[k]) ** 2).sum() for k in base)
    assert abs(value.item() - expected.item()) <= 1e-4 * expected.item()
