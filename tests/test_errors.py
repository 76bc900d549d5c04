"""Issue 14's remaining classes of bad input, through the CLI's entry point: output paths that are files,
read-only or on a full disk; data that can't be fetched offline; broken recipes. Each case asserts a non-zero
exit, no "Traceback", and that no output was left behind. The commands run in this process
(`conftest.litllm_in_process`: `litllm.__main__.main` with its exit status and output, ~2 s cheaper a command);
those that need an environment this process did not start with (an unreachable Hub: huggingface_hub reads its
endpoint at import) run the real `python -m litllm` in a subprocess, and so prove the exit codes end to end.

Simulating the file systems: the suite often runs as root, which ignores permission bits, so a
read-only folder is a tmpfs remounted `-o ro` (EROFS) and a full disk a tiny tmpfs (ENOSPC). Both
need CAP_SYS_ADMIN; without it the read-only case falls back to `chmod 0o555` (EACCES, which does
hold for non-root users) and the full-disk cases skip. In-process tests at the end cover the same
helpers by patching the writer, and run everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import litllm_in_process, offline_here
from test_pretrain import env_with_tests

from litllm.errors import LitLLMError


# ---------------------------------------------------------------------- helpers
def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its content (None for folders): "nothing was written" is equality."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    } if folder.exists() else {}


def run_cli(args: list, cwd: Path, env: dict | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m litllm ARGS` (or `python -c script ARGS`, a script that ends by calling litllm's `main()`)."""
    start = ["-c", script] if script else ["-m", "litllm"]
    return subprocess.run(
        [sys.executable, *start, *map(str, args)], capture_output=True, text=True, timeout=300,
        cwd=cwd, env=env or env_with_tests(),
    )


# the litllm CLI, in whose process huggingface_hub retries an unreachable Hub without its back-off waits (~25 s):
# the same requests fail the same way, only sooner
CLI_WITHOUT_HUB_BACKOFF = """
import time, types
import huggingface_hub.utils._http as http
http.time = types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None})
from litllm.__main__ import main
main()
"""


def fails_cleanly(args: list, cwd: Path, names: str, code: int = 1, env: dict | None = None,
                  script: str | None = None, own_process: bool | None = None) -> str:
    """The CLI exits with `code`, prints no traceback, and its last line is one `error:` naming `names`.
    In this process, or in a subprocess (`run_cli`) when `own_process` (by default: when an `env` is given)."""
    if own_process is None:
        own_process = env is not None
    proc = run_cli(args, cwd, env, script) if own_process else litllm_in_process(args, cwd, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, last
    return last


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path) -> None:
    """Write into `folder` until its device is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


@contextmanager
def read_only_folder(path: Path, copy_from: Path | None = None):
    """A folder (holding a copy of `copy_from`) that refuses writes: a read-only tmpfs as root, else chmod 0o555."""
    if os.geteuid() != 0:
        shutil.copytree(copy_from, path) if copy_from else path.mkdir(parents=True)
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            folder.chmod(0o555)
        try:
            yield path
        finally:
            for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
                folder.chmod(0o755)
        return
    with tmpfs(path, "2m"):
        if copy_from:
            shutil.copytree(copy_from, path, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path


# ---------------------------------------------------------------------- inputs every command needs
@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Valid inputs for every writing command (only the output path is bad in these tests)."""
    from conftest import write_lora_folder
    from litllm.lora import add_lora
    from litllm.model import GPT

    root = tmp_path_factory.mktemp("inputs")
    write_lora_folder(add_lora(GPT.from_checkpoint(tiny_checkpoint), r=2), root / "lora",
                         {"checkpoint_dir": str(tiny_checkpoint), "lora_r": 2})
    (root / "data.json").write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}] * 4))
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text("hello world, the quick brown fox\n" * 50)
    hf = root / "hf"  # an HF folder before conversion (convert_to_litllm writes into it)
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_checkpoint / name, hf / name)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import zstandard

        for split in ("train", "validation"):
            (root / "slimpajama" / split / "chunk1").mkdir(parents=True)
            record = json.dumps({"text": "hello world " * 50, "meta": {"redpajama_set_name": "RedPajamaBook"}})
            (root / "slimpajama" / split / "chunk1" / "a.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor().compress((record + "\n").encode()))
        (root / "starcoder" / "python").mkdir(parents=True)
        table = pa.table({"content": ["def f():\n    pass\n" * 20]})
        pq.write_table(table, root / "starcoder" / "python" / "t.parquet")
    except ImportError:
        pass  # the prepare_* cases skip
    return {"model": tiny_checkpoint, **{p.name: p for p in root.iterdir()}}


TRAIN = ["--accelerator", "cpu", "--train.max_steps", "1"]

# command -> its arguments with the output path as "{out}" (every command that writes)
WRITERS: dict[str, list[str]] = {
    "convert_from_litllm": ["{model}", "{out}"],
    "convert_pretrained_checkpoint": ["{model}", "{out}"],
    "download": ["EleutherAI/pythia-14m", "--checkpoint_dir", "{out}"],
    "pretrain": ["--model_name", "pythia-14m", "--tokenizer_dir", "{model}", "--data", "TextFiles",
                 "--data.train_data_path", "{text}", "--out_dir", "{out}", *TRAIN],
    "finetune_lora": ["{model}", "--data", "JSON", "--data.json_path", "{data.json}", "--out_dir", "{out}", *TRAIN],
    "finetune_full": ["{model}", "--data", "JSON", "--data.json_path", "{data.json}", "--out_dir", "{out}", *TRAIN],
    "finetune_adapter": ["{model}", "--adapter_start_layer", "0", "--data", "JSON", "--data.json_path",
                         "{data.json}", "--out_dir", "{out}", *TRAIN],
    "finetune_adapter_v2": ["{model}", "--adapter_start_layer", "0", "--data", "JSON", "--data.json_path",
                            "{data.json}", "--out_dir", "{out}", *TRAIN],
    "merge_lora": ["{lora}", "--out_dir", "{out}"],
    "evaluate": ["{model}", "--tasks", "hellaswag", "--out_dir", "{out}"],
    "evaluate_perplexity": ["{model}", "--data", "{text}", "--out_dir", "{out}"],
    "prepare_slimpajama": ["--input_dir", "{slimpajama}", "--tokenizer_path", "{model}", "--output_dir", "{out}"],
    "prepare_starcoder": ["--input_dir", "{starcoder}", "--tokenizer_path", "{model}", "--output_dir", "{out}"],
    "train_tokenizer": ["--data_path", "{text}", "--vocab_size", "300", "--out_dir", "{out}"],
}


def command_args(command: str, inputs: dict[str, Path], out: Path) -> list[str]:
    if command == "evaluate":
        pytest.importorskip("lm_eval")
    values = {**{k: str(v) for k, v in inputs.items()}, "out": str(out)}
    missing = [a for a in WRITERS[command] if a.startswith("{") and a[1:-1] not in values]
    if missing:
        pytest.skip(f"{missing[0]} needs pyarrow and zstandard")
    return [command, *(values[a[1:-1]] if a.startswith("{") else a for a in WRITERS[command])]


# ---------------------------------------------------------------------- class 1: output paths
@pytest.mark.parametrize("command", list(WRITERS))
def test_output_path_is_a_file(command, inputs, tmp_path):
    """`--out_dir X` where X is a plain file (or below one): one line naming X, the file untouched."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "taken").write_text("not a folder")
    # half the commands get the file itself, the other half a path below it
    out = work / "taken" if list(WRITERS).index(command) % 2 == 0 else work / "taken" / "sub"
    before = tree(work)
    line = fails_cleanly(command_args(command, inputs, out), work, str(out))
    assert "file" in line
    assert tree(work) == before


@pytest.mark.parametrize("command", ["convert_to_litllm", "pretrain", "finetune_lora", "download", "prepare_starcoder"])
def test_output_path_is_read_only(command, inputs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # convert_to_litllm writes into the folder it converts
    with read_only_folder(tmp_path / "ro", inputs["hf"] if command == "convert_to_litllm" else None) as ro:
        out = ro if command == "convert_to_litllm" else ro / "out"
        args = ["convert_to_litllm", ro] if command == "convert_to_litllm" else command_args(command, inputs, out)
        before, before_work = tree(ro), tree(work)
        line = fails_cleanly(args, work, str(out))
        assert "read-only" in line or "permission denied" in line
        assert tree(ro) == before and tree(work) == before_work


@pytest.mark.parametrize("command", ["finetune_full", "download", "evaluate_perplexity", "train_tokenizer"])
def test_output_on_a_full_disk(command, inputs, tmp_path):
    """A device with no space left fails before any work, naming the output path."""
    work = tmp_path / "work"
    work.mkdir()
    with tmpfs(tmp_path / "full", "64k") as full:
        fill(full)
        out = full / "out"
        line = fails_cleanly(command_args(command, inputs, out), work, str(out))
        assert "no space left" in line
        assert tree(full).keys() == {"filler"} and tree(work) == {}


@pytest.mark.parametrize("command", ["convert_from_litllm", "convert_pretrained_checkpoint", "merge_lora"])
def test_disk_fills_up_while_writing(command, inputs, tmp_path):
    """Space for the check but not for the weights (~440 kB): the half-written output is removed."""
    work = tmp_path / "work"
    work.mkdir()
    with tmpfs(tmp_path / "full", "128k") as full:
        out = full / "out"
        line = fails_cleanly(command_args(command, inputs, out), work, str(out))
        assert "no space left" in line
        assert tree(full) == {} and tree(work) == {}


# ---------------------------------------------------------------------- class 2: data offline
def offline_env(**extra: str) -> dict[str, str]:
    env = env_with_tests()
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra})
    return env


def offline_or_unreachable(env: str) -> dict:
    """fails_cleanly's arguments for an offline case (in this process when it is offline) or an unreachable Hub."""
    if env == "offline":
        return {"env": None} if offline_here() else {"env": offline_env()}
    return {"env": unreachable_env(), "script": CLI_WITHOUT_HUB_BACKOFF}


def unreachable_env() -> dict[str, str]:
    """Online mode, but the Hub is a closed local port: a connection that fails at once."""
    return offline_env(HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")


@pytest.mark.parametrize("data, env", [("Alpaca", "offline"), ("Dolly", "unreachable")])
def test_finetune_data_offline(data, env, tiny_checkpoint, tmp_path):
    """A Hub data set that can't be fetched: one line naming it, how to provide it; no data folder, no out_dir."""
    work = tmp_path / "work"
    work.mkdir()
    line = fails_cleanly(
        ["finetune_lora", tiny_checkpoint, "--data", data, "--out_dir", work / "out", *TRAIN], work, f"--data {data}",
        **offline_or_unreachable(env),
    )
    assert ("offline mode" if env == "offline" else "can't be reached") in line
    assert "--data JSON --data.json_path" in line and "put the file at data/" in line
    assert tree(work) == {}  # neither the data folder (nor huggingface_hub's lock files) nor out/


@pytest.mark.parametrize("data", ["Alpaca2k", "AlpacaGPT4", "LIMA"])
def test_other_hub_data_sets_offline(data, tmp_path, monkeypatch):
    """The other Hub sets take the same path (in-process: a finetune subprocess per set costs ~20 s)."""
    import litllm.data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = getattr(litllm.data, data)(download_dir=tmp_path / "data" / data.lower())
    with pytest.raises(LitLLMError) as error:
        module.prepare_data()
    message = str(error.value)
    assert message.startswith(f"--data {data}: could not download {module.source.filename}")
    assert "offline mode" in message and f"put the file at {module.download_dir / module.source.filename}," in message
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("env", ["offline", "unreachable"])
def test_download_offline(env, tmp_path):
    line = fails_cleanly(["download", "EleutherAI/pythia-14m", "--checkpoint_dir", tmp_path / "ck"], tmp_path,
                         "EleutherAI/pythia-14m", **offline_or_unreachable(env))
    assert ("offline mode" if env == "offline" else "can't be reached") in line and "convert_to_litllm" in line
    assert not (tmp_path / "ck").exists()


def test_remote_and_hub_paths_offline(tiny_checkpoint, inputs, tmp_path):
    """litdata `s3://` folders without credentials or network, and a Hub name given where a folder is expected."""
    work = tmp_path / "work"
    work.mkdir()
    env = offline_env(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                      AWS_EC2_METADATA_DISABLED="true")
    for key in [k for k in env if k.startswith("AWS_") and ("KEY" in k or k == "AWS_PROFILE")]:
        del env[key]
    line = fails_cleanly(["pretrain", "--model_name", "pythia-14m", "--tokenizer_dir", tiny_checkpoint, "--data",
                          "LitData", "--data.data_path", "s3://litllm-test-bucket/tokens", "--out_dir", work / "out",
                          *TRAIN], work, "s3://litllm-test-bucket/tokens", env=env, own_process=not offline_here())
    assert "remote token folder" in line
    line = fails_cleanly(["pretrain", "--model_name", "pythia-14m", "--tokenizer_dir", "EleutherAI/pythia-14m",
                          "--data", "TextFiles", "--data.train_data_path", inputs["text"], "--out_dir", work / "out"],
                         work, "EleutherAI/pythia-14m", env=env, own_process=not offline_here())
    assert "litllm download EleutherAI/pythia-14m" in line
    assert tree(work) == {}


# ---------------------------------------------------------------------- class 3: recipes
def test_broken_recipes(tiny_checkpoint, tmp_path):
    """`--config` missing, invalid YAML, not text, or with an unknown (nested) key: one line, exit 2 (1 for bytes)."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "bad.yaml").write_text("out_dir: [unclosed\n  - : :\n")
    (tmp_path / "unknown.yaml").write_text("out_dir: out\ntrain:\n  micro_batch_sise: 2\n")
    (tmp_path / "bytes.yaml").write_bytes(b"\xff\xfe\x00binary")
    cases = [
        (["pretrain", "--config", tmp_path / "missing.yaml"], "missing.yaml: file not found", 2),
        (["pretrain", "--config", tmp_path / "unknown.yml"], "unknown.yml: file not found (did you mean unknown.yaml?)", 2),
        (["finetune_lora", tiny_checkpoint, "--config", tmp_path / "bad.yaml"], "line 1", 2),
        (["finetune_full", tiny_checkpoint, "--config", tmp_path / "unknown.yaml"], "train.micro_batch_sise", 2),
        (["generate", tiny_checkpoint, "--config", tmp_path / "bytes.yaml"], "bytes.yaml", 1),
    ]
    for args, names, code in cases:
        proc = litllm_in_process(args, work)
        assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no usage text, one line
        assert proc.stderr.startswith("error: ") and names in proc.stderr
    assert tree(work) == {}


def test_a_finetuning_step_names_how_to_get_its_model(tmp_path):
    """A LoRA run's `step-*` holds only the trained weights: `convert_pretrained_checkpoint` names `merge_lora`."""
    step = tmp_path / "run" / "step-00000002"
    step.mkdir(parents=True)
    (step / "trainable.safetensors").write_bytes(b"")
    line = fails_cleanly(["convert_pretrained_checkpoint", step, tmp_path / "model"], tmp_path, str(step))
    assert "use the run's final/ folder" in line and f"litllm merge_lora {step} --out_dir {tmp_path / 'model'}" in line
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("command", ["convert_from_litllm", "convert_to_gguf"])
def test_an_adapter_model_is_refused_by_the_exports(command, tiny_checkpoint, tmp_path):
    """An adapter model's prefixes and gates have no HF or GGUF form: one line before anything is written (before:
    convert_from_litllm died with a KeyError, convert_to_gguf named the first adapter tensor)."""
    if command == "convert_to_gguf":
        pytest.importorskip("gguf")
    folder = tmp_path / "adapter-final"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "adapter.yaml").write_text("version: 2\nstart_layer: 0\nprefix_length: 2\n")
    out = tmp_path / "export"
    line = fails_cleanly([command, folder, out / "model.gguf" if command == "convert_to_gguf" else out], tmp_path,
                         f"{folder}: an adapter model")
    assert "litllm generate, chat, serve and evaluate run it" in line and tree(out) == {}


# ---------------------------------------------------------------------- the helpers, in-process
def test_atomic_path_on_a_failing_writer(tmp_path, monkeypatch):
    """A write that fails for the file system names the final path and leaves nothing, parents included."""
    from litllm.utils import OutputWriteError, atomic_path

    target = tmp_path / "new" / "deeper" / "weights.bin"
    with pytest.raises(OutputWriteError, match=f"^{target}: cannot write it \\(no space left on the device\\)"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert tree(tmp_path) == {}

    # torch.save on a full disk raises a RuntimeError about stream positions: the free space decides
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OutputWriteError, match="no space left"):
        with atomic_path(tmp_path / "step-1") as tmp:
            tmp.mkdir()
            with atomic_path(tmp / "optimizer.pt"):  # nested: the outer (final) name is reported
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert tree(tmp_path) == {}
    monkeypatch.undo()
    with pytest.raises(ValueError):  # other errors pass through unchanged
        with atomic_path(tmp_path / "x"):
            raise ValueError("a bug")


def test_check_output_dir(tmp_path, monkeypatch):
    import tempfile

    from litllm.utils import check_output_dir

    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert tree(tmp_path) == {}  # creates nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(LitLLMError, match="exists and is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(LitLLMError, match=f"{tmp_path / 'f'} is a file"):
        check_output_dir(tmp_path / "f" / "sub")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(LitLLMError, match=f"^--out_dir {tmp_path / 'new'}: can't write there .*permission denied"):
        check_output_dir(tmp_path / "new")


def test_new_pretrain_refuses_an_out_dir_holding_another_run(tmp_path):
    """Issue 20.8: the old step-* folders would be resumed by a later --resume auto; nothing is written."""
    out = tmp_path / "out"
    (out / "step-00000002").mkdir(parents=True)
    before = tree(out)
    last = fails_cleanly(["pretrain", "--model_name", "pythia-14m", "--data", "TextFiles", "--data.train_data_path",
                          tmp_path, "--tokenizer_vocab_size", "300", "--out_dir", out], tmp_path,
                         f"--out_dir {out} already holds a run (step-00000002/)")
    assert "continue it with --resume auto, or pick another --out_dir" in last
    assert tree(out) == before
