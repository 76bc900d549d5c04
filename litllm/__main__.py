"""The `litllm` command: a dispatch table of subcommands, nothing else.

Each subcommand is a function whose signature is its CLI (jsonargparse reads types, defaults
and docstrings). A run imports only its command's module and builds only its parser; `litllm --help`
lists the commands from their source (`_listing`) and imports none. Command modules import heavy
libraries (lightning, litdata, lm_eval, bitsandbytes) inside their functions, so `litllm CMD --help` stays fast.
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path
from typing import Callable, Optional

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
    "finetune_grpo": "litllm.finetune:finetune_grpo",
    "merge_lora": "litllm.lora:merge_lora",
    "evaluate": "litllm.evaluate:evaluate",
    "evaluate_perplexity": "litllm.evaluate:evaluate_perplexity",
}
# commands that parse their own arguments: `litllm estimate COMMAND [that command's flags]`
RAW_COMMANDS: dict[str, str] = {"estimate": "litllm.estimate_cli:main"}
# their entries in `litllm --help` (a stub whose docstring jsonargparse lists)
RAW_COMMAND_HELP: dict[str, str] = {"estimate": "litllm.cli_utils:estimate"}


def _load(target: str):
    module, _, fn = target.partition(":")
    return getattr(import_module(module), fn)


def _listing(target: str):
    """A stand-in for a command in `litllm --help`: a function with no parameters and the command's docstring, read
    from its source with `ast`. Importing the command's module (torch, ~2 CPU-s for all of them) and building its
    parser (jsonargparse reads every flag's type and docstring) only to print one line per command would cost
    `litllm --help` ~40x its own work; jsonargparse lists a command by its name and the docstring's first
    paragraph, which the stand-in has verbatim."""
    import ast

    module, _, fn = target.partition(":")
    parts = module.split(".")
    # the command's source, found without importing its package (`litllm.train` imports torch)
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    source = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
    nodes = ast.parse(source.read_text(encoding="utf-8")).body if parts[0] == "litllm" and source else ()
    found = next((n for n in nodes if isinstance(n, ast.FunctionDef) and n.name == fn), None)
    if found is None:  # not a plain function of a litllm source file: the real one
        return _load(target)

    def command() -> None:
        raise AssertionError("litllm --help's listing of a command is never run")

    command.__name__ = command.__qualname__ = fn
    command.__doc__ = ast.get_docstring(found)
    return command


def append_repeated(argv: list[str], flags) -> list[str]:
    """`--flag x --flag y` -> jsonargparse's `--flag+ x --flag+ y` (a list flag given several times, as TRL users
    write `--reward accuracy --reward format`): a job's fields declared `litllm.flags.repeatable`, which
    `job_command` lists in the command's `repeatable_flags`."""
    out = []
    for a in argv:
        name, eq, value = a.partition("=")
        out.append(f"{name}+{eq}{value}" if name in flags else a)
    return out


def positionals_after_config(argv: list[str], start: int) -> list[str]:
    """`litllm finetune_lora CKPT --config recipe.yaml`: the folder typed on the command line is the one the run
    uses, not the recipe's `checkpoint_dir`. jsonargparse applies the arguments in order, so a recipe read after a
    positional replaced it (silently, when the recipe's folder exists): the command's positionals move after the
    recipes. `start`: where the command's arguments begin. Every flag here takes one value (`--flag=value` or
    `--flag value`), except the switches below."""
    if not any(a.partition("=")[0] == "--config" for a in argv):
        return argv
    flags, positionals, value_next = [], [], False
    for a in argv[start:]:
        if value_next or a.startswith("-"):
            flags.append(a)
            value_next = not value_next and "=" not in a and a not in ("--help", "-h", "--print_config")
        else:
            positionals.append(a)
    return [*argv[:start], *flags, *positionals]


def fill_bare_flags(argv: list[str], flags, value: str = "") -> list[str]:
    """`--flag` given with no value (last, or followed by another flag) -> `--flag=<value>` (default: empty).

    A command lists such flags in its function's `flags_without_value` (`litllm evaluate --tasks`);
    `litllm estimate` fills its `--json` switch with `true`.
    """
    return [
        f"{a}={value}" if a in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else a
        for i, a in enumerate(argv)
    ]


# the flags whose value jsonargparse resolves as an optimizer class name
OPTIMIZER_FLAGS = ("--optimizer", "--optimizer.class_path", "--optimizer.help")


def _torch_optimizer_path(name: str) -> str:
    """A bare torch.optim optimizer class name as its dotted path ("AdamW" -> "torch.optim.AdamW"); any other
    value unchanged."""
    import torch.optim

    cls = getattr(torch.optim, name, None) if name.isidentifier() else None
    return f"torch.optim.{name}" if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else name


def qualify_bare_optimizer(argv: list[str]) -> list[str]:
    """`--optimizer AdamW` -> `--optimizer torch.optim.AdamW` (likewise `--optimizer=`, `--optimizer.class_path`,
    `--optimizer.help`). jsonargparse resolves a bare class name among every loaded subclass of
    torch.optim.Optimizer: once a process has imported bitsandbytes.optim (its own AdamW, Adam, SGD...), the name
    is ambiguous. A bare name means torch.optim's class; dotted paths and names torch.optim lacks (a misspelling
    gets jsonargparse's error, which `_suggestion` turns into one line) pass unchanged."""
    if not any(a.partition("=")[0] in OPTIMIZER_FLAGS for a in argv):
        return argv
    out = []
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if eq and name in OPTIMIZER_FLAGS:
            a = f"{name}={_torch_optimizer_path(value)}"
        elif i and argv[i - 1] in OPTIMIZER_FLAGS:
            a = _torch_optimizer_path(a)
        out.append(a)
    return out


def skip_optimizer_params_in_class_parsers() -> None:
    """Let `--optimizer bitsandbytes.optim.PagedAdamW8bit --optimizer.lr 1e-4` replace a default optimizer that has
    init_args (finetune's AdamW). On that class_path change jsonargparse (4.53) builds the new class's parser to see
    which old init_args it still takes, but without skipping the `params` that the `Callable[[params], Optimizer]`
    type supplies: torch's optimizers annotate `params`, bitsandbytes' do not, and the check died with a traceback.
    An optimizer's parser here always skips its first positional argument, as jsonargparse's own parse of the flag
    does."""
    from jsonargparse._typehints import ActionTypeHint

    build = ActionTypeHint.get_class_parser
    if getattr(build, "skips_optimizer_params", False):
        return

    def get_class_parser(val_class, sub_add_kwargs=None, skip_args=None):
        import torch  # loaded already: every command with an --optimizer flag imports it

        cls = _import_class(val_class) if isinstance(val_class, str) else val_class
        if skip_args is None and isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            skip_args = {1}
        return build(val_class, sub_add_kwargs, skip_args)

    get_class_parser.skips_optimizer_params = True
    ActionTypeHint.get_class_parser = staticmethod(get_class_parser)


def _fail(line: str, code: int = 1) -> None:
    """Print the error on a line of its own (closing any progress bar left open mid-line) and exit."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    print(line, file=sys.stderr)
    raise SystemExit(code) from None


def _subclasses(typehint) -> dict[str, type]:
    """Every class a class-typed flag accepts (the classes in `typehint` and their subclasses, the return class of a
    `Callable[..., cls]` such as `--optimizer`'s), by name. `str` in a Union accepts any text, not its subclasses;
    `None` (an Optional's) is no class to choose."""
    import collections.abc
    import inspect
    import typing

    found: dict[str, type] = {}
    args = typing.get_args(typehint) or (typehint,)
    args = [typing.get_args(t)[-1] if typing.get_origin(t) is collections.abc.Callable else t for t in args]
    todo = [t for t in args if inspect.isclass(t) and t not in (str, type(None))]
    while todo:
        cls = todo.pop()
        if cls.__name__ not in found and not cls.__name__.startswith("_"):
            found[cls.__name__] = cls
            todo.extend(cls.__subclasses__())
    return found


def _closest(word: str, candidates: dict[str, str], what: str, limit: Optional[int] = 12) -> str:
    """`did you mean X?` for the candidate (shown as key, compared by value, case-insensitively) closest to
    `word`, or `expected <what>: ...` when none is close."""
    from difflib import get_close_matches

    by_word = {value.lower(): shown for shown, value in candidates.items()}
    close = get_close_matches(word.lower(), by_word, n=1, cutoff=0.6)
    if close:
        return f"did you mean {by_word[close[0]]}?"
    listed = sorted(candidates)
    more = limit is not None and len(listed) > limit
    return f"expected {what}: {', '.join(listed[:limit])}{', ...' if more else ''}"


def _import_class(path: str) -> Optional[type]:
    module, _, name = path.rpartition(".")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


VALUE_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text", "Path": "a path",
               "NoneType": "null"}
"""How a mistyped value's error names the types a flag takes."""


def _takes_bool(typehint) -> bool:
    """Whether a flag's type is bool or Optional[bool] (a string annotation included, as `from __future__ import
    annotations` leaves a class's signature)."""
    import typing

    return typehint in (bool, "bool", "Optional[bool]", "bool | None") or bool in typing.get_args(typehint)


def _missing_value(flag: str, parser, argv: list[str]) -> str:
    """One line for a flag given with no value (`--adapter_only` as a switch): the flag as typed and what it takes.
    jsonargparse names a class's option (`--data.packing`) by its class flag (`--data`), so the flag is found in argv:
    the one under that name followed by another flag or by nothing."""
    import inspect

    given = next((a for i, a in enumerate(argv) if (a == flag or a.startswith(f"{flag}."))
                  and (i + 1 == len(argv) or argv[i + 1].startswith("--"))), flag)
    action = next((a for a in parser._actions if flag in a.option_strings), None)
    typehint = getattr(action, "_typehint", None)
    if given != flag:  # an option of the class named after `--data`: its annotation in the class's signature
        chosen = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag), "")
        cls = _subclasses(typehint).get(chosen) or (_import_class(chosen) if "." in chosen else None)
        param = inspect.signature(cls).parameters.get(given.rpartition(".")[2]) if cls else None
        typehint = param.annotation if param else None
    if _takes_bool(typehint):
        return f"{given} takes true or false: {given} true"
    return f"{given}: expected a value after it"


def _recipe_in_checkout(path: Path) -> str:
    """" (litllm's recipe is <checkout>/config_hub/...)" where `path` is a `config_hub/...` recipe path as the docs
    write it (run from the root of litllm's checkout) and the command ran elsewhere; else ""."""
    if "config_hub" not in path.parts:
        return ""
    recipe = Path(__file__).resolve().parents[1].joinpath(*path.parts[path.parts.index("config_hub"):])
    return f" (litllm's recipe is {recipe})" if recipe.is_file() else ""


def _suggestion(message: str, parser, chosen: Optional[str], argv: list[str] = ()) -> Optional[str]:
    """One line for a misspelled flag, nested option, class name, choice or recipe file, a mistyped or missing value
    or a missing positional (instead of jsonargparse's dump), or None. `argv`: the arguments as given."""
    import inspect
    import re

    sub = getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {}).get(chosen, parser)
    no_value = re.search(r"argument (--[\w.]+): expected one argument", message)
    if no_value:  # `--adapter_only` as a switch: every flag takes a value
        return _missing_value(no_value.group(1), sub, list(argv))
    options = {s: s.removeprefix("--") for a in sub._actions for s in a.option_strings
               if s.startswith("--") and not s.endswith(".help")}
    unknown = re.search(r"unrecognized arguments: (.*)", message)
    if unknown:
        flags = [a.split("=")[0] for a in unknown.group(1).split() if a.startswith("--")]
        if not flags:
            return None
        return f"unknown flag {flags[0]} ({_closest(flags[0].removeprefix('--'), options, 'a flag')})"
    class_required = re.search(r'Parser key "([\w.]+)":.*? class_path \'(?:[\w.]+\.)?(\w+)\': the following arguments '
                               r'are required: ([\w, ]+)', message)
    if class_required:  # `--data JSON` without `--data.json_path`: the class's option, not jsonargparse's Union dump
        flag = f"--{class_required.group(1)}"
        names = [f"{flag}.{name.strip()}" for name in class_required.group(3).split(",")]
        them = "it" if len(names) == 1 else "them"
        return f"missing {', '.join(names)}: {flag} {class_required.group(2)} needs {them}"
    required = re.search(r"the following arguments are required: (.+)", message)
    if required and chosen:  # `litllm generate` with no folder: its positional names, not `generate.checkpoint_dir`
        names = [name.strip().removeprefix(f"{chosen}.") for name in required.group(1).split(",")]
        usage = " ".join(a.dest.upper() for a in sub._actions if not a.option_strings and a.dest != "help")
        return f"missing {', '.join(names)}: litllm {chosen} {usage} [flags]"
    mistyped = (re.search(r'Parser key "([\w.]+)": Expected a (<class [^>]+>)\. Got value: (.*)$', message)
                or re.search(r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes '
                             r'Subtypes: \[(.*?)\] Errors: .* Given value: (.*)$', message))
    if mistyped:  # `--train.max_steps abc`: the flag and the type it takes, not jsonargparse's Union dump
        class_re = r"<class '(?:[\w.]+\.)?(\w+)'>"
        types = [VALUE_TYPES.get(name) for name in re.findall(class_re, mistyped.group(2))]
        plain = not re.sub(class_re, "", mistyped.group(2)).strip(", ")  # no class-typed or generic member
        if types and all(types) and plain and not mistyped.group(3).startswith("NestedArg("):
            return f"--{mistyped.group(1)}: expected {' or '.join(types)}, got {mistyped.group(3)!r}"
    literal = re.search(r'Parser key "([\w.]+)": Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$', message)
    if literal:  # `--strategy fdsp`
        choices = {choice: choice for choice in re.findall(r"'([^']*)'", literal.group(2))}
        return f"--{literal.group(1)} {literal.group(3)}: {_closest(literal.group(3), choices, 'one of', limit=None)}"
    missing = re.search(r"Parser key \"config\": File does not exist: '(.+)'", message)
    if missing:  # a misspelled recipe name: `debug.yml` for `debug.yaml`
        path = Path(missing.group(1))
        recipes = {p.name: p.name for p in path.parent.glob("*.y*ml")} if path.parent.is_dir() else {}
        hint = _closest(path.name, recipes, "a recipe")
        if hint.startswith("did you mean"):
            return f"--config {path}: file not found ({hint})"
        return f"--config {path}: file not found{_recipe_in_checkout(path)}"
    key = re.search(r'Parser key "([\w.]+)"', message)
    if key is None:
        return None
    action = next((a for a in sub._actions if a.dest == key.group(1)), None)
    classes = _subclasses(getattr(action, "_typehint", None))
    option = (re.search(r"class_path '([\w.]+)': Option '(\w+)' is not accepted", message)
              or re.search(r"Option '(\w+)' is not accepted.*?class_path='([\w.]+)'", message))
    if option:
        path, bad = option.groups() if option.re.pattern.startswith("class_path") else option.groups()[::-1]
        cls = _import_class(path)
        if cls is None:
            return None
        flag = f"--{key.group(1)}"
        fields = {f"{flag}.{name}": name for name in inspect.signature(cls).parameters}
        hint = _closest(bad, fields, "one of") if fields else f"name a class first: {flag} CLASS"
        # `--data.json_path FILE` with no `--data JSON` before it: the option belongs to a class not chosen yet
        owners = sorted(name for name, c in classes.items() if bad in inspect.signature(c).parameters)
        if not hint.startswith("did you mean") and owners:
            hint = f"it is an option of {flag} {' or '.join(owners)}: name the class before it"
        return f"{flag}.{bad}: {cls.__name__} has no option {bad!r} ({hint})"
    name = re.search(r"Expected a dot import path string: (\S+)", message)
    if name and classes:
        found = {c: c for c in classes}
        return f"--{key.group(1)} {name.group(1)}: no such class ({_closest(name.group(1), found, 'one of')})"
    return None


def suggested(message: str, build: Callable, chosen: Optional[str], argv: list[str] = ()) -> str:
    """`_suggestion`'s line for jsonargparse's error `message`, else `message`; `build()` builds the parser again
    (only on this error path) for its own option names."""
    from jsonargparse import capture_parser

    try:
        return _suggestion(message, capture_parser(build), chosen, argv) or message
    except Exception:  # a suggestion is a courtesy: the original message stands
        return message


def _quiet_libraries() -> None:
    """Silence, at their source, library messages that tell a litllm user nothing they can act on."""
    import warnings

    # Lightning on any machine with Slurm installed, for every single-node run (multi-node runs use srun)
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    # torch 2.13's own export machinery rebuilding its LeafSpec (copyreg), once per decode-step compile
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


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
    argv = argv or ["--help"]  # a bare `litllm` lists the commands rather than erring that none was given
    if argv[:1] == ["--version"]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"litllm {version('litllm')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("litllm (not installed: run from a source tree)")
        return
    if argv and argv[0] in RAW_COMMANDS:
        try:
            return _load(RAW_COMMANDS[argv[0]])(argv[1:])
        except LitLLMError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    _quiet_libraries()
    # only the chosen command's module is imported and its parser built
    chosen = next((a for i, a in enumerate(argv) if not a.startswith("-") and argv[i - 1:i] != ["--config"]), None)
    listed = {**COMMANDS, **RAW_COMMAND_HELP}  # `litllm --help` lists estimate too (it parses its own flags)
    if chosen in COMMANDS:
        components = {chosen: _load(COMMANDS[chosen])}
    elif any(a.partition("=")[0] in ("--config", "--print_config") for a in argv):
        # a recipe may name the command (`subcommand: generate`): every real parser, as jsonargparse needs
        components = {name: _load(target) for name, target in listed.items()}
    else:  # `litllm --help`, a bare `litllm`, an unknown command: names and docstrings are all jsonargparse reads
        components = {name: _listing(target) for name, target in listed.items()}
    if chosen in components:
        argv = fill_bare_flags(argv, getattr(components[chosen], "flags_without_value", ()))
        argv = positionals_after_config(argv, argv.index(chosen) + 1)
        argv = append_repeated(argv, getattr(components[chosen], "repeatable_flags", ()))
        argv = qualify_bare_optimizer(argv)
        skip_optimizer_params_in_class_parsers()

    try:
        _check_config_files(argv)
        # exit_on_error=False: a bad flag, value or recipe raises instead of printing the whole usage text
        CLI(components, args=argv, as_positional=True, prog="litllm", exit_on_error=False)
    except ArgumentError as e:
        help_hint = f"litllm {chosen} --help" if chosen in components else "litllm --help"
        message = " ".join(str(e).split())
        if "invalid choice" in message and chosen is not None:
            commands = {name: name for name in [*COMMANDS, *RAW_COMMANDS]}
            message = f"unknown command {chosen!r} ({_closest(chosen, commands, 'one of')})"
        else:
            message = suggested(message, lambda: CLI(components, args=argv, as_positional=True, prog="litllm"),
                                chosen, argv)
        _fail(f"error: {message} (see `{help_hint}`)", code=2)
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
