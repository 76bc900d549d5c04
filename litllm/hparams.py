"""`hyperparameters.yaml`: the arguments a training command ran with, saved in each of its checkpoints.

One writer and one reader for every folder that holds it (training checkpoints, `final/`, LoRA
folders). The file is a flat mapping of the command's flags as the user gives them
(`checkpoint_dir`, `devices`, `lora_r`, `train: {...}`, ...): the command's job flattened by
`litllm.flags.flatten` (`hyperparameters`), read back into typed settings by `litllm.flags.unflatten`
through the same field map, so a file written by any litllm version reads back the same way;
`merge_lora` takes the base `checkpoint_dir` and the `lora_*` settings from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litllm.errors import LitLLMError

HYPERPARAMETERS_FILE = "hyperparameters.yaml"


def to_plain(value: Any) -> Any:
    """Arguments -> YAML-safe data (dataclasses, paths and DataModule objects included)."""
    import dataclasses

    is_dataclass = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if hasattr(value, "connect") and not isinstance(value, type):  # a DataModule: as jsonargparse writes it
        # its arguments only, not the state `connect`/`setup` fill in (a dataclass's init=False fields: data sets)
        names = ([f.name for f in dataclasses.fields(value) if f.init] if is_dataclass
                 else [k for k in vars(value) if not k.startswith("_")])
        init_args = {name: to_plain(getattr(value, name)) for name in names}
        return {"class_path": f"{type(value).__module__}.{type(value).__qualname__}", "init_args": init_args}
    if is_dataclass:
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        return str(value).removeprefix("torch.")
    return repr(value)


def hyperparameters(job: Any) -> dict[str, Any]:
    """A command's job (a dataclass of its flags, `litllm.flags`) as the flat mapping this file records, flattened
    here, once; a mapping (a script's own record) or None is taken as it is."""
    import dataclasses

    from litllm.flags import flatten

    if dataclasses.is_dataclass(job) and not isinstance(job, type):
        return flatten(job)
    return dict(job or {})


def write_hyperparameters(folder: Path, hparams: dict[str, Any]) -> Path:
    """Write `folder/hyperparameters.yaml` (atomically) from a command's arguments."""
    import yaml

    from litllm.utils import atomic_write_text

    path = Path(folder) / HYPERPARAMETERS_FILE
    atomic_write_text(path, yaml.safe_dump(to_plain(hparams), sort_keys=False))
    return path


def read_hyperparameters(folder: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The arguments recorded in `folder/hyperparameters.yaml`; a clear error if it is missing or lacks `required` keys."""
    import yaml

    path = Path(folder) / HYPERPARAMETERS_FILE
    if not path.is_file():
        raise LitLLMError(f"{path}: not found")
    try:
        hparams = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LitLLMError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(hparams, dict):
        raise LitLLMError(f"{path}: expected a mapping of argument names to values")
    missing = [key for key in required if key not in hparams]
    if missing:
        raise LitLLMError(f"{path}: missing {', '.join(missing)}")
    return hparams
