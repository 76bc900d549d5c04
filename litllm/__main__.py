"""The `litllm` command: a dispatch table of subcommands, nothing else.

Each subcommand is a function whose signature is its CLI (jsonargparse reads types, defaults
and docstrings). Command modules import heavy libraries (lightning, litdata, lm_eval,
bitsandbytes) inside their functions, so `litllm --help` stays fast.
"""

from __future__ import annotations

import sys
from importlib import import_module

# command name -> "module:function"
COMMANDS: dict[str, str] = {
    "list_models": "litllm.cli_utils:list_models",
    "download": "litllm.download:download",
    "convert_to_litllm": "litllm.convert:convert_to_litllm",
    "convert_from_litllm": "litllm.convert:convert_from_litllm",
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


def main(argv: list[str] | None = None) -> None:
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
        CLI(components, args=argv, as_positional=True, prog="litllm")
    except LitLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
