"""The finetune commands on a tiny converted model and a small JSON set (CPU, fp32, in-process).

Every method lowers the training loss; final/ folders are exact (merged LoRA = base + trained
update; adapter folders hold the trained tensors); LoRA resumes bit-exactly, also after a SIGKILL
in the middle of a save; the merged folder generates and converts to a HF folder transformers loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_resumed_run_is_uninterrupted, assert_same_tensors, json_file, make_converted_checkpoint
from litllm.errors import LitLLMError
from litllm.finetune import finetune_adapter, finetune_adapter_v2, finetune_full, finetune_lora
from litllm.model import GPT
from litllm.train.args import EvalArgs, TrainArgs

ROOT = Path(__file__).resolve().parents[1]
LR = {"full": 2e-3, "lora": 2e-2, "adapter": 1e-1, "adapter_v2": 5e-2}


def _records(n: int = 48) -> list[dict]:
    return [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return json_file(tmp_path_factory, _records())


def _data(data_file: Path):
    from litllm.data import JSON

    return JSON(json_path=data_file, val_split_fraction=0.1, prompt_style="default")


def _kwargs(data_file: Path, method: str = "lora", max_steps: int = 8, save_interval: int = 4, **extra) -> dict:
    kwargs = dict(
        accelerator="cpu", precision="32-true", data=_data(data_file),
        train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=max_steps, lr_warmup_steps=1,
                        save_interval=save_interval, max_seq_length=64),
        eval=EvalArgs(interval=1000, max_iters=2, final_validation=False),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": LR[method], "weight_decay": 0.0}},
    )
    if method.startswith("adapter"):
        kwargs["adapter_start_layer"] = 1
    kwargs.update(extra)
    return kwargs


COMMANDS = {"full": finetune_full, "lora": finetune_lora, "adapter": finetune_adapter, "adapter_v2": finetune_adapter_v2}


@pytest.fixture(scope="module")
def runs(base, data_file, tmp_path_factory) -> dict:
    """One short run per method (and QLoRA), shared by the tests that inspect their outputs."""
    results = {}
    for name, method, extra in [
        ("full", "full", {}),
        ("lora", "lora", dict(lora_mlp=True, lora_projection=True, lora_key=True)),
        ("qlora", "lora", dict(quantize="bnb.nf4", lora_mlp=True)),
        ("adapter", "adapter", {}),
        ("adapter_v2", "adapter_v2", {}),
    ]:
        if name == "qlora":
            pytest.importorskip("bitsandbytes")
        out = tmp_path_factory.mktemp(name)
        results[name] = (out, COMMANDS[method](base, out_dir=out, **_kwargs(data_file, method, **extra)))
    return results


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["full", "lora", "qlora", "adapter", "adapter_v2"])
def test_every_method_lowers_the_training_loss(runs, name):
    _, result = runs[name]
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert result.step == 8 and len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_lora_final_folder_is_the_exact_merge(runs, base, name):
    from litllm.lora import LORA_WEIGHTS, is_lora_parameter, load_lora_model, read_lora_checkpoint

    out, result = runs[name]
    final = result.final_dir
    assert final == out / "final"
    # training checkpoints hold the LoRA weights alone
    step = load_file(str(out / "step-00000008" / "trainable.safetensors"))
    assert step and all(is_lora_parameter(k) for k in step)
    lora = load_file(str(final / LORA_WEIGHTS))
    assert set(lora) == set(step) and all(torch.equal(lora[k], step[k]) for k in lora)
    hparams, settings = read_lora_checkpoint(final)
    assert Path(hparams["checkpoint_dir"]) == base and settings.mlp
    # final/ is a plain model: base (full precision, even for QLoRA) + the trained update
    merged = GPT.from_checkpoint(final).eval()
    unmerged = load_lora_model(final).eval()
    x = _tokens()
    with torch.no_grad():
        assert (merged(x) - unmerged(x)).abs().max() <= 1e-5
        assert (merged(x) - GPT.from_checkpoint(base).eval()(x)).abs().max() > 1e-3
    assert (final / "prompt_style.yaml").is_file() and (final / "tokenizer.json").is_file()


def test_merge_lora_takes_a_training_checkpoint(runs, tmp_path):
    from litllm.lora import merge_lora

    out, result = runs["lora"]
    with pytest.raises(LitLLMError, match="out_dir"):
        merge_lora(out / "step-00000008")
    assert not (out / "step-00000008" / "lit_model.safetensors").exists()
    merge_lora(out / "step-00000008", out_dir=tmp_path / "merged")
    assert_same_tensors(tmp_path / "merged" / "lit_model.safetensors", result.final_dir / "lit_model.safetensors")


def test_full_and_adapter_final_folders(runs, base):
    from litllm.adapter import load_adapter_model, read_adapter_settings

    out, result = runs["full"]
    full = GPT.from_checkpoint(result.final_dir)
    assert set(load_file(str(out / "step-00000008" / "lit_model.safetensors"))) == set(full.state_dict())
    x = _tokens()
    for name, version in (("adapter", 1), ("adapter_v2", 2)):
        out, result = runs[name]
        settings = read_adapter_settings(result.final_dir)
        assert settings.version == version and settings.start_layer == 1
        model = load_adapter_model(result.final_dir).eval()
        saved = load_file(str(result.final_dir / "lit_model.safetensors"))
        trained = load_file(str(out / "step-00000008" / "trainable.safetensors"))
        assert trained and all(torch.equal(saved[k], v) for k, v in trained.items())
        assert any(".adapter." in k for k in trained)
        assert (version == 2) == any("norm" in k for k in trained)  # v2 also trains the norms
        with torch.no_grad():
            assert (model(x) - GPT.from_checkpoint(base).eval()(x)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["adapter", "adapter_v2"])
def test_adapter_final_folder_generates(runs, name):
    """generate/chat/LLM load an adapter folder with its adapter modules (it can't be merged away)."""
    from litllm.adapter import load_adapter_model
    from litllm.inference import load_for_inference

    _, result = runs[name]
    model = load_for_inference(result.final_dir, device="cpu", precision="32-true")
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_adapter_model(result.final_dir).eval()(x), atol=0, rtol=0)


def test_merged_folder_generates_and_converts_to_hf(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from litllm.convert import convert_from_litllm
    from litllm.engine import generate_ids
    from litllm.tokenizer import Tokenizer

    final = runs["lora"][1].final_dir
    model = GPT.from_checkpoint(final).eval()
    tokenizer = Tokenizer(final)
    tokens = generate_ids(model, tokenizer.encode("Say the number 7").tolist(), max_new_tokens=6)
    assert 0 < len(tokens) <= 6
    convert_from_litllm(final, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------- resume
STRAIGHT = dict(max_steps=6, save_interval=2, lora_dropout=0.1, lora_mlp=True)  # dropout on: RNG state matters
RESUMABLE = {
    "lora": ("lora", STRAIGHT),
    "qlora": ("lora", dict(STRAIGHT, quantize="bnb.nf4")),
    "full": ("full", dict(max_steps=6, save_interval=2)),
    "adapter_v2": ("adapter_v2", dict(max_steps=6, save_interval=2)),
}


def _straight_run(name: str, base: Path, data_file: Path, out: Path):
    method, extra = RESUMABLE[name]
    if "quantize" in extra:
        pytest.importorskip("bitsandbytes")
    return COMMANDS[method](base, out_dir=out, **_kwargs(data_file, method, **extra))


@pytest.fixture(scope="module")
def straight(base, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, _straight_run("lora", base, data_file, out)


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_is_bit_exact(straight, base, data_file, tmp_path, name):
    straight_out, straight_result = straight if name == "lora" else (
        tmp_path / "straight", _straight_run(name, base, data_file, tmp_path / "straight"))
    # a fresh start from the straight run's step-2 checkpoint must continue exactly as the straight run did
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(straight_out / "step-00000002", resumed_out / "step-00000002")
    method, extra = RESUMABLE[name]
    resumed = COMMANDS[method](base, out_dir=resumed_out, resume="auto", **_kwargs(data_file, method, **extra))
    assert_resumed_run_is_uninterrupted(resumed_out, resumed, straight_out, straight_result, first_step=3)


KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
import litllm.train.checkpoints as ckpt
from test_finetune import _kwargs, STRAIGHT
from litllm.finetune import finetune_lora
saves = []
real_save = torch.save

def save_then_die(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if str(path).endswith("optimizer.pt"):
        saves.append(path)
        if len(saves) == 2:  # the step-4 checkpoint is half written
            os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
finetune_lora({base!r}, out_dir={out!r}, **_kwargs({data!r}, **STRAIGHT))
"""


def test_sigkill_during_a_save_leaves_a_usable_checkpoint(straight, base, data_file, tmp_path):
    straight_out, straight_result = straight
    out = tmp_path / "out"
    script = KILLER.format(tests=str(Path(__file__).parent), base=Path(base), out=out, data=Path(data_file))
    script = script.replace("PosixPath(", "Path(").replace("import os,", "from pathlib import Path\nimport os,")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "step-00000002" in visible and "step-00000004" not in visible and "final" not in visible
    resumed = finetune_lora(base, out_dir=out, resume="auto", **_kwargs(data_file, **STRAIGHT))
    assert_resumed_run_is_uninterrupted(out, resumed, straight_out, straight_result, first_step=3)
    assert not any(p.name.startswith(".step-") for p in out.iterdir())  # the half-written save was cleaned up


# ---------------------------------------------------------------------- errors
def test_bad_input_fails_clearly_and_writes_nothing(base, data_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LitLLMError, match="not found"):
        finetune_lora(tmp_path / "missing", out_dir=out, **_kwargs(data_file))
    with pytest.raises(LitLLMError, match="adapter_start_layer"):
        finetune_adapter(base, out_dir=out, **_kwargs(data_file, "adapter", adapter_start_layer=2))
    with pytest.raises(LitLLMError, match="quantize"):
        finetune_lora(base, out_dir=out, **_kwargs(data_file, quantize="bnb.int3"))
    with pytest.raises(LitLLMError, match="lora_r"):
        finetune_lora(base, out_dir=out, **_kwargs(data_file, lora_r=0))
    with pytest.raises(LitLLMError, match="global_batch_size"):
        finetune_lora(base, out_dir=out, **dict(_kwargs(data_file), train=TrainArgs(global_batch_size=3, micro_batch_size=2)))
    assert not out.exists()


def test_lora_head_on_a_tied_embedding_is_refused(data_file, tmp_path):
    tied = make_converted_checkpoint(tmp_path / "qwen2", family="qwen2")
    with pytest.raises(LitLLMError, match="lora_head"):
        finetune_lora(tied, out_dir=tmp_path / "out", **_kwargs(data_file, lora_head=True))
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(tmp_path):
    from conftest import litllm_in_process

    proc = litllm_in_process(["finetune_lora", tmp_path / "missing"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_finetune_merge_generate(base, data_file, tmp_path):
    """`litllm finetune_lora` -> `litllm merge_lora` -> `litllm generate`, as a user runs them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "out"

    def litllm(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "litllm", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    litllm(
        "finetune_lora", str(base), "--out_dir", str(out), "--accelerator", "cpu", "--precision", "32-true",
        "--data", "JSON", "--data.json_path", str(data_file), "--data.prompt_style", "default",
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "4",
        "--train.max_seq_length", "64", "--eval.interval", "2", "--eval.max_new_tokens", "4", "--optimizer.lr", "0.01",
    )
    litllm("merge_lora", str(out / "final"), "--out_dir", str(tmp_path / "merged"), "--peft_dir", str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    x = _tokens()
    with torch.no_grad():
        diff = GPT.from_checkpoint(tmp_path / "merged").eval()(x) - GPT.from_checkpoint(out / "final").eval()(x)
    assert diff.abs().max() <= 1e-5
    proc = litllm("generate", str(tmp_path / "merged"), "--prompt", "Say the number 5", "--max_new_tokens", "5",
                  "--device", "cpu")
    assert proc.stdout.strip()
