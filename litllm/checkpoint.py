"""Reading and writing model weights: safetensors only, atomically, tensor by tensor when large.

`read_hf_weights` opens a Hugging Face folder (safetensors or `.bin`, sharded or not) lazily;
`SafetensorsWriter` writes a `.safetensors` file one tensor at a time so converting a checkpoint
never holds all of it in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from litllm.errors import LitLLMError
from litllm.utils import atomic_path

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise LitLLMError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---------------------------------------------------------------------- litllm model files
def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as saved: a tied head is stored once (as `wte.weight`)."""
    sd = model.state_dict()
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_model_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `lit_model.safetensors` atomically (tensor by tensor)."""
    with atomic_path(path) as tmp:
        with SafetensorsWriter(tmp, {k: (v.shape, v.dtype) for k, v in state_dict.items()}) as writer:
            for name, tensor in state_dict.items():
                writer.write(name, tensor)


def load_model_weights(
    model: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
) -> None:
    """Load `lit_model.safetensors` into `model` (which may live on the meta device)."""
    path = Path(path)
    state_dict = load_file(str(path), device=str(device))
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    config = model.config
    expected = model_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise LitLLMError(
            f"{path}: weights don't match {path.parent / 'model_config.yaml'}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LitLLMError(
                f"{path}: {name} has shape {tuple(tensor.shape)} but model_config.yaml implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter
    model.build_rope_cache(torch.device(device))


# ---------------------------------------------------------------------- streaming writer
class SafetensorsWriter:
    """Write a safetensors file incrementally: the header is fixed up front from (shape, dtype),
    then tensors are appended in the declared order. Files are readable by `safetensors`."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.Size, torch.dtype]], metadata=None) -> None:
        self.path = Path(path)
        self.order = list(specs)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.nbytes: dict[str, int] = {}
        for name, (shape, dtype) in specs.items():
            n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.nbytes[name] = n
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        self.specs = specs
        self._next = 0
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise RuntimeError(f"tensor {name!r} written out of the declared order")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(shape)} {dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._file.flush()
        if exc_type is None:
            import os

            os.fsync(self._file.fileno())
        self._file.close()
        if exc_type is None and self._next != len(self.order):
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self.order)} tensors were written")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------- HF folders
class HFWeights:
    """Lazy, read-only view of the weights in a HF checkpoint folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}  # normalized name -> file
        self._names: dict[str, str] = {}  # normalized name -> name in the file
        self._handles: dict[Path, object] = {}
        for file in self._weight_files():
            for name in self._open(file).keys():
                self._where[_normalize(name)] = file
                self._names[_normalize(name)] = name

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError):
                    raise LitLLMError(f"{index}: expected a JSON object with a 'weight_map'") from None
                files = sorted({self.folder / f for f in weight_map.values()})
                absent = [f.name for f in files if not f.is_file()]
                if absent:
                    raise LitLLMError(f"{index}: lists shard(s) that are missing: {', '.join(absent[:3])}")
                return files
        files = sorted(self.folder.glob("*.safetensors"))
        files = [f for f in files if f.name != "lit_model.safetensors"]
        if not files:
            files = sorted(self.folder.glob("*.bin"))
            files = [f for f in files if f.name not in ("training_args.bin",)]
        if not files:
            raise LitLLMError(f"{self.folder}: no weights found (expected *.safetensors or pytorch_model*.bin)")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            if file.suffix == ".safetensors":
                try:
                    self._handles[file] = safe_open(str(file), framework="pt")
                except Exception as e:  # safetensors raises its own error type for corrupt files
                    raise LitLLMError(f"{file}: not a readable safetensors file ({e})") from None
            else:
                try:
                    self._handles[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:
                    raise LitLLMError(f"{file}: could not be read as a weights-only PyTorch file ({e})") from None
        return self._handles[file]

    def keys(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        file, raw = self._where[name], self._names[name]
        if file.suffix == ".safetensors":
            return read_tensor(file, raw)
        return self._open(file)[raw]


def read_tensor(file: str | Path, name: str) -> torch.Tensor:
    """Read one tensor from a safetensors file, unmapping the file right after.

    A long-lived handle keeps every page it touched mapped (and counted in RSS), so streaming
    conversion opens the file per tensor: header parsing is cheap next to the copy.
    """
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def _normalize(name: str) -> str:
    """Strip wrappers of multimodal checkpoints so the language model's names are the usual ones."""
    for prefix, repl in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ):
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name
