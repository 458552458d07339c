"""What every method shares: roles (`Nets`), the per-step context, phases and loss outputs.

A method is a small object: a typed config, `phases(step)` (which roles update now: TTUR lives here) and one loss
function per phase returning `LossOut`. Methods do math only: no backward, no optimizer step, no logging.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from parallel.randomness import StepRandom
from trainer.denoiser import Cond, Denoiser
from trainer.sampling import student_input, student_predict
from trainer.sections import Section


class HeadOptions(Section):
    """The discriminator heads' options, shared by the methods with a discriminator (trainer/heads.py)."""
    head_hidden: Optional[int] = Field(None, gt=0, description="each head's width (capacity); default: the family's")
    head_norm: Optional[bool] = Field(None, description="GroupNorm / LayerNorm in the heads; default: conv heads "
                                      "normalised, MLP heads (the toy's) not")
    head_taps: Literal["all", "bottleneck"] = Field("all", description="which backbone taps get a head: every tapped "
                                                    "block, or the last (the mid block), as DMD2's classifier")


@dataclass
class Nets:
    """The roles. teacher, pixel_backbone: frozen; fake_score and heads: critics; generator: the student."""
    generator: nn.Module
    teacher: Optional[nn.Module] = None
    fake_score: Optional[nn.Module] = None
    heads: Optional[nn.Module] = None
    pixel_backbone: Optional[nn.Module] = None   # ADP's pixel discriminator backbone (SAM / DINOv2 / toy classifier)

    def role(self, name: str) -> nn.Module:
        return getattr(self, name)

    def present(self) -> dict[str, nn.Module]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class LossOut:
    """loss: scalar tensor to backpropagate; metrics: detached scalars (the trainer reduces and logs them);
    histograms: detached per-sample tensors, e.g. discriminator logits [B] (rank 0 logs the window's last ones)."""
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Phase:
    name: str
    updates: tuple[str, ...]               # roles whose optimizers step after this phase
    loss: Callable[["StepContext"], LossOut]


@dataclass
class StepContext:
    """Everything one step's losses read. Tensors are this rank's slice of the global batch [B_local, ...]."""
    nets: Nets
    denoiser: Denoiser
    rand: StepRandom
    step: int
    data_shape: tuple[int, ...]
    cond: Cond                      # generator-side conditions ("prompts")
    uncond: Cond                    # null conditions for CFG
    real_x: Optional[torch.Tensor] = None   # real data (teacher pretraining, DMD2's real branch)
    real_cond: Optional[Cond] = None
    pair_noise: Optional[torch.Tensor] = None    # ODE pairs (pretrain stage): x_T [B, ...], unit variance as drawn
    pair_output: Optional[torch.Tensor] = None   # the teacher's ODE solution x_0 from that noise [B, ...]
    generator_denoiser: Optional[Denoiser] = None   # the student's own parameterisation (docs/algorithms.md §10.7); None: the teacher's
    student_timesteps: list[float] = field(default_factory=list)
    conditioning_timestep: Optional[float] = None
    generator_trains: bool = False  # the generator's sample keeps its graph only when the generator updates
    # False while a critic phase runs under gradient accumulation (trainer.phase_backward): the sample is then made
    # without its graph and made again, with it, from the cached input by the generator's phase
    keep_generator_graph: bool = True
    _generator_input: Optional[tuple[torch.Tensor, int]] = None   # (x_{t_k}, k) of the backward simulation
    _generator_x0: Optional[torch.Tensor] = None
    _generator_prediction: Optional[object] = None   # ADP: the generator's full Prediction (native view for its MSE)

    @property
    def student_denoiser(self) -> Denoiser:
        return self.generator_denoiser or self.denoiser

    def times(self, value) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        return torch.full((len(self.rand.sample_indices),), float(value), device=self.rand.device)

    def generator_x0(self) -> torch.Tensor:
        """The generator's x0 [B, ...] for this step, computed once and shared by the phases (critics detach it).

        One-step: pure noise in. Multi-step: backward simulation with k ~ U{0..K-1} shared by all ranks
        (keyed by (seed, step) only), the prefix under no_grad, fresh noise at every re-noise (docs/algorithms.md §3).

        A sample made without its graph (keep_generator_graph False) is made again from the cached prefix when a
        later phase wants the graph: the same weights and input give the same values, for one more generator call."""
        if self._generator_input is None:
            num_steps = len(self.student_timesteps)
            k = self.rand.shared_randint("backward_simulation_k", num_steps) if num_steps > 1 else 0
            noise_fn = lambda i: self.rand.normal(f"student_noise_{i}", self.data_shape)  # noqa: E731
            self._generator_input = (student_input(self.student_denoiser, self.nets.generator, self.cond,
                                                   self.student_timesteps, noise_fn, k, self.conditioning_timestep), k)
        with_graph = self.generator_trains and self.keep_generator_graph
        if self._generator_x0 is None or (with_graph and self._generator_x0.grad_fn is None):
            x, k = self._generator_input
            with torch.set_grad_enabled(with_graph):
                self._generator_x0 = student_predict(self.student_denoiser, self.nets.generator, x,
                                                     self.student_timesteps[k], self.cond,
                                                     self.conditioning_timestep)
        return self._generator_x0


class Method(ABC):
    """Base: subclasses define `phases(step)` and the loss functions they name."""
    trains = ("generator",)          # roles this method builds optimizers for
    needs_real_data = False
    needs_pairs = False              # teacher ODE pairs (the pretrain stage's methods)

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def frozen_roles(self) -> tuple[str, ...]:
        """Frozen roles the losses call (built from pretrained weights, never updated)."""
        return ("teacher",)

    @property
    def gathered_roles(self) -> tuple[str, ...]:
        """Roles a sharded backend must keep gathered between their backward and their optimizer step (FSDP2 adds
        them to `parallel.keep_gathered`): a double backward reads the gathered weights a first one would reshard."""
        return ()

    def build_heads(self, family) -> nn.Module:
        """The `heads` role (methods with a discriminator; their configs are HeadOptions)."""
        return family.build_heads(self.cfg.head_hidden, self.cfg.head_norm, self.cfg.head_taps == "bottleneck")

    @abstractmethod
    def phases(self, step: int) -> list[Phase]:
        """The phases of step `step`, in order; TTUR decides which roles update now."""

    def generator_trains_at(self, step: int) -> bool:
        return any("generator" in p.updates for p in self.phases(step))
