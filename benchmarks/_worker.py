"""What the benchmarks' worker processes share (`benchmarks/dpo.py`, `benchmarks/grpo.py`): step and per-phase timing,
peak memory, the one JSON result line, and the runner that starts each side in a fresh process, in alternating rounds.

A benchmark script runs itself as the worker: `python benchmarks/X.py --worker SIDE FOLDER OUT DEVICE ARGS...`
(`worker_main`), which calls its `run_<side>(timer, folder, out, device, *args)` and prints `timer.result(...)`.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

WARMUP_STEPS = 2  # the first steps (allocations, first-call overheads) are left out of the medians


def rss_mib() -> float:
    """This process's RSS high-water mark so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer:
    """Seconds per optimizer step and per named phase inside each step (rollout, forward, backward, ...).

    `wrap(owner, name, phase)` times every call of `owner.name` into `phase` of the step in progress; a call inside
    another timed call is counted once, in the outer phase. On CUDA each boundary synchronizes the device."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.steps: list[float] = []
        self.cpu: list[float] = []  # CPU seconds of the process (all threads) per step: less sensitive to a loaded machine
        self.phases: list[dict[str, float]] = []
        self._start = self._cpu_start = 0.0
        self._current: dict[str, float] = defaultdict(float)  # phase -> wall seconds; "phase cpu" -> CPU seconds
        self._depth = 0

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def begin(self) -> None:
        self.sync()
        self._current = defaultdict(float)
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def end(self) -> None:
        self.sync()
        self.steps.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._cpu_start)
        self.phases.append(dict(self._current))

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            self.sync()
            self._depth, start, cpu = 1, time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self._depth = 0
                self._current[phase] += time.perf_counter() - start
                self._current[f"{phase} cpu"] += time.process_time() - cpu

        setattr(owner, name, timed)

    def wrap_step(self, owner, name: str) -> None:
        """Time every call of `owner.name` as one whole step."""
        original = getattr(owner, name)

        def step(*args, **kwargs):
            self.begin()
            try:
                return original(*args, **kwargs)
            finally:
                self.end()

        setattr(owner, name, step)

    def result(self, baseline_mib: float, tokens: Optional[list[float]] = None) -> dict:
        """Medians after the warm-up steps: step_s, step_cpu_s, {phase: s, "phase cpu": CPU s} (`other`: the rest of the
        step's wall time), completion tokens
        per second of step time and of the rollout phase (with `tokens` per step), peak memory."""
        kept = slice(WARMUP_STEPS, None) if len(self.steps) > WARMUP_STEPS else slice(None)
        steps, phases = self.steps[kept], self.phases[kept]
        names = sorted({name for p in phases for name in p})
        out = {"step_s": statistics.median(steps), "step_cpu_s": statistics.median(self.cpu[kept]),
               "steps": len(self.steps), "first_steps_s": self.steps[:WARMUP_STEPS],
               "phases": {name: statistics.median(p.get(name, 0.0) for p in phases) for name in names}}
        out["phases"]["other"] = statistics.median(s - sum(t for name, t in p.items() if not name.endswith(" cpu"))
                                                   for s, p in zip(steps, phases))
        if tokens:
            per_step = statistics.median(tokens[kept] or tokens)
            out["tokens_per_s"] = per_step / out["step_s"]
            rollout = out["phases"].get("rollout")
            out["rollout_tokens_per_s"] = per_step / rollout if rollout else None
        if self.device == "cuda":
            import torch

            out["peak"] = out["above_baseline"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            out["peak"] = rss_mib()
            out["above_baseline"] = out["peak"] - baseline_mib
        return out


def trl_side(timer: StepTimer, folder: Path, device: str):
    """What each TRL side starts from: (HF model in the benchmark's dtype, tokenizer, PEFT LoRA r=8 on q and v, as the
    litllm side's adapters, a `TrainerCallback` timing each optimizer step with `timer`)."""
    import peft
    import torch
    import transformers

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.begin()

        def on_step_end(self, args, state, control, **kwargs):
            timer.end()

    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    return model, tokenizer, lora, Timer()


def worker_main(module: dict) -> None:
    """`--worker SIDE FOLDER OUT DEVICE ARGS...`: run `module["run_" + SIDE]` and print its result as the last line."""
    side, folder, out, device, *args = sys.argv[sys.argv.index("--worker") + 1:]
    timer = StepTimer(device)
    result = module[f"run_{side}"](timer, Path(folder), Path(out), device, *args)
    print(json.dumps(result))


def run_sides(script: Path, sides: list[str], labels: dict[str, str], folder: Path, workdir: Path, env: dict,
              worker_args: list, rounds: int = 1, side_args: Optional[dict[str, list]] = None) -> dict[str, list[dict]]:
    """{side: [its worker's result per round]}: each side in its own process (`script --worker side folder out
    *worker_args *side_args[side]`), `rounds` times, the order alternating from round to round (a machine's load
    drifts); a failing run prints its error and is left out."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            out = workdir / f"out-{side}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"Round {round_ + 1}/{rounds}: {labels[side]} ...", file=sys.stderr)
            proc = subprocess.run([sys.executable, str(script), "--worker", side, str(folder), str(out),
                                   *map(str, worker_args), *map(str, (side_args or {}).get(side, []))],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {side: runs for side, runs in results.items() if runs}


def ratios(results: dict[str, list[dict]], reference: str, side: str, key: Callable[[dict], float]) -> list[float]:
    """reference / side of `key` per round (both ran), e.g. the step-time speed-up of `side` over `reference`."""
    return [key(r) / key(s) for r, s in zip(results.get(reference, []), results.get(side, []))]


def median_run(runs: list[dict]) -> dict:
    """The run of median step time."""
    return sorted(runs, key=lambda r: r["step_s"])[(len(runs) - 1) // 2]
