"""Fetching a diffusers model from the Hugging Face hub: the local cache first, then one quick question to the hub.

``from_pretrained`` on an unreachable hub retries its first request several times, waiting longer each
time, and then reports a missing ``config.json``, which sends the user looking for a broken repository.
:func:`fetch_from_hub` loads from the cache without any network access when the model is there, asks the
hub once (a short timeout, no retries) whether it can serve the model when it is not, and raises
:class:`cli.UsageError` saying which of "offline", "unreachable", "unknown id" or "gated" it is before any
download is tried.

Example:
    >>> from diffusers.models import AutoencoderKL  # doctest: +SKIP
    >>> vae = fetch_from_hub(AutoencoderKL.from_pretrained, "stabilityai/sd-vae-ft-ema", "the VAE",
    ...                      "pass --vae PATH")  # doctest: +SKIP
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TypeVar

from runtime.cli import UsageError

__all__ = ["PROBE_TIMEOUT_S", "absolute_if_local", "fetch_from_hub", "hub_problem"]

PROBE_TIMEOUT_S = 10.0  # one answer from a reachable hub; a blackholed address is given up after this long
T = TypeVar("T")


def fetch_from_hub(load: Callable[..., T], repo_id: str, what: str, fix: str) -> T:
    """``load(repo_id)`` from the local cache, else from the hub once it answers for repo_id; UsageError
    ``cannot fetch <what> <repo_id>: <why>: <fix>`` when it cannot."""
    with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated: not ours
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        try:
            return load(repo_id, local_files_only=True)  # no network access at all
        except OSError:
            pass  # not (completely) in the cache
        problem = hub_problem(repo_id)
        if problem is not None:
            raise UsageError(f"cannot fetch {what} {repo_id}: {problem}: {fix}")
        return load(repo_id)


def hub_problem(repo_id: str) -> str | None:
    """Why the hub cannot serve repo_id now (offline mode, unreachable, unknown, gated), or None if it can."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cache = f"it is not in the local cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return f"{cache} and HF_HUB_OFFLINE is set, which forbids downloading it"
    try:
        model_info(repo_id, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return f"{cache} and it is gated on {constants.ENDPOINT} (accept its terms there, then `hf auth login`)"
    except RepositoryNotFoundError:
        return (f"{cache} and {constants.ENDPOINT} has no model of that id (a typo, or a private one: log in "
                "with `hf auth login`)")
    except HfHubHTTPError as error:
        return f"{cache} and {constants.ENDPOINT} answered {_first_line(error)}"
    except Exception as error:  # noqa: BLE001 - the HTTP client's connection errors (DNS, refused, timeout)
        return (f"{cache} and the hub {constants.ENDPOINT} is unreachable ({_first_line(error)}; no network, "
                "or a proxy or HF_ENDPOINT is needed)")
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def absolute_if_local(name_or_path: str | None) -> str | None:
    """An existing local path made absolute (a run recorded from one folder is read from another); a hub id,
    a path that does not exist, or None (no VAE given), as given.

    >>> absolute_if_local("stabilityai/sd-vae-ft-ema")
    'stabilityai/sd-vae-ft-ema'
    """
    if name_or_path is None:
        return None
    return os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
