"""Stability guards (issue #8), with no host sync inside the step.

- Non-finite loss: `nonfinite_flag(loss)` is a 0/1 device tensor, MAX-reduced over ranks (one scalar all-reduce,
  asynchronous on a GPU) so that every rank skips the same update, as sharded optimizers must. The backends hand it
  to the fused AdamW as `found_inf` (what torch's GradScaler does): the kernel skips the update and the step count
  on the device. Backends that know the gradient norm before stepping (data parallel, FSDP2) also skip on a
  non-finite norm.
- The per-step flags stay on the device and are read at the logging cadence (`read_window`, one host sync, next to
  the metrics' own). `max_consecutive_skips` skipped steps in a row roll the stage back to its last checkpoint, at
  most `max_rollbacks` times per run.
- Alarms, from the metrics already reduced for logging: the discriminator wins outright (its accuracy on real and
  fake samples, or the gap between its mean real and fake logits), the generator's samples saturate, or their mean
  drifts. They go to the log and tensorboard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class GuardError(RuntimeError):
    """A stage the guards stopped (too many skipped updates); trainer.main prints it as one line."""


def nonfinite_flag(loss: torch.Tensor) -> torch.Tensor:
    """1.0 when the loss is NaN or Inf on any rank, else 0.0 (a float32 device scalar; no host sync)."""
    flag = (~torch.isfinite(loss.detach())).float().reshape(())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def sample_statistics(x0: torch.Tensor, abs_limit: float) -> dict[str, torch.Tensor]:
    """Device scalars of the generator's sample x0 [B, ...]: mean and the fraction of values beyond abs_limit."""
    x = x0.detach().float()
    return {"samples/mean": x.mean(), "samples/saturated_fraction": (x.abs() > abs_limit).float().mean()}


def discriminator_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of real samples with a positive logit and fake samples with a negative one (device scalar)."""
    return 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())


class Guards:
    """Host-side bookkeeping of the skipped-update flags and the alarms; `cfg` is the recipe's GuardsConfig."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.window_flags: list[torch.Tensor] = []
        self.consecutive_skips = 0      # skipped steps in a row, up to the last window read
        self.skipped_updates = 0        # steps with a skipped update over this process's run
        self.rollbacks = 0
        self._injected: set[int] = set()

    def inject(self, step: int) -> bool:
        """Fault injection for the guard's own tests: True once per process for each listed step (a rollback
        replays the step cleanly)."""
        if step in self.cfg.inject_nan_at_steps and step not in self._injected:
            self._injected.add(step)
            return True
        return False

    def record_step(self, flag: torch.Tensor) -> None:
        self.window_flags.append(flag)

    def read_window(self) -> int:
        """Read this window's flags (one host sync, at the logging cadence); returns the steps skipped in it and
        updates the run of consecutive skips."""
        if not self.window_flags:
            return 0
        flags = torch.stack(self.window_flags).tolist()
        self.window_flags.clear()
        for flag in flags:
            self.consecutive_skips = self.consecutive_skips + 1 if flag > 0 else 0
        skipped = int(sum(1 for f in flags if f > 0))
        self.skipped_updates += skipped
        return skipped

    def should_roll_back(self) -> bool:
        return self.consecutive_skips >= self.cfg.max_consecutive_skips

    def alarms(self, values: dict[str, float]) -> list[tuple[str, str]]:
        """(name, message) for each alarm the window's reduced metrics raise."""
        cfg, out = self.cfg, []
        accuracy = values.get("metrics/disc_accuracy")
        real, fake = values.get("metrics/logits_real"), values.get("metrics/logits_fake")
        gap = real - fake if real is not None and fake is not None else None
        if (accuracy is not None and accuracy >= cfg.disc_win_accuracy) or (gap is not None and
                                                                            gap >= cfg.disc_win_logit_gap):
            out.append(("discriminator_wins", f"the discriminator wins outright: accuracy {accuracy:.3f} (alarm at "
                        f"{cfg.disc_win_accuracy:g}), real - fake logit gap {gap:.3g} (alarm at "
                        f"{cfg.disc_win_logit_gap:g}) (hint: lower the heads' learning rate or the GAN weight)"))
        saturated = values.get("samples/saturated_fraction")
        if saturated is not None and saturated > cfg.saturation_fraction:
            out.append(("samples_saturate", f"{saturated:.1%} of the generator's sample values exceed "
                        f"guards.sample_abs_limit {cfg.sample_abs_limit:g}"))
        mean = values.get("samples/mean")
        if mean is not None and abs(mean) > cfg.mean_drift:
            out.append(("samples_mean_drift", f"the generator's sample mean {mean:+.3f} drifted beyond "
                        f"guards.mean_drift {cfg.mean_drift:g}"))
        return out
