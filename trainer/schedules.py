"""Noise schedules in one time convention: `t` is what the network receives as its timestep.

- DDPM (SDXL eps, CogVideoX v): t is an integer index 0..999; a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t).
  t = -1 denotes clean data (a = 1, s = 0), like diffusers' `final_alpha_cumprod = 1`.
- Rectified flow (SD3): t = 1000 * sigma, a = 1 - sigma, s = sigma; t = 0 is clean data.
Forward process for every schedule: x_t = a_t * x0 + s_t * eps (docs/algorithms.md §1.1).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """[num_steps] float64 abar of diffusers' `scaled_linear` betas (SDXL, CogVideoX)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def shift_snr(alphas_cumprod: torch.Tensor, snr_shift: float) -> torch.Tensor:
    """Divide the SNR abar/(1-abar) by `snr_shift` at every step (CogVideoX's `snr_shift_scale`)."""
    return alphas_cumprod / (snr_shift + (1.0 - snr_shift) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(abar) so abar_0 is unchanged and abar_last == 0 exactly."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root ** 2


def shift_sigma(sigma, shift: float):
    """SD3's timestep shift sigma' = k sigma / (1 + (k - 1) sigma): identity at k = 1, fixes 0 and 1, monotone."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class NoiseSchedule(ABC):
    """Common surface: `alpha_sigma(t)`, the time range and the few time grids the methods need."""
    kind: str
    t_max: float      # noisiest timestep the network sees
    clean_time: float  # the timestep value meaning "clean data" (a = 1, s = 0)

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) for timesteps t [B]."""

    @abstractmethod
    def timesteps_from_uniform(self, u: torch.Tensor, lo_frac: float, hi_frac: float) -> torch.Tensor:
        """Map u ~ U[0,1) to training timesteps in [lo_frac*T, hi_frac*T] (DDPM: integers; flow: after the shift)."""

    @abstractmethod
    def student_timesteps(self, num_steps: int) -> list[float]:
        """K student timesteps, noisiest first (docs/algorithms.md §5.8)."""

    @abstractmethod
    def sampler_timesteps(self, num_steps: int) -> list[float]:
        """num_steps + 1 times from t_max down to clean_time for the teacher's deterministic sampler."""

    def snap(self, t: torch.Tensor) -> torch.Tensor:
        """Round to the schedule's time grid (DDPM: integer indices; flow: continuous)."""
        return t


class DDPMSchedule(NoiseSchedule):
    kind = "ddpm"
    clean_time = -1.0

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, snr_shift: float = 1.0,
                 zero_terminal_snr: bool = False):
        abar = scaled_linear_alphas_cumprod(beta_start, beta_end)
        if snr_shift != 1.0:
            abar = shift_snr(abar, snr_shift)
        if zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        self.alphas_cumprod = abar                                  # [1000] float64, index = timestep
        # index 0 of the extended table is t = -1 (clean): abar = 1.
        self._abar_ext = torch.cat([torch.ones(1, dtype=torch.float64), abar])
        self.t_max = float(NUM_TRAIN_TIMESTEPS - 1)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = (t.detach().round().long() + 1).clamp(0, NUM_TRAIN_TIMESTEPS).cpu()
        abar = self._abar_ext[index].to(device=t.device)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return abar.sqrt().to(dtype), (1.0 - abar).clamp_min(0).sqrt().to(dtype)

    def timesteps_from_uniform(self, u, lo_frac, hi_frac):
        # integers in [lo, hi] as DMD2 draws them: randint(min_step, min(max_step + 1, T)), so 0.02 and 0.98 give
        # [20, 980] and 0 and 1 give [0, 999]
        lo = round(lo_frac * NUM_TRAIN_TIMESTEPS)
        stop = min(round(hi_frac * NUM_TRAIN_TIMESTEPS) + 1, NUM_TRAIN_TIMESTEPS)
        return (lo + u * (stop - lo)).floor().clamp(lo, stop - 1)

    def student_timesteps(self, num_steps):
        # DMD2: range(999, 0, -(1000 // K)), the first K of it: 4 steps 999, 749, 499, 249; 6 steps 999, 833, 667,
        # 501, 335, 169 (where 1000 // K does not divide 999, DMD2's range has a K+1-th entry, 3 at K = 6: a K-step
        # student has K timesteps, so it is not used)
        stride = NUM_TRAIN_TIMESTEPS // num_steps
        return [float(NUM_TRAIN_TIMESTEPS - 1 - stride * i) for i in range(num_steps)]

    def sampler_timesteps(self, num_steps):
        # "trailing" spacing (Lin et al. 2024 Table 2): starts at 999, ends in the clean state
        stride = NUM_TRAIN_TIMESTEPS / num_steps
        times = [float(round(NUM_TRAIN_TIMESTEPS - i * stride) - 1) for i in range(num_steps)]
        return times + [self.clean_time]

    def snap(self, t):
        return t.round()


class FlowSchedule(NoiseSchedule):
    kind = "flow"
    clean_time = 0.0

    def __init__(self, shift: float = 1.0):
        self.shift = shift
        self.t_max = float(NUM_TRAIN_TIMESTEPS)

    def alpha_sigma(self, t):
        sigma = t / NUM_TRAIN_TIMESTEPS
        return 1.0 - sigma, sigma

    def timesteps_from_uniform(self, u, lo_frac, hi_frac):
        sigma = lo_frac + u * (hi_frac - lo_frac)
        return shift_sigma(sigma, self.shift) * NUM_TRAIN_TIMESTEPS

    # python floats, not tensors: these grids are built inside the planner's fake-tensor trace too
    def student_timesteps(self, num_steps):
        return [shift_sigma(1.0 - i / num_steps, self.shift) * NUM_TRAIN_TIMESTEPS for i in range(num_steps)]

    def sampler_timesteps(self, num_steps):
        return [shift_sigma(1.0 - i / num_steps, self.shift) * NUM_TRAIN_TIMESTEPS for i in range(num_steps + 1)]


def cubic_timesteps(u: torch.Tensor, t_max: float, power: float = 3.0) -> torch.Tensor:
    """ADP's high-noise student schedule t = (1 - u^p) T, p = 3 the paper's cubic (docs/algorithms.md §6.2):
    support (0, T], P(t > 0.9T) = 0.464, median 0.875T."""
    return (1.0 - u ** power) * t_max


def build_schedule(prediction: str, beta_start=0.00085, beta_end=0.012, snr_shift=1.0, zero_terminal_snr=False,
                   shift=1.0) -> NoiseSchedule:
    if prediction == "flow":
        return FlowSchedule(shift)
    return DDPMSchedule(beta_start, beta_end, snr_shift, zero_terminal_snr)


def time_step_size(schedule: NoiseSchedule, dt_frac: float) -> float:
    """dt in network time units (docs/algorithms.md §5.5): DDPM rounds 1000/64 = 15.625 to 16 index steps."""
    dt = dt_frac * NUM_TRAIN_TIMESTEPS
    return float(math.ceil(dt - 1e-9)) if schedule.kind == "ddpm" else dt
