"""Repeated short `litllm generate`s of one model, each a fresh process, in a fresh compile cache: the default
`--compile` (compiling amortised over runs, `litllm.compile_ledger.EagerAccount`: eager while the eager decode
seconds earlier runs spent plus those this one would spend are below the expected compile seconds, then that run
compiles and saves the step, and later runs load it) against `--compile false`, alternating run by run.

    python benchmarks/short_runs.py                    # 134M model, runs of 256 new tokens until 2 after the compile
    python benchmarks/short_runs.py --n_layer 2 --max_new_tokens 400   # a quicker run

Per run and side: how it decoded (eager / compiled / loaded), wall and CPU seconds from start to exit, decode
tokens/s (`litllm generate`'s own figure); for the default side the rent after the run (the eager decode seconds
in the ledger, `decode_seconds.json`) and the price it is compared with (the expected compile seconds, from the
one-line note of the run that compiles); then the sums, the compile's expected and measured seconds, and the first
run after which the default's total wall and CPU time are below eager's (the compile paid back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, add_tokenizer, build_checkpoint  # noqa: E402

from litllm.compile_ledger import COMPILE_SECONDS_FIXED, COMPILE_SECONDS_PER_LAYER  # noqa: E402

SIDES = {"default --compile": [], "eager (--compile false)": ["--compile", "false"]}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(folder: Path, env: dict, flags: list[str], new_tokens: int) -> tuple[str, float, float, float, str]:
    """(how it decoded, wall s, CPU s, decode tokens/s, its stderr) of one fresh `litllm generate`."""
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run([sys.executable, "-m", "litllm", "generate", str(folder), "--prompt", "Hello",
                           "--max_new_tokens", str(new_tokens), "--temperature", "0", "--precision", "32-true",
                           *flags], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"litllm generate {' '.join(flags)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    how = ("compiled" if "Compiled the decode step" in proc.stderr else
           "loaded" if "Loaded the saved compiled decode step" in proc.stderr else "eager")
    rate = re.search(r"Sample 1: \d+ tokens in [\d.]+ s, ([\d.]+) tokens/s", proc.stderr)
    return how, wall, cpu, float(rate.group(1)) if rate else float("nan"), proc.stderr


def rent(cache: Path) -> float:
    """The eager decode seconds the ledger holds (one model and shape here)."""
    try:
        entries = json.loads((cache / "decode_seconds.json").read_text())["eager"].values()
    except (OSError, ValueError, KeyError):
        return 0.0
    return sum(entry.get("seconds", 0.0) for entry in entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--runs", type=int, default=40, help="at most this many rounds")
    parser.add_argument("--after", type=int, default=2, help="rounds after the one that compiled, then stop")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "model", Path(tmp) / "cache"
        build_checkpoint(folder, args)
        add_tokenizer(folder)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        env.pop("LITLLM_COMPILE", None)
        totals = {side: [0.0, 0.0] for side in SIDES}
        compiled_at = paid = None  # the run that compiled; the run from which the default's totals stay below eager's
        measured = None  # what the compile took
        price = COMPILE_SECONDS_FIXED + COMPILE_SECONDS_PER_LAYER * args.n_layer  # none measured in a fresh cache
        print(f"the price: a compile of {args.n_layer} layers is expected to take {price:.0f} s")
        print(f"{'run':>3}  " + "  ".join(f"{side:>44}" for side in SIDES) + "  default's rent after it")
        for i in range(1, args.runs + 1):
            cells = []
            for side, flags in (SIDES.items() if i % 2 else reversed(SIDES.items())):  # alternating first side
                how, wall, cpu, rate, err = run(folder, env, flags, args.max_new_tokens)
                totals[side][0] += wall
                totals[side][1] += cpu
                cells.append((side, f"{how:>8} {wall:6.1f} s {cpu:6.1f} CPU-s {rate:6.1f} tok/s"))
                if how == "compiled" and compiled_at is None:
                    compiled_at = i
                    note = re.search(r"took ([\d.]+) s in earlier runs and would take ~([\d.]+) s now", err)
                    ledger = f"compiled: {note.group(1)} + ~{note.group(2)} s >= {price:.0f} s" if note else "?"
                    measured = float(re.search(r"Compiled the decode step in ([\d.]+) s", err).group(1))
            ledger = f"{rent(cache):6.1f} s" if compiled_at is None else ledger if compiled_at == i else ""
            print(f"{i:>3}  " + "  ".join(cell for _, cell in sorted(cells, key=lambda c: list(SIDES).index(c[0])))
                  + f"  {ledger}")
            (default_wall, default_cpu), (eager_wall, eager_cpu) = totals.values()
            below = compiled_at is not None and default_wall < eager_wall and default_cpu < eager_cpu
            paid = (paid or i) if below else None
            if compiled_at is not None and i >= compiled_at + args.after:
                break
        for side, (wall, cpu) in totals.items():
            print(f"{side}: {i} runs of {args.max_new_tokens} tokens in {wall:.1f} s ({cpu:.1f} CPU-s)")
        print(f"compiled at run {compiled_at}: expected {price:.0f} s, took {measured:.1f} s; " if compiled_at else
              "never compiled; ", end="")
        print(f"the default's total wall and CPU time below eager's from run {paid} on" if paid else
              "the default's total time not below eager's at the end")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
