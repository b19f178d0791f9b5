"""The EWC penalty  lambda * sum_i F_i (theta_i - theta*_i)^2  over the parameters that train.

Frozen parameters keep theta = theta*, so they add a constant zero and are left out. The gradient
2 * lambda * F * (theta - theta*) is added to .grad directly with multi-tensor (foreach) ops
instead of building an autograd graph over every weight: no Python loop of per-parameter kernels,
no saved activations. F and theta* may be stored in bf16/fp16 to halve their memory; the
arithmetic is float32.

The penalty is memory-bound: each step streams theta, theta*, F and the gradient once. Work goes
in groups so the float32 temporaries (theta - theta*, upcast F) of a group stay small; on the CPU,
tensors are also cut into flat pieces so a group's temporaries stay in the cache instead of
making another round trip through memory.

Under FSDP each process holds its rows of every weight, gradient, F and theta*, and the penalty,
being elementwise, works on those rows alone; its value is this process's part of the sum.
"""

from __future__ import annotations

import torch

from amnesia_sd.model.shards import local, rows

# (piece elements, group elements) per device type. Small on the CPU for the cache; on a GPU the
# kernels are fast and each group costs launches, so groups are large and tensors stay whole.
LAYOUT = {"cpu": (2**19, 2**20), "cuda": (None, 2**25)}
GROUP_TENSORS = 256


def _pieces(tensors: list[torch.Tensor], split: list[bool], piece: int | None) -> list[torch.Tensor]:
    """Flat views of at most `piece` elements of the tensors marked in `split`; the others whole."""
    if piece is None:
        return list(tensors)
    return [v for t, s in zip(tensors, split) for v in (t.reshape(-1).split(piece) if s else (t,))]


def _groups(sizes: list[int], limit: int) -> list[slice]:
    groups, start, size = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and (size + n > limit or i - start >= GROUP_TENSORS):
            groups.append(slice(start, i))
            start, size = i, 0
        size += n
    if start < len(sizes):
        groups.append(slice(start, len(sizes)))
    return groups


class EWCPenalty:
    def __init__(self, params: list[torch.Tensor], fisher: list[torch.Tensor], anchors: list[torch.Tensor], lam: float):
        self.params, self.fisher, self.anchors, self.lam = params, fisher, anchors, lam
        device = local(params[0]).device.type if params else "cpu"
        self.piece, group_elements = LAYOUT.get(device, LAYOUT["cuda"])
        self.split = [local(p).is_contiguous() and f.is_contiguous() and a.is_contiguous()
                      for p, f, a in zip(params, fisher, anchors)]
        # Pieces of F and theta* are fixed views of tensors the penalty owns. Those of theta and its
        # gradient are made at each call: `accelerator.prepare` may re-point a parameter's storage
        # (p.data = a copy; under torchrun on the CPU it does), and views made before would keep
        # reading the old weights, theta* itself, so the penalty would stay zero.
        self._fisher = _pieces(fisher, self.split, self.piece)
        self._anchors = _pieces(anchors, self.split, self.piece)
        self.groups = _groups([f.numel() for f in self._fisher], group_elements)

    def _diff(self, params: list[torch.Tensor], group: slice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """theta - theta* and F for one group, in float32 (no copies of F when already float32)."""
        diff = torch._foreach_sub([p.float() for p in params[group]], [a.float() for a in self._anchors[group]])
        return diff, [f.float() for f in self._fisher[group]]

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """lambda * sum F (theta - theta*)^2, as a float32 scalar."""
        total = self._zero()
        if self.lam == 0:
            return total
        params = _pieces([local(p.detach()) for p in self.params], self.split, self.piece)
        for group in self.groups:
            diff, fisher = self._diff(params, group)
            total += self._weighted_sum(diff, fisher)
            del diff, fisher
        return total * self.lam

    @torch.no_grad()
    def add_grad_(self, with_value: bool = False) -> torch.Tensor | None:
        """Add the penalty's gradient 2 lambda F (theta - theta*) to each parameter's .grad.

        With `with_value`, also return the penalty's value, computed in the same pass while each
        group's theta - theta* is still at hand (a separate value() reads every weight again).
        """
        total = self._zero() if with_value else None
        if self.lam == 0:
            return total
        for p, split in zip(self.params, self.split):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif split and not local(p.grad).is_contiguous():  # its flat pieces must be views of the real .grad
                p.grad = p.grad.contiguous()
        grads = _pieces([local(p.grad) for p in self.params], self.split, self.piece)
        params = _pieces([local(p.detach()) for p in self.params], self.split, self.piece)
        for group in self.groups:
            diff, fisher = self._diff(params, group)
            torch._foreach_addcmul_(grads[group], fisher, diff, value=2 * self.lam)
            if with_value:
                total += self._weighted_sum(diff, fisher)
            del diff, fisher  # before the next group's, so one group's temporaries exist at a time
        return total * self.lam if with_value else None

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=local(self.params[0]).device if self.params else "cpu")

    @staticmethod
    def _weighted_sum(diff: list[torch.Tensor], fisher: list[torch.Tensor]) -> torch.Tensor:
        """sum F (theta - theta*)^2 of one group; `diff` is used up, F is left alone."""
        torch._foreach_mul_(diff, diff)
        torch._foreach_mul_(diff, fisher)  # never negative
        return torch.stack(torch._foreach_norm(diff, 1)).sum()


class LoraPenalty:
    """The EWC penalty of LoRA training:  lambda * sum_W F_W (delta W)^2,  delta W = s B A.

    The adapter's update is the whole change to W (the frozen base weight is the anchor, so no copy
    of theta* exists). The gradient is written out by hand, one adapted layer at a time, so only one
    layer's delta W exists at once:  G = 2 lambda F * delta W,  dB = s G A^T,  dA = s B^T G.

    Under FSDP a process holds some rows of B, hence of delta W and G, and F for those rows: dB of
    its rows is exact locally; dA sums over every row of W, so the processes' parts are added up
    (one all-reduce for all layers) before each keeps its own rows of A's gradient.
    """

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]], lam: float):
        # (A [r, in], B [out, r], F [out, in] (this process's rows of B), scale s); a convolution's
        # adapter is the same product with A [r, in, kh, kw] flattened to [r, in * kh * kw].
        self.layers, self.lam = layers, lam
        self.sharded = any(rows(a) is not None for a, *_ in layers)

    @torch.no_grad()
    def add_grad_(self, with_value: bool = False) -> torch.Tensor | None:
        total = torch.zeros((), dtype=torch.float32, device=local(self.layers[0][0]).device) if with_value else None
        if self.lam == 0:
            return total
        partial_da = []
        for a, b, fisher, scale in self.layers:
            a32 = (a.full_tensor() if self.sharded else a).float().flatten(1)  # all of A: r rows, small
            b32 = local(b).float().flatten(1)
            delta = (b32 @ a32).mul_(scale)
            weighted = delta.mul_(fisher.float().flatten(1))  # F * delta W (delta W is not needed alone again)
            if with_value:
                total += (weighted * (b32 @ a32)).sum() * scale
            g = weighted.mul_(2 * self.lam)
            _add_grad(b, (g @ a32.T).mul_(scale))
            da = (b32.T @ g).mul_(scale)
            if self.sharded:
                partial_da.append(da)
            else:
                _add_grad(a, da)
            del delta, weighted, g
        if partial_da:
            flat = torch.cat([d.reshape(-1) for d in partial_da])
            torch.distributed.all_reduce(flat)
            for (a, *_), da in zip(self.layers, flat.split([d.numel() for d in partial_da])):
                _add_grad(a, da.view(a.shape[0], -1)[rows(a)])
        return total * self.lam if with_value else None


def _add_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Add `grad` (this process's rows, flattened after dim 0) to p's gradient."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    target = local(p.grad)
    target.add_(grad.view(target.shape).to(target.dtype))
