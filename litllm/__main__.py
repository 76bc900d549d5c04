"""The `litllm` command: a dispatch table of subcommands, nothing else.

Each subcommand is a function whose signature is its CLI (jsonargparse reads types, defaults
and docstrings). Command modules import heavy libraries (lightning, litdata, lm_eval,
bitsandbytes) inside their functions, so `litllm --help` stays fast.
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

# command name -> "module:function"
COMMANDS: dict[str, str] = {
    "list_models": "litllm.cli_utils:list_models",
    "download": "litllm.download:download",
    "convert_to_litllm": "litllm.convert:convert_to_litllm",
    "convert_from_litllm": "litllm.convert:convert_from_litllm",
    "convert_to_gguf": "litllm.gguf_export:convert_to_gguf",
    "convert_pretrained_checkpoint": "litllm.train.checkpoints:convert_pretrained_checkpoint",
    "generate": "litllm.generate:generate",
    "chat": "litllm.chat:chat",
    "serve": "litllm.serve.server:serve",
    "train_tokenizer": "litllm.data.train_tokenizer:train_tokenizer",
    "prepare_slimpajama": "litllm.data.prepare_slimpajama:prepare",
    "prepare_starcoder": "litllm.data.prepare_starcoder:prepare",
    "pretrain": "litllm.pretrain:setup",
    "finetune": "litllm.finetune:finetune_lora",
    "finetune_lora": "litllm.finetune:finetune_lora",
    "finetune_full": "litllm.finetune:finetune_full",
    "finetune_adapter": "litllm.finetune:finetune_adapter",
    "finetune_adapter_v2": "litllm.finetune:finetune_adapter_v2",
    "finetune_dpo": "litllm.finetune:finetune_dpo",
    "merge_lora": "litllm.lora:merge_lora",
    "evaluate": "litllm.evaluate:evaluate",
    "evaluate_perplexity": "litllm.evaluate:evaluate_perplexity",
}
# commands that parse their own arguments: `litllm estimate COMMAND [that command's flags]`
RAW_COMMANDS: dict[str, str] = {"estimate": "litllm.estimate_cli:main"}


def _load(target: str):
    module, _, fn = target.partition(":")
    return getattr(import_module(module), fn)


def _fill_bare_flags(argv: list[str], flags) -> list[str]:
    """`--flag` given with no value (last, or followed by another flag) -> `--flag=` (an empty value).

    A command lists such flags in its function's `flags_without_value` (`litllm evaluate --tasks`).
    """
    return [
        f"{a}=" if a in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else a
        for i, a in enumerate(argv)
    ]


def _fail(line: str, code: int = 1) -> None:
    """Print the error on a line of its own (closing any progress bar left open mid-line) and exit."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    print(line, file=sys.stderr)
    raise SystemExit(code) from None


def _check_config_files(argv: list[str]) -> None:
    """`--config FILE` must be readable UTF-8 text (jsonargparse reports a missing or invalid YAML file itself)."""
    from litllm.errors import LitLLMError

    for i, arg in enumerate(argv):
        path = arg.partition("=")[2] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        if path and Path(path).is_file():
            try:
                Path(path).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise LitLLMError(f"--config {path}: not a readable YAML text file ({type(e).__name__})") from None


def main(argv: list[str] | None = None) -> None:
    from argparse import ArgumentError

    from jsonargparse import CLI, set_parsing_settings

    from litllm.errors import LitLLMError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in RAW_COMMANDS:
        try:
            return _load(RAW_COMMANDS[argv[0]])(argv[1:])
        except LitLLMError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # only the chosen command's module is imported; `--help` with no command needs them all
    chosen = next((a for a in argv if not a.startswith("-")), None)
    names = [chosen] if chosen in COMMANDS else list(COMMANDS)
    components = {name: _load(COMMANDS[name]) for name in names}
    if chosen in components:
        argv = _fill_bare_flags(argv, getattr(components[chosen], "flags_without_value", ()))

    try:
        _check_config_files(argv)
        # exit_on_error=False: a bad flag, value or recipe raises instead of printing the whole usage text
        CLI(components, args=argv, as_positional=True, prog="litllm", exit_on_error=False)
    except ArgumentError as e:
        help_hint = f"litllm {chosen} --help" if chosen in components else "litllm --help"
        _fail(f"error: {' '.join(str(e).split())} (see `{help_hint}`)", code=2)
    except LitLLMError as e:
        _fail(f"error: {e}")
    except OSError as e:
        # the file system refused a write no check caught in advance (a disk that filled up mid-run, ...):
        # one line naming the path; atomic writers have already removed their temporary files
        from litllm.utils import WRITE_ERRORS

        if e.filename is None and e.errno not in WRITE_ERRORS:
            raise
        reason = WRITE_ERRORS.get(e.errno, e.strerror)
        where = f"{e.filename}: " if e.filename is not None else ""
        _fail(f"error: {where}{reason} ({type(e).__name__}: {e.strerror})")
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
