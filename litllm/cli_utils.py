"""Small commands that only report: `litllm list_models`."""

from __future__ import annotations


def list_models() -> None:
    """Print every preset model name (use them with `--model_name`, `Config.from_name`, download)."""
    from litllm.config import _presets

    for name, values in sorted(_presets().items()):
        print(f"{name:45s} {values.get('hf_repo', '')}")
