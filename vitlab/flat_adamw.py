"""AdamW with each parameter group's parameters, gradients and moments in one buffer apiece.

PyTorch's fused AdamW still works tensor by tensor: for the MNIST model's 80 parameter tensors one
step spends most of its time on per-tensor work (a step counter each, a kernel call each), not on
the 200,000 numbers it updates. ``FlatAdamW`` makes the parameters of each group views into one
contiguous buffer, keeps the two moments the same way, gathers the gradients into one buffer with a
single ``torch._foreach_copy_``, and runs the fused update once per group. The arithmetic is the fused
AdamW's, number for number; the tests hold it to the plain optimizer exactly.

What stays as ``torch.optim.AdamW`` has it:

- ``state_dict`` / ``load_state_dict`` (every parameter keeps its own ``step``, ``exp_avg`` and
  ``exp_avg_sq``, views into the group's buffers), so a checkpoint loads into either optimizer;
- a step where some parameter has no gradient, a ``closure``, or a ``GradScaler`` takes the
  tensor-by-tensor path over the same views, and the next steps go back to the buffers where they
  can (not once the parameters' step counts differ);
- parameters moved or replaced behind the optimizer's back (``model.to(...)``): the buffers are
  built afresh from the parameters as they are now.

The cost: while the buffers exist, the parameters share storage, so a single parameter saved on
its own with ``torch.save`` carries the whole buffer (825 KB for the MNIST model's 10-float head
bias). ``unflatten()`` gives every parameter and moment its own storage again (``fit`` calls it when
training ends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Buffers:
    """One group's parameters laid end to end in ``param``; ``steps[i]`` is parameter i's step count."""

    params: list[nn.Parameter]
    pointers: list[int]  # each parameter's data_ptr() when the buffers were built
    param: torch.Tensor  # (n,)
    grad: torch.Tensor  # (n,)
    grad_views: list[torch.Tensor]  # grad cut into the parameters' shapes
    exp_avg: torch.Tensor  # (n,)
    exp_avg_sq: torch.Tensor  # (n,)
    steps: torch.Tensor  # (len(params),) float32
    step: torch.Tensor  # () steps[0], the count the fused update reads when all are equal
    uniform: bool = True  # every entry of steps is known to be equal


class FlatAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(..., fused=True)`` whose update runs once per parameter group.

    Takes AdamW's arguments except ``fused`` (always True), ``foreach``, ``capturable`` and
    ``differentiable``. Where a group has ``amsgrad``, parameters of mixed dtypes or devices, or
    complex or sparse ones, every step goes tensor by tensor, as AdamW's own.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, fused=True)
        self._buffers: list[_Buffers | None] | None = None  # per group; None: not built yet

    # -- the buffers ---------------------------------------------------------------------------

    def _flattenable(self, group: dict) -> bool:
        params = group["params"]
        if not params or group["amsgrad"]:
            return False
        first = params[0]
        return all(
            p.dtype == first.dtype and p.device == first.device and not p.is_complex() and p.layout == torch.strided
            for p in params
        ) and first.dtype.is_floating_point

    @torch.no_grad()
    def _build(self, group: dict) -> _Buffers | None:
        """Copy a group's parameters and moments into fresh buffers and point them there; None where the
        group cannot be flattened, or where its parameters' step counts differ."""
        if not self._flattenable(group):
            return None
        params = group["params"]
        states = [self.state.get(p) for p in params]
        started = [bool(s) for s in states]
        if any(started) and not all(started):
            return None  # some parameters have taken steps, others none
        if all(started):
            counts = torch.stack([torch.as_tensor(s["step"], dtype=torch.float32).reshape(()) for s in states])
            if not bool((counts == counts[0]).all()):
                return None
        first = params[0]
        n = sum(p.numel() for p in params)
        like = dict(dtype=first.dtype, device=first.device)
        param, grad = torch.empty(n, **like), torch.empty(n, **like)
        exp_avg, exp_avg_sq = torch.zeros(n, **like), torch.zeros(n, **like)
        steps = torch.zeros(len(params), dtype=torch.float32, device=first.device)
        grad_views, offset = [], 0
        for i, (p, state) in enumerate(zip(params, states)):
            view = slice(offset, offset + p.numel())
            param[view].copy_(p.reshape(-1))
            if state:
                exp_avg[view].copy_(state["exp_avg"].reshape(-1))
                exp_avg_sq[view].copy_(state["exp_avg_sq"].reshape(-1))
                steps[i] = torch.as_tensor(state["step"], dtype=torch.float32)
            p.data = param[view].view_as(p)
            self.state[p] = {"step": steps[i], "exp_avg": exp_avg[view].view_as(p),
                             "exp_avg_sq": exp_avg_sq[view].view_as(p)}
            grad_views.append(grad[view].view_as(p))
            offset += p.numel()
        return _Buffers(list(params), [p.data_ptr() for p in params], param, grad, grad_views, exp_avg, exp_avg_sq,
                        steps, steps[0])

    def _ready(self) -> list[tuple[_Buffers, list[torch.Tensor]]] | None:
        """(buffers, gradients) of every group, the buffers built or rebuilt where needed; None where
        this step must go tensor by tensor."""
        if self._buffers is None or len(self._buffers) != len(self.param_groups):
            self._buffers = [self._build(group) for group in self.param_groups]
        ready = []
        for i, group in enumerate(self.param_groups):
            buffers = self._buffers[i]
            if buffers is not None and (
                len(buffers.params) != len(group["params"])
                or any(mine is not theirs for mine, theirs in zip(buffers.params, group["params"]))
                or [p.data_ptr() for p in buffers.params] != buffers.pointers
            ):  # parameters replaced, or moved by model.to(...)
                buffers = self._buffers[i] = self._build(group)
            if buffers is None:
                return None
            grads = [p.grad for p in buffers.params]
            if any(g is None or g.is_sparse for g in grads):
                return None
            if not buffers.uniform:
                if not bool((buffers.steps == buffers.steps[0]).all()):
                    return None
                buffers.uniform = True
            ready.append((buffers, grads))
        return ready

    @torch.no_grad()
    def unflatten(self) -> None:
        """Give every parameter, and its moments and step count, storage of its own again. The next
        ``step`` builds the buffers anew."""
        for buffers in self._buffers or []:
            if buffers is None:
                continue
            for p in buffers.params:
                p.data = p.data.clone()
                state = self.state.get(p)
                if state:
                    self.state[p] = {key: value.clone() for key, value in state.items()}
        self._buffers = None

    # -- AdamW's interface ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update; with a ``closure``, a gradient scaler or a missing gradient, AdamW's own
        tensor-by-tensor step over the same storage."""
        amp = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        buffers = None if closure is not None or amp else self._ready()
        if buffers is None:
            if self._buffers is not None:
                for b in self._buffers:
                    if b is not None:
                        b.uniform = False  # only the parameters with gradients count this step
            return super().step(closure)
        for group, (b, grads) in zip(self.param_groups, buffers):
            torch._foreach_copy_(b.grad_views, grads)  # one call: a cat would need a reshape per tensor
            b.steps.add_(1)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                [b.param], [b.grad], [b.exp_avg], [b.exp_avg_sq], [], [b.step],
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                amsgrad=False, maximize=group["maximize"],
            )
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's, after which the buffers are built anew from the loaded state at the next step."""
        super().load_state_dict(state_dict)
        self._buffers = None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._buffers = None
