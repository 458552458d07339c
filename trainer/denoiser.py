"""The one denoiser convention: every network call returns its native prediction plus fp32 x0 / eps views.

Parameterisations (docs/algorithms.md §1.1), with x_t = a x0 + s eps:
  eps : native = eps                  x0 = (x_t - s eps) / a
  v   : native = v = a eps - s x0     x0 = a x_t - s v,   eps = s x_t + a v      (needs a^2 + s^2 = 1)
  flow: native = v = eps - x0         x0 = x_t - sigma v, eps = x_t + (1 - sigma) v
CFG (docs/algorithms.md §1.3) combines native outputs; because every conversion is affine in the output at fixed (x_t, t), the guided
x0 is the same whichever view is guided. The one-step ODE move (docs/algorithms.md §1.2) lives here too. DMD's real-minus-fake
difference, ADM's step and every sampler are written once against these views, for every backbone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from trainer.schedules import NoiseSchedule

Cond = dict[str, Any]  # keyword arguments of the network besides (sample, timestep); tensors batched on dim 0


def cat_conditions(a: Cond, b: Cond) -> Cond:
    """Concatenate two condition dicts along the batch (nested dicts such as SDXL's added_cond_kwargs too)."""
    out = {}
    for key, value in a.items():
        if isinstance(value, dict):
            out[key] = cat_conditions(value, b[key])
        elif isinstance(value, torch.Tensor):
            out[key] = torch.cat([value, b[key]])
        else:
            out[key] = value
    return out


@dataclass
class Prediction:
    """A network's prediction at (x_t, t). native: the network's own output; x0, eps: fp32 views. [B, ...]."""
    native: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor


@dataclass
class ScorePair:
    """x0 predictions of the real and the fake score at one (x_t, t) [B, ...] fp32."""
    x0_real: torch.Tensor
    x0_fake: torch.Tensor

    @property
    def direction(self) -> torch.Tensor:
        """The distribution-matching direction x0_fake - x0_real [B, ...] (DMD, docs/algorithms.md §2): the gradient
        of the reverse KL w.r.t. the generator's sample points along it (up to DMD's per-sample normaliser), so
        descent moves the sample toward the teacher's prediction."""
        return self.x0_fake - self.x0_real


def apply_cfg(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """diffusers' convention pred_u + w (pred_c - pred_u), written as w pred_c + (1 - w) pred_u so that w = 1 returns
    the conditional prediction and w = 0 the unconditional one bit-for-bit."""
    return guidance_scale * pred_cond + (1.0 - guidance_scale) * pred_uncond


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(-1, *([1] * (like.dim() - 1)))


class Denoiser:
    """Schedule + prediction type: conversions, CFG, noising and the ODE step. Holds no weights."""

    def __init__(self, schedule: NoiseSchedule, prediction: str):
        if (prediction == "flow") != (schedule.kind == "flow"):
            raise ValueError(f"prediction '{prediction}' does not fit a '{schedule.kind}' schedule")
        self.schedule, self.prediction = schedule, prediction

    # --- coefficients and conversions -----------------------------------------------------------------
    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) shaped to broadcast against `like` [B, ...], in float32 (float64 if `like` is)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        a, s = self.schedule.alpha_sigma(t.to(dtype))
        return _expand(a, like), _expand(s, like)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def to_views(self, native: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        x_t = x_t.float() if x_t.dtype != torch.float64 else x_t
        out = native.to(x_t.dtype)
        a, s = self.coefficients(t, x_t)
        if self.prediction == "eps":
            eps = out
            x0 = (x_t - s * eps) / a
        elif self.prediction == "v":
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        else:  # flow: s = sigma, a = 1 - sigma
            x0 = x_t - s * out
            eps = x_t + a * out
        return Prediction(native=native, x0=x0, eps=eps)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native-parameterisation regression target (fake-score and teacher denoising losses, as DMD2)."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "v":
            a, s = self.coefficients(t, x0)
            return a * eps - s * x0
        return eps - x0

    # --- network calls ----------------------------------------------------------------------------------
    def predict(self, net: Callable, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                uncond: Optional[Cond] = None, guidance_scale: float = 1.0) -> Prediction:
        """One network call (two batched as [cond ‖ uncond] with CFG): pred_u + w (pred_c - pred_u)."""
        if guidance_scale == 1.0 or uncond is None:
            return self.to_views(net(x_t, t, **cond), x_t, t)
        both = net(torch.cat([x_t, x_t]), torch.cat([t, t]), **cat_conditions(cond, uncond))
        pred_cond, pred_uncond = both.chunk(2)
        return self.to_views(apply_cfg(pred_cond, pred_uncond, guidance_scale), x_t, t)

    def score_pair(self, real_score: Callable, fake_score: Callable, x_t: torch.Tensor, t: torch.Tensor,
                   cond: Cond, uncond: Optional[Cond], guidance_scale: float) -> "ScorePair":
        """The real score (the teacher, with CFG) and the fake score (no CFG) at the same (x_t, t), under no_grad.
        DMD's loss and ADM's diagnostic cosine both read their distribution-matching direction from here."""
        with torch.no_grad():
            real = self.predict(real_score, x_t, t, cond, uncond, guidance_scale)
            fake = self.predict(fake_score, x_t, t, cond)
        return ScorePair(real.x0, fake.x0)

    @staticmethod
    def tapped_features(net, x_t, t, cond: Cond) -> list[torch.Tensor]:
        """The family's tapped features of a conditional call (discriminator backbones), per tap [B, C, ...].

        Goes through the module's __call__ with `taps_only=True`, so wrappers' hooks (FSDP2's root all-gather,
        ZeRO-3's parameter fetch) run as for a plain forward, and the network may stop after its last tap."""
        return net(x_t, t, **cond, taps_only=True)

    # --- ODE ---------------------------------------------------------------------------------------------
    def ode_step(self, pred: Prediction, x_t: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """First-order (DDIM / Euler) move from t to u with the model's own views (docs/algorithms.md §1.2):
        x_u = a_u x0_hat + s_u eps_hat. For rectified flow this is exactly x_t + (u - t) v_hat."""
        a_u, s_u = self.coefficients(u, pred.x0)
        return a_u * pred.x0 + s_u * pred.eps

