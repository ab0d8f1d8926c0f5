"""The DDIM update and its inverse, on a scheduler's own alphas (Song et al. 2021).

Pure tensor functions: ``sched`` is any diffusers scheduler with ``alphas_cumprod``,
``final_alpha_cumprod`` and ``config.prediction_type`` / ``config.num_train_timesteps``
(a ``DDIMScheduler`` built from the model's config). Every sampling and inversion loop
of the engine (plain and fast path) goes through these, so there is one DDIM formula.
"""

from __future__ import annotations

import torch


def alpha_at(sched, t: int) -> torch.Tensor:
    """``alpha-bar_t`` (cumulative product), with the scheduler's final alpha for ``t < 0``."""
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def x0_eps(sched, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output -> ``(x0, eps)`` for the scheduler's ``prediction_type``
    (SD 1.x ``epsilon``, SD 2.x ``v_prediction``, or ``sample``)."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    if kind == "v_prediction":
        return a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
    if kind == "sample":
        return out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    raise ValueError(f"unsupported prediction_type {kind!r}")


def ddim_update(sched, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor,
                a_prev: torch.Tensor) -> torch.Tensor:
    """DDIM step (Song et al. 2021, eq. 12, eta = 0) from alphas-cumprod ``a_t`` to ``a_prev``
    (tensors, so the fast path can keep them in buffers)."""
    x0, eps = x0_eps(sched, out, x, a_t)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def ddim_inverse_update(sched, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor,
                        a_from: torch.Tensor) -> torch.Tensor:
    """DDIM inversion step from alphas-cumprod ``a_from`` up to ``a_t``, the model evaluated
    at (x, t) as in the null-text paper's ``next_step`` (Mokady et al. 2022)."""
    _, eps = x0_eps(sched, out, x, a_t)
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def prev_timestep(sched, t: int, steps: int) -> int:
    """The timestep one DDIM step below ``t`` (``t - T/steps``), as ``DDIMScheduler.step``."""
    return t - sched.config.num_train_timesteps // steps


def ddim_step(sched, out: torch.Tensor, t: int, x: torch.Tensor, steps: int) -> torch.Tensor:
    """One deterministic DDIM sampling step t -> t - T/steps (Song et al. 2021, eq. 12, eta = 0).

    Differentiable; equal to ``DDIMScheduler.step(...).prev_sample`` (tested)."""
    return ddim_update(sched, out, x, alpha_at(sched, t), alpha_at(sched, prev_timestep(sched, t, steps)))


def ddim_inverse_step(sched, out: torch.Tensor, t: int, x: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM inversion step (t - T/steps) -> t, the model evaluated at (x, t) (Mokady et al.
    2022, ``next_step``)."""
    return ddim_inverse_update(sched, out, x, alpha_at(sched, t),
                               alpha_at(sched, prev_timestep(sched, t, steps)))
