"""A command's flags as one typed job: a dataclass published as the command's flat flags, bound once.

A training command is a function of its job, `def finetune_lora(job: LoRAJob)`; `@job_command` turns it
into the command jsonargparse reads, with one flag per field of the job, in the order of the job's
`__init__` (so fields declared after `_: KW_ONLY` come last, a subclass's own fields before them):

- a plain field is one flag (`--out_dir`); a dataclass field is a group (`--train.micro_batch_size`),
  as jsonargparse shows any dataclass argument;
- a field declared `flat(prefix, cls)` publishes each field of `cls` as a flat flag `prefix + name`
  (`lora: LoRASettings = flat("lora_", LoRASettings)` gives `--lora_r`, `run: RunArgs = flat("", ...)`
  gives `--devices`), its defaults those of the field's default instance.

Help texts are the fields' attribute docstrings (a subclass may redeclare a field to change its default
or its text). The command binds its flags once into the job and receives it. `flatten(job)` is the job
as its flat flags (what `hyperparameters.yaml` records) and `unflatten(cls, flags)` reads such a
mapping back through the same field map (a flag it lacks keeps its default).

`@with_flags("load", LoadArgs)` does the same for a decode command, which takes a dict of one dataclass's fields.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Mapping, NamedTuple, Optional

FLAT = "litllm.flags.flat"
"""Field metadata key: the prefix of the flat flags a `flat` field publishes."""


def flat(prefix: str, cls: type, default: Optional[Callable[[], Any]] = None) -> Any:
    """A job field whose dataclass `cls` is published as flat flags `prefix + field name`; its default is
    `default()` (a factory), or `cls()`."""
    return dataclasses.field(default_factory=default or cls, metadata={FLAT: prefix})


REPEATABLE = "litllm.flags.repeatable"
"""Field metadata key: a list flag that may be given several times (`--reward a --reward b`)."""


def repeatable(default: Any = None) -> Any:
    """A list-valued job field whose flag may be given several times, each adding an item (`--reward a --reward
    b`, as TRL users write it); `litllm.__main__` reads the command's `repeatable_flags`."""
    return dataclasses.field(default=default, metadata={REPEATABLE: True})


def attribute_docs(cls: type) -> dict[str, str]:
    """{field: its attribute docstring}, joined into one line."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def publish(wrapper: Callable, command: Callable, public: inspect.Signature, docs: dict[str, str]) -> Callable:
    """Show `wrapper` with the signature `public` and `command`'s docstring plus `docs` ({flag: help}) in its `Args:`."""
    del wrapper.__wrapped__  # jsonargparse and help() read the public signature, not the command's
    wrapper.__signature__ = public
    doc = (command.__doc__ or "").rstrip()
    if "\n    Args:\n" not in doc:
        doc += "\n\n    Args:"
    wrapper.__doc__ = doc + "\n" + "".join(f"        {name}: {text}\n" for name, text in docs.items())
    return wrapper


# ---------------------------------------------------------------------- the field map
class Flag(NamedTuple):
    name: str
    annotation: Any
    default: Any
    """`inspect.Parameter.empty` for a required flag."""
    help: str
    repeatable: bool = False


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """`cls`'s fields in the order of its `__init__`: positional ones first, then keyword-only ones."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    return [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def _docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of `cls` and its dataclass bases (a subclass's text wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(attribute_docs(klass))
    return docs


def job_flags(cls: type, defaults: Any = None, prefix: str = "") -> list[Flag]:
    """Every flag of the job class `cls`, in order (`defaults`: an instance whose values are the defaults)."""
    hints = typing.get_type_hints(cls)
    docs = _docs(cls)
    flags = []
    for f in _init_fields(cls):
        default = _default(f) if defaults is None else getattr(defaults, f.name)
        if FLAT in f.metadata:
            flags += job_flags(hints[f.name], default, prefix + f.metadata[FLAT])
        else:
            flags.append(Flag(prefix + f.name, hints[f.name], default, docs.get(f.name, ""), REPEATABLE in f.metadata))
    return flags


def flatten(job: Any, prefix: str = "") -> dict[str, Any]:
    """The job as its flags {flag: value}, in order (nested dataclasses of plain fields stay values)."""
    values: dict[str, Any] = {}
    for f in _init_fields(type(job)):
        value = getattr(job, f.name)
        if FLAT in f.metadata:
            values.update(flatten(value, prefix + f.metadata[FLAT]))
        else:
            values[prefix + f.name] = value
    return values


def unflatten(cls: type, flags: Mapping[str, Any], prefix: str = "", defaults: Any = None) -> Any:
    """The `cls` (a job class or a flat field's dataclass) whose flags are `flags`, as `flatten` writes them;
    a flag missing from `flags` keeps its default (that of `defaults` if given), keys that are no flag are ignored."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in _init_fields(cls):
        if FLAT in f.metadata:
            nested = _default(f)
            values[f.name] = unflatten(hints[f.name], flags, prefix + f.metadata[FLAT],
                                       None if nested is inspect.Parameter.empty else nested)
        elif prefix + f.name in flags:
            values[f.name] = _typed(hints[f.name], flags[prefix + f.name], _default(f))
    return dataclasses.replace(defaults, **values) if defaults is not None else cls(**values)


def _typed(hint: Any, value: Any, default: Any) -> Any:
    """A dataclass field's value read as plain data (a mapping, from hyperparameters.yaml) -> the dataclass, its
    missing keys from the field's default; any other value as it is."""
    if not (dataclasses.is_dataclass(hint) and isinstance(value, Mapping)):
        return value
    return dataclasses.replace(default, **value) if dataclasses.is_dataclass(default) else hint(**value)


def job_command(command: Callable) -> Callable:
    """`command(job: SomeJob)` -> the command with `SomeJob`'s flags as its parameters (see the module's
    docstring). It binds them once into a `SomeJob` and calls `command(job)`; `.bind(*args, **flags)` does
    only the binding (`litllm estimate`), `.job_class` is `SomeJob`, `.repeatable_flags` its `repeatable` flags."""
    job_class = typing.get_type_hints(command)["job"]
    flags = job_flags(job_class)
    P = inspect.Parameter
    public = inspect.Signature(
        [P(f.name, P.POSITIONAL_OR_KEYWORD, default=f.default, annotation=f.annotation) for f in flags],
        return_annotation=inspect.signature(command, eval_str=True).return_annotation,
    )

    def bind(*args: Any, **kwargs: Any) -> Any:
        bound = public.bind(*args, **kwargs)
        bound.apply_defaults()
        return unflatten(job_class, bound.arguments)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return command(bind(*args, **kwargs))

    wrapper.bind, wrapper.job_class = bind, job_class
    wrapper.repeatable_flags = tuple(f"--{f.name}" for f in flags if f.repeatable)
    return publish(wrapper, command, public, {f.name: f.help for f in flags})


def with_flags(param: str, cls: type, prefix: str = "") -> Callable[[Callable], Callable]:
    """Give a command the fields of the dataclass `cls` as flat flags (`prefix` + field name) in place of
    its argument `param`, which receives them as a dict {field: value} (`cls(**param)` when the command
    needs one, so checks run where the command chooses). Help texts come from `cls`'s attribute
    docstrings, appended to the command's `Args:`; defaults are the fields' defaults."""
    fields = dataclasses.fields(cls)
    docs = attribute_docs(cls)
    hints = inspect.get_annotations(cls, eval_str=True)

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index(param)
        flat_params = [inspect.Parameter(prefix + f.name, params[at].kind, default=f.default, annotation=hints[f.name])
                       for f in fields]
        public = signature.replace(parameters=params[:at] + flat_params + params[at + 1:])

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            packed = {f.name: arguments.pop(prefix + f.name) for f in fields}
            return command(**arguments, **{param: packed})

        return publish(wrapper, command, public, {prefix + f.name: docs.get(f.name, "") for f in fields})

    return decorate
