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
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from pathlib import Path

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


def probe_batch_size(loaded, budget_mb: float, max_batch: int) -> int:
    """Render dummy batches on the loaded pipeline and pick the batch size for the budget."""
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

    chosen, peaks = choose_batch_size(measure, budget_mb, max_batch)
    fits = peaks[1] is not None and peaks[1] <= budget_mb
    (log.info if fits else log.warning)(
        "batch size chosen" if fits else "batch size 1 exceeds the memory budget",
        extra={
            "profile": profile.name,
            "batch_size": chosen,
            "budget_mb": budget_mb,
            "device": loaded.device,
            "peaks_mb": ",".join(f"{k}:{v}" for k, v in peaks.items()),  # size:MiB, as measured
            "width": profile.width,
            "height": profile.height,
        },
    )
    return chosen
