"""Hugging Face Hub ids as model arguments: `org/name[@revision]` → a folder in the Hub's own cache.

huggingface_hub does the work, so its cache (HF_HUB_CACHE / HF_HOME), offline mode
(HF_HUB_OFFLINE=1) and token (HF_TOKEN, or `hf auth login`) behave as in every other tool that
uses it. A local path always wins: an argument names the Hub only when nothing of that name
exists on disk. What is fetched is the least the caller needs: config.json alone for sizing and
random weights, the config, safetensors and tokenizer files for real weights (never the other
weight formats a repository may also hold).

This sits below config and checkpoint (both resolve ids through it) and knows nothing of tensors.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from granite_cli.errors import GraniteError, InputError

# The Hub's repository-id rule: two names of letters, digits, '-', '_', '.', not starting or ending
# with '-' or '.', with no '--' or '..'; at most 96 characters each.
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]{{1,255}}))?$")
# Suffixes of local files; an argument ending in one is a path, never a Hub id.
_FILE_SUFFIXES = (".json", ".toml", ".gguf", ".safetensors")
CONFIG_ONLY = ["config.json"]
WITH_WEIGHTS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def parse_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` names a Hub repository and no local path, else None.
    A revision that is not a valid git ref name (`..`, an absolute or empty part, control characters,
    ...) is refused (InputError): it would name a folder outside the Hub's cache."""
    s = str(spec)
    m = _ID.match(s)
    if not m or "--" in m["repo"] or ".." in m["repo"] or s.lower().endswith(_FILE_SUFFIXES) or Path(s).exists():
        return None
    if m["rev"] is not None and (why := _bad_revision(m["rev"])):
        raise InputError(f"{s[:120]!r}: the revision {why}; give a branch, tag or commit of the repository")
    return m["repo"], m["rev"]


def _bad_revision(rev: str) -> str | None:
    """Why `rev` is not a ref name git (and so the Hub) accepts, or None: the rules of
    `git check-ref-format`, which also keep it from naming a path outside the cache."""
    if any(ord(c) < 32 or ord(c) == 127 or c in " ~^:?*[\\" for c in rev):
        return "holds a character a git ref may not (space, control, ~ ^ : ? * [ or backslash)"
    if rev.startswith("/") or rev.endswith("/") or "//" in rev:
        return "has an empty or absolute part"
    if ".." in rev or "@{" in rev or rev.endswith(".") or rev == "@":
        return "holds '..', '@{' or ends with '.'"
    if any(part.startswith(".") or part.endswith(".lock") for part in rev.split("/")):
        return "has a part starting with '.' or ending with '.lock'"
    return None


def model_name(spec: str) -> str:
    """The name a Hub model goes by in reports: the repository's name without its owner."""
    return str(spec).split("@", 1)[0].split("/", 1)[1]


# What the Hub's refusals mean to a user, first match first (a gated repository is also "not found").
_REFUSALS = (
    ("GatedRepoError", "the repository is gated; accept its terms on huggingface.co and set HF_TOKEN "
                       "(or run `hf auth login`)"),
    ("RepositoryNotFoundError", "no local folder of that name, and the Hugging Face Hub has no model {repo} "
                                "(private ones need HF_TOKEN)"),
    ("RevisionNotFoundError", "the Hub repository {repo} has no revision {rev!r}; use a branch, tag or commit it has"),
    ("IncompleteSnapshotError", "the Hub cache holds only part of {what} and the Hub cannot be reached; download it "
                                "with network access (or pass a local folder)"),
)


def snapshot(spec: str, weights: bool) -> Path:
    """The cached snapshot folder of Hub id `spec` (downloading what is missing, unless offline)
    holding config.json, and with weights=True its safetensors and tokenizer files too."""
    parsed = parse_id(spec)
    if parsed is None:
        raise InputError(f"{spec!r} is not a Hugging Face Hub id (org/name or org/name@revision)")
    repo, rev = parsed
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as E
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - a declared dependency
        raise InputError(f"{spec}: reading Hub ids needs huggingface_hub; pip install huggingface_hub") from None
    if not sys.stderr.isatty():
        disable_progress_bars()
    what = "its config, safetensors and tokenizer files" if weights else "its config.json"
    try:
        path = snapshot_download(repo, revision=rev, allow_patterns=WITH_WEIGHTS if weights else CONFIG_ONLY)
    except (E.GatedRepoError, E.RepositoryNotFoundError, E.RevisionNotFoundError, E.IncompleteSnapshotError) as e:
        refusal = next(text for kind, text in _REFUSALS if isinstance(e, getattr(E, kind)))
        raise InputError(f"{spec}: " + refusal.format(repo=repo, rev=rev, what=what)) from None
    except E.LocalEntryNotFoundError:
        missing = (f"{spec}: no local folder of that name, and {what} {'are' if weights else 'is'} not in the "
                   "Hugging Face cache")
        if constants.HF_HUB_OFFLINE:
            raise InputError(f"{missing} (HF_HUB_OFFLINE=1 forbids a download); run once online, or pass a local "
                             "folder") from None
        # the Hub could not be reached: a runtime failure, not bad input
        raise GraniteError(f"{missing}, and the Hub cannot be reached; check the network, or pass a local "
                           "folder") from None
    except E.HFValidationError as e:
        raise InputError(f"{spec}: not a valid Hub id ({str(e).splitlines()[0]})") from None
    except E.HfHubHTTPError as e:
        raise GraniteError(f"{spec}: the Hugging Face Hub answered {str(e).splitlines()[0]}") from None
    snap = Path(path).resolve()
    cache = Path(constants.HF_HUB_CACHE).resolve()
    if cache not in snap.parents:  # whatever the revision said, nothing outside the cache is read
        raise InputError(f"{spec}: resolves to {snap}, outside the Hugging Face cache {cache}; check the revision")
    return Path(path)
