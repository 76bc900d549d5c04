"""Shared fixtures: tiny tokenizers and tiny converted checkpoints built on the spot (no downloads)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the suite never reaches the real Hub: lm-eval/datasets load local task files; tests that need a
# Hub start a local fake one (tests/fake_hub.py), which lifts this for its own duration
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the decode step compiles by default where it pays (litllm.compile_decode); the suite decodes eagerly unless a
# test asks (tests/test_compile_decode.py covers the default), so that hundreds of commands skip compiling
os.environ.setdefault("LITLLM_COMPILE", "0")
# CPU tests use fp32, whatever default precision the inference commands pick ($LITLLM_PRECISION overrides it)
os.environ.setdefault("LITLLM_PRECISION", "32-true")
# a subprocess that dies on a signal (a crash in native code) prints every thread's Python stack: a rare CI failure
# then says where it happened
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Each test starts with this process's torch thread count: an in-process tensor-parallel rank
    (`litllm.parallel.runtime` splits the cores between the ranks) sets it and leaves it, and the thread count is
    part of the key a saved compiled step's layout and thread pick are recorded under (`decode_choices_key`)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request) -> int:
    """The test runs on 1 torch thread, then on 2 (ops that split their work between threads, litllm's C++ ops and
    the one-token attention, run other code on each); the autouse `_restore_torch_threads` sets the count back."""
    torch.set_num_threads(request.param)
    return request.param


sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

from tiny_checkpoints import SAMPLE_TEXT, make_converted_checkpoint, train_bpe_tokenizer  # noqa: E402,F401


def assert_final_folder_generates_and_matches_hf(final: Path, hf_folder: Path) -> None:
    """A training run's `final/` folder generates, and converted to `hf_folder` transformers computes its logits
    (within 1e-4)."""
    import transformers

    from litllm.convert import convert_from_litllm
    from litllm.engine import generate_ids
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer

    model = GPT.from_checkpoint(final).eval()
    tokens = generate_ids(model, Tokenizer(final).encode("Say the number 7").tolist(), max_new_tokens=5)
    assert 0 < len(tokens) <= 5
    convert_from_litllm(final, hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-4)


def assert_same_tensors(a: Path, b: Path) -> None:
    """The safetensors files `a` and `b` hold the same tensors under the same names, bit for bit."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), (a, b)
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differ, f"{a} and {b} differ in {differ[:3]}"


def assert_resumed_run_is_uninterrupted(resumed_out: Path, resumed, straight_out: Path, straight, first_step: int
                                        ) -> None:
    """A training run resumed in `resumed_out` ends as the uninterrupted one in `straight_out` did: as many steps, the
    same loss at each step from `first_step` on, and bit for bit the same final weights (the LoRA's and the model's,
    where the uninterrupted run saved them)."""
    assert resumed.step == straight.step
    for step in range(first_step, straight.step + 1):
        assert resumed.losses[step] == straight.losses[step], step
    for name in ("lit_lora.safetensors", "lit_model.safetensors"):
        if (straight_out / "final" / name).is_file():
            assert_same_tensors(resumed_out / "final" / name, straight_out / "final" / name)


NUMBER_RECORDS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(16)]


def finetune_lora_briefly(base: Path, out_dir: Path, data_file: Path, train: dict | None = None, **flags):
    """A few steps of `finetune_lora` of `base` on CPU in fp32 on the instruction records of `data_file` (AdamW at
    lr 2e-2, no checkpoints or validation): the run of a family's "LoRA finetunes and exports" test. `train`
    overrides TrainArgs fields (4 steps of 4 samples in micro-batches of 2, 32 tokens); `flags` go to
    `finetune_lora` (`lora_mlp=True`, ...). On one thread, where tiny models train fastest."""
    from litllm.data import JSON
    from litllm.engine import threads_for
    from litllm.finetune import finetune_lora
    from litllm.train.args import EvalArgs, TrainArgs

    train = {**dict(global_batch_size=4, micro_batch_size=2, max_steps=4, lr_warmup_steps=1, save_interval=None,
                    max_seq_length=32), **(train or {})}
    with threads_for(1):
        return finetune_lora(
            base, out_dir=out_dir, accelerator="cpu", precision="32-true", logger_name="csv",
            data=JSON(json_path=data_file, val_split_fraction=0.1, prompt_style="default"),
            train=TrainArgs(**train), eval=EvalArgs(interval=1000, max_iters=1, final_validation=False),
            optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-2, "weight_decay": 0.0}}, **flags,
        )


def assert_peft_export_computes_the_same(model, base: Path, folder: Path, seq_len: int = 12, atol: float = 1e-4
                                         ) -> dict:
    """Export a LoRA-wrapped litllm model (or the `final/` folder of a LoRA run) as a PEFT adapter into `folder`;
    transformers + peft load it on the HF checkpoint `base`, change its logits (the adapter applies) and compute
    litllm's (within `atol`) on 2 rows of `seq_len` tokens. Returns the adapter's `adapter_config.json`."""
    import peft
    import transformers

    from litllm.engine import threads_for
    from litllm.lora import load_lora_model, save_peft_adapter

    if isinstance(model, Path):
        model = load_lora_model(model).eval()
    save_peft_adapter(model, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), threads_for(1):
        without_adapter = hf(x).logits
        got = peft.PeftModel.from_pretrained(hf, folder).eval()(x).logits
        expected = model(x)
    assert (got - without_adapter).abs().max() > atol  # the adapter was applied
    torch.testing.assert_close(got, expected[..., : got.size(-1)], rtol=0, atol=atol)
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread (and far faster when the cores are shared)."""
    from litllm.engine import threads_for

    with threads_for(1):
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A converted tiny Llama with its tokenizer (read-only: copy it before changing anything)."""
    return make_converted_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def base(tiny_checkpoint) -> Path:
    """The tiny checkpoint as the base model of finetuning runs (read-only: runs write elsewhere)."""
    return tiny_checkpoint


@pytest.fixture(scope="session")
def numbers_file(tmp_path_factory) -> Path:
    """NUMBER_RECORDS as a JSON file: the data of `finetune_lora_briefly` runs."""
    return json_file(tmp_path_factory, NUMBER_RECORDS)


def json_file(tmp_path_factory, records, name: str = "data.json") -> Path:
    """`records` written as a JSON file in a fresh temporary folder (a module fixture's data set)."""
    path = tmp_path_factory.mktemp(Path(name).stem) / name
    path.write_text(json.dumps(records))
    return path


def tiny_config(**overrides):
    """A tiny Llama-like `Config` (3 layers, 32 wide, grouped-query attention) for model-level tests."""
    from litllm.config import Config

    values = dict(
        name="tiny", block_size=64, vocab_size=320, padding_multiple=64, n_layer=3, n_embd=32, n_head=4,
        n_query_groups=2, intermediate_size=64, norm_class_name="RMSNorm", mlp_class_name="GatedMLP",
        activation="silu",
    )
    values.update(overrides)
    return Config(**values)


def slow_save_cli(path_part: str, message: str, seconds: float) -> str:
    """A `python -c` script running the litllm CLI in which writing a weights file whose path contains
    `path_part` prints `message` once written, then sleeps `seconds` (a signal or a kill lands mid-save)."""
    return f"""
import sys, time
import litllm.model_folder as checkpoint

write = checkpoint.save_model_weights
def slow_write(state_dict, path):
    write(state_dict, path)
    if {path_part!r} in str(path):
        print({message!r}, flush=True)
        time.sleep({seconds})
checkpoint.save_model_weights = slow_write

from litllm.__main__ import main
main(sys.argv[1:])
"""


def offline_here() -> bool:
    """This process is offline for the Hub and for `datasets` (set above, before either library reads it at
    import): a test of the offline behaviour can then run a command in this process."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) and os.environ.get("HF_DATASETS_OFFLINE") == "1"


def show_warnings_as_a_fresh_interpreter_does() -> None:
    """Python's default warning filters, and warnings printed to (the current) sys.stderr instead of recorded by
    pytest: a command run in-process prints the warnings the console script would (inside catch_warnings)."""
    import warnings

    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def _run_main(main, args: list[str]) -> int:
    """`main(args)`'s exit status, as `litllm_in_process` runs it: inside a context of its own (contextvars), whose
    garbage is collected before it is left, as a process of its own would end. jsonargparse keeps its parse state in
    context variables set and reset by generator context managers; one left suspended by a command and finalized by
    the garbage collector in the middle of a later command's parse, in the same context, deletes that parse's
    variable: the likely cause of one CI run's `LookupError: <ContextVar name='parent_parser'>` in every in-process
    parse after test_estimate/test_evaluate (not reproduced when rerun)."""
    import gc
    import traceback

    try:
        main(args)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # as the interpreter does with `raise SystemExit("message")`
            print(e.code, file=sys.stderr)
            code = 1
    except Exception:
        traceback.print_exc()
        code = 1
    gc.collect()  # here, in this command's context: what it left suspended is finalized where it was set
    return code


def litllm_in_process(args, cwd: Path | None = None, stdin: str = "", env: dict | None = None
                      ) -> subprocess.CompletedProcess:
    """`litllm ARGS` run in this process as the console script runs it (`litllm.__main__.main`), without paying
    an interpreter + torch start (~2 s a command): its stdout/stderr, and its exit status (a SystemExit's code;
    an uncaught exception prints its traceback and gives 1, as Python does). `env` replaces the environment for
    the call (what libraries read at import, such as HF_HUB_OFFLINE, stays as this process imported them).
    `cwd`, the environment, the warning filters and the thread count (1 during the call, as the subprocesses of
    `test_pretrain.env_with_tests` get) are restored afterwards.

    For what litllm prints (errors, notes, replies). Output that libraries log through handlers made at import,
    a process of its own, an exit status seen by a shell: tests of those run the real `python -m litllm`
    (tests/test_cli.py, tests/test_errors.py' unreachable Hub, test_chat_subprocess...)."""
    import contextlib
    import contextvars
    import io
    import warnings

    from litllm.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    env, old_cwd, threads, old_stdin = dict(os.environ), os.getcwd(), torch.get_num_threads(), sys.stdin
    try:
        torch.set_num_threads(1)
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        sys.stdin = io.StringIO(stdin)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            show_warnings_as_a_fresh_interpreter_does()
            code = contextvars.copy_context().run(_run_main, main, [str(a) for a in args])
    finally:
        sys.stdin = old_stdin
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["litllm", *map(str, args)], code, out.getvalue(), err.getvalue())


# One fresh interpreter imports torch (not heavy) once, then forks a child per command: the child imports a module
# (["import", "litllm.x"]) or runs `litllm ARGS` as the console script does (`litllm.__main__.main`, output
# discarded, stdin one line), and reports which of the watched modules are in its sys.modules. `serve` runs up to
# the point it would listen (its app built).
MODULES_LOADED_SCRIPT = """
import io, json, os, sys
import torch
watched, commands = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for name, args in commands.items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        sys.stdin = io.StringIO("Hello\\n")
        try:
            if args[0] == "import":
                __import__(args[1])
            else:
                if args[0] == "serve":
                    import litllm.serve.server as server
                    def listen(*a, **k):
                        raise SystemExit(0)
                    server._run_uvicorn = listen
                from litllm.__main__ import main
                try:
                    main(args)
                except SystemExit as e:
                    if e.code not in (0, None):
                        raise RuntimeError(f"exit status {e.code}")
            found = [m for m in watched if m in sys.modules]
        except BaseException as e:
            found = f"failed: {e!r}"
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out[name] = json.loads(f.read())
    os.waitpid(pid, 0)
print(json.dumps(out))
"""


def modules_loaded_by(commands: dict[str, list[str]], watched, cwd: Path | None = None) -> dict:
    """{name: the modules of `watched` that a fresh process imports doing `commands[name]`} (see
    MODULES_LOADED_SCRIPT), the inference commands eager (LITLLM_COMPILE=0) on one thread."""
    env = dict(os.environ, LITLLM_COMPILE="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", MODULES_LOADED_SCRIPT, json.dumps(list(watched)),
                             json.dumps(commands)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def shared_data() -> Path:
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared data sets not available at {data}")
    return data


def reference_reply(model, tokenizer, prompt_ids, max_new_tokens: int, prompt_style=None) -> str:
    """A reply as the old post-hoc policy cut it (the oracle for streamed stops): greedy tokens with no
    stops, cut at the first EOS/stop id, decoded, cut at the first of the style's stop strings."""
    from litllm.engine import generate_ids

    tokens = generate_ids(model, [int(i) for i in prompt_ids], max_new_tokens)
    stops = set(tokenizer.stop_ids)
    if prompt_style is not None:  # stop strings that are one special token stop as that token
        stops |= {ids[0] for ids in prompt_style.stop_tokens(tokenizer) if len(ids) == 1}
    tokens = tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]
    text = tokenizer.decode(tokens)
    for s in (prompt_style.stop_strings if prompt_style is not None else ()):
        text = text.split(s)[0] if s else text
    return text


def make_im_end_checkpoint(source: Path, folder: Path, message: str, max_new_tokens: int = 20) -> list[int]:
    """A copy of the model folder `source` whose greedy chatml reply to `message` ends with the special
    token `<|im_end|>` (the output rows of `<|im_end|>` and of a token the reply first emits at k >= 2
    are swapped; nothing before it changes). Returns the reply's token ids before `<|im_end|>`."""
    from litllm.engine import generate_ids
    from litllm.model import GPT
    from litllm.model_folder import WEIGHTS_FILE, model_state_dict, save_model_weights
    from litllm.prompts import PromptStyle
    from litllm.tokenizer import Tokenizer

    shutil.copytree(source, folder)
    model, tok, style = GPT.from_checkpoint(folder).eval(), Tokenizer(folder), PromptStyle.from_name("chatml")
    im_end = tok.token_to_id("<|im_end|>")
    ids = style.encode(tok, style.render_messages([{"role": "user", "content": message}])).tolist()
    full = generate_ids(model, ids, max_new_tokens)
    assert im_end not in full and model.lm_head.weight is not model.wte.weight
    k = next(i for i in range(2, max_new_tokens) if full[i] not in full[:i])
    with torch.no_grad():
        w = model.lm_head.weight
        w[[full[k], im_end]] = w[[im_end, full[k]]]
    save_model_weights(model_state_dict(model), folder / WEIGHTS_FILE)
    return full[:k]


def write_lora_folder(model, folder: Path, hyperparameters: dict) -> Path:
    """A LoRA folder as `finetune_lora`'s final/ holds it, through the writers it uses: `hyperparameters.yaml`
    (which must record `checkpoint_dir`) and the LoRA weights alone in `lit_lora.safetensors`."""
    from litllm.hparams import write_hyperparameters
    from litllm.lora import lora_state_dict
    from litllm.model_folder import LORA_WEIGHTS, save_model_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_hyperparameters(folder, hyperparameters)
    save_model_weights({k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}, folder / LORA_WEIGHTS)
    return folder

