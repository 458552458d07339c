"""Tensorboard scalars and a progress bar with ETA, on rank 0 only. Metrics arrive as device tensors and are read
(one host sync) only at the logging cadence."""
from __future__ import annotations

import os
import sys

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class Monitor:
    def __init__(self, log_dir: str, enabled: bool, total_steps: int, start_step: int, desc: str,
                 progress: bool = True):
        self.enabled, self.desc = enabled, desc
        self.writer = None
        self.bar = None
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir)
            self.bar = None if not progress else tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        loss_keys = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("loss/")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(loss_keys.items())[:3]}, refresh=False)

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
        line = f"[{self.desc}] ALARM at step {step}: {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)
        self.writer.add_scalar(f"alarms/{name}", 1.0, step)
        self.writer.add_text(f"alarms/{name}", message, step)
        self.writer.flush()

    def reset_to(self, step: int) -> None:
        """After a rollback: the bar shows the step the stage continues from."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def image(self, tag: str, hwc, step: int) -> None:
        """An HWC uint8 image."""
        if self.enabled:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
