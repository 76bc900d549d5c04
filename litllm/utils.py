"""Small helpers shared by commands: output-path checks, atomic writes, JSON files."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from litllm.errors import LitLLMError


# errno -> what it means for an output path (the rest of the sentence is the caller's)
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted (an immutable or protected folder)",
    errno.EEXIST: "a file is in the way",
    errno.ENOTDIR: "a file is in the way where a folder was expected",
    errno.EISDIR: "a folder is in the way where a file was expected",
}
_FULL_BELOW = 1 << 20  # a write that failed on a device with less free space than this failed for lack of it


class OutputWriteError(LitLLMError):
    """An output could not be written: `path` names the output (not a temporary file), `reason` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: cannot write it ({reason}); free some space or choose another output path"
                         if "space" in reason or "quota" in reason else f"{path}: cannot write it ({reason})")
        self.path, self.reason = path, reason


def _existing_ancestor(path: Path) -> Path:
    """`path` itself, or its nearest ancestor that exists (whatever it is)."""
    path = Path(os.path.abspath(path))
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | Path, what: str = "--out_dir") -> Path:
    """Fail clearly, before any work, unless `path` is a folder (or can become one) this process can write in.

    Creates nothing: a one-byte probe file goes into `path` or its nearest existing ancestor and is
    removed again. Catches a file in the way, a read-only file system, missing permissions and a
    full device, each as one line naming `what` and `path`.
    """
    path = Path(path)
    existing = _existing_ancestor(path)
    if not existing.is_dir():
        where = "exists and is a file" if existing == Path(os.path.abspath(path)) else f"{existing} is a file"
        raise LitLLMError(f"{what} {path}: {where}; expected a folder (or a path that doesn't exist yet)")
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".litllm-write-check-")
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        reason = WRITE_ERRORS.get(e.errno, e.strerror or type(e).__name__)
        inside = "" if existing == Path(os.path.abspath(path)) else f" (in {existing})"
        raise LitLLMError(f"{what} {path}: can't write there{inside}: {reason}") from None
    return path


def write_error(path: Path, error: BaseException) -> OutputWriteError | None:
    """`error`, raised while writing `path`, as an `OutputWriteError` when the file system caused it.

    Writers don't all say so: `torch.save` on a full disk raises a RuntimeError about stream
    positions, so a failure on a (nearly) full device counts as one whatever its type.
    """
    if isinstance(error, OutputWriteError):
        return OutputWriteError(path, error.reason)  # a nested atomic_path: name the outer output
    if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
        return OutputWriteError(path, WRITE_ERRORS[error.errno])
    if isinstance(error, Exception) and not isinstance(error, LitLLMError):
        try:
            if shutil.disk_usage(_existing_ancestor(path)).free < _FULL_BELOW:
                return OutputWriteError(path, WRITE_ERRORS[errno.ENOSPC])
        except OSError:
            pass
        if "No space left on device" in str(error):  # e.g. safetensors' SafetensorError
            return OutputWriteError(path, WRITE_ERRORS[errno.ENOSPC])
    return None


@contextmanager
def temporarily(get: Callable[[], Any], set: Callable[[Any], Any], value: Any) -> Iterator[None]:
    """Run a block with a process-wide setting at `value` (None: unchanged), restored afterwards, e.g.
    `temporarily(torch.get_num_threads, torch.set_num_threads, 4)`."""
    before = get()
    if value is None or value == before:
        yield
        return
    set(value)
    try:
        yield
    finally:
        set(before)


@contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device (shapes only) without running `torch.nn.init`'s initialisers, as
    transformers' `no_init_weights` does: on meta they compute nothing, but their random ops run torch's Python
    reference kernels, whose first call imports `torch._dynamo` (~1 CPU-s, a third of an eager `generate`'s start)."""
    import torch

    initialisers = {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)
                    if name.endswith("_") and not name.startswith("_")}  # normal_, kaiming_uniform_, zeros_, ...
    for name in initialisers:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, initialiser in initialisers.items():
            setattr(torch.nn.init, name, initialiser)


@contextmanager
def kept_modules(model) -> Iterator[None]:
    """Run a block that may swap `model`'s submodules in place (a compiled decode step's layout,
    `litllm.compile_decode.unpack_weights`: Linears as `OneRowLinear`/`RowSplitLinear` on the same weights); at exit
    every module of the tree on entry has its children of then again (what the block added under new names stays)."""
    children = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()]
    try:
        yield
    finally:
        for parent, name, child in children:
            if parent._modules.get(name, child) is not child:
                setattr(parent, name, child)


_STARTED = time.time()  # about when this process started (litllm.utils is imported first thing)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, under another user
        return True
    return True


def clean_stale_temporaries(path: str | Path) -> None:
    """Remove what a killed `atomic_path(path)` left beside `path`: `.<name>.tmp-<pid>` (an unfinished
    write) and `.<name>.old-<pid>` (the previous version, moved aside for the swap; put back when a kill
    between the two renames left no `path`). Only names of that pattern, of a process that is not
    running, made before this one started, are touched: a concurrent writer's temporaries stay."""
    path = Path(path)
    try:
        entries = list(path.parent.glob(f".{glob.escape(path.name)}.*-*"))
    except OSError:  # no such folder yet, or not readable: nothing of ours to clean
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match["name"] != path.name:
            continue
        pid = int(match["pid"])
        try:
            stale = pid != os.getpid() and not _pid_alive(pid) and entry.lstat().st_mtime < _STARTED
            if not stale:
                continue
            if match["kind"] == "old" and not (path.exists() or path.is_symlink()):
                os.replace(entry, path)  # the kill came between moving the old version aside and the new in
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # gone already (another process cleaned it), or not ours to remove


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash (or SIGKILL) inside the block leaves `path` untouched: either the old file or nothing.
    Works for files and for folders. On failure the temporary path and any parent folders this call
    created are removed, and a file-system failure (full disk, read-only, a file in the way) is
    raised as one `OutputWriteError` naming `path`. What a killed earlier write of `path` left beside
    it is cleaned up first (`clean_stale_temporaries`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    created = [p for p in path.parents if not p.exists()]  # nearest first: removed in this order
    try:
        clean_stale_temporaries(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        yield tmp
        if path.is_dir() and tmp.is_dir():
            # rename() can't replace a non-empty folder: move the old one aside first
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        clear = write_error(path, e)  # before the clean-up frees the space
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or not ours to remove)
        if clear is not None:
            raise clear from None
        raise


@contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """The folder to write an output folder's files in: it is built beside `path` and replaces it whole
    when the block succeeds (`atomic_path`), so a kill leaves the old folder or the new one, never a mix.
    Entries of an existing `path` that the block did not write are carried over (hard links where the
    file system allows, else copies), leaving the old folder intact until the swap."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)  # a link keeps pointing at it
    with atomic_path(path) as tmp:
        tmp.mkdir()
        yield tmp
        if path.is_dir():
            for entry in path.iterdir():
                if not (tmp / entry.name).exists() and not (tmp / entry.name).is_symlink():
                    _carry_over(entry, tmp / entry.name)


def _carry_over(source: Path, target: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def litllm_cache_home() -> Path:
    """litllm's folder in the user's cache: `$XDG_CACHE_HOME/litllm`, else `~/.cache/litllm` (compile caches, built
    extensions)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litllm"


OFF_VALUES = ("0", "false", "no", "off")
"""What an on/off environment switch reads as off."""


def switched_off(name: str) -> bool:
    """Is the environment switch `$name` set to off (`0`/`false`/`no`/`off`, any case, spaces ignored)?"""
    return os.environ.get(name, "").strip().lower() in OFF_VALUES


def cpu_model_name(default: str = "") -> str:
    """This CPU's model name (`/proc/cpuinfo`), `default` where it can't be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), default)
    except OSError:
        return default


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (`/proc/cpuinfo`'s first `flags` line: "avx2", "avx512_vnni"...), none where it can't
    be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def owned_and_private(path: Path) -> bool:
    """Is `path` owned by this user and writable by no one else (the only shared libraries litllm loads that it
    built itself: saved compiled steps, its C++ op)?"""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# exception class names (anywhere in the error's chain) that mean "no network", by library
_OFFLINE_ERRORS = ("OfflineModeIsEnabled",)  # huggingface_hub with HF_HUB_OFFLINE=1
_UNREACHABLE_ERRORS = (
    "LocalEntryNotFoundError",  # huggingface_hub: not cached and the Hub can't be reached
    "ConnectError", "ConnectTimeout", "ConnectionError", "Timeout", "gaierror",  # httpx, requests, sockets
    "EndpointConnectionError", "NoCredentialsError",  # botocore (litdata's s3:// reader)
)


def unreachable_reason(error: BaseException) -> str | None:
    """Why a download failed, if the cause is a missing connection (or offline mode); else None."""
    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    if "NoCredentialsError" in names:
        return "no credentials for the object store (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if names & set(_OFFLINE_ERRORS) or (hub_offline and "LocalEntryNotFoundError" in names):
        return "offline mode is on (HF_HUB_OFFLINE is set)"
    if names & set(_UNREACHABLE_ERRORS):
        return "the server can't be reached (no connection?)"
    return None


def hub_name_hint(path: str | Path) -> str:
    """For a local folder that doesn't exist: a hint when `path` looks like a Hub repo id instead."""
    parts = Path(path).parts
    if Path(path).exists() or Path(path).is_absolute() or len(parts) != 2 or parts[0] in (".", ".."):
        return ""
    return (f" (a local folder is expected; for the Hub model {path}, run `litllm download {path}` and give "
            f"checkpoints/{path})")


def read_json_object(path: str | Path) -> dict:
    """A JSON object file as a dict ({} when the file is absent); invalid JSON is a clear error."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LitLLMError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return data if isinstance(data, dict) else {}

