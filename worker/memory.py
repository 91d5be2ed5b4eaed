"""Peak memory of a render, and the batch size that fits a memory budget.

What "memory" means depends on the device, and each number is the whole process, weights included:
- cuda: `torch.cuda.max_memory_allocated` (tensors torch allocated), reset before each
  measurement. The CUDA context and the allocator's cache come on top (~0.5-1 GiB): leave headroom.
- cpu: the process's peak resident set size, VmHWM in /proc/self/status, reset before each
  measurement by writing 5 to /proc/self/clear_refs (Linux). Where the reset is refused, the
  lifetime peak (getrusage) is reported instead; the probe measures growing batch sizes in
  order, so a lifetime peak still tells whether each one fits.
- mps: Metal has no peak counter; the driver's allocation after the call stands in for it.

`--max-memory` (LCMQ_MAX_MEMORY_MB) makes the worker probe at load: it renders batch sizes 1, 2,
4, ... up to its configured batch size at the profile's default size (one dummy prompt, one step:
a step's activations are the same at every step), measures each one's peak, and keeps the largest
that stays under the budget. Batch size 1 is kept even over budget (with a warning): a worker
cannot render less.

VAE slicing where memory requires it: the full VAE's decode is the peak of a CPU render (at 512²
about 1 GiB for the first image and 0.6 GiB for each more, all images at once; docs/models.md).
When a batch size does not fit, the probe measures the larger ones again with the VAE decoding
one image at a time (`vae.enable_slicing()`), and keeps the largest that fits that way. The
worker then slices only micro-batches above the largest size that fitted without
(`LoadedPipeline.vae_slicing_above`, applied per call by `slice_vae`): smaller ones decode at
once, as before. A profile with `vae_slicing = true` slices always and is not probed for it.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lcmq.worker")

PROBE_PROMPT = "lcmq memory probe"
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.mb`: the peak over the block, in MiB."""

    def __init__(self, device: str):
        self.device = device
        self.mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.device == "cpu":
            _reset_rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.mb = round(_peak_mb(self.device), 1)
        except Exception:  # noqa: BLE001 - a missing counter must never fail a render
            self.mb = None


def _peak_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        import torch

        return torch.mps.driver_allocated_memory() / 2**20
    return _rss_peak_mb()


def candidate_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


def choose_batch_size(
    measure: Callable[[int], float | None], budget_mb: float, max_batch: int
) -> tuple[int, dict[int, float | None]]:
    """The largest candidate batch size whose measured peak (MiB) stays within the budget.

    Sizes are measured in increasing order and the probe stops at the first one over budget (a
    larger batch never needs less memory). `measure` returns None when the size cannot run at
    all (out of memory), which counts as over budget. Returns the choice and the peaks measured.
    """
    chosen, peaks = 1, {}
    for size in candidate_sizes(max_batch):
        peaks[size] = peak = measure(size)
        if peak is None or peak > budget_mb:
            break
        chosen = size
    return chosen, peaks


@dataclass(frozen=True)
class BatchChoice:
    """What the probe chose: the batch size and, when it fits only with the VAE decoding one image
    at a time, the largest size that fits without (micro-batches above it are sliced)."""

    size: int
    peaks: dict[int, float | None]  # size: MiB, without slicing
    sliced_peaks: dict[int, float | None] = field(default_factory=dict)  # size: MiB, VAE sliced
    slicing_above: int | None = None


def choose_with_vae_slicing(
    measure: Callable[[int], float | None],
    budget_mb: float,
    max_batch: int,
    set_slicing: Callable[[bool], None] | None,
) -> BatchChoice:
    """choose_batch_size, then, where a size did not fit and `set_slicing` can switch the VAE to
    one image at a time, the sizes above the choice measured again that way. Slicing is left off."""
    chosen, peaks = choose_batch_size(measure, budget_mb, max_batch)
    if set_slicing is None or chosen == max_batch:
        return BatchChoice(chosen, peaks)
    # 1. Above the largest size that fits, each image decodes alone: only the VAE's share shrinks.
    set_slicing(True)
    try:
        best, sliced = chosen, {}
        for size in candidate_sizes(max_batch):
            if size <= chosen:
                continue
            sliced[size] = peak = measure(size)
            if peak is None or peak > budget_mb:
                break
            best = size
    finally:
        set_slicing(False)  # 2. Left off: slice_vae turns it on per call, above `chosen` only.
    return BatchChoice(best, peaks, sliced, chosen if best > chosen else None)


def slice_vae(loaded: Any, images: int) -> None:
    """Decode this call's images one at a time if --max-memory found its size needs it."""
    above = getattr(loaded, "vae_slicing_above", None)
    if above is None:
        return
    if images > above:
        loaded.pipe.vae.enable_slicing()
    else:
        loaded.pipe.vae.disable_slicing()


def probe_batch_size(loaded, budget_mb: float, max_batch: int) -> int:
    """Render dummy batches on the loaded pipeline and pick the batch size for the budget; sets
    `loaded.vae_slicing_above` when sizes above it fit only with the VAE sliced."""
    import torch

    profile = loaded.profile

    def measure(size: int) -> float | None:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(size)]
        try:
            with PeakMemory(loaded.device) as peak, torch.inference_mode():
                loaded.pipe(
                    prompt=[PROBE_PROMPT] * size,
                    num_inference_steps=1,
                    guidance_scale=profile.guidance,
                    width=profile.width,
                    height=profile.height,
                    generator=generators,
                    output_type="pil",
                )
        except torch.OutOfMemoryError:
            if loaded.device == "cuda":
                torch.cuda.empty_cache()
            return None
        return peak.mb

    vae: Any = getattr(loaded.pipe, "vae", None)
    can_slice = not profile.vae_slicing and hasattr(vae, "enable_slicing")  # always on: nothing to probe

    def set_slicing(on: bool) -> None:
        if on:
            vae.enable_slicing()
        else:
            vae.disable_slicing()

    choice = choose_with_vae_slicing(measure, budget_mb, max_batch, set_slicing if can_slice else None)
    loaded.vae_slicing_above = choice.slicing_above
    fits = choice.peaks[1] is not None and choice.peaks[1] <= budget_mb
    (log.info if fits else log.warning)(
        "batch size chosen" if fits else "batch size 1 exceeds the memory budget",
        extra={
            "profile": profile.name,
            "batch_size": choice.size,
            "budget_mb": budget_mb,
            "device": loaded.device,
            "peaks_mb": ",".join(f"{k}:{v}" for k, v in choice.peaks.items()),  # size:MiB, as measured
            # Sizes measured again with the VAE sliced, and above which size it slices (None: never).
            "vae_sliced_peaks_mb": ",".join(f"{k}:{v}" for k, v in choice.sliced_peaks.items()) or None,
            "vae_slicing_above": choice.slicing_above,
            "width": profile.width,
            "height": profile.height,
        },
    )
    return choice.size
