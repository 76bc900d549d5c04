"""Start-up cost of litllm processes: the CPU seconds (user + system) and wall time each command's process takes.

Each case is a fresh `python` process, run `--rounds` times with the cases interleaved (so a machine shared with
other jobs slows every case alike); it prints the best and median of each, and which heavy libraries the process
imported (in one extra run per case):

- `--help`, `generate --help`, `pretrain --help`: the CLI and a command's flags;
- `generate`: a tiny converted Llama (built once, with transformers) generating 2 tokens, eager;
- `worker import`: what a tensor-parallel worker (`python -m litllm.parallel.worker`) imports before it joins;
- `training start`: `litllm.train.fabric.make_fabric` (imports Fabric): what every training process, and each rank
  of a multi-process run, pays before its first step;
- `optimizer`, `fabric+optimizer`: a torch optimizer alone, and after a Fabric: torch's own
  `Optimizer.add_param_group` imports torch._dynamo (as Fabric's `wrappers.py` does), so a training process pays
  that import with or without Fabric; the difference of the two is what Fabric adds to a run.

`--fabric-only` runs every case as if the environment had `lightning-fabric` without `lightning`,
`pytorch-lightning` and torchmetrics (what `pip install litllm` installs since pyproject names `lightning-fabric`):
a folder put first on PYTHONPATH holds packages of those names that raise ImportError. `--both` runs the cases
both ways, alternating; `--baseline PATH` times another litllm tree too (in the installed environment); each
case's median CPU is given over the first side's.

    python benchmarks/startup.py --baseline ../main --fabric-only   # main as installed vs this tree, fabric-only
    python benchmarks/startup.py --both --rounds 5 --cases training_start generate
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "scipy", "transformers",
         "matplotlib", "sympy", "litdata", "torch._dynamo")
HIDDEN = ("lightning", "pytorch_lightning", "torchmetrics")


def cases(checkpoint: Path) -> dict[str, list[str]]:
    litllm = [sys.executable, "-m", "litllm"]
    return {
        "help": [*litllm, "--help"],
        "generate_help": [*litllm, "generate", "--help"],
        "pretrain_help": [*litllm, "pretrain", "--help"],
        "generate": [*litllm, "generate", str(checkpoint), "--prompt", "Hello", "--max_new_tokens", "2"],
        "worker_import": [sys.executable, "-c", "import litllm.parallel.worker, litllm.parallel.runtime"],
        "training_start": [sys.executable, "-c",
                           "from litllm.train.fabric import make_fabric; make_fabric(accelerator='cpu')"],
        # what every training process pays without Fabric: torch's Optimizer.add_param_group imports torch._dynamo
        "optimizer": [sys.executable, "-c", "import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"],
        "fabric+optimizer": [sys.executable, "-c", "from litllm.train.fabric import make_fabric; import torch; "
                             "make_fabric(accelerator='cpu'); "
                             "torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"],
    }


def hiding_folder() -> Path:
    """A folder whose `lightning`, `pytorch_lightning` and `torchmetrics` packages raise ImportError."""
    folder = Path(tempfile.mkdtemp(prefix="litllm-startup-"))
    for name in HIDDEN:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name}: hidden by benchmarks/startup.py')\n")
    return folder


def environment(hide: Path | None, repo: Path = REPO) -> dict[str, str]:
    env = dict(os.environ, LITLLM_COMPILE="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    paths = ([str(hide)] if hide else []) + [str(repo), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one process running `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


# runs a case's `-m module args` or `-c code` and prints, at exit, which HEAVY modules the process imported
REPORTER = """
import atexit, json, runpy, sys
heavy = json.loads(sys.argv[1])
atexit.register(lambda: print("HEAVY=" + json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr))
flag, what, sys.argv = sys.argv[2], sys.argv[3], sys.argv[3:]
if flag == "-m":
    runpy.run_module(what, run_name="__main__", alter_sys=True)
else:
    exec(what)
"""


def heavy_imports(cmd: list[str], env: dict[str, str]) -> list[str]:
    """The HEAVY modules in sys.modules when the process running `cmd` exits."""
    proc = subprocess.run([cmd[0], "-c", REPORTER, json.dumps(HEAVY), *cmd[1:]], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    return json.loads(proc.stderr.rpartition("HEAVY=")[2])


def tiny_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_checkpoints import make_converted_checkpoint

    return make_converted_checkpoint(folder / "tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="*", help="a subset of the case names (default: all)")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--fabric-only", action="store_true", help="as if lightning/torchmetrics were not installed")
    side.add_argument("--both", action="store_true", help="both environments, alternating")
    parser.add_argument("--baseline", type=Path, help="also time the litllm source tree at this path (e.g. a checkout "
                        "of main), in the installed environment, alternating")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        all_cases = cases(tiny_checkpoint(Path(tmp)))
        chosen = {name: cmd for name, cmd in all_cases.items() if not args.cases or name in args.cases}
        hide = hiding_folder()
        sides = {"installed": environment(None), "fabric-only": environment(hide)}
        if not args.both:
            sides = {k: v for k, v in sides.items() if (k == "fabric-only") == args.fabric_only}
        if args.baseline:
            sides = {"baseline": environment(None, args.baseline.resolve()), **sides}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for name, cmd in chosen.items():
                for label, env in sides.items():
                    results.setdefault((name, label), []).append(run(cmd, env))
        print(f"load average: {open('/proc/loadavg').read().split()[:3]}; {args.rounds} rounds")
        print(f"{'case':16} {'environment':12} {'CPU-s best':>10} {'median':>7} {'wall-s best':>11} {'median':>7}  "
              f"heavy imports")
        for name, cmd in chosen.items():
            for label, env in sides.items():
                cpu, wall = zip(*results[(name, label)])
                print(f"{name:16} {label:12} {min(cpu):10.2f} {statistics.median(cpu):7.2f} {min(wall):11.2f} "
                      f"{statistics.median(wall):7.2f}  {','.join(heavy_imports(cmd, env)) or '-'}")
            first, *others = sides
            for other in others:
                a, b = (statistics.median(c for c, _ in results[(name, k)]) for k in (first, other))
                print(f"{'':16} {other} / {first}, median CPU: {b / a:.2f}")


if __name__ == "__main__":
    main()
