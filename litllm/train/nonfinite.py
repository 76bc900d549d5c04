"""A diverging run never saves NaN: non-finite steps are skipped and counted on the device, and the
run stops after `--train.max_nonfinite_steps` of them in a row.

Per step (inside `train_step`, no host sync): every rank's loss sum joins the one all-reduce the
step already does (that of the label count), so all ranks agree whether the global loss is finite;
the global gradient norm of the clipping says whether the gradients are (without clipping, a sum of
gradient norms joins the same all-reduce). A step whose loss or
gradient norm is NaN/inf has its gradients zeroed before `optimizer.step()`, so nothing
non-finite reaches the weights or the optimizer state (the optimizer still takes its step with a
zero gradient: momentum carries on, the step counter advances). Counters stay on the device:
steps skipped, the current run of consecutive skipped steps, the step at which that run reached
the limit, and loss spikes (a finite loss above twice its running average).

The loop reads the counters where it already waits for the device (each logging interval, before
each checkpoint, at the end); `stop_if_diverged` raises one `LitLLMError` naming the step once the limit was
reached. `litllm.train.checkpoints.CheckpointWriter` checks the weights themselves before every
save, so no checkpoint and no `final/` ever holds a non-finite weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

SPIKE_FACTOR = 2.0
"""A finite step loss above this many times its (positive) running average counts as a spike (logged, not skipped)."""
SPIKE_WARMUP = 10
"""Finite steps before spikes are looked for (the running average needs a few values first)."""
_EMA = 0.05  # weight of the newest loss in the running average (about the last 20 steps)


class NonFiniteGuard:
    """Device-side bookkeeping of non-finite and spiking steps (see the module docstring)."""

    def __init__(self, device: torch.device, limit: int, step: int = 0, out_dir: Optional[Path] = None,
                 grads_checked_by_scaler: bool = False) -> None:
        self.limit = limit
        self.step = step  # the optimizer step the next `record` is about (host-side: no sync)
        self.out_dir = out_dir
        self.grads_checked_by_scaler = grads_checked_by_scaler
        """16-mixed: the GradScaler skips steps with inf gradients itself (a normal part of its scaling)."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        # skipped, streak (consecutive skipped), limit_step (0: not reached), spikes, last_spike, ema, good
        self.counters = {name: zero.clone() for name in
                         ("skipped", "streak", "limit_step", "spikes", "last_spike", "ema", "good")}
        self._seen = {"skipped": 0, "spikes": 0}  # what the last `read` reported
        self._limit_step = 0

    def step_ok(self, global_loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-dim bool: this step's global loss (a sum over ranks: NaN/inf if any rank's is) and gradient norm
        (the clipping's, or without clipping the all-reduced `gradient_check`) are finite."""
        ok = torch.isfinite(global_loss)
        if not self.grads_checked_by_scaler:
            ok = ok & torch.isfinite(grad_norm)
        return ok

    @staticmethod
    def gradient_check(model) -> torch.Tensor:
        """Without clipping: this rank's sum of gradient norms (0-dim float64), NaN/inf if any gradient is."""
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in model.parameters())
                 if g is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        return torch.stack([norm.double() for norm in torch._foreach_norm(grads)]).sum()  # dtypes may differ

    def record(self, ok: torch.Tensor, loss: torch.Tensor) -> None:
        """Count one optimizer step (`loss`: its global mean) on the device."""
        c = self.counters
        self.step += 1
        bad = (~ok).double()
        c["skipped"] += bad
        c["streak"] = (c["streak"] + 1) * bad
        reached = (c["streak"] >= self.limit) & (c["limit_step"] == 0)
        c["limit_step"] = torch.where(reached, float(self.step), c["limit_step"])
        loss = torch.where(ok, loss.double(), c["ema"])  # a skipped step leaves the average alone
        spike = ok & (c["good"] >= SPIKE_WARMUP) & (c["ema"] > 0) & (loss > SPIKE_FACTOR * c["ema"])
        c["spikes"] += spike.double()
        c["last_spike"] = torch.where(spike, float(self.step), c["last_spike"])
        c["ema"] = torch.where(c["good"] == 0, loss, (1 - _EMA) * c["ema"] + _EMA * loss)
        c["good"] += ok.double()

    def read(self, fabric) -> dict[str, float]:
        """Read the counters (a host sync: call only where the loop already waits); print one warning line
        when there are new skipped steps or spikes. Returns the metrics to log ({"nonfinite_steps",
        "loss_spikes"}: totals of this process's run). `stop_if_diverged` then raises if the limit was reached."""
        skipped, _, limit_step, spikes, last_spike, *_ = torch.stack(list(self.counters.values())).tolist()
        self._limit_step = int(limit_step)
        # one line when a total reaches 1, 2, 4, 8, ...: a long run with rare events stays readable
        if _crossed_power_of_two(self._seen["spikes"], spikes):
            fabric.print(f"warning: loss spike at step {int(last_spike)} (a loss above {SPIKE_FACTOR:g}x its running "
                         f"average; {int(spikes)} so far, logged as loss_spikes)")
        if _crossed_power_of_two(self._seen["skipped"], skipped):
            fabric.print(f"warning: NaN/inf loss or gradient norm: optimizer step skipped by step {self.step} "
                         f"({int(skipped)} so far, logged as nonfinite_steps; {self.limit} in a row stop the run)")
        self._seen = {"skipped": skipped, "spikes": spikes}
        return {"nonfinite_steps": skipped, "loss_spikes": spikes}

    def stop_if_diverged(self) -> None:
        """After `read`: one `LitLLMError` naming the step if `limit` non-finite steps came in a row."""
        from litllm.errors import LitLLMError
        from litllm.train.checkpoints import diverged_message

        if self._limit_step:
            raise LitLLMError(diverged_message(
                f"the loss or gradient norm was NaN/inf at {self.limit} optimizer steps in a row, up to step "
                f"{self._limit_step} (--train.max_nonfinite_steps {self.limit}; each was skipped)", self.out_dir,
            ))

    def check(self, fabric) -> None:
        """`read`, then `stop_if_diverged` (before a checkpoint and at the end of the run)."""
        self.read(fabric)
        self.stop_if_diverged()


def _crossed_power_of_two(before: float, now: float) -> bool:
    return now > before and int(now).bit_length() > int(before).bit_length()


def zero_nonfinite_step(params, ok: torch.Tensor) -> None:
    """Zero every gradient unless `ok` (0-dim bool, on the device): the skip needs no host sync."""
    bad = ~ok
    for p in params:
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # a DTensor's shard under FSDP2
            grad.masked_fill_(bad, 0)
