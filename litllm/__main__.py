"""The `litllm` command: a dispatch table of subcommands, nothing else.

Each subcommand is a function whose signature is its CLI (jsonargparse reads types, defaults
and docstrings). Command modules import heavy libraries (lightning, litdata, lm_eval,
bitsandbytes) inside their functions, so `litllm --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

# command name -> "module:function"
COMMANDS: dict[str, str] = {
    "list_models": "litllm.cli_utils:list_models",
    "convert_to_litllm": "litllm.convert:convert_to_litllm",
    "convert_from_litllm": "litllm.convert:convert_from_litllm",
}


def _load(target: str):
    module, _, fn = target.partition(":")
    return getattr(import_module(module), fn)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, set_parsing_settings

    from litllm.errors import LitLLMError

    argv = sys.argv[1:] if argv is None else argv
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # only the chosen command's module is imported; `--help` with no command needs them all
    chosen = next((a for a in argv if not a.startswith("-")), None)
    names = [chosen] if chosen in COMMANDS else list(COMMANDS)
    components = {name: _load(COMMANDS[name]) for name in names}
    try:
        CLI(components, args=argv, as_positional=True)
    except LitLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
