"""Samplers, written once against the denoiser convention and shared by training, `trainer.sample` and export.

Student (docs/algorithms.md §3 "multi-step"): predict x0 at t_i, re-noise with FRESH noise to t_{i+1}; pure noise at the first step.
Teacher: deterministic first-order ODE (DDIM / Euler) from t_max to clean data, CFG in every call.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from trainer.denoiser import Cond, Denoiser

NoiseFn = Callable[[int], torch.Tensor]   # noise_fn(i): [B, ...] fresh standard normal for student step i


def _times(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), float(value), device=like.device)


def student_input(denoiser: Denoiser, generator, cond: Cond, timesteps: list[float], noise_fn: NoiseFn,
                  k: int, conditioning_timestep: Optional[float] = None) -> torch.Tensor:
    """x_{t_k}: the input of student step k, simulated with the current generator under no_grad (DMD2's backward
    simulation). k = 0 is pure noise: at SDXL's t = 999 a = 0.068, so x_999 is replaced by noise as DMD2 does."""
    x = noise_fn(0)
    with torch.no_grad():
        for i in range(k):
            x0 = student_predict(denoiser, generator, x, timesteps[i], cond, conditioning_timestep)
            x = denoiser.add_noise(x0, noise_fn(i + 1), _times(timesteps[i + 1], x0))
    return x


def student_predict(denoiser: Denoiser, generator, x: torch.Tensor, t: float, cond: Cond,
                    conditioning_timestep: Optional[float] = None) -> torch.Tensor:
    """x0-hat [B, ...] of one student call. A one-step student may see a fixed conditioning timestep on its
    pure-noise input (DMD2 SDXL: 399), whose coefficients then convert its output."""
    t_net = t if conditioning_timestep is None else conditioning_timestep
    return denoiser.predict(generator, x, _times(t_net, x), cond).x0


def student_sample(denoiser: Denoiser, generator, cond: Cond, timesteps: list[float], noise_fn: NoiseFn,
                   conditioning_timestep: Optional[float] = None) -> torch.Tensor:
    """Full K-step student sampling -> x0 [B, ...]."""
    k = len(timesteps) - 1
    x = student_input(denoiser, generator, cond, timesteps, noise_fn, k, conditioning_timestep)
    with torch.no_grad():
        return student_predict(denoiser, generator, x, timesteps[k], cond, conditioning_timestep)


@torch.no_grad()
def teacher_sample(denoiser: Denoiser, teacher, noise: torch.Tensor, cond: Cond, uncond: Optional[Cond],
                   guidance_scale: float, num_steps: int) -> torch.Tensor:
    """Deterministic multi-step ODE sample of the (CFG-guided) teacher -> x0 [B, ...]."""
    times = denoiser.schedule.sampler_timesteps(num_steps)
    x = noise
    for t, u in zip(times[:-1], times[1:]):
        pred = denoiser.predict(teacher, x, _times(t, x), cond, uncond, guidance_scale)
        x = denoiser.ode_step(pred, x, _times(t, x), _times(u, x))
    return x
