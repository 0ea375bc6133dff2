"""Pretrained weights by name (``model.weights``): the file torchvision or timm would download, taken
from that library's own cache.

- ``torchvision:NAME`` with ``model.weights=DEFAULT`` (or any member of the model's weights enum,
  ``IMAGENET1K_V2``, ...): ``torch.hub.get_dir()/checkpoints/<file of the enum's url>``, the place
  ``torchvision.models.get_model(NAME, weights=...)`` saves it. Read with ``weights_only=True``.
- ``timm:NAME`` with ``model.weights=pretrained`` (the default tag) or a tag (``augreg_in21k``): the
  Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)
  entry of the ``hf_hub_id`` in timm's ``pretrained_cfg``, or the torch hub file of its ``url``. timm
  loads it (``pretrained_cfg_overlay={"file": ...}``: its own filter resizes position embeddings and
  drops a classifier of another width; ``weights_only=True`` / safetensors).

A file not in the cache is downloaded by the library's own function (``torch.hub.download_url_to_file``,
``huggingface_hub.hf_hub_download``) unless ``LOCALLEARN_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``; offline
or when the download fails: one line saying where it looked and how to get the file (``WeightsError``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# what timm's hub entries hold, in the order timm itself prefers them
HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class WeightsError(ValueError):
    """``model.weights`` names weights that cannot be had; one line saying where it looked."""


def offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("LOCALLEARN_OFFLINE", "HF_HUB_OFFLINE")
    )


def hf_cache() -> Path:
    """The Hugging Face hub cache as ``huggingface_hub`` resolves it, read when called (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _download(url: str, path: Path, spec: str, weights: str, how: str) -> Path:
    where = f"model.weights={weights} for {spec}: no file {str(path)!r} (the torch hub cache, torch.hub.get_dir())"
    if offline():
        raise WeightsError(f"{where} and downloads are off (LOCALLEARN_OFFLINE / HF_HUB_OFFLINE); {how}")
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as e:  # no network, a proxy, a full disk: all mean "not here"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise WeightsError(f"{where} and downloading {url} failed ({reason}); {how}") from None
    return path


def torchvision_file(spec: str, weights: str) -> Path:
    """The cached file of torchvision weights ``weights`` of ``spec`` (``torchvision:NAME``)."""
    import torchvision

    name = spec.partition(":")[2]
    try:
        enum = torchvision.models.get_model_weights(name)
    except (KeyError, ValueError):
        raise WeightsError(f"model.weights={weights}: torchvision has no weights for {name}") from None
    choices = list(enum.__members__)
    if weights not in choices:
        raise WeightsError(
            f"model.weights={weights}: torchvision's {name} has weights {', '.join(choices)} (model.weights=NAME)"
        )
    url = enum[weights].url
    path = _hub_file(url)
    if path.is_file():
        return path
    how = (
        f"get it once with network: python -c \"import torchvision; torchvision.models.get_model('{name}', "
        f"weights='{weights}')\", copy it there, or give model.pretrained=FILE"
    )
    return _download(url, path, spec, weights, how)


def _timm_cfg(spec: str, weights: str):
    import timm

    arch = spec.partition(":")[2]
    name = arch if weights == "pretrained" else f"{arch.split('.')[0]}.{weights}"
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    except RuntimeError:  # an architecture timm knows, a tag it does not
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [t for t in timm.list_pretrained(arch.split(".")[0] + ".*")]
        hint = f"; its tags: {', '.join(t.split('.', 1)[1] for t in tags[:8])}" if tags else ""
        raise WeightsError(
            f"model.weights={weights}: timm has no pretrained weights for {name}{hint} "
            "(model.weights=pretrained or =TAG)"
        )
    return name, cfg


def timm_file(spec: str, weights: str) -> tuple[Path, bool]:
    """The cached file of timm's pretrained weights of ``spec`` and whether timm reads it with the
    model's own loader (an ``.npz`` of Google's ViTs)."""
    name, cfg = _timm_cfg(spec, weights)
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id
        snapshots = hf_cache() / f"models--{repo.replace('/', '--')}"
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES
        ref = snapshots / "refs" / "main"
        revision = ref.read_text().strip() if ref.is_file() else None
        candidates = [snapshots / "snapshots" / revision / f for f in files] if revision else []
        found = next((p for p in candidates if p.is_file()), None)
        if found is not None:
            return found, False
        how = (
            f"get it once with network: python -c \"import timm; timm.create_model('{name}', pretrained=True)\" "
            "(or set HF_HOME), or give model.pretrained=FILE"
        )
        where = (
            f"model.weights={weights} for {spec}: {repo} is not in the Hugging Face cache {str(hf_cache())!r}"
        )
        if offline():
            raise WeightsError(f"{where} and downloads are off (LOCALLEARN_OFFLINE / HF_HUB_OFFLINE); {how}")
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo, files[0], cache_dir=str(hf_cache()))), False
        except Exception as e:  # no network, no such file on the hub, huggingface_hub missing
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise WeightsError(f"{where} and downloading it failed ({reason}); {how}") from None
    path = _hub_file(cfg.url)
    how = f"get it once with network: python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    path = path if path.is_file() else _download(cfg.url, path, spec, weights, how)
    return path, bool(cfg.custom_load)


def timm_kwargs(spec: str, weights: str) -> dict:
    """What ``timm.create_model`` takes to load ``weights`` from the cached file with timm's own
    loader (and only from it: nothing else is fetched)."""
    path, custom = timm_file(spec, weights)
    log.info("timm weights for %s from %s", spec, path)
    name, _ = _timm_cfg(spec, weights)
    overlay = {"file": str(path), "custom_load": custom, "source": None, "hf_hub_id": None, "url": None}
    tag = name.partition(".")[2]
    return {"pretrained": True, "pretrained_cfg_overlay": overlay, **({"pretrained_cfg": tag} if tag else {})}
