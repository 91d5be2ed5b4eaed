"""Style LoRAs on top of the LCM-LoRA: each loaded once, recent ones kept in a bounded LRU.

How a style combines with the LCM-LoRA. The loader fuses the LCM-LoRA into the UNet's weights
(no per-step cost). peft then treats every LoRA layer as "merged", and a merged layer's forward
pass runs the base weights only: an unmerged style adapter loaded next to it would be silently
ignored (peft tuners/lora/layer.py, `elif self.merged`). And unfusing to make room for styles
drifts the weights in fp16 (lcm-lora.md). So before the first style is loaded, the LCM-LoRA's
peft layers are removed while its fused weights stay (`unload_lora_weights` after `fuse_lora`:
the base weights already hold the LCM-LoRA, so images do not change by a bit). From then on the
UNet is "base + LCM" and each style is an ordinary adapter: `set_adapters([styles], weights)`.
A profile whose LCM-LoRA is loaded but not fused keeps it as an adapter instead, and it is then
activated with the styles: `set_adapters(["lcm", styles...], [1.0, weights...])`.

Memory: loading and unloading adapters grows a process (diffusers #8532, peft #1639), so
adapters are never unloaded wholesale; at most `lora_cache_size` styles stay loaded, the least
recently used one is removed with `delete_adapters` before a new one loads, and jobs without
styles disable the adapters rather than delete them.

Adapter names inside the pipeline are not the user's names (two batches may call different
files "ink"): they are `style_<hash>` of the file's identity (path, size and mtime; for s3://
the object's ETag). s3:// LoRAs are downloaded once into `<models dir>/loras/`, keyed by the
hash of URL and ETag; ones pushed with `lcmq models push` (a folder URL, or a file with the
push's manifest beside it) are fetched and verified like models (worker/model_fetch.py). An edge
worker's LoRAs come as presigned https:// URLs (the gateway's claim): downloaded the same way,
named by the URL without its signature (stable across claims) and the ETag the GET answers with;
errors show the URL without its signature.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lcmq.errors import PermanentError
from lcmq.loras import LCM_ADAPTER
from lcmq.profiles import SINGLE_FILE_SUFFIXES
from lcmq.settings import Settings

log = logging.getLogger("lcmq.worker")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what a LoRA folder holds


class LoraLoadError(PermanentError):
    """A style LoRA is missing, not a LoRA, or does not fit this model: its jobs fail, the
    worker goes on."""


@dataclass(frozen=True)
class LocalLora:
    adapter: str  # the name inside the pipeline
    folder: str
    weight_name: str


def _adapter_name(identity: str) -> str:
    return "style_" + hashlib.sha256(identity.encode()).hexdigest()[:16]


def _local(path: str) -> LocalLora:
    """A local file or folder, and its identity: a file replaced on disk is a new adapter."""
    p = Path(path)
    if p.is_dir():
        p = p / LORA_WEIGHT_NAME
    try:
        stat = p.stat()
    except OSError as exc:
        raise LoraLoadError(f"LoRA {path}: {exc.strerror or exc}") from exc
    if not p.is_file():
        raise LoraLoadError(f"LoRA {path}: not a file")
    return LocalLora(_adapter_name(f"{p}:{stat.st_size}:{stat.st_mtime_ns}"), str(p.parent), p.name)


def _from_s3(url: str, cache: Path, settings: Settings) -> LocalLora:
    """Download an s3:// LoRA into the cache (once per URL and ETag), through a temporary file."""
    from lcmq.storage import S3Storage

    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    store = S3Storage(
        bucket, "", settings.s3_endpoint_url, settings.s3_region, settings.s3_timeout_s, settings.s3_max_attempts
    )
    try:
        head = store._call("head", store.client.head_object, Bucket=bucket, Key=key)
    except PermanentError as exc:  # 404, 403: the job cannot succeed on a retry
        raise LoraLoadError(f"LoRA {url}: {exc}") from exc
    etag = head.get("ETag", "").strip('"')
    digest = hashlib.sha256(f"{url}:{etag}".encode()).hexdigest()[:16]
    folder = cache / digest
    target = folder / (Path(key).name if key.endswith(".safetensors") else LORA_WEIGHT_NAME)
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        response = store._call("get", store.client.get_object, Bucket=bucket, Key=key)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                for block in iter(lambda: response["Body"].read(1 << 20), b""):
                    fh.write(block)
            os.replace(tmp, target)  # concurrent workers: the last rename wins, same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("lora downloaded", extra={"url": url, "etag": etag, "bytes": target.stat().st_size})
    return LocalLora(_adapter_name(f"{url}:{etag}"), str(folder), target.name)


def _pushed(url: str, settings: Settings) -> LocalLora | None:
    """A LoRA pushed with `lcmq models push` (a manifest beside it): fetched and verified like a
    model (worker/model_fetch.py). None for a plain object with no manifest (a file URL), which
    `_from_s3` downloads as before; a folder URL must have its manifest."""
    from lcmq.modelpack import ManifestMissingError, ModelFetchError
    from worker.model_fetch import S3Source, fetch_model

    try:
        fetched = fetch_model(url, settings.models_path, S3Source(settings))
    except ManifestMissingError:
        if url.endswith(SINGLE_FILE_SUFFIXES) and not url.endswith("/"):
            return None
        raise LoraLoadError(
            f"LoRA {url}: a folder URL needs the lcmq-model.json that `lcmq models push` writes"
        ) from None
    except ModelFetchError as exc:
        raise LoraLoadError(f"LoRA {exc}") from exc
    folder, name = (
        (fetched.path.parent, fetched.path.name) if fetched.path.is_file() else (fetched.path, LORA_WEIGHT_NAME)
    )
    return LocalLora(_adapter_name(f"{fetched.path}"), str(folder), name)


def _shown(path: str) -> str:
    """A LoRA's name in messages: a presigned URL without its query (the signature)."""
    return path.split("?", 1)[0] if path.startswith(("https://", "http://")) else path


def _from_presigned(url: str, cache: Path) -> LocalLora:
    """Download a LoRA from a presigned GET URL into the cache (once per object and ETag)."""
    import httpx

    shown = _shown(url)
    try:
        with httpx.stream("GET", url, timeout=60) as response:
            if response.status_code != 200:
                raise LoraLoadError(f"LoRA {shown}: {response.status_code} from the presigned URL")
            etag = response.headers.get("ETag", "").strip('"')
            folder = cache / hashlib.sha256(f"{shown}:{etag}".encode()).hexdigest()[:16]
            name = Path(urlparse(shown).path).name
            target = folder / (name if name.endswith(".safetensors") else LORA_WEIGHT_NAME)
            if not target.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as fh:
                        for block in response.iter_bytes(1 << 20):
                            fh.write(block)
                    os.replace(tmp, target)  # concurrent workers: the last rename wins, same bytes
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                log.info("lora downloaded", extra={"url": shown, "etag": etag, "bytes": target.stat().st_size})
    except httpx.HTTPError as exc:
        raise LoraLoadError(f"LoRA {shown}: {type(exc).__name__}") from exc
    return LocalLora(_adapter_name(f"{shown}:{etag}"), str(folder), target.name)


class AdapterCache:
    """The style adapters of one pipeline. Not thread-safe by itself: render calls hold `lock`."""

    def __init__(self, pipe: Any, capacity: int, settings: Settings):
        self.pipe = pipe
        self.capacity = max(1, capacity)
        self.settings = settings
        self.cache_dir = settings.models_path / "loras"
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter -> source, least recent first
        self.lock = threading.Lock()
        self._enabled = True
        self._resolved: dict[str, LocalLora] = {}  # s3:// URL -> its download (one HEAD per process)
        self.lcm_mode = self._lcm_mode()

    def _lcm_mode(self) -> str:
        """ "fused" (in the weights, peft layers still there), "adapter" (loaded, not fused) or "none"."""
        adapters = {name for names in self.pipe.get_list_adapters().values() for name in names}
        if LCM_ADAPTER not in adapters:
            return "none"
        merged = any(LCM_ADAPTER in getattr(m, "merged_adapters", ()) for m in self.pipe.unet.modules())
        return "fused" if merged else "adapter"

    def _bake_lcm(self) -> None:
        """Drop the fused LCM-LoRA's peft layers, keeping its weights (see the module doc)."""
        if self.lcm_mode == "fused":
            self.pipe.unload_lora_weights()
            self.lcm_mode = "baked"
            log.info("lcm-lora baked into the weights", extra={"reason": "style adapters need unmerged layers"})

    def _resolve(self, path: str) -> LocalLora:
        if path.startswith("s3://"):
            if path not in self._resolved:
                self._resolved[path] = _pushed(path, self.settings) or _from_s3(path, self.cache_dir, self.settings)
            return self._resolved[path]
        if path.startswith(("https://", "http://")):
            shown = _shown(path)  # a new signature each claim, the same object
            if shown not in self._resolved:
                self._resolved[shown] = _from_presigned(path, self.cache_dir)
            return self._resolved[shown]
        return _local(path)

    def _adapters_now(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def _evict_one(self, keep: set[str]) -> None:
        victim = next(name for name in self.loaded if name not in keep)
        self.pipe.delete_adapters([victim])
        source = self.loaded.pop(victim)
        log.info("lora evicted", extra={"adapter": victim, "path": source, "loaded": len(self.loaded)})

    def _load(self, lora: LocalLora, source: str) -> None:
        try:
            self.pipe.load_lora_weights(
                lora.folder, weight_name=lora.weight_name, adapter_name=lora.adapter, low_cpu_mem_usage=True
            )
        except Exception as exc:  # noqa: BLE001 - any loader failure is this LoRA's fault
            self._forget(lora.adapter)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LoraLoadError(
                f"LoRA {source} cannot be loaded into this model: {type(exc).__name__}: {first_line[:300]}"
            ) from exc
        if lora.adapter not in self._adapters_now():
            # diffusers only warns when no key matches a layer of the model: refuse it loudly here.
            self._forget(lora.adapter)
            raise LoraLoadError(
                f"LoRA {source} has no weights for any layer of this model "
                "(keys from another architecture, or not a LoRA)"
            )
        self.loaded[lora.adapter] = source
        log.info("lora loaded", extra={"adapter": lora.adapter, "path": source, "loaded": len(self.loaded)})

    def _forget(self, adapter: str) -> None:
        """After a failed load: remove whatever part of the adapter got in."""
        try:
            if adapter in self._adapters_now():
                self.pipe.delete_adapters([adapter])
        except Exception as exc:  # noqa: BLE001 - best effort; the job fails with the load error
            log.warning("partial lora not removed", extra={"adapter": adapter, "error": str(exc)})

    def activate(self, loras: Sequence[dict[str, Any]] | None) -> None:
        """Make exactly this set active (an empty one: no style), loading what is missing."""
        if not loras:
            if self.loaded and self._enabled:
                if self.lcm_mode == "adapter":
                    self.pipe.set_adapters([LCM_ADAPTER], adapter_weights=[1.0])
                else:
                    self.pipe.disable_lora()
                    self._enabled = False
            return
        self._bake_lcm()
        weights: dict[str, float] = {}
        wanted: list[tuple[LocalLora, str]] = []
        for entry in loras:
            local = self._resolve(entry["path"])
            if local.adapter not in weights:
                wanted.append((local, _shown(entry["path"])))
            # The same file under two names: one adapter with the summed weight.
            weights[local.adapter] = weights.get(local.adapter, 0.0) + float(entry["weight"])
        keep = set(weights)
        missing = [(local, source) for local, source in wanted if local.adapter not in self.loaded]
        # Evict before loading, so the peak stays at the bound (a set larger than the bound is
        # loaded whole: it is one pipeline call's need).
        while self.loaded and len(self.loaded) + len(missing) > self.capacity and set(self.loaded) - keep:
            self._evict_one(keep)
        for local, source in missing:
            self._load(local, source)
        for adapter in weights:
            self.loaded.move_to_end(adapter)
        names = list(weights)
        values = [weights[name] for name in names]
        if self.lcm_mode == "adapter":
            names, values = [LCM_ADAPTER, *names], [1.0, *values]
        if not self._enabled:
            self.pipe.enable_lora()
            self._enabled = True
        self.pipe.set_adapters(names, adapter_weights=values)

    def style_adapters(self) -> list[str]:
        """The style adapters loaded in the pipeline now (what the LRU bound applies to)."""
        return sorted(name for name in self._adapters_now() if name != LCM_ADAPTER)


_CACHES: dict[int, AdapterCache] = {}
_CACHES_LOCK = threading.Lock()


def adapter_cache(pipe: Any, settings: Settings) -> AdapterCache:
    """The cache of this process's pipeline (img2img shares it: the same UNet)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(id(pipe))
        if cache is None or cache.pipe is not pipe:
            cache = _CACHES[id(pipe)] = AdapterCache(pipe, settings.lora_cache_size, settings)
        return cache
