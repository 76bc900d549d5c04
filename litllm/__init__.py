"""litllm: pretrain, finetune, evaluate, convert and run large language models.

`import litllm` stays light: the model and API load on first use.

Imported before torch, it bounds how long OpenMP's idle threads spin before they sleep (`bound_omp_spin`).
"""

import os
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["GPT", "Config", "LLM"]

if TYPE_CHECKING:
    from litllm.api import LLM
    from litllm.config import Config
    from litllm.model import GPT

OMP_SPIN_COUNT = "3000"
"""GNU OpenMP's spin count that `bound_omp_spin` sets (`GOMP_SPINCOUNT`), against ~10 ms for its default 300000.
1000 (what libgomp uses when its threads outnumber the CPUs; ~20-50 us of `pause` on a Zen 3 EPYC) lasts only 5-10 us
on the AMX Xeon VM: its second thread slept between the int8/int4 ops of a decode step and each wake-up cost 20-50 us;
3000 (3x as long) decodes int8 and bf16 1.11-1.35x faster at 2 threads quiet
(tutorials/inference_measurements.md#twothreads-s33)."""


def bound_omp_spin() -> None:
    """Set `GOMP_SPINCOUNT` (`OMP_SPIN_COUNT`) unless the user chose a wait policy (`OMP_WAIT_POLICY`,
    `GOMP_SPINCOUNT`), before torch loads libgomp, which reads it once. A CPU decode step is dozens of OpenMP barriers
    (a compiled 12-layer step ~180 per token); by default a thread that reaches one first spins up to ~10 ms for
    the other. When other processes keep the cores busy, the thread it waits for has been descheduled, and the
    spinning one holds the core it needs: a 2-layer 768-wide compiled bf16 step at 2 threads and load average 6
    on 2 cores took 6x the CPU time of 1 thread (51 vs 8 ms a token) and ran 5x slower; bounded, 9.5 vs 8 ms, at
    0.9x 1 thread's speed (tutorials/inference_measurements.md#per-step-notes). Barriers on an idle machine end
    within the bound. After torch is imported it is too late: nothing is changed."""
    if "torch" in sys.modules or os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"):
        return
    os.environ["GOMP_SPINCOUNT"] = OMP_SPIN_COUNT


bound_omp_spin()


def __getattr__(name: str):
    if name == "Config":
        from litllm.config import Config

        return Config
    if name == "GPT":
        from litllm.model import GPT

        return GPT
    if name == "LLM":
        from litllm.api import LLM

        return LLM
    raise AttributeError(f"module 'litllm' has no attribute {name!r}")
