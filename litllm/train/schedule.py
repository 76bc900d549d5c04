"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr`.

A pure function of the step, so resuming needs no scheduler state: the step counter is the state.
"""

from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup ramps linearly up to `max_lr` over `warmup_steps` (step 0 already gets max_lr/warmup_steps,
    so no step is wasted at lr 0); the cosine then decays from `max_lr` to `min_lr` at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return max_lr
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
