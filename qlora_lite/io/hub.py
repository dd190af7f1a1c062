"""Models and datasets named by Hugging Face hub id (`Qwen/Qwen2.5-0.5B`), resolved through the local HF cache.

`resolve_model_dir` returns a local directory for a path or a hub id: an existing path is used as it is; a hub id
goes through `huggingface_hub.snapshot_download`, which answers from the cache (`HF_HOME` / `HF_HUB_CACHE`) and
downloads what is missing when the network is allowed, with its own progress bar. Offline mode is the user's
choice (`HF_HUB_OFFLINE=1`), read at call time and never forced. Only the files a QLoRA run needs are fetched:
config, safetensors shards and tokenizer files, never pickled `*.bin` weights. `revision` (a branch, tag or commit;
None for main) picks the snapshot. `resolve_dataset_dir` does the same for a dataset repo's JSON / JSONL / Parquet
files; `data/records` picks a split's files and reads them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DataError, ModelLoadError

# What a model dir needs: config, safetensors weights (and their index), generation config, tokenizer files.
MODEL_FILES = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
]  # fmt: skip
DATASET_FILES = ["*.jsonl", "*.json", "**/*.jsonl", "**/*.json", "*.parquet", "**/*.parquet"]
# org/name: the hub's rules (letters, digits, '-', '_', '.'), one slash, not a relative path like ./x or ../x
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a hub repo id (`org/name`) rather than a path."""
    return bool(HUB_ID.fullmatch(text)) and not text.endswith((".yaml", ".yml", ".json", ".jsonl"))


def hub_offline() -> bool:
    """Whether the user turned downloads off (`HF_HUB_OFFLINE`), read now rather than at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _snapshot(repo_id: str, revision: str | None, repo_type: str, patterns: list[str], what: str, error: type) -> Path:
    """The local snapshot folder of a hub repo (from the cache, or downloaded when allowed)."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    cache, offline = hub_cache_dir(), hub_offline()
    at = f" at revision {revision}" if revision else ""
    get = f"`hf download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id}{f' --revision {revision}' if revision else ''}`"
    try:
        folder = snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns, cache_dir=cache,
            local_files_only=offline,
        )  # fmt: skip
    except hub_errors.LocalEntryNotFoundError:
        if offline:
            raise error(
                f"{what} {repo_id}{at} is not in the Hugging Face cache ({cache}) and downloads are off "
                f"(HF_HUB_OFFLINE=1); download it once with {get}, or unset HF_HUB_OFFLINE."
            ) from None
        raise error(
            f"{what} {repo_id}{at} is not in the Hugging Face cache ({cache}) and the hub could not be reached; "
            f"check the network, or download it elsewhere with {get} and copy the cache."
        ) from None
    except hub_errors.GatedRepoError:
        raise error(
            f"{what} {repo_id} is gated: accept its license on the hub, then log in with `hf auth login`."
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise error(
            f"{what} {repo_id} does not exist on the hub (or is private: log in with `hf auth login`); "
            "check the id, or give a local directory."
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise error(f"{what} {repo_id} has no revision {revision!r}; check the branch, tag or commit.") from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what} {repo_id}{at} could not be fetched from the hub ({first[:160]}).") from None
    return Path(folder)


def resolve_model_dir(name: str | Path, revision: str | None = None) -> Path:
    """A local model directory for a path or a hub id (`org/name`, through the HF cache).

    An existing path is returned unchanged, and so is anything that is not shaped like a hub id (the caller then
    reports the missing directory in its own words). Raises `ModelLoadError` for a hub id that cannot be had.
    """
    path = Path(name)
    if path.exists() or not looks_like_hub_id(str(name)):
        return path
    folder = _snapshot(str(name), revision, "model", MODEL_FILES, "model", ModelLoadError)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model {name} in the Hugging Face cache ({folder}) has no config.json; "
            f"download it completely with `hf download {name}`."
        )
    return folder


def resolve_dataset_dir(name: str, revision: str | None = None) -> Path:
    """A local folder holding a hub dataset's JSON / JSONL / Parquet files (through the HF cache)."""
    return _snapshot(name, revision, "dataset", DATASET_FILES, "dataset", DataError)
