"""Small commands that only report: `litllm list_models`; the `litllm --help` entry of `litllm estimate`."""

from __future__ import annotations


def list_models() -> None:
    """Print every preset model name (use them with `--model_name`, `Config.from_name`, download)."""
    from litllm.config import _presets

    for name, values in sorted(_presets().items()):
        print(f"{name:45s} {values.get('hf_repo', '')}")


def estimate(command: str) -> None:
    """Estimate a command's peak memory per device, FLOPs and time before launching it: `litllm estimate COMMAND [its flags]`.

    Only listed here: `litllm estimate` parses its own arguments (`litllm.estimate_cli`).

    Args:
        command: `pretrain`, any `finetune_*`, `generate` or `serve` (`litllm estimate COMMAND --help` lists its flags).
    """
    from litllm.estimate_cli import main

    main([command])
