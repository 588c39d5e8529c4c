"""Upload an exported folder to the Hugging Face Hub, where timm loads it by name:
``timm.create_model("hf-hub:<org>/<name>", pretrained=True)``.

The token is huggingface_hub's own: ``HF_TOKEN`` or the cache ``hf auth login`` writes. A
missing token or a refused push is one error line; the local folder is never touched.
"""

from __future__ import annotations

from pathlib import Path

from m3i_lightning.core.errors import M3IError


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the model repository ``repo_id`` if needed and upload ``folder`` as one commit.

    Args:
        folder: an exported folder (``model.safetensors``, ``config.json``, ``README.md``...).
        repo_id: ``<org or user>/<name>``.
        private: create the repository private (an existing one keeps its visibility).

    Returns:
        The URL of the commit.

    Example:
        >>> push_folder("outputs/run/backbone", "me/vit-m3i")  # doctest: +SKIP
        'https://huggingface.co/me/vit-m3i/commit/...'
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    kept = f"the exported folder is kept at {folder}"
    token = get_token()
    if token is None:
        raise M3IError(f"push_to_hub={repo_id} needs a Hugging Face token (hf auth login, or "
                       f"HF_TOKEN=...); {kept}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload model exported by m3i_lightning")
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise M3IError(f"push to {repo_id} refused: {reason}; {kept}") from None
    return commit.commit_url
