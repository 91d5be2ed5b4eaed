"""What the VAE costs a render, and what the tiny one (`vae_decoder = "tiny"`) saves: `sd15-arch`
(the real SD1.5 architecture, random weights) on this machine's CPU, 4 steps, guidance 1.

    .venv/bin/python bench/vae.py                                  # 256² and 512², ~10 min on 2 cores
    .venv/bin/python bench/vae.py --sizes 256 --images 4
    .venv/bin/python bench/vae.py --memory 4 --sizes 512           # peak RSS, VAE sliced or not

Speed: one pipeline is loaded the worker's way (`load_pipeline`, full VAE); the tiny profile's
plan (`vae_decoder = "tiny"`, the generated `sd15-arch-taesd` AutoencoderTiny) loads its VAE
through the same loader (`load_vae`) and a second pipeline shares every other component
(`from_pipe`): the same UNet, text encoder and scheduler, one copy of the weights. Each round
renders the same prompts and seeds with both, micro-batch by micro-batch, the order swapped
from one micro-batch to the next (full tiny, tiny full, …: drift in a shared machine's load hits
both). Time in `vae.decode` is measured inside the real calls. The best round of each counts.
Last line, per size: `full256_img_s=… tiny256_img_s=… vae_share256=… tiny_vae_share256=…
tiny_speedup256=… full_decode256_s=… tiny_decode256_s=…` (vae_share: the decode ÷ the whole
render; *_decode*_s: seconds of decode per image).

Memory (`--memory BATCH`): three fresh processes (peak RSS is per process; freed memory may stay
resident), each loads the profile and renders BATCH images at one step (the probe's render,
worker/memory.py): full VAE, full VAE sliced (`vae.enable_slicing()`), tiny VAE. Last line:
`rss_full_mb=… rss_sliced_mb=… rss_tiny_mb=… loaded_mb=… full_s=… sliced_s=… tiny_s=… batch=… size=…`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "sd15-arch"
TINY_VAE = "lcmq-generated:sd15-arch-taesd"  # worker/generated.py: ensure_tiny_vae


def _prompts(n: int, round_no: int) -> list[str]:
    return [f"a product photo of item {i}, studio light, round {round_no}" for i in range(n)]


class DecodeTimer:
    """Wraps one VAE's `decode` (the pipelines call `self.vae.decode`) and adds up its seconds."""

    def __init__(self, vae):
        self.seconds = 0.0
        inner = vae.decode

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        vae.decode = timed


def _render(pipe, texts: list[str], size: int, steps: int, batch_size: int) -> None:
    import torch

    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(batch))]
        with torch.inference_mode():
            pipe(
                prompt=batch,
                num_inference_steps=steps,
                guidance_scale=1.0,
                width=size,
                height=size,
                generator=generators,
                output_type="pil",
            )


def _pipelines():
    """(profile, full pipeline, tiny pipeline) sharing one UNet and text encoder."""
    import torch

    from lcmq.profiles import get_profile
    from lcmq.settings import get_settings
    from worker.pipeline import load_pipeline, load_vae, plan_load

    settings = get_settings()
    profile = get_profile(MODEL)
    full = load_pipeline(profile, settings)
    tiny_plan = plan_load(replace(profile, vae_decoder="tiny", tiny_vae=TINY_VAE), full.device)
    assert tiny_plan.tiny_vae == TINY_VAE
    tiny_vae = load_vae(tiny_plan, settings, getattr(torch, tiny_plan.dtype)).to(full.device)
    tiny = type(full.pipe).from_pipe(full.pipe, vae=tiny_vae)
    tiny.set_progress_bar_config(disable=True)
    assert type(tiny.vae).__name__ == "AutoencoderTiny" and tiny.unet is full.pipe.unet
    return full, tiny


def speed(args) -> str:
    full, tiny = _pipelines()
    pipes = {"full": full.pipe, "tiny": tiny}
    timers = {name: DecodeTimer(pipe.vae) for name, pipe in pipes.items()}
    smallest = min(args.sizes)
    for pipe in pipes.values():  # warm: first calls pay for kernel selection and allocation
        _render(pipe, _prompts(1, -1), smallest, 1, 1)
    fields = []
    for size, images in zip(args.sizes, args.images, strict=True):
        batch_size = min(args.batch_size, images)
        # name: (img/s, decode share, decode s per image) of its best round
        best: dict[str, tuple[float, float, float]] = {}
        for round_no in range(args.rounds):
            texts = _prompts(images, round_no)
            seconds, decode = dict.fromkeys(pipes, 0.0), dict.fromkeys(pipes, 0.0)
            # Each micro-batch with both decoders, the order swapped from one to the next: a
            # shared machine's load drifts over seconds, and both sides then see the same drift.
            for n, start in enumerate(range(0, images, batch_size)):
                order = ("full", "tiny") if (n + round_no) % 2 == 0 else ("tiny", "full")
                for name in order:
                    timers[name].seconds = 0.0
                    started = time.perf_counter()
                    _render(pipes[name], texts[start : start + batch_size], size, args.steps, batch_size)
                    seconds[name] += time.perf_counter() - started
                    decode[name] += timers[name].seconds
            for name in pipes:
                rate, share = images / seconds[name], decode[name] / seconds[name]
                print(
                    f"{size}px round {round_no} {name}: {rate:.4f} img/s, decode {decode[name]:.1f} s "
                    f"of {seconds[name]:.1f} s ({share:.0%})",
                    file=sys.stderr,
                    flush=True,
                )
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, share, decode[name] / images)
        fields += [
            f"full{size}_img_s={best['full'][0]:.4f}",
            f"tiny{size}_img_s={best['tiny'][0]:.4f}",
            f"vae_share{size}={best['full'][1]:.3f}",
            f"tiny_vae_share{size}={best['tiny'][1]:.3f}",
            f"tiny_speedup{size}={best['tiny'][0] / best['full'][0]:.2f}",
            # Seconds of decode per image: the part the decoder choice changes, less noisy than rates.
            f"full_decode{size}_s={best['full'][2]:.2f}",
            f"tiny_decode{size}_s={best['tiny'][2]:.2f}",
        ]
    fields += [f"images={','.join(map(str, args.images))}", f"rounds={args.rounds}", f"cores={os.cpu_count()}"]
    return " ".join(fields)


def _rss_mb() -> float:
    """This process's resident memory now: after the load, before a render (safetensors weights
    are mapped lazily, so less than the weights until a render touches them)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_one(mode: str, size: int, batch: int) -> dict:
    """In this process: load, then one BATCH render at one step with the VAE `mode`."""
    from worker.memory import PeakMemory

    full, tiny = _pipelines() if mode == "tiny" else (None, None)
    if full is None:
        from lcmq.profiles import get_profile
        from lcmq.settings import get_settings
        from worker.pipeline import load_pipeline

        full = load_pipeline(get_profile(MODEL), get_settings())
    pipe = tiny if mode == "tiny" else full.pipe
    if mode == "sliced":
        pipe.vae.enable_slicing()
    loaded = _rss_mb()
    started = time.perf_counter()
    with PeakMemory(full.device) as peak:
        _render(pipe, _prompts(batch, 0), size, 1, batch)
    return {"peak_mb": peak.mb, "loaded_mb": round(loaded, 1), "seconds": round(time.perf_counter() - started, 1)}


def memory(args) -> str:
    size, out = args.sizes[0], {}
    for mode in ("full", "sliced", "tiny"):
        command = [sys.executable, __file__, "--peak-one", mode, "--sizes", str(size), "--memory", str(args.memory)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{mode}: {done.stderr[-3000:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{size}px batch {args.memory} {mode}: {out[mode]}", file=sys.stderr, flush=True)
    return (
        f"rss_full_mb={out['full']['peak_mb']} rss_sliced_mb={out['sliced']['peak_mb']} "
        f"rss_tiny_mb={out['tiny']['peak_mb']} loaded_mb={out['full']['loaded_mb']} "
        f"full_s={out['full']['seconds']} sliced_s={out['sliced']['seconds']} tiny_s={out['tiny']['seconds']} "
        f"batch={args.memory} size={size} cores={os.cpu_count()}"
    )


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_ints, default=[256, 512], help="square sides, e.g. 256,512")
    parser.add_argument("--images", type=_ints, default=None, help="images per round, one per size (4,2)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", type=int, metavar="BATCH", help="peak RSS at this batch size instead of speed")
    parser.add_argument("--peak-one", choices=["full", "sliced", "tiny"], help=argparse.SUPPRESS)  # a --memory child
    args = parser.parse_args()
    os.environ.setdefault("LCMQ_MODELS_DIR", str(Path(".lcmq/models").resolve()))
    from lcmq.settings import reset_settings

    reset_settings()
    if args.peak_one:
        print(json.dumps(peak_one(args.peak_one, args.sizes[0], args.memory or 1)))
        return 0
    if args.memory:
        print(memory(args))
        return 0
    args.images = args.images or [4 if size <= 256 else 2 for size in args.sizes]
    if len(args.images) != len(args.sizes):
        parser.error(f"--images gives {len(args.images)} counts for {len(args.sizes)} sizes")
    print(speed(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
