"""Mergers, rules and whole runs on the Hugging Face hub.

A name is read as a local folder when it exists, or when it cannot be a hub repo id (absolute,
``./``, ``~``, more than one slash, or a ``Path`` object): a missing local folder is left to the
loader, which reports it as it always did. Otherwise it is a hub repo id ("org/name") and is fetched
into the hub cache with ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` and the saved login. Pushing saves into a temporary folder and uploads it
(``HfApi.create_repo(exist_ok=True)`` + ``HfApi.upload_folder``).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from umim.errors import UserError, one_line

RUN_PARTS = ("merger", "rules")
"""The folders of a ``umim fit`` run that loading needs (checkpoints and logs stay local)."""


class HubError(UserError):
    """A hub repo cannot be fetched or written."""


class HubRepoMissing(HubError, FileNotFoundError):
    """A name is neither a local folder nor a hub repo (revision) that is cached or reachable."""


def is_repo_id(name: object) -> bool:
    """Whether ``name`` can be a hub repo id "org/name" (a ``Path`` or a path-like string never is)."""
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith(("/", ".", "~")):
        return False
    if os.sep != "/" and os.sep in name:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_local(name: object) -> bool:
    """Whether ``name`` names a local folder: it exists, cannot be a repo id, or its first path
    component is a local folder (``runs/default`` before the first fit is a missing local run, not a
    hub repo)."""
    return not is_repo_id(name) or Path(name).exists() or Path(str(name).split("/")[0]).is_dir()


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub lets its HTTP client's transport errors through as they are (httpx, httpx2 in newer releases)
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
            files: Sequence[str] = (), what: str = "folder", hint: str = "") -> Path:
    """The local folder of a saved ``what``: ``name_or_path`` itself when it is local (see the module
    docstring), else the snapshot of hub repo ``name_or_path`` in the hub cache, fetched when missing.

    Parameters
    ----------
    revision : branch, tag or commit of the hub repo (default ``main``); refused for a local folder.
    subfolder : folder inside the repo (or the local folder) that holds the ``what``.
    files : files or folders (relative to ``subfolder``) to fetch; a repo without one of them is refused.
    hint : what to do when the name is neither a local folder nor a hub repo (appended to the error).
    """
    if is_local(name_or_path):
        if revision is not None:
            raise HubError(f"{what} {name_or_path}: revision {revision!r} is for hub repos and this is a local "
                           "folder: drop revision, or give a hub repo id")
        return Path(name_or_path) / subfolder if subfolder else Path(name_or_path)

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = str(name_or_path)
    ref = f"{name} (revision {revision})" if revision else name
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    # a folder entry "merger" fetches merger/*; fnmatch's * crosses "/" so deeper files come too
    patterns = [p for f in files for p in (f"{prefix}{f}", f"{prefix}{f}/*")] or None
    hint = f": {hint}" if hint else ""
    try:
        snapshot = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except IncompleteSnapshotError as e:
        raise HubError(f"hub repo {ref} is only partly in the hub cache and the hub cannot be reached: "
                       "fetch it again with the hub reachable") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        raise HubRepoMissing(f"{what} {name}: no such local folder, and hub repo {ref} is not in the hub cache "
                             f"({why}){hint or ': give an existing folder, or fetch it once with the hub reachable'}"
                             ) from e
    except RevisionNotFoundError as e:
        raise HubRepoMissing(f"hub repo {name} has no revision {revision!r}: give a branch, tag or commit "
                             "it has") from e
    except GatedRepoError as e:
        raise HubError(f"hub repo {name} is gated: accept its terms on the hub, then log in "
                       "(hf auth login)") from e
    except RepositoryNotFoundError as e:
        raise HubRepoMissing(f"{what} {name}: no such local folder, and no hub repo {name} "
                             f"(a private one needs hf auth login){hint}") from e
    except (HfHubHTTPError, *_network_errors()) as e:
        raise HubError(f"cannot fetch hub repo {ref}: {one_line(e)}") from e
    folder = snapshot / prefix if prefix else snapshot
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        where = f" in {subfolder}" if subfolder else ""
        raise HubError(f"hub repo {ref} holds no {what}{where} ({missing[0]} is missing): give the repo "
                       f"(and subfolder) a {what} was pushed to")
    return folder


def resolve_run(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The local folder of a ``umim fit`` run holding ``merger/`` and ``rules/``: ``name_or_path``
    itself when local (a missing local run is left to the loader), else the snapshot of that hub
    repo (only ``merger/`` and ``rules/`` are fetched)."""
    return resolve(name_or_path, revision=revision, files=RUN_PARTS, what="run folder",
                   hint="run `umim fit` to make it, or give an existing run folder or hub repo id")


def push_folder(folder: str | os.PathLike, repo_id: str, *, what: str = "folder", private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, token: str | None = None,
                allow_patterns: Sequence[str] | None = None):
    """Upload ``folder`` to hub repo ``repo_id`` (created when missing, ``private`` then applies) on
    branch ``revision`` (created from ``main`` when missing); returns the commit's ``CommitInfo``."""
    _check_repo_id(repo_id, what)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message or f"Upload {what} with UMIM",
                                 allow_patterns=list(allow_patterns) if allow_patterns else None)
    except (HfHubHTTPError, *_network_errors()) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = ("HF_HUB_OFFLINE is set: unset it to push" if _offline() else
               f"{one_line(e)}: log in with hf auth login, or pass token=" if status in (401, 403) else
               one_line(e) if isinstance(e, HfHubHTTPError) else f"the hub cannot be reached ({one_line(e)})")
        raise HubError(f"cannot push the {what} to hub repo {repo_id}: {why}") from e


def push_saved(save: Callable[[Path], object], repo_id: str, *, what: str, **kwargs):
    """``save(folder)`` into a fresh temporary folder, then :func:`push_folder` it (``kwargs``)."""
    _check_repo_id(repo_id, what)  # before the save, which may take a while
    with tempfile.TemporaryDirectory(prefix="umim-push-") as tmp:
        folder = Path(tmp) / "upload"
        save(folder)
        return push_folder(folder, repo_id, what=what, **kwargs)


def push_run(run_dir: str | os.PathLike, repo_id: str, **kwargs):
    """Upload the ``merger/`` and ``rules/`` of ``umim fit`` run ``run_dir`` to hub repo ``repo_id``
    (``kwargs`` as :func:`push_folder`), so that :func:`resolve_run` can load it back."""
    from umim.merging.merger import is_merger_dir
    from umim.rules.store import is_rules_dir

    run = Path(run_dir)
    for part, is_ours in zip(RUN_PARTS, (is_merger_dir, is_rules_dir)):
        if not is_ours(run / part):
            raise HubError(f"{run / part} is not a saved {part} folder: push the output folder of umim fit "
                           "(it holds merger/ and rules/)")
    return push_folder(run, repo_id, what="run", allow_patterns=[f"{p}/*" for p in RUN_PARTS], **kwargs)


def _check_repo_id(repo_id: object, what: str) -> None:
    if not is_repo_id(repo_id):
        raise HubError(f"push of the {what}: {repo_id!r} is not a hub repo id: give one as org/name")
