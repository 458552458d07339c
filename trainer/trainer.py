"""StageTrainer: the role-agnostic loop of every training stage (teacher, pretrain, distill). For each step: build this rank's batch and random source, then for each
phase of the method: freeze the roles it does not update, compute its loss, backward, clip, step, EMA.

It owns checkpoint cadence, resume, metric reduction and logging; the method owns only the math.
"""
from __future__ import annotations

import os
import resource
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from parallel.randomness import StepRandom, sample_indices
from trainer.checkpoint import Checkpointer
from trainer.config import GuardsConfig
from trainer.exit_codes import stopped_by
from trainer.guards import GuardError, Guards, nonfinite_flag, sample_statistics
from trainer.methods.base import LossOut, Method, Nets, StepContext
from trainer.monitor import Monitor, reduce_window
from trainer.sampling import student_sample
from trainer.stop_requests import StopRequests


def memory_stats(device: torch.device) -> dict[str, float]:
    """This rank's peak memory in GiB: CUDA's peak allocated and reserved bytes, or the process's peak RSS."""
    if device.type == "cuda":
        return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Stopped(Exception):
    """A stop was asked for (trainer/stop_requests.py) and the checkpoint is written. exit_code: 0 after USR1 (the
    job script requeues), 128 + the signal after SIGTERM / SIGINT (trainer/exit_codes.py)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LoopConfig:
    steps: int
    batch_size: int          # global
    seed: int
    log_every: int
    checkpoint_every: int
    keep_last: int
    bf16: bool = False
    micro_batch_size: Optional[int] = None   # per rank per backward; None: the whole local batch
    sample_every: int = 0                    # steps between fixed-seed sample grids in tensorboard; 0: off


def loop_config(train, seed: int) -> LoopConfig:
    """A stage's `train:` section (trainer/config.py TrainConfig) as the loop's settings."""
    return LoopConfig(steps=train.steps, batch_size=train.batch_size, micro_batch_size=train.micro_batch_size,
                      seed=seed, log_every=train.log_every, checkpoint_every=train.checkpoint_every,
                      keep_last=train.keep_last, bf16=train.bf16, sample_every=train.sample_every)


def deal(fields, m: int, count: int):
    """Micro-batch m of `count` of a batch's fields: positions m, m + count, ... of each tensor (a tuple of fields,
    a dict of embeddings, or one tensor)."""
    if isinstance(fields, tuple):
        return tuple(deal(f, m, count) for f in fields)
    if isinstance(fields, dict):
        return {k: v[m::count] for k, v in fields.items()}
    return fields[m::count]


class StageTrainer:
    def __init__(self, *, stage_dir: str, stage_name: str, method: Method, nets: Nets, backend, denoiser, family,
                 loop: LoopConfig, dist_info, student_timesteps: list[float],
                 conditioning_timestep: Optional[float] = None, data_source=None, guards_cfg=None,
                 generator_denoiser=None, provenance: Optional[dict] = None, prompt_source=None):
        """prompt_source: the prompt stream of a latent family with encoded prompts (`batch(indices)` ->
        embeddings {input: [B, ...]}, checkpointed with the data position); None: prompt ids by sample index."""
        self.stage_dir, self.stage_name = stage_dir, stage_name
        self.method, self.nets, self.backend = method, nets, backend
        self.denoiser, self.family, self.loop, self.dist = denoiser, family, loop, dist_info
        self.generator_denoiser = generator_denoiser or denoiser   # the student's parameterisation (docs/algorithms.md §10.7)
        self.student_timesteps, self.conditioning_timestep = student_timesteps, conditioning_timestep
        self.data_source, self.prompt_source = data_source, prompt_source
        self.provenance = provenance or {}   # this attempt's record (trainer/provenance.py), in every checkpoint
        self.after_phase = None              # optional hook(step, phase, loss_out): tests record each phase here
        self.run_text: dict[str, str] = {}   # tensorboard text written at the start (the recipe, provenance)
        self.in_loop_eval = None             # eval.every: trainer/latent_evaluation.py InLoopEvaluation
        if guards_cfg is None:
            guards_cfg = GuardsConfig()
        self.guards = Guards(guards_cfg)
        self.checkpointer = Checkpointer(stage_dir, loop.keep_last, dist_info.is_main)
        self.stops = StopRequests(dist_info.is_main)
        self.step = 0
        self.saved_step = -1             # the step of the last checkpoint this process wrote
        self.samples_seen = 0
        self.device_hours = 0.0          # world size x wall time over every attempt of this stage (extra_state)
        self.last_histograms: dict[str, torch.Tensor] = {}
        if loop.batch_size % dist_info.dp_size:
            raise ValueError(f"batch_size {loop.batch_size} is not divisible by the {dist_info.dp_size} data-parallel "
                             f"ranks")
        local_batch = loop.batch_size // dist_info.dp_size
        if loop.micro_batch_size and local_batch % loop.micro_batch_size:
            raise ValueError(f"micro_batch_size {loop.micro_batch_size} does not divide the local batch {local_batch}")

    # --- state ------------------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """Counters and the data position (JSON): a stream's global position survives a change of world size;
        the bundled toy data needs none (it is a pure function of samples_seen)."""
        data = self.data_source.state_dict() if hasattr(self.data_source, "state_dict") else {}
        prompts = self.prompt_source.state_dict() if self.prompt_source is not None else {}
        return {"step": self.step, "samples_seen": self.samples_seen, "data": data, "prompts": prompts,
                "world_size": self.dist.world_size, "device_hours": self.device_hours, "provenance": self.provenance}

    def load_extra_state(self, extra: dict) -> None:
        self.step, self.samples_seen = extra["step"], extra["samples_seen"]
        self.device_hours = extra.get("device_hours", 0.0)
        if extra.get("data") and hasattr(self.data_source, "load_state_dict"):
            self.data_source.load_state_dict(extra["data"])
        if extra.get("prompts") and self.prompt_source is not None:
            self.prompt_source.load_state_dict(extra["prompts"])

    def resume(self) -> bool:
        path = self.checkpointer.newest_verified()   # collective: the ranks share the hashing
        if path is None:
            return False
        self.backend.load_state(path)
        self.load_extra_state(self.checkpointer.load_extra(path))
        return True

    def save(self) -> None:
        self.checkpointer.save(self.step, self.backend.save_state, self.extra_state())
        self.saved_step = self.step

    # --- one step --------------------------------------------------------------------------------------------
    def generator_prompts(self, indices):
        """The prompts of the generator's samples `indices`: a batch of the prompt stream's embeddings when the run
        has one (it owns the position: exactly once per epoch), else prompt ids / classes, a pure function of
        (seed, sample index) (the toy's classes, the tiny twins' random table)."""
        if self.prompt_source is not None:
            return self.prompt_source.batch(indices)
        return self.family.prompt_labels(indices, self.loop.seed)

    def make_context(self, step: int, indices: Optional[range] = None, data=None, prompts=None) -> StepContext:
        """The context of this rank's samples `indices` (default: its whole local batch) at `step`.
        data: the real or pair fields of those samples, prompts: their generator prompts, when the caller already
        read them (micro-batches slice one read)."""
        loop, info = self.loop, self.dist
        if indices is None:
            indices = sample_indices(step, loop.batch_size, info.dp_rank, info.dp_size)
        rand = StepRandom(loop.seed, step, indices, info.device)
        if self.method.needs_pairs:
            # the pairs' prompts are the generator's: the student must see each noise with ITS prompt
            noise, output, pair_prompts = data if data is not None else self.data_source.batch(indices)
            cond = self.family.condition(pair_prompts, info.device)
        else:
            cond = self.family.condition(prompts if prompts is not None else self.generator_prompts(indices),
                                         info.device)
        ctx = StepContext(nets=self.nets, denoiser=self.denoiser, rand=rand, step=step,
                          data_shape=self.family.data_shape, cond=cond,
                          uncond=self.family.null_condition(len(indices), info.device),
                          student_timesteps=self.student_timesteps, conditioning_timestep=self.conditioning_timestep,
                          generator_trains=self.method.generator_trains_at(step),
                          generator_denoiser=self.generator_denoiser)
        if self.method.needs_real_data:
            # each real sample is conditioned on its own caption's embeddings (the toy: its class)
            real_x, real_prompts = data if data is not None else self.data_source.batch(indices)
            ctx.real_x = real_x.to(info.device, torch.float32)
            ctx.real_cond = self.family.condition(real_prompts, info.device)
        if self.method.needs_pairs:
            ctx.pair_noise = noise.to(info.device, torch.float32)
            ctx.pair_output = output.to(info.device, torch.float32)
        return ctx

    def micro_contexts(self, step: int) -> list[StepContext]:
        """This rank's local batch dealt into micro-batches of `micro_batch_size` samples: local position i goes to
        micro-batch i % count, as sample_indices deals the global batch to ranks. So micro-batch m of rank r holds
        the samples that rank r + W*m of W*count ranks would hold, and every draw is keyed by the sample's global
        index: accumulation changes only the arithmetic's grouping, never which noise meets which sample. The
        streams (real data, pairs, prompts) are read once per step (they own the data position) and dealt the same
        way."""
        loop, info = self.loop, self.dist
        indices = sample_indices(step, loop.batch_size, info.dp_rank, info.dp_size)
        size = loop.micro_batch_size or len(indices)
        if size == len(indices):
            return [self.make_context(step, indices)]
        count = len(indices) // size
        needs_data = self.method.needs_real_data or self.method.needs_pairs
        data = self.data_source.batch(indices) if needs_data else None
        prompts = None
        if self.prompt_source is not None and not self.method.needs_pairs:
            prompts = self.prompt_source.batch(indices)
        return [self.make_context(step, indices[m::count], None if data is None else deal(data, m, count),
                                  None if prompts is None else deal(prompts, m, count))
                for m in range(count)]

    def phase_backward(self, phase, contexts: list[StepContext], poison: bool = False) -> LossOut:
        """Freeze the roles this phase does not update, then per micro-batch: loss, backward (+ gradient reduction).
        Gradients accumulate over the micro-batches; each loss is scaled by 1/len(contexts), so the sum is the local
        batch's mean. Returns the mean loss and metrics over the micro-batches.

        The generator stays trainable: its sample may carry a graph into a later phase of this step; critic
        losses detach it, so it receives no gradient there (tests/unit/test_method_invariants.py checks).
        poison: replace the loss by NaN (guards.inject_nan_at_steps, the guards' own tests)."""
        frozen = [m for r, m in self.nets.present().items() if r not in phase.updates and r != "generator"]
        autocast = (torch.autocast(self.dist.device.type, dtype=torch.bfloat16) if self.loop.bf16
                    else self.backend.compute_context())
        losses, metrics, histograms = [], defaultdict(list), defaultdict(list)
        # Under accumulation a critic phase makes each micro-batch's generator sample without its graph: kept, the
        # graphs of all micro-batches would live until the generator's phase, so activation memory would grow with
        # the micro-batch count (the planner measured 2x at 2 micro-batches on CogVideoX-5B). Cost: the generator's
        # phase calls the generator once more per micro-batch (the backward-simulation prefix is cached).
        release_graph = len(contexts) > 1 and "generator" not in phase.updates
        # backward inside the frozen context too: activation checkpointing recomputes forwards during backward,
        # and they must see the same requires_grad flags as the original forward
        with self.backend.frozen(frozen):
            for ctx in contexts:
                ctx.keep_generator_graph = not release_graph
                with autocast:
                    out = phase.loss(ctx)
                if poison:
                    out = LossOut(out.loss * float("nan"), out.metrics)
                # 1/2^k scales are exact in floating point, so accumulation changes only the summation grouping
                self.backend.backward(out.loss / len(contexts) if len(contexts) > 1 else out.loss, phase.updates)
                losses.append(out.loss.detach())
                for key, value in out.metrics.items():
                    metrics[key].append(value)
                for key, value in out.histograms.items():
                    histograms[key].append(value)
        histograms = {k: torch.cat(v) for k, v in histograms.items()}
        if len(contexts) == 1:
            return LossOut(losses[0], {k: v[0] for k, v in metrics.items()}, histograms)
        return LossOut(torch.stack(losses).mean(), {k: torch.stack(v).mean() for k, v in metrics.items()}, histograms)

    def train_step(self, step: int, sums: dict) -> None:
        contexts = self.micro_contexts(step)
        poison = self.guards.inject(step)
        step_skipped = torch.zeros((), device=self.dist.device)
        for phase in self.method.phases(step):
            t0 = time.perf_counter()
            out = self.phase_backward(phase, contexts, poison)
            if self.after_phase is not None:
                self.after_phase(step, phase, out)   # gradients are complete and not yet clipped or stepped
            # a non-finite loss on any rank skips this phase's update on the device (trainer/guards.py)
            skip = nonfinite_flag(out.loss)
            norms = self.backend.clip_and_step(phase.updates, skip)
            if "generator" in phase.updates:
                self.backend.ema_update()   # a skipped update left the weights as they were: the EMA stays finite
            step_skipped = torch.maximum(step_skipped, skip)
            sums[f"loss/{phase.name}"].append(out.loss.detach())
            for key, value in out.metrics.items():
                sums[f"metrics/{key}"].append(value)
            for key, value in out.histograms.items():
                self.last_histograms[f"{phase.name}/{key}"] = value   # device tensors; read at the log cadence
            for role, norm in norms.items():
                sums[f"grad_norm/{role}"].append(norm.detach())
                step_skipped = torch.maximum(step_skipped, (~torch.isfinite(norm.detach())).float().reshape(()))
            # host-side wall time of the phase as issued (on GPU this is launch time unless something syncs)
            sums[f"time/{phase.name}_seconds"].append(torch.tensor(time.perf_counter() - t0))
        self.guards.record_step(step_skipped)
        samples = [c._generator_x0 for c in contexts if c._generator_x0 is not None]
        if samples:
            for key, value in sample_statistics(torch.cat(samples), self.guards.cfg.sample_abs_limit).items():
                sums[key].append(value)

    GRID_SAMPLES, GRID_SEED = 16, 12345

    @torch.no_grad()
    def log_sample_grid(self, monitor: Monitor) -> None:
        """The generator's K-step samples for fixed noise and prompts (the same every time) as a tensorboard image.
        Every rank runs the forward (sharded generators gather their weights); rank 0 renders and writes."""
        n, device = self.GRID_SAMPLES, self.dist.device
        rand = StepRandom(self.GRID_SEED, 0, range(n), device)
        cond = self.family.condition(self.family.prompt_labels(range(n), self.GRID_SEED), device)   # rows by id
        with self.backend.compute_context():
            samples = student_sample(self.generator_denoiser, self.nets.generator, cond, self.student_timesteps,
                                     lambda i: rand.normal(f"grid_noise_{i}", self.family.data_shape),
                                     self.conditioning_timestep)
        if self.dist.is_main:
            monitor.image("samples/grid", self.family.render_grid(samples), self.step)

    def evaluate_in_loop(self, monitor: Monitor) -> None:
        """eval.every: the EMA weights' metrics (collective). The EMA is gathered whole on every rank: a
        full-parameter gather, at the evaluation cadence only, never inside a step."""
        metrics, grid = self.in_loop_eval(self.backend.full_state("ema"))
        if not self.dist.is_main:
            return
        scores = {f"eval/{k}": metrics[k] for k in ("fd_dinov2", "clip_score") if k in metrics}
        for key, value in scores.items():
            monitor.writer.add_scalar(key, value, self.step)
        monitor.image("eval/samples" if metrics["frames_per_sample"] == 1 else "eval/frames", grid, self.step)
        monitor.line(f"[{self.stage_name}] eval at step {self.step}: "
                     + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in scores.items()))

    def stop_here(self, request: int) -> None:
        """Act on a stop request at this step boundary: checkpoint (unless this step just wrote one), then stop."""
        if self.saved_step != self.step:
            self.save()
        self.stops.consume_file()
        name = signal.Signals(request).name
        code = 0 if request == signal.SIGUSR1 else stopped_by(request)
        verb = "preempted" if request == signal.SIGUSR1 else "stopped"
        raise Stopped(f"[{self.stage_name}] {verb} at step {self.step} ({self.samples_seen} samples seen) on {name}: "
                      f"checkpoint written; rerunning the same command resumes here", code)

    def roll_back(self, monitor: Monitor) -> None:
        """Return to the last complete checkpoint after `max_consecutive_skips` skipped updates in a row."""
        cfg, at = self.guards.cfg, self.step
        reason = f"{self.guards.consecutive_skips} updates skipped in a row (non-finite losses) up to step {at}"
        if self.guards.rollbacks >= cfg.max_rollbacks:
            raise GuardError(f"[{self.stage_name}] {reason}, after {self.guards.rollbacks} rollbacks: stopping "
                             f"(hint: lower the learning rates or raise guards.max_rollbacks)")
        if not self.checkpointer.has_checkpoint():
            raise GuardError(f"[{self.stage_name}] {reason}, and no checkpoint to roll back to "
                             f"(hint: lower train.checkpoint_every)")
        self.guards.rollbacks += 1
        self.guards.consecutive_skips = 0
        self.resume()
        monitor.alarm(at, "rollback", f"{reason}: rolled back to the checkpoint of step {self.step} "
                                      f"(rollback {self.guards.rollbacks} of at most {cfg.max_rollbacks})")
        monitor.reset_to(self.step)

    # --- loop ------------------------------------------------------------------------------------------------
    def reduce_metrics(self, sums: dict) -> dict[str, float]:
        """Means over the window and over ranks (trainer.monitor.reduce_window): the window's one host sync."""
        return reduce_window(sums, self.dist.device)

    def run(self) -> None:
        with self.stops.installed():
            self._run()

    def _run(self) -> None:
        resumed = self.resume()
        loop = self.loop
        monitor = Monitor(f"{self.stage_dir}/tb", self.dist.is_main, loop.steps, self.step, self.stage_name)
        if resumed and self.dist.is_main:
            monitor.line(f"[{self.stage_name}] resumed at step {self.step} ({self.samples_seen} samples seen)")
        for tag, text in self.run_text.items():
            monitor.text(tag, text, self.step)
        sums: dict = defaultdict(list)
        window_start, window_steps = time.perf_counter(), 0
        hang_rank, _, hang_step = os.environ.get("DMDX_FAULT_HANG_AT_STEP", "-1:-1").partition(":")
        try:
            while self.step < loop.steps:
                if self.dist.rank == int(hang_rank) and self.step == int(hang_step):
                    time.sleep(1e6)     # fault injection (tests/e2e/test_elastic.py): a rank that hangs
                self.train_step(self.step, sums)
                self.step += 1
                self.samples_seen += loop.batch_size
                window_steps += 1
                monitor.advance()
                if self.step % loop.log_every == 0 or self.step == loop.steps:
                    values = self.reduce_metrics(sums)
                    elapsed = time.perf_counter() - window_start
                    values["throughput/samples_per_second"] = window_steps * loop.batch_size / elapsed
                    values["throughput/step_seconds"] = elapsed / window_steps
                    values["progress/samples_seen"] = float(self.samples_seen)
                    self.device_hours += self.dist.world_size * elapsed / 3600
                    values["progress/device_hours"] = self.device_hours   # GPU-hours on GPUs
                    values.update(memory_stats(self.dist.device))
                    for role in self.backend.optimizers:
                        values[f"lr/{role}"] = self.backend.lr(role)
                    self.guards.read_window()          # the flags' one host sync, beside the metrics' own
                    values["guards/skipped_updates"] = float(self.guards.skipped_updates)
                    values["guards/rollbacks"] = float(self.guards.rollbacks)
                    monitor.scalars(self.step, values)
                    monitor.histograms(self.step, self.last_histograms)
                    for name, message in self.guards.alarms(values):
                        monitor.alarm(self.step, name, message)
                    sums.clear()
                    window_start, window_steps = time.perf_counter(), 0
                    if self.guards.should_roll_back():
                        self.roll_back(monitor)
                        continue
                if loop.sample_every and self.student_timesteps and self.step % loop.sample_every == 0:
                    self.log_sample_grid(monitor)
                if self.step % loop.checkpoint_every == 0 or self.step == loop.steps:
                    self.save()
                if self.in_loop_eval is not None and self.in_loop_eval.due(self.step):
                    self.evaluate_in_loop(monitor)   # after the checkpoint: a fault in it loses no training
                request = self.stops.poll()   # every step: Slurm's SIGKILL follows SIGTERM within KillWait seconds
                if request:
                    self.stop_here(request)
        finally:   # the bar's last line before any error line
            monitor.close()
