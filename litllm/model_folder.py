"""Model folders: the one module that knows their files, reads them and writes them.

A model folder (what generate, chat, evaluate, finetune and convert_from_litllm take) holds:
  lit_model.safetensors   the weights; a head tied to the embedding is stored once, as `wte.weight`
  model_config.yaml       the `Config`
  TOKENIZER_FILES         tokenizer, generation and prompt-style files (copied along by every writer)
  adapter.yaml            adapter models only: the structure to add before the weights load
  lit_lora.safetensors    LoRA runs only: the LoRA tensors alone (beside `hyperparameters.yaml`)
A training checkpoint (`litllm.train.checkpoints`) is a model folder plus optimizer and training state.

Weights are read only with safetensors or `torch.load(weights_only=True)`, and every reader here turns
a damaged or truncated file into one `LitLLMError` naming it. Writers are atomic (temporary name +
rename). Tied weights are handled here only: `stored_state_dict` drops the tied head, `untied`
puts it back for loading, `retie_head` restores the shared Parameter after an `assign=True` load.

Lower layer: `SafetensorsWriter` streams a `.safetensors` file tensor by tensor, `read_tensor` reads one
tensor, `HFWeights` is a lazy view of a Hugging Face folder (safetensors or `.bin`, sharded or not).
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn as nn
from safetensors import safe_open

from litllm.errors import LitLLMError
from litllm.utils import atomic_path, atomic_write_text, output_folder

WEIGHTS_FILE = "lit_model.safetensors"
CONFIG_FILE = "model_config.yaml"
PROMPT_STYLE_FILE = "prompt_style.yaml"
ADAPTER_SPEC = "adapter.yaml"
LORA_WEIGHTS = "lit_lora.safetensors"
# a training checkpoint of a method that freezes the base (LoRA, adapters) stores only the trained tensors
TRAINABLE_WEIGHTS = "trainable.safetensors"
# files of a HF folder that travel with the model (tokenizer, generation and prompt settings)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    PROMPT_STYLE_FILE,
)
# where a tied head appears in a state dict: a plain GPT, and a head wrapped by adapter v2 or LoRA
_TIED_HEAD_KEYS = ("lm_head.weight", "lm_head.base.weight")

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: Optional[str], flag: str = "--dtype") -> Optional[torch.dtype]:
    """A weights dtype by name (None: keep the checkpoint's); a bad name is an error naming `flag`."""
    if name is None:
        return None
    if name not in DTYPES:
        raise LitLLMError(f"{flag}: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---------------------------------------------------------------------- tied weights (the one place)
def has_tied_head(module: nn.Module) -> bool:
    """The module is a GPT whose output head is its input embedding."""
    config = getattr(module, "config", None)
    return bool(config is not None and config.tie_embeddings)


def stored_state_dict(state_dict: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """A state dict as files store it: a tied head is left out (it is `wte.weight`)."""
    if not tie_embeddings:
        return state_dict
    return {k: v for k, v in state_dict.items() if k not in _TIED_HEAD_KEYS}


def untied(state_dict: dict[str, torch.Tensor], module_keys, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """A stored state dict with the tied head put back under the module's own head key."""
    if not tie_embeddings or "wte.weight" not in state_dict:
        return state_dict
    head = next((k for k in _TIED_HEAD_KEYS if k in module_keys), None)
    return {**state_dict, head: state_dict["wte.weight"]} if head else state_dict


def retie_head(model: nn.Module) -> None:
    """After `load_state_dict(assign=True)` replaced `wte.weight`, make the head share it again."""
    if has_tied_head(model):
        head = model.lm_head.base if hasattr(model.lm_head, "base") else model.lm_head
        head.weight = model.wte.weight


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a model folder stores them (plain, adapter or LoRA-wrapped GPT)."""
    return stored_state_dict(model.state_dict(), has_tied_head(model))


# ---------------------------------------------------------------------- reading files (clear errors)
def check_safetensors(path: str | Path) -> None:
    """Fail clearly unless `path` is a complete safetensors file: a readable header and every byte it promises.

    Cheap (reads the header only), so folders are checked before a command writes anything.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LitLLMError(f"{path}: not a readable safetensors file, damaged or truncated ({e})") from None
    if 8 + n + end > size:
        raise LitLLMError(
            f"{path}: truncated: the header promises {8 + n + end} bytes, the file has {size} "
            "(an interrupted copy?); copy or convert it again"
        )


def _read(path: Path, kind: str, read):
    """`read()`, with any error of a damaged file (SafetensorError, pickle, zip) as one clear line."""
    try:
        return read()
    except Exception as e:
        raise LitLLMError(f"{path}: not a readable {kind} file ({str(e).strip().splitlines()[0][:200]})") from None


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (one clear error if it is damaged or truncated)."""
    from safetensors.torch import load_file

    check_safetensors(path)
    return _read(path, "safetensors", lambda: load_file(str(path), device=str(device)))


def open_safetensors(path: str | Path):
    """A lazy `safe_open` handle (keys, slices) on a checked file."""
    check_safetensors(path)
    return _read(path, "safetensors", lambda: safe_open(str(path), framework="pt"))


def check_torch_file(path: str | Path) -> None:
    """Fail clearly unless `path` is a complete `torch.save` file (its zip directory, at the end, reads)."""
    path = Path(path)
    if not path.is_file():
        raise LitLLMError(f"{path}: not found")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        raise LitLLMError(f"{path}: not a readable PyTorch file, damaged or truncated ({e})") from None


def read_torch_file(path: str | Path) -> Any:
    """A `torch.save` file, read with `weights_only=True` (one clear error if it is damaged)."""
    check_torch_file(path)
    return _read(path, "PyTorch", lambda: torch.load(path, map_location="cpu", weights_only=True))


def check_model_folder(folder: str | Path) -> Path:
    """Fail clearly unless `folder` holds a converted litllm model with a complete weights file."""
    folder = Path(folder)
    if folder.is_file():
        raise LitLLMError(f"{folder}: a file; expected a model folder ({WEIGHTS_FILE} + {CONFIG_FILE})")
    if not folder.is_dir():
        from litllm.utils import hub_name_hint

        raise LitLLMError(f"{folder}: checkpoint folder not found{hub_name_hint(folder)}")
    if not (folder / WEIGHTS_FILE).is_file():
        if (folder / "config.json").is_file():
            raise LitLLMError(
                f"{folder}: not converted yet (no {WEIGHTS_FILE}); run `litllm convert_to_litllm {folder}` first"
            )
        if (folder / "final" / WEIGHTS_FILE).is_file():  # a training run's out_dir
            raise LitLLMError(f"{folder}: a training run's folder; its model is {folder / 'final'}")
        raise LitLLMError(f"{folder}: no {WEIGHTS_FILE} (is this a litllm model folder?)")
    check_safetensors(folder / WEIGHTS_FILE)
    return folder


def read_config(folder: str | Path, **overrides: Any):
    """The `Config` of a model folder (`model_config.yaml`, else its HF `config.json`)."""
    from litllm.config import Config

    return Config.from_checkpoint(folder, **overrides)


# ---------------------------------------------------------------------- loading weights into models
def _check_keys(source, expected: dict, state_dict: dict, required=None, against: str = "the model") -> None:
    required = set(expected) if required is None else set(required)
    missing = sorted(k for k in required if k not in state_dict)
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise LitLLMError(
            f"{source}: weights don't match {against}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LitLLMError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but {against} implies {tuple(expected[name].shape)}"
            )


def load_model_weights(
    model: nn.Module, path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
) -> None:
    """Load `lit_model.safetensors` into `model` (plain or adapter GPT, possibly on the meta device)."""
    path = Path(path)
    state_dict = read_safetensors(path, device=device)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    against = f"{ADAPTER_SPEC} and {CONFIG_FILE}" if (path.parent / ADAPTER_SPEC).is_file() else CONFIG_FILE
    _check_keys(path, model_state_dict(model), state_dict, against=against)
    model.load_state_dict(state_dict, strict=False, assign=True)
    retie_head(model)  # assign=True replaced the shared Parameter
    model.build_rope_cache(torch.device(device))


def load_full_state_dict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], required: Optional[set] = None, source=""
) -> None:
    """Load a full (unsharded) state dict into a plain, DDP or FSDP2-sharded module.

    `required`: the keys the file must hold (None: every stored key of the module). A base checkpoint
    lacks the parameters a method added (LoRA factors); a LoRA checkpoint holds only those.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    expected = get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))
    required = set(stored_state_dict(expected, has_tied_head(module))) if required is None else required
    _check_keys(source, expected, state_dict, required=required)
    state_dict = untied(state_dict, expected, has_tied_head(module))
    set_model_state_dict(module, state_dict, options=StateDictOptions(full_state_dict=True, strict=False))


# ---------------------------------------------------------------------- the extras: adapter.yaml, LoRA weights
@dataclass
class AdapterSettings:
    """The structure an adapter model adds (written to `adapter.yaml`)."""

    version: Literal[1, 2] = 1
    start_layer: int = 2
    """First block (0-based) whose attention gets a learned prefix."""
    prefix_length: int = 10
    """Number of learned prefix tokens per adapted block."""


def check_exportable(folder: Path, form: str) -> None:
    """An export (`form`: a Hugging Face folder, a GGUF file) takes a plain model: an adapter model's learned prefixes
    and gates have no place in one."""
    if (Path(folder) / ADAPTER_SPEC).is_file():
        raise LitLLMError(
            f"{folder}: an adapter model ({ADAPTER_SPEC}: finetune_adapter's prefixes and gates) has no {form} form; "
            "litllm generate, chat, serve and evaluate run it as it is (finetune with LoRA for a model that exports)"
        )


def read_adapter_settings(folder: str | Path) -> Optional[AdapterSettings]:
    """The `adapter.yaml` of a model folder, or None for a plain model."""
    import yaml

    path = Path(folder) / ADAPTER_SPEC
    if not path.is_file():
        return None
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        settings = AdapterSettings(**values)
    except (yaml.YAMLError, UnicodeDecodeError, TypeError):
        raise LitLLMError(f"{path}: expected keys version, start_layer, prefix_length") from None
    if settings.version not in (1, 2):
        raise LitLLMError(f"{path}: version must be 1 or 2, got {settings.version!r}")
    return settings


def adapter_settings_yaml(settings: AdapterSettings) -> str:
    import yaml

    return yaml.safe_dump(asdict(settings), sort_keys=False)


def lora_weights_file(folder: str | Path) -> Path:
    """`lit_lora.safetensors` of a final folder, or `trainable.safetensors` of a step checkpoint."""
    for name in (LORA_WEIGHTS, TRAINABLE_WEIGHTS):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise LitLLMError(f"{folder}: no {LORA_WEIGHTS} (is this the output of `litllm finetune_lora`?)")


# ---------------------------------------------------------------------- writing
def save_model_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a `.safetensors` file atomically (tensor by tensor)."""
    with atomic_path(path) as tmp:
        with SafetensorsWriter(tmp, {k: (v.shape, v.dtype) for k, v in state_dict.items()}) as writer:
            for name, tensor in state_dict.items():
                writer.write(name, tensor)


def copy_model_files(out_dir: str | Path, *file_sources: Optional[Path]) -> None:
    """Copy the tokenizer/generation/prompt-style files into `out_dir`, each from the first source that has it."""
    sources = [Path(d) for d in file_sources if d is not None]
    for name in TOKENIZER_FILES:
        source = next((d / name for d in sources if (d / name).is_file()), None)
        if source is not None and source.resolve() != (Path(out_dir) / name).resolve():
            shutil.copy2(source, Path(out_dir) / name)


def save_model_folder(
    model: nn.Module, out_dir: str | Path, *file_sources: Path, adapter: Optional[AdapterSettings] = None
) -> None:
    """Write a model (plain or adapter GPT) as a model folder: config, `adapter.yaml`, tokenizer files,
    then the weights last and atomically, so a folder with `lit_model.safetensors` is always complete.

    Tokenizer/prompt files are taken from the first of `file_sources` that has each one.
    """
    state = {k: v.detach().contiguous() for k, v in model_state_dict(model).items()}
    with output_folder(out_dir) as folder:  # a new folder appears whole or not at all
        model.config.save(folder / CONFIG_FILE)
        if adapter is not None:
            atomic_write_text(folder / ADAPTER_SPEC, adapter_settings_yaml(adapter))
        copy_model_files(folder, *file_sources)
        save_model_weights(state, folder / WEIGHTS_FILE)


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
                    weight_map.values()
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                    raise LitLLMError(f"{index}: expected a JSON object with a 'weight_map' object") from None
                inside = self.folder.resolve()
                for name in set(weight_map.values()):
                    if not isinstance(name, str) or not (inside / name).resolve().is_relative_to(inside):
                        raise LitLLMError(f"{index}: its weight_map names {name!r}, which is not a file inside "
                                          f"{self.folder}; refusing to read it")
                files = sorted({self.folder / f for f in weight_map.values()})
                absent = [f.name for f in files if not f.is_file()]
                if absent:
                    raise LitLLMError(f"{index}: lists shard(s) that are missing: {', '.join(absent[:3])}")
                return files
        files = sorted(self.folder.glob("*.safetensors"))
        files = [f for f in files if f.name != WEIGHTS_FILE]
        if not files:
            files = sorted(self.folder.glob("*.bin"))
            files = [f for f in files if f.name not in ("training_args.bin",)]
        if not files:
            raise LitLLMError(f"{self.folder}: no weights found (expected *.safetensors or pytorch_model*.bin)")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            if file.suffix == ".safetensors":
                self._handles[file] = open_safetensors(file)
            else:
                self._handles[file] = _read(
                    file, "weights-only PyTorch", lambda: torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                )
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

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """`get(name)[index]`, reading only that slice of a safetensors file (one expert of a stacked tensor)."""
        file, raw = self._where[name], self._names[name]
        if file.suffix != ".safetensors":
            return self._open(file)[raw][index]

        def read() -> torch.Tensor:
            with safe_open(str(file), framework="pt") as f:
                return f.get_slice(raw)[index]

        return _read(file, "safetensors", read)


def read_tensor(file: str | Path, name: str) -> torch.Tensor:
    """Read one tensor from a safetensors file, unmapping the file right after.

    A long-lived handle keeps every page it touched mapped (and counted in RSS), so streaming
    conversion opens the file per tensor: header parsing is cheap next to the copy.
    """
    def read() -> torch.Tensor:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    return _read(file, "safetensors", read)


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
