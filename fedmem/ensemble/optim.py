"""SGD / Adam updates on stacked parameters: one independent optimizer per ensemble member."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedmem.config import TrainConfig

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


class _StackedOptimizer:
    """SGD / Adam over a dict of stacked parameters, one independent optimizer per model."""

    def __init__(self, cfg: TrainConfig, params: Mapping[str, torch.Tensor]):
        if cfg.optimizer not in ("sgd", "adam"):
            raise ValueError(f"train.optimizer: unknown {cfg.optimizer!r}")
        self.cfg = cfg
        k = next(iter(params.values())).shape[0]
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        if cfg.optimizer == "sgd" and cfg.momentum != 0:
            self.state["buf"] = {n: torch.zeros_like(p) for n, p in params.items()}
        if cfg.optimizer == "adam":
            self.state["m"] = {n: torch.zeros_like(p) for n, p in params.items()}
            self.state["v"] = {n: torch.zeros_like(p) for n, p in params.items()}
        self.steps = torch.zeros(k, dtype=torch.float64)

    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor],
        active: torch.Tensor,
    ) -> None:
        """Update every model with ``active[k]``; the others are left untouched."""
        if bool(active.all()):
            self._update(params, grads, self.state, slice(None))
            return
        idx = torch.nonzero(active).flatten()
        if len(idx) == 0:
            return
        idx_dev = idx.to(next(iter(params.values())).device)
        sub_p = {n: p.index_select(0, idx_dev) for n, p in params.items()}
        sub_g = {n: g.index_select(0, idx_dev) for n, g in grads.items()}
        sub_s = {
            s: {n: t.index_select(0, idx_dev) for n, t in d.items()} for s, d in self.state.items()
        }
        self._update(sub_p, sub_g, sub_s, idx)
        for n, p in params.items():
            p.index_copy_(0, idx_dev, sub_p[n])
        for s, d in self.state.items():
            for n, t in d.items():
                t.index_copy_(0, idx_dev, sub_s[s][n])

    @property
    def fusable(self) -> bool:
        """SGD with momentum: the gradient can be accumulated straight into the buffers."""
        return self.cfg.optimizer == "sgd" and self.cfg.momentum != 0

    def step_fused(self, params: dict[str, torch.Tensor]) -> None:
        """The SGD step of every model after ``buf <- momentum * buf + grad`` was done in place.

        Weight decay then adds ``weight_decay * w`` to the buffer (the same sum as torch's
        ``momentum * buf + (grad + weight_decay * w)``, rounded in another order).
        """
        cfg = self.cfg
        self.steps += 1
        for n, p in params.items():
            buf = self.state["buf"][n]
            if cfg.weight_decay != 0:
                buf.add_(p, alpha=cfg.weight_decay)
            p.add_(buf, alpha=-cfg.lr)

    def _update(self, params, grads, state, which) -> None:
        cfg = self.cfg
        self.steps[which] += 1
        if cfg.optimizer == "sgd":
            for n, p in params.items():
                g = grads[n]
                if cfg.weight_decay != 0:
                    g = g.add(p, alpha=cfg.weight_decay)
                if cfg.momentum != 0:
                    buf = state["buf"][n]
                    buf.mul_(cfg.momentum).add_(g)
                    g = buf
                p.add_(g, alpha=-cfg.lr)
            return
        beta1, beta2 = _ADAM_BETAS
        steps = self.steps[which]
        uniform = bool((steps == steps[0]).all())
        if uniform:  # python scalars, exactly as torch.optim.Adam computes them
            t = float(steps[0])
            step_size: float | torch.Tensor = cfg.lr / (1 - beta1**t)
            bc2_sqrt: float | torch.Tensor = (1 - beta2**t) ** 0.5
        else:
            step_size = (cfg.lr / (1 - beta1**steps)).float()
            bc2_sqrt = ((1 - beta2**steps) ** 0.5).float()
        for n, p in params.items():
            g = grads[n]
            if cfg.weight_decay != 0:
                g = g.add(p, alpha=cfg.weight_decay)
            m, v = state["m"][n], state["v"][n]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if uniform:
                denom = (v.sqrt() / bc2_sqrt).add_(_ADAM_EPS)
                p.addcdiv_(m, denom, value=-step_size)  # type: ignore[arg-type]
            else:
                shape = (-1,) + (1,) * (p.dim() - 1)
                s = step_size.to(p.device).view(shape)  # type: ignore[union-attr]
                c = bc2_sqrt.to(p.device).view(shape)  # type: ignore[union-attr]
                denom = (v.sqrt() / c).add_(_ADAM_EPS)
                p.sub_(s * (m / denom))
