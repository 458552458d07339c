"""Tensorboard scalars and progress with ETA, on rank 0 only: a progress bar on a terminal, else (Slurm logs, pipes)
one plain line per logging step. Metrics arrive as device tensors and are read (one host sync) only at the logging
cadence."""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class Monitor:
    def __init__(self, log_dir: str, enabled: bool, total_steps: int, start_step: int, desc: str,
                 progress: bool = True):
        self.enabled, self.desc = enabled, desc
        self.writer = None
        self.bar = None
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.perf_counter()
        self.lines = enabled and progress and not sys.stderr.isatty()   # a redrawn bar is unreadable in a log file
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir)
            if progress and not self.lines:
                self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                                file=sys.stderr, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        loss_keys = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("loss/")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(loss_keys.items())[:3]}, refresh=False)
        if self.lines:
            print(self.progress_line(step, loss_keys), flush=True)

    def progress_line(self, step: int, losses: dict[str, float]) -> str:
        """`[stage] step 40/4000 (1.0%) loss generator=0.12 critic=1.1 | 2.31 s/step, ETA 2:32:26`; `step`: the
        steps done."""
        per_step = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
        eta = int(per_step * max(self.total_steps - step, 0))
        loss = " ".join(f"{k}={v:.3g}" for k, v in losses.items())
        return (f"[{self.desc}] step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.1f}%) "
                f"loss {loss} | {per_step:.3g} s/step, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")

    def histograms(self, step: int, tensors: dict) -> None:
        """Per-sample values (discriminator logits) of the window's last step, as tensorboard histograms."""
        if self.enabled:
            for key, value in tensors.items():
                self.writer.add_histogram(f"histograms/{key}", value.detach().float().cpu(), step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def alarm(self, step: int, name: str, message: str) -> None:
        """One line in the log and, in tensorboard, `alarms/<name>` = 1 at `step` plus the message as text."""
        if not self.enabled:
            return
        self.line(f"[{self.desc}] ALARM at step {step}: {message}", sys.stderr)
        self.writer.add_scalar(f"alarms/{name}", 1.0, step)
        self.writer.add_text(f"alarms/{name}", message, step)
        self.writer.flush()

    def line(self, text: str, file=None) -> None:
        """One line in the log (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=file or sys.stderr)
        else:
            print(text, file=file or sys.stdout, flush=True)

    def reset_to(self, step: int) -> None:
        """After a rollback: the bar shows the step the stage continues from."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        self.start_step, self.started = step, time.perf_counter()   # the ETA restarts from here

    def image(self, tag: str, hwc, step: int) -> None:
        """An HWC uint8 image."""
        if self.enabled:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, markdown, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def reduce_window(sums: dict, device) -> dict[str, float]:
    """{key: [device scalars of the window's steps]} -> {key: mean over the window and over ranks}. The one host
    sync per logging window is here (.tolist()). Diagnostics' timestep buckets (metrics/diagnostics/...) may be empty
    on a step or a rank (NaN, trainer/diagnostics.py): they are averaged over the values present, and a key with none
    anywhere is left out; every other NaN (a loss) stays NaN."""
    keys = sorted(sums)
    if not keys:
        return {}
    sparse = [k.startswith("metrics/diagnostics/") for k in keys]
    per_key = [torch.stack([v.float().to(device) for v in sums[k]]) for k in keys]
    local = torch.stack([v.nanmean() if s else v.mean() for s, v in zip(sparse, per_key)])
    present = (~torch.tensor(sparse, device=device) | ~local.isnan()).float()
    totals = torch.stack([torch.where(present > 0, local, torch.zeros_like(local)), present])
    if dist.is_initialized():
        dist.all_reduce(totals)
    flat = torch.cat([totals[0] / totals[1], totals[1]]).tolist()   # one read for both
    values, counts = flat[:len(keys)], flat[len(keys):]
    return {k: v for k, v, count in zip(keys, values, counts) if count > 0}
