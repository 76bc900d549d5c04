"""What produced a run: litllm's version and git commit, the data's fingerprint, the device layout.

`run_provenance` builds the record on global rank 0; the loop writes it as `provenance.yaml` into every
checkpoint and `final/` (next to `hyperparameters.yaml`, the effective recipe) and logs it with the
recipe to the run's logger (`provenance/...`), so a checkpoint and a W&B / MLflow run each name the code,
data and hardware behind them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from pathlib import Path
from typing import Any, Optional

PROVENANCE_FILE = "provenance.yaml"


def run_provenance(fabric, loaders: dict[str, Any], method_name: str, model_name: str) -> dict[str, Any]:
    """{litllm_version, git_commit, method, model, data, devices, versions} of this run."""
    import platform

    from importlib.metadata import PackageNotFoundError, version

    import lightning_fabric
    import torch

    try:
        litllm_version = version("litllm")  # as `litllm --version` says it
    except PackageNotFoundError:  # run from a source tree that was never installed
        litllm_version = None
    return {
        "litllm_version": litllm_version,
        "git_commit": git_commit(Path(__file__).resolve().parents[2]),  # litllm/train/provenance.py -> the checkout
        "method": method_name,
        "model": model_name,
        "data": data_fingerprint(loaders),
        "devices": device_layout(fabric),
        "versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                     "lightning_fabric": str(lightning_fabric.__version__)},
    }


def git_commit(root: Path) -> Optional[str]:
    """HEAD of the git checkout litllm runs from (`+dirty` with uncommitted changes to tracked files); None
    when litllm is installed as a package (no `.git` beside it) or git is missing."""
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def data_fingerprint(loaders: dict[str, Any]) -> dict[str, str]:
    """sha256 (16 hex digits) of the data each loader serves, and what it was computed from.

    Samples held in memory (finetuning sets, packed or not): every sample's tokens and labels, in the
    data set's order (the shuffle is the seed's). Streamed litdata folders: each folder's `index.json`
    (its chunks, their sizes and item counts) and path; the tokenized folders of `TextFiles` are named
    after a hash of their source files and tokenizer.
    """
    h = hashlib.sha256()
    basis = []
    for split, loader in loaders.items():
        if loader is None:
            continue
        dataset = getattr(loader, "dataset", loader)
        samples = dataset if isinstance(dataset, list) else getattr(dataset, "samples", None)
        h.update(split.encode())
        if isinstance(samples, list) and all(isinstance(s, dict) for s in samples):
            for sample in samples:
                for key in sorted(sample):
                    h.update(key.encode() + _bytes(sample[key]))
            basis.append(f"{split}: tokens of {len(samples)} samples")
            continue
        folders = _streamed_folders(dataset)
        if folders:
            for folder in folders:
                index = Path(folder) / "index.json"
                h.update(folder.encode() + (index.read_bytes() if index.is_file() else b""))
            basis.append(f"{split}: litdata index of {', '.join(folders)}")
        else:
            h.update(type(dataset).__qualname__.encode())
            basis.append(f"{split}: only the data set's type ({type(dataset).__qualname__})")
    return {"sha256": h.hexdigest()[:16], "of": "; ".join(basis)}


def _bytes(value) -> bytes:
    import torch

    return value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode()


def _streamed_folders(dataset) -> list[str]:
    """The input folders (paths or URLs) of a litdata StreamingDataset or CombinedStreamingDataset."""
    inner = getattr(dataset, "_datasets", None)
    if inner is not None:
        return [folder for d in inner for folder in _streamed_folders(d)]
    where = getattr(dataset, "input_dir", None)
    if where is None:
        return []
    return [str(getattr(where, "path", None) or getattr(where, "url", None) or where)]


def device_layout(fabric) -> dict[str, Any]:
    """Processes, nodes, device kind and name, strategy and precision of the run."""
    import torch

    num_nodes = getattr(fabric.strategy, "num_nodes", 1) or 1
    device = fabric.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "world_size": fabric.world_size,
        "num_nodes": num_nodes,
        "devices_per_node": fabric.world_size // num_nodes,
        "accelerator": device.type,
        "device_name": name,
        "strategy": type(fabric.strategy).__name__,
        "precision": str(getattr(fabric.strategy.precision, "precision", "?")),
    }


def start_run_record(fabric, logger, naming, method_name: str, model_name: str, out_dir: Path,
                     resume_dir: Optional[Path], saved_state: Optional[dict], loaders: dict[str, Any],
                     hparams: dict[str, Any], fast_dev_run: bool = False) -> tuple[str, Optional[dict[str, Any]]]:
    """On global rank 0, as setup ends: the provenance record, and the logger's run started (continuing the run
    a resumed checkpoint of this out_dir names) with the recipe and the record logged. A `--fast_dev_run` logs
    too (it checks that the tracker works), its run tagged `fast_dev_run`.

    Returns (provenance.yaml's text, the logger run to keep in checkpoints' training state, or None).
    """
    import yaml

    from litllm.hparams import to_plain

    record = run_provenance(fabric, loaders, method_name, model_name)
    logger_run = None
    if logger is not None:
        if hasattr(logger, "start"):  # a `TrainingLogger` (the loop also takes any Fabric-style logger)
            same_job = resume_dir is not None and Path(resume_dir).resolve().parent == Path(out_dir).resolve()
            saved = (saved_state or {}).get("logger_run") if same_job else None  # elsewhere: a fork, a new run
            if fast_dev_run and naming is not None:
                naming = dataclasses.replace(naming, tags=[*naming.tags, "fast_dev_run"])
            logger.start(naming, default_group="-".join(filter(None, (method_name, model_name))), saved_run=saved)
            logger_run = record["tracking"] = logger.run_record()
        logger.log_hyperparams({**to_plain(hparams), "provenance": record})
    return yaml.safe_dump(record, sort_keys=False), logger_run
