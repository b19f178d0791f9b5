"""The EWC penalty  lambda * sum_i F_i (theta_i - theta*_i)^2  over the parameters that train.

Frozen parameters keep theta = theta*, so they add a constant zero and are left out. The gradient
2 * lambda * F * (theta - theta*) is added to .grad directly with multi-tensor (foreach) ops
instead of building an autograd graph over every weight: no Python loop of per-parameter kernels,
no saved activations. F and theta* may be stored in bf16/fp16 to halve their memory; the
arithmetic is float32. Work goes in groups of tensors so temporaries never exceed one group.
"""

from __future__ import annotations

import torch

GROUP_ELEMENTS = 2**24  # about 64 MB of float32 temporaries at most
GROUP_TENSORS = 64


def _groups(params: list[torch.Tensor]) -> list[slice]:
    groups, start, size = [], 0, 0
    for i, p in enumerate(params):
        if i > start and (size + p.numel() > GROUP_ELEMENTS or i - start >= GROUP_TENSORS):
            groups.append(slice(start, i))
            start, size = i, 0
        size += p.numel()
    if start < len(params):
        groups.append(slice(start, len(params)))
    return groups


class EWCPenalty:
    def __init__(self, params: list[torch.Tensor], fisher: list[torch.Tensor], anchors: list[torch.Tensor], lam: float):
        self.params, self.fisher, self.anchors, self.lam = params, fisher, anchors, lam
        self.groups = _groups(params)

    def _diff(self, group: slice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """theta - theta* and F for one group, in float32 (no copies when already float32)."""
        diff = torch._foreach_sub([p.float() for p in self.params[group]], [a.float() for a in self.anchors[group]])
        return diff, [f.float() for f in self.fisher[group]]

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """lambda * sum F (theta - theta*)^2, as a float32 scalar."""
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device if self.params else "cpu")
        if self.lam == 0:
            return total
        for group in self.groups:
            diff, fisher = self._diff(group)
            weighted = torch._foreach_mul(diff, fisher)
            torch._foreach_mul_(weighted, diff)  # F (theta - theta*)^2, never negative
            total += torch.stack(torch._foreach_norm(weighted, 1)).sum()
        return total * self.lam

    @torch.no_grad()
    def add_grad_(self) -> None:
        """Add the penalty's gradient 2 lambda F (theta - theta*) to each parameter's .grad."""
        if self.lam == 0:
            return
        for group in self.groups:
            params = self.params[group]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            diff, fisher = self._diff(group)
            torch._foreach_addcmul_([p.grad for p in params], fisher, diff, value=2 * self.lam)
