"""Commands that share flags: a dataclass's fields published as flat flags of a command.

`@with_flags("lora", LoRASettings, prefix="lora_")` gives `finetune_lora` the flags `--lora_r`,
`--lora_alpha`, ... documented once, on the dataclass's attributes; `litllm.train.args.with_run_args`
does the same for the flags of every training command. jsonargparse (and `help()`) read the public
signature and docstring these decorators write.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable


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
        flat = [inspect.Parameter(prefix + f.name, params[at].kind, default=f.default, annotation=hints[f.name])
                for f in fields]
        public = signature.replace(parameters=params[:at] + flat + params[at + 1:])

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            packed = {f.name: arguments.pop(prefix + f.name) for f in fields}
            return command(**arguments, **{param: packed})

        return publish(wrapper, command, public, {prefix + f.name: docs.get(f.name, "") for f in fields})

    return decorate
