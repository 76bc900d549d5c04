"""`litllm download`: fetch a model from the Hugging Face Hub and convert it to litllm's format.

Only what a model folder needs is downloaded: one copy of the weights (safetensors in preference
to `.bin`; for a sharded checkpoint exactly the shards its index names), `config.json` and the
tokenizer/generation files. Files land in `<checkpoint_dir>/<org>/<name>/`; an interrupted download
resumes where it stopped when the same command runs again (huggingface_hub keeps per-file metadata
in the folder's `.cache/`), and a dropped connection is resumed with an HTTP Range request.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from litllm.errors import LitLLMError

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def download(
    repo_id: str,
    *,
    checkpoint_dir: Path = Path("checkpoints"),
    access_token: Optional[str] = None,
    revision: Optional[str] = None,
    tokenizer_only: bool = False,
    convert_checkpoint: bool = True,
    dtype: Optional[str] = None,
    model_name: Optional[str] = None,
) -> None:
    """Download a model from the Hugging Face Hub into `<checkpoint_dir>/<org>/<name>/` and convert it.

    `litllm download list` prints the preset models (any repo of a supported architecture works).

    Args:
        repo_id: The Hub repository, e.g. `meta-llama/Llama-3.2-1B`, or `list`.
        checkpoint_dir: Root folder; the model goes into `<checkpoint_dir>/<repo_id>`.
        access_token: A Hugging Face token for gated or private repos (default: the `HF_TOKEN`
            environment variable, else the token saved by `hf auth login`).
        revision: A branch, tag or commit of the repo (default: `main`).
        tokenizer_only: Download only the tokenizer and generation files (no weights, no conversion).
        convert_checkpoint: Convert the weights to `lit_model.safetensors` after downloading.
        dtype: Cast the weights while converting: `float32`, `float16` or `bfloat16`.
        model_name: The preset to use when the repo has no `config.json` (default: the preset whose
            `hf_repo` is this repo, if any).
    """
    if repo_id == "list":
        from litllm.cli_utils import list_models

        list_models()
        return
    if not REPO_ID.match(repo_id):
        raise LitLLMError(f"repo_id: expected `org/name` (e.g. meta-llama/Llama-3.2-1B), got {repo_id!r}")
    from litllm.model_folder import parse_dtype

    parse_dtype(dtype)  # a bad --dtype fails before downloading gigabytes
    folder = Path(checkpoint_dir) / repo_id
    from litllm.utils import check_output_dir

    check_output_dir(folder, "--checkpoint_dir")  # a file in the way or a full disk fails before the network
    token = access_token or os.environ.get("HF_TOKEN") or None
    # HF_ENDPOINT is read here, at call time: huggingface_hub reads it once at import
    endpoint = os.environ.get("HF_ENDPOINT") or None

    files = _repo_files(repo_id, revision, token, endpoint, folder)
    wanted = _tokenizer_files(files)
    if not tokenizer_only:
        wanted += ["config.json"] if "config.json" in files else []
        wanted += _weight_files(repo_id, files, folder, revision, token, endpoint)
    _fetch(repo_id, sorted(set(wanted)), folder, revision, token, endpoint)
    print(f"Downloaded {len(set(wanted))} files to {folder}")

    if tokenizer_only or not convert_checkpoint:
        return
    from litllm.convert import convert_to_litllm

    if model_name is None and not (folder / "config.json").is_file():
        model_name = _preset_for(repo_id)
        if model_name is None:
            raise LitLLMError(f"{repo_id} has no config.json and no preset: pass --model_name <preset>")
    convert_to_litllm(folder, dtype=dtype, model_name=model_name or _preset_for(repo_id))


def _preset_for(repo_id: str) -> Optional[str]:
    from litllm.config import _name_by_repo

    return _name_by_repo().get(repo_id.lower())


def _tokenizer_files(files: list[str]) -> list[str]:
    from litllm.model_folder import TOKENIZER_FILES

    return [f for f in TOKENIZER_FILES if f in files]


def _weight_files(repo_id, files, folder, revision, token, endpoint) -> list[str]:
    """One copy of the weights: safetensors shards named by the index (else `.bin`)."""
    for index, single, suffix, prefix in (
        ("model.safetensors.index.json", "model.safetensors", ".safetensors", "model"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", ".bin", "pytorch_model"),
    ):
        if index in files:
            _fetch(repo_id, [index], folder, revision, token, endpoint)
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LitLLMError(f"{repo_id}: {index} has no valid `weight_map`") from None
            shards = sorted(set(weight_map.values()))
            _check_inside_folder(repo_id, shards, f"{index}'s weight_map")
            missing = [s for s in shards if s not in files]
            if missing:
                raise LitLLMError(f"{repo_id}: {index} names {missing[0]}, which the repo doesn't have")
            return [index, *shards]
        if single in files:
            return [single]
        # other layouts: top-level files of this format with the usual prefix
        # (skips e.g. Mistral's `consolidated.safetensors`, a second copy in another layout)
        candidates = [f for f in files if "/" not in f and f.endswith(suffix) and f.startswith(prefix)]
        if candidates:
            return candidates
    raise LitLLMError(
        f"{repo_id}: no model weights found (expected model*.safetensors or pytorch_model*.bin); "
        "use --tokenizer_only to download just the tokenizer"
    )


def _hub_errors(
    repo_id: str, revision: Optional[str], token: Optional[str], endpoint: Optional[str], folder: Path
):
    """Turn huggingface_hub's exceptions into one-line LitLLMErrors."""
    from contextlib import contextmanager

    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    hub = endpoint or "https://huggingface.co"

    @contextmanager
    def translate():
        try:
            yield
        except GatedRepoError:
            how = "the token given can't access it" if token else "no token was given"
            raise LitLLMError(
                f"{repo_id} is a gated repo and {how}: accept its terms at {hub}/{repo_id}, then pass "
                "--access_token <your token> or set the HF_TOKEN environment variable"
            ) from None
        except RepositoryNotFoundError:
            raise LitLLMError(
                f"{repo_id}: repository not found on {hub} (check the name; a private repo needs --access_token)"
            ) from None
        except RevisionNotFoundError:
            raise LitLLMError(f"{repo_id}: revision {revision!r} not found") from None
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            raise LitLLMError(
                f"{repo_id}: the Hub answered HTTP {status} ({str(e).splitlines()[0]}); "
                "run the same command again to resume the download"
            ) from None
        except (LocalEntryNotFoundError, OSError, _network_error()) as e:
            # connection refused, timeouts, a connection dropped too many times, a full disk, ...
            from litllm.utils import unreachable_reason, write_error

            failed_write = write_error(folder, e)
            if failed_write is not None:
                raise failed_write from None
            reason = unreachable_reason(e)
            if reason is not None:
                raise LitLLMError(
                    f"{repo_id}: can't download, {reason}: connect to {hub} (with HF_HUB_OFFLINE unset) and run "
                    f"the same command again, or copy a Hugging Face checkpoint of it to {folder} and run "
                    f"`litllm convert_to_litllm {folder}`"
                ) from None
            detail = str(e).splitlines()[0] if str(e) else ""
            raise LitLLMError(
                f"{repo_id}: download failed ({type(e).__name__}: {detail}); "
                f"check the connection to {hub} and run the same command again to resume"
            ) from None

    return translate()


def _network_error() -> type:
    """The HTTP client's base error (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    for name in ("httpx2", "httpx"):
        try:
            return __import__(name).HTTPError
        except ImportError:
            continue
    return OSError


def _repo_files(
    repo_id: str, revision: Optional[str], token: Optional[str], endpoint: Optional[str], folder: Path
) -> list[str]:
    from huggingface_hub import HfApi

    with _hub_errors(repo_id, revision, token, endpoint, folder):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision or "main", token=token)
    return [s.rfilename for s in (info.siblings or [])]


def _check_inside_folder(repo_id: str, names, source: str) -> None:
    """Refuse a file name that would land outside the download folder (absolute, `..`, a backslash)."""
    from pathlib import PurePosixPath

    for name in names:
        if not isinstance(name, str) or not name or "\\" in name or PurePosixPath(name).is_absolute() \
                or ".." in PurePosixPath(name).parts:
            raise LitLLMError(f"{repo_id}: {source} names {name!r}, a path outside the repo's folder; refusing to "
                              "download it (ask the repo's owner to fix the file name)")


def _fetch(repo_id: str, files: list[str], folder: Path, revision, token, endpoint) -> None:
    from huggingface_hub import snapshot_download

    _check_inside_folder(repo_id, files, "the Hub's file list")
    folder.mkdir(parents=True, exist_ok=True)
    with _hub_errors(repo_id, revision, token, endpoint, folder):
        snapshot_download(
            repo_id, revision=revision, local_dir=folder, allow_patterns=files, token=token, endpoint=endpoint
        )
