"""`litllm convert_to_litllm` and `litllm convert_from_litllm`: move checkpoints between HF and litllm.

Both stream tensor by tensor, so peak memory stays near the largest single tensor, not the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from litllm.config import Config
from litllm.errors import LitLLMError
from litllm.hf import fp8, mxfp4
from litllm.hf.config import config_from_hf, config_to_hf, infer_model_type
from litllm.hf.family import QKV_LAYOUTS, STACKED_EXPERTS
from litllm.hf.weights import (
    IGNORED_HF, expert_index, hf_sources, qkv_from_interleaved, qkv_to_interleaved, split_sizes, weight_map,
)
from litllm.model_folder import (
    CONFIG_FILE, WEIGHTS_FILE, HFWeights, SafetensorsWriter, check_exportable, check_model_folder, copy_model_files,
    model_state_dict, open_safetensors, parse_dtype, read_config, read_tensor,
)
from litllm.utils import atomic_path, check_output_dir, clean_stale_temporaries, read_json_object


def convert_to_litllm(
    checkpoint_dir: Path,
    dtype: Optional[str] = None,
    model_name: Optional[str] = None,
) -> None:
    """Convert a Hugging Face checkpoint folder into litllm's format, in place.

    Reads `config.json` and `*.safetensors` (or `*.bin`, sharded or not) and writes
    `lit_model.safetensors` and `model_config.yaml` beside them.

    Args:
        checkpoint_dir: The HF folder (as written by `save_pretrained` or downloaded from the Hub).
        dtype: Cast weights to `float32`, `float16` or `bfloat16` (default: keep the checkpoint's dtype).
        model_name: A preset name to use when the folder has no `config.json`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        if checkpoint_dir.is_file():
            raise LitLLMError(f"{checkpoint_dir}: a file; expected a Hugging Face model folder")
        raise LitLLMError(f"{checkpoint_dir}: checkpoint folder not found")
    check_output_dir(checkpoint_dir, "checkpoint_dir")  # the litllm files are written beside the HF ones
    target_dtype = parse_dtype(dtype)
    config = _hf_folder_config(checkpoint_dir, model_name)
    hf = HFWeights(checkpoint_dir)
    mapping = weight_map(config, config.hf_model_type)
    hf_config = read_json_object(checkpoint_dir / "config.json") if (checkpoint_dir / "config.json").is_file() else {}
    fp8_block = fp8.block_size(hf_config)
    mtp_layers = hf_config.get("num_nextn_predict_layers") or 0

    from litllm.model import GPT

    with torch.device("meta"):
        expected = model_state_dict(GPT(config))

    used: set[str] = set()

    def build(lit_name: str) -> torch.Tensor:
        try:
            source = hf_sources(lit_name, mapping)
        except KeyError:
            raise LitLLMError(f"{checkpoint_dir}: no HF weight mapping for {lit_name}") from None
        names = list(source.names)
        missing = [n for n in names if n not in hf and not all(p in hf for p in mxfp4.packed_names(n))]
        if missing:
            raise LitLLMError(
                f"{checkpoint_dir}: weight {missing[0]} is missing but config.json ({config.hf_model_type}) needs it"
            )
        expert = expert_index(lit_name) if source.layout == STACKED_EXPERTS else None
        if expert is not None:  # Llama 4: litllm's expert e is the HF stack's [e] (in, out), transposed
            used.update(names)
            tensors = [hf.get_row(names[0], expert).T.contiguous()]
        else:
            tensors = [_read_weight(hf, n, target_dtype, fp8_block, used) for n in names]
        tensor = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if source.layout in QKV_LAYOUTS and tensor.shape[0] == expected[lit_name].shape[0]:
            tensor = qkv_from_interleaved(tensor, source.layout, config)
        if tuple(tensor.shape) != tuple(expected[lit_name].shape):
            raise LitLLMError(
                f"{checkpoint_dir}: config.json does not match the weights: {', '.join(names)} "
                f"give shape {tuple(tensor.shape)}, config implies {tuple(expected[lit_name].shape)} for {lit_name}"
            )
        return tensor.to(target_dtype) if target_dtype is not None else tensor

    names = list(expected)
    first = build(names[0])  # its dtype is the output dtype unless --dtype says otherwise
    out_dtype = target_dtype or first.dtype
    specs = {name: (t.shape, out_dtype) for name, t in expected.items()}
    with atomic_path(checkpoint_dir / WEIGHTS_FILE) as tmp:
        with SafetensorsWriter(tmp, specs) as writer:
            for name in tqdm(names, desc="convert_to_litllm", unit="tensor"):
                tensor = first if name == names[0] else build(name)
                first = None  # hold at most one tensor at a time
                writer.write(name, tensor.to(out_dtype))
                del tensor
        _check_all_used(checkpoint_dir, hf, used, config, mtp_layers)
        config.save(checkpoint_dir / CONFIG_FILE)
    print(f"Wrote {checkpoint_dir / WEIGHTS_FILE} and {CONFIG_FILE}")


def _read_weight(hf: HFWeights, name: str, dtype: Optional[torch.dtype], fp8_block: Optional[tuple[int, int]],
                 used: set[str]) -> torch.Tensor:
    """One HF weight as stored, or dequantized: MXFP4-packed (gpt-oss's experts, `*_blocks`/`*_scales`) to
    `dtype` (default bfloat16); block-FP8 with its `_scale_inv` beside it (DeepSeek-V3, Kimi K2) to fp32."""
    if name not in hf:
        blocks, scales = mxfp4.packed_names(name)
        used.update((blocks, scales))
        return mxfp4.dequantize(hf.get(blocks), hf.get(scales), dtype or torch.bfloat16)
    used.add(name)
    tensor = hf.get(name)
    scale_name = name + fp8.SCALE_SUFFIX
    if fp8_block is None or tensor.element_size() != 1 or scale_name not in hf:
        return tensor
    used.add(scale_name)
    return fp8.dequantize(tensor, hf.get(scale_name), fp8_block)


def _is_mtp_layer(hf_name: str, n_layer: int, mtp_layers: int) -> bool:
    """`model.layers.{n}.*` with num_hidden_layers <= n < num_hidden_layers + num_nextn_predict_layers: a
    multi-token-prediction module (DeepSeek-V3, GLM-4.5) that transformers, like litllm, does not run."""
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    return m is not None and n_layer <= int(m.group(1)) < n_layer + mtp_layers


def _hf_folder_config(checkpoint_dir: Path, model_name: Optional[str]) -> Config:
    """The config of an HF folder: from its `config.json`, else the preset `model_name`; it must name its HF model type."""
    if (checkpoint_dir / "config.json").is_file():
        config = config_from_hf(checkpoint_dir / "config.json")
        config.name = model_name or config.name or checkpoint_dir.name
    elif model_name:
        config = Config.from_name(model_name)
    else:
        raise LitLLMError(f"{checkpoint_dir}: no config.json (pass --model_name to use a preset)")
    if not config.hf_model_type:
        raise LitLLMError(f"model {config.name!r}: preset has no hf_model_type, can't map HF weight names")
    return config


def _check_all_used(checkpoint_dir: Path, hf: HFWeights, used: set[str], config: Config, mtp_layers: int) -> None:
    """Every HF weight has found its place (a weight left over means config.json and the weights disagree)."""
    leftover = sorted(n for n in hf.keys() if n not in used and not IGNORED_HF.search(n)
                      and not _is_mtp_layer(n, config.n_layer, mtp_layers))
    if config.tie_embeddings:
        leftover = [n for n in leftover if not n.startswith("lm_head.")]
    if leftover:
        raise LitLLMError(
            f"{checkpoint_dir}: {len(leftover)} weight(s) have no place in a {config.hf_model_type} model "
            f"(e.g. {leftover[0]}): config.json and weights disagree"
        )


def convert_from_litllm(
    checkpoint_dir: Path,
    output_dir: Path,
    dtype: Optional[str] = None,
    max_shard_size: str = "5GB",
) -> None:
    """Export a litllm model folder as a complete Hugging Face folder.

    Writes `config.json`, `model.safetensors` (or shards with `model.safetensors.index.json`),
    `generation_config.json` and copies the tokenizer files, so that
    `transformers.AutoModelForCausalLM.from_pretrained(output_dir)` loads it.

    Args:
        checkpoint_dir: A litllm model folder (`lit_model.safetensors` + `model_config.yaml`).
        output_dir: Where to write the HF folder (must not exist or be empty).
        dtype: Cast weights to `float32`, `float16` or `bfloat16` (default: keep).
        max_shard_size: Largest shard, e.g. `5GB`, `500MB`.
    """
    checkpoint_dir, output_dir = check_model_folder(checkpoint_dir), Path(output_dir)
    check_exportable(checkpoint_dir, "Hugging Face")
    check_output_dir(output_dir, "output_dir")
    clean_stale_temporaries(output_dir)  # what a killed conversion to the same folder left
    if output_dir.exists() and any(output_dir.iterdir()):
        raise LitLLMError(f"{output_dir}: output folder exists and is not empty")
    target_dtype = parse_dtype(dtype)
    shard_bytes = _parse_size(max_shard_size)
    config = read_config(checkpoint_dir)
    model_type = infer_model_type(config)
    mapping = weight_map(config, model_type)
    lit_file = checkpoint_dir / WEIGHTS_FILE
    plan, specs = _export_plan(open_safetensors(lit_file), config, mapping, target_dtype)
    shards = _shard(plan, specs, shard_bytes)
    with atomic_path(output_dir) as tmp:
        tmp.mkdir(parents=True)
        weight_index: dict[str, str] = {}
        total = 0
        bar = tqdm(total=len(plan), desc="convert_from_litllm", unit="tensor")
        cache: dict[str, torch.Tensor] = {}
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            shard_specs = {hf_name: specs[hf_name] for hf_name, _, _ in shard}
            with SafetensorsWriter(tmp / fname, shard_specs) as writer:
                for hf_name, lit_name, how in shard:
                    if how[0] == "stack":
                        tensor = torch.stack([read_tensor(lit_file, name).T for name in how[1]])
                    else:
                        if lit_name not in cache:
                            cache.clear()  # a fused tensor's parts are consecutive in the plan
                            cache[lit_name] = read_tensor(lit_file, lit_name)
                        tensor = cache[lit_name]
                    if how[0] == "rows":
                        tensor = tensor[how[1]: how[1] + how[2]]
                    elif how[0] == "interleave":
                        tensor = qkv_to_interleaved(tensor, how[1], config)
                    writer.write(hf_name, tensor.to(specs[hf_name][1]))
                    weight_index[hf_name] = fname
                    total += specs[hf_name][1].itemsize * specs[hf_name][0].numel()
                    bar.update()
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_index}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_hf_files(tmp, checkpoint_dir, config, out_dtype=next(iter(specs.values()))[1])
    print(f"Wrote a Hugging Face checkpoint to {output_dir}")


def _export_plan(lit, config: Config, mapping, target_dtype: Optional[torch.dtype]):
    """`(plan, specs)`: (hf name, lit name, how to cut it out) in file order, and {hf name: (shape, dtype)} for the
    headers."""
    plan: list[tuple[str, str, tuple]] = []
    specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
    stacks: dict[str, list[str]] = {}  # a stacked HF tensor -> its experts' litllm names
    for lit_name in lit.keys():
        sl = lit.get_slice(lit_name)
        shape, st_dtype = sl.get_shape(), sl.get_dtype()
        out_dtype = target_dtype or _ST_TO_DTYPE[st_dtype]
        source = hf_sources(lit_name, mapping)
        if source.layout == STACKED_EXPERTS and expert_index(lit_name) is not None:  # (Llama 4) every expert's
            # tensor into one HF tensor, (n_expert, in, out)
            hf_name = source.names[0]
            if hf_name not in stacks:
                stacks[hf_name] = []
                plan.append((hf_name, lit_name, ("stack", stacks[hf_name])))
                specs[hf_name] = (torch.Size([config.n_expert, shape[1], shape[0]]), out_dtype)
            stacks[hf_name].append(lit_name)
        elif not source.concatenated:
            hf_name = source.names[0]
            qkv = source.layout in QKV_LAYOUTS
            plan.append((hf_name, lit_name, ("interleave", source.layout) if qkv else ("whole",)))
            specs[hf_name] = (torch.Size(shape), out_dtype)
        else:
            sizes = split_sizes(lit_name, config, len(source.names))
            start = 0
            for hf_name, size in zip(source.names, sizes):
                plan.append((hf_name, lit_name, ("rows", start, size)))
                specs[hf_name] = (torch.Size([size, *shape[1:]]), out_dtype)
                start += size
    return plan, specs


def _write_hf_files(folder: Path, checkpoint_dir: Path, config: Config, out_dtype: torch.dtype) -> None:
    """`config.json` (with the generation config's special token ids), the tokenizer files and
    `generation_config.json`."""
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    generation = _generation_config(checkpoint_dir)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in generation:
            hf_config[key] = generation[key]
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    copy_model_files(folder, checkpoint_dir)
    if not (folder / "generation_config.json").is_file():
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


_ST_TO_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _generation_config(checkpoint_dir: Path) -> dict:
    return read_json_object(checkpoint_dir / "generation_config.json") or {"_from_model_config": True}


def _parse_size(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise LitLLMError(f"--max_shard_size: expected a size like 5GB or 500MB, got {text!r}")


def _shard(plan, specs, shard_bytes: int) -> list[list[tuple]]:
    shards: list[list[tuple]] = [[]]
    size = 0
    for item in plan:
        spec = specs[item[0]]
        n = spec[1].itemsize * spec[0].numel()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards
