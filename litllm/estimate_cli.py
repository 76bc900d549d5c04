"""The `litllm estimate COMMAND [that command's flags]` command line: the command's own arguments
(parsed by jsonargparse from its signature, `--config` recipes included), estimate's flags, the table.

The estimate itself is `litllm/estimate.py`.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any, Optional

import torch

from litllm.errors import LitLLMError
from litllm.estimate import (
    CATEGORIES, DECODE_COMMANDS, TRAIN_COMMANDS, Estimate, decode_plan_from_command, estimate_decoding,
    estimate_training, gb, parse_memory, plan_from_job,
)


def _estimate_flags(
    device_memory: Optional[str] = None,
    mfu: float = 0.4,
    peak_tflops: Optional[float] = None,
    gpu: Optional[str] = None,
    json: bool = False,
) -> None:
    """Flags of `litllm estimate` itself, after the command's own.

    Args:
        device_memory: Memory of one device for the verdict, e.g. `80GB`, `40GiB` (default: the visible GPU's).
        mfu: Model FLOPs utilisation the time estimate assumes.
        peak_tflops: Peak dense TFLOP/s of one device (default: the visible or `--gpu` GPU's, from litllm.train.flops).
        gpu: A GPU name from litllm.train.flops.PEAK_FLOPS (e.g. `A100`, `H100`) for the peak FLOP/s.
        json: Print one JSON object instead of the table.
    """


def _own_flags_help() -> str:
    """`  --name (default: value)  help` for each of `_estimate_flags`' arguments, from its docstring."""
    import re

    helps = dict(re.findall(r"^ {8}(\w+): (.*)$", _estimate_flags.__doc__ or "", re.M))
    return "\n".join(f"  --{p.name} (default: {p.default}): {helps.get(p.name, '')}"
                     for p in inspect.signature(_estimate_flags).parameters.values())


def gpu_peak_flops(name: str, precision: str) -> float:
    from litllm.train.flops import PEAK_FLOPS

    for key, (half, tf32, _fp32) in PEAK_FLOPS.items():
        if key.lower() in name.lower():
            return half if precision.startswith(("bf16", "16")) else tf32
    raise LitLLMError(f"--gpu {name!r}: unknown; expected one of {', '.join(PEAK_FLOPS)} (or give --peak_tflops)")


def parse_command(command: str, argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """(the command's arguments, estimate's own flags), parsed by jsonargparse from the command's own signature:
    a training command's arguments as its job (bound once, as the command binds them), others' as a dict."""
    from argparse import ArgumentError

    from jsonargparse import CLI, set_parsing_settings

    from litllm.__main__ import (
        COMMANDS, _fail, _load, fill_bare_flags, positionals_after_config, qualify_bare_optimizer, suggested,
    )

    if command not in COMMANDS:
        raise LitLLMError(f"estimate: unknown command {command!r}; see `litllm --help`")
    target = _load(COMMANDS[command])
    signature = inspect.signature(target)
    own = list(inspect.signature(_estimate_flags, eval_str=True).parameters.values())  # types, not strings
    public = signature.replace(parameters=[*signature.parameters.values(),
                                           *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own)])

    def capture(*args, **kwargs):
        bound = public.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    capture.__signature__ = public
    capture.__name__ = command
    capture.__doc__ = (target.__doc__ or "").rstrip() + "\n" + "\n".join(
        line for line in (_estimate_flags.__doc__ or "").splitlines()[3:])
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    argv = positionals_after_config(qualify_bare_optimizer(fill_bare_flags(argv, {"--json"}, "true")), 0)
    def cli(exit_on_error: bool = True):
        return CLI(capture, args=argv, as_positional=True, prog=f"litllm estimate {command}",
                   exit_on_error=exit_on_error)

    try:  # a bad flag or value: one line, as the command itself prints it, not the usage text
        values = cli(exit_on_error=False)
    except ArgumentError as e:
        message = suggested(" ".join(str(e).split()), cli, None, argv)
        _fail(f"error: {message} (see `litllm estimate {command} --help`)", 2)
    flags = {p.name: values.pop(p.name) for p in own}
    return (target.bind(**values) if hasattr(target, "job_class") else values), flags


def main(argv: Optional[list[str]] = None) -> None:
    """`litllm estimate COMMAND ...` (dispatched from `litllm.__main__`)."""
    argv = sys.argv[2:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        import litllm.estimate

        print(litllm.estimate.__doc__.split("The command line")[0].strip())
        print(f"\nCOMMAND: {', '.join([*TRAIN_COMMANDS, *DECODE_COMMANDS])}. "
              "`litllm estimate COMMAND --help` lists its flags and estimate's.")
        print("\nestimate's own flags (after the command's):")
        print(_own_flags_help())
        return
    command, rest = argv[0], argv[1:]
    if command not in TRAIN_COMMANDS and command not in DECODE_COMMANDS:
        raise LitLLMError(f"estimate: unknown command {command!r}; expected one of "
                          f"{', '.join([*TRAIN_COMMANDS, *DECODE_COMMANDS])}")
    arguments, flags = parse_command(command, rest)
    if command in DECODE_COMMANDS:
        est = estimate_decoding(decode_plan_from_command(command, arguments), command,
                                _device_memory(flags["device_memory"]))
    else:
        # a GPU named or present: an unset --precision is bf16-mixed; on a CPU machine, the 32-true the run would use
        for_gpu = torch.cuda.is_available() or any(flags[k] for k in ("gpu", "peak_tflops", "device_memory"))
        plan = training_plan(command, arguments, for_gpu=for_gpu)
        est = estimate_training(plan, command, _device_memory(flags["device_memory"]), _peak(flags, plan.precision),
                                flags["mfu"])
    print(json.dumps(est.to_json(), indent=2) if flags["json"] else format_table(est))


def _device_memory(text: Optional[str]) -> Optional[int]:
    if text is not None:
        return parse_memory(text)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def _peak(flags: dict[str, Any], precision: str) -> Optional[float]:
    if flags["peak_tflops"]:
        return flags["peak_tflops"] * 1e12
    if flags["gpu"]:
        return gpu_peak_flops(flags["gpu"], precision)
    if torch.cuda.is_available():
        from litllm.train.flops import device_peak_flops

        return device_peak_flops(torch.device("cuda", 0), precision)
    return None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_table(est: Estimate) -> str:
    title = (f"litllm estimate {est.command}: {est.model}, {est.method}{' + ' + est.quantize if est.quantize else ''}, "
             f"{est.precision}, ")
    if est.method == "inference":
        title += f"{est.micro_batch_size} KV-cache slot(s) x {est.seq_length} positions"
        if est.world_size > 1:
            title += f", tensor parallel over {est.world_size} devices"
    else:
        title += (f"{est.world_size} device(s) ({est.strategy}), micro-batch {est.micro_batch_size} x {est.seq_length} "
                  f"tokens, activation checkpointing {'on' if est.activation_checkpointing else 'off'}")
    lines = [
        title,
        "",
        "peak memory per device (estimate)",
    ]
    for name in CATEGORIES:
        lines.append(f"  {name.replace('_', ' '):<18} {gb(est.breakdown[name]):>12}")
    lines.append(f"  {'total (peak)':<18} {gb(est.peak_memory_bytes):>12}")
    if est.method == "inference":
        per_token = est.breakdown["kv_cache"] / max(1, est.micro_batch_size * est.seq_length)
        lines += ["", f"KV cache: {est.micro_batch_size} slot(s) x {est.seq_length} positions, {per_token:,.0f} bytes per "
                      f"token; FLOPs per decode step {est.flops_per_step:.3e}"]
    else:
        lines += ["", f"tokens per optimizer step  {est.tokens_per_step:,}", f"FLOPs per step             {est.flops_per_step:.3e}"]
    if est.method == "inference":
        pass
    elif est.seconds_per_step is not None:
        lines.append(f"time per step              {_duration(est.seconds_per_step)} at {est.mfu:.0%} MFU of "
                     f"{est.peak_flops / 1e12:.0f} TFLOP/s per device")
        if est.seconds_total is not None:
            lines.append(f"whole run ({est.total_steps:,} steps)   {_duration(est.seconds_total)}")
    else:
        lines.append("time                       give --gpu NAME or --peak_tflops for a time estimate")
    lines.append("")
    if est.fits is None:
        lines.append("verdict: give --device_memory (e.g. 80GB) for a verdict")
    elif est.fits:
        lines.append(f"verdict: fits in {gb(est.device_memory_bytes)} ({est.peak_memory_bytes / est.device_memory_bytes:.0%})")
    else:
        lines.append(f"verdict: does NOT fit in {gb(est.device_memory_bytes)}; changes that would:")
        for fix in est.fixes:
            lines.append(f"  {fix['change']:<66} -> {gb(fix['peak_memory_bytes'])}{'' if fix['fits'] else ' (still too much)'}")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def training_plan(command: str, job: Any, for_gpu: bool = True):
    """The TrainPlan of a training command's job (the model config as the command resolves it);
    `for_gpu`: see `litllm.estimate.plan_from_job`."""
    config = None
    if command == "pretrain":
        from litllm.pretrain import _model_config

        config = _model_config(job.model_name, job.model_config, job.initial_checkpoint_dir)
    return plan_from_job(command, job, config, for_gpu=for_gpu)
