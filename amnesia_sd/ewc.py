"""The EWC penalty  lambda * sum_i F_i (theta_i - theta*_i)^2  over the parameters that train.

Frozen parameters keep theta = theta*, so they add a constant zero and are left out. The gradient
2 * lambda * F * (theta - theta*) is added to .grad directly with multi-tensor (foreach) ops
instead of building an autograd graph over every weight: no Python loop of per-parameter kernels
and no saved activations. Work goes in groups of tensors so the temporary never exceeds a group.
"""

from __future__ import annotations

import torch

GROUP = 64  # tensors per foreach call: bounds the temporary (theta - theta*) buffers


class EWCPenalty:
    def __init__(self, params: list[torch.Tensor], fisher: list[torch.Tensor], anchors: list[torch.Tensor], lam: float):
        self.params, self.fisher, self.anchors, self.lam = params, fisher, anchors, lam

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """lambda * sum F (theta - theta*)^2, as a float32 scalar."""
        return self._run(add_grad=False)

    @torch.no_grad()
    def add_grad_(self) -> torch.Tensor:
        """Add the penalty's gradient to each parameter's .grad; return the penalty's value."""
        return self._run(add_grad=True)

    def _run(self, add_grad: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device if self.params else "cpu")
        if self.lam == 0 or not self.params:
            return total
        for start in range(0, len(self.params), GROUP):
            params = self.params[start : start + GROUP]
            diff = torch._foreach_sub([p.float() for p in params], self.anchors[start : start + GROUP])
            weighted = torch._foreach_mul(diff, self.fisher[start : start + GROUP])  # F (theta - theta*)
            if add_grad:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                torch._foreach_add_([p.grad for p in params], weighted, alpha=2 * self.lam)
            torch._foreach_mul_(weighted, diff)  # F (theta - theta*)^2, never negative
            total += torch.stack(torch._foreach_norm(weighted, 1)).sum()
        return total * self.lam
