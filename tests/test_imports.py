"""Imports point down: no module of litllm imports, directly or through others, a module that imports it.

The graph is read from the source with `ast`, not from `sys.modules`, so it sees every import:
- top-level imports, AND imports inside functions (litllm imports heavy or upper modules lazily;
  a lazy import that points up is still a circle, it only fails later, at call time);
- not imports under `if TYPE_CHECKING:` (annotations only, never executed).
An edge A -> B means "A's code names module B": `from litllm.x import y` points to `litllm.x.y`
when that is a module, else to `litllm.x`. Importing `litllm.x.y` also executes the package
`litllm.x`, but that implicit edge is left out: a package's `__init__` re-exporting its own
submodules is not a circle in the layering.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import modules_loaded_by

ROOT = Path(__file__).resolve().parents[1] / "litllm"


def module_files() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """litllm modules that `name`'s code imports, anywhere but under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]  # `litllm.x.func` -> `litllm.x`
        if target.startswith("litllm") and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    package = package[: len(package) - child.level + 1]
                    base = ".".join(package + ([base] if base else []))
                for alias in child.names:
                    resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_top_level_and_lazy_imports():
    modules = module_files()
    # config.save imports litllm.utils inside the method; evaluate imports scoring at the top
    assert "litllm.utils" in imported_modules("litllm.config", modules["litllm.config"], modules)
    assert "litllm.scoring" in imported_modules("litllm.evaluate", modules["litllm.evaluate"], modules)
    # litllm/__init__.py's lazy attributes import the model, the config and the API
    assert {"litllm.model", "litllm.config", "litllm.api"} <= imported_modules("litllm", modules["litllm"], modules)


def test_no_import_cycle_in_litllm():
    modules = module_files()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---------------------------------------------------------------------- what a command imports when it runs
# Only training needs Lightning Fabric: `import lightning_fabric` costs a process ~1.7 s of CPU beyond torch's (1.4 of
# them torch._dynamo, which a training process's torch optimizer imports anyway; see litllm/train/fabric.py), and
# with `lightning` or torchmetrics installed ~4.6 s (torchmetrics pulls scipy, transformers, matplotlib; see
# benchmarks/startup.py). litdata is the training data's streaming.
TRAINING_ONLY = ("lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "scipy", "transformers",
                 "litdata")


def test_inference_commands_run_without_lightning(tiny_checkpoint, tmp_path):
    """`litllm generate/chat/serve/evaluate_perplexity` on one device, run to the end, never import Lightning (nor
    torchmetrics, scipy, transformers, litdata): a user's first seconds and every inference test process."""
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    ckpt = str(tiny_checkpoint)
    commands = {
        "generate": ["generate", ckpt, "--prompt", "Hello", "--max_new_tokens", "2"],
        "chat": ["chat", ckpt, "--max_new_tokens", "2"],
        "serve": ["serve", ckpt, "--port", "0"],
        "evaluate_perplexity": ["evaluate_perplexity", ckpt, "--data", str(text), "--out_dir", str(tmp_path / "ppl")],
        "tensor-parallel worker": ["import", "litllm.parallel.worker"],
    }
    assert modules_loaded_by(commands, TRAINING_ONLY, cwd=tmp_path) == {name: [] for name in commands}
