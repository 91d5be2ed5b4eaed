"""What the queue costs a render farm: a bare diffusers loop against lcmq end to end, side by
side, the same model, parameters and batch size, alternating A B A B in one run.

    .venv/bin/python bench/overhead.py --model tiny --images 96 --rounds 2
    .venv/bin/python bench/overhead.py --model sd15-arch --images 8 --rounds 1
    .venv/bin/python bench/overhead.py --model tiny --workers 2
    .venv/bin/python bench/overhead.py --model sd15-arch --runtime both --images 8 --rounds 2

(A) bare: load the pipeline (the worker's own loader), `pipe(...)` over the prompts in batches,
    PNG-encode, write to disk.
(B) lcmq: submit → `--workers` separate `lcmq worker` commands (pipelines preloaded, like a
    warm farm; started together, so each takes its share of the cores: worker/threads.py) →
    moto S3 server → Postgres rows; timed from the submit call until every job is final.
    With several workers, chunks are two micro-batches, so the images spread evenly.

`--runtime openvino` runs (A) and (B) with the profile's `runtime = "openvino"` (a generated
lcmq.toml). `--runtime both` runs no queue: the bare loop (A) with the torch pipeline and with the
OpenVINO one, loaded in this process and alternated round by round, and ends with
`torch_img_s=… openvino_img_s=… speedup=…` (best round of each; export and compile time, paid
once per models dir and per process, are reported apart; where the time goes, per network, on
stderr).

Starts its own Redis, database (Postgres at LCMQ_BENCH_PG) and moto server. Last line:
`ratio=… lcmq_img_s=… bare_img_s=…` (ratio = B/A, best round of each). (A) is one process using
all of this machine's cores, so with `--workers 2` the ratio says what the farm of two gets
against one worker that has the whole machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Process, bench_world, done, wait_until  # noqa: E402


def prompts(n: int, round_no: int) -> list[str]:
    return [f"a product photo of item {i}, studio light, round {round_no}" for i in range(n)]


def bare_loop(loaded, texts: list[str], batch_size: int, steps: int, out: Path) -> float:
    """The plain diffusers loop a user would write; returns images/s."""
    import torch

    from worker.encode import encode_png

    profile = loaded.profile
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(batch))]
        with torch.inference_mode():
            images = loaded.pipe(
                prompt=batch,
                num_inference_steps=steps,
                guidance_scale=1.0,
                width=profile.width,
                height=profile.height,
                generator=generators,
                output_type="pil",
            ).images
        for i, image in enumerate(images):
            (out / f"{start + i:06d}.png").write_bytes(encode_png(image, batch[i]))
    return len(texts) / (time.perf_counter() - started)


class PartTimes:
    """Seconds spent in each network's forward (text encoder, UNet, VAE decode) of a pipeline."""

    def __init__(self, pipe):
        self.seconds = {"text_encoder": 0.0, "unet": 0.0, "vae_decode": 0.0}
        self._wrap(pipe.text_encoder, "forward", "text_encoder")
        self._wrap(pipe.unet, "forward", "unet")
        self._wrap(pipe.vae, "decode", "vae_decode")

    def _wrap(self, module, method: str, part: str) -> None:
        inner = getattr(module, method)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started

        setattr(module, method, timed)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def line(self, total_s: float) -> str:
        parts = " ".join(f"{part}_s={s:.2f}" for part, s in self.seconds.items())
        return f"{parts} other_s={total_s - sum(self.seconds.values()):.2f}"


def compare_runtimes(args, models: str) -> int:
    """(A) with each runtime, alternating torch / openvino rounds in this one process."""
    from dataclasses import replace

    from lcmq.profiles import get_profile
    from lcmq.settings import get_settings
    from worker.pipeline import load_pipeline

    os.environ["LCMQ_MODELS_DIR"] = models
    work = Path(tempfile.mkdtemp(prefix="lcmq-runtimes-"))
    profile = get_profile(args.model)
    loaded, timers = {}, {}
    for runtime in ("torch", "openvino"):
        started = time.perf_counter()
        chosen = args.openvino if runtime == "openvino" else runtime
        loaded[runtime] = load_pipeline(replace(profile, runtime=chosen), get_settings())
        timers[runtime] = PartTimes(loaded[runtime].pipe)
        print(f"{runtime} load_s={time.perf_counter() - started:.1f}", file=sys.stderr)
    rates: dict[str, list[float]] = {"torch": [], "openvino": []}
    for round_no in range(-1, args.rounds):  # round -1 warms both up (first-call allocations)
        for runtime in ("torch", "openvino"):
            timers[runtime].reset()
            texts = prompts(args.images if round_no >= 0 else args.batch_size, round_no)
            rate = bare_loop(loaded[runtime], texts, args.batch_size, args.steps, work / f"{runtime}{round_no}")
            if round_no >= 0:
                rates[runtime].append(rate)
                print(
                    f"round {round_no}: {runtime}_img_s={rate:.3f} {timers[runtime].line(len(texts) / rate)}",
                    file=sys.stderr,
                )
    best = {runtime: max(values) for runtime, values in rates.items()}
    print(
        f"torch_img_s={best['torch']:.3f} openvino_img_s={best['openvino']:.3f} "
        f"speedup={best['openvino'] / best['torch']:.2f} model={args.model} images={args.images} "
        f"batch_size={args.batch_size} steps={args.steps} rounds={args.rounds} openvino={args.openvino}"
    )
    return 0


def lcmq_run(texts: list[str], model: str, steps: int, poll_s: float) -> float:
    from lcmq import api

    started = time.perf_counter()
    batch_id = api.submit(texts, model=model, steps=steps).batch_id
    # Polling costs this 2-core machine CPU the render needs: poll at ~1 % of the expected time.
    wait_until(lambda: done(batch_id), 3600, interval_s=poll_s, what="the batch")
    seconds = time.perf_counter() - started
    assert api.status(batch_id).succeeded == len(texts)
    return len(texts) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15-arch"])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="separate `lcmq worker` commands in (B)")
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "openvino", "both"],
        help="the profile's runtime; both: bare loops of torch against openvino, no queue",
    )
    parser.add_argument(
        "--openvino",
        default="openvino",
        choices=["openvino", "openvino-bf16"],
        help="which OpenVINO runtime --runtime openvino/both uses (f32, or bf16 compute)",
    )
    parser.add_argument(
        "--torch-threads", type=int, help="LCMQ_TORCH_THREADS for every process (2 on 2 cores: the old way)"
    )
    parser.add_argument("--profile", metavar="DIR", help="cProfile the workers into DIR (bench/profile_hooks.py)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lcmq-overhead-"))
    models = os.environ.get("LCMQ_MODELS_DIR", str(Path(".lcmq/models").resolve()))
    if args.runtime == "both":
        return compare_runtimes(args, models)
    # One worker takes whole chunks (32 jobs); a farm needs chunks small enough to share out.
    farm = {"LCMQ_CHUNK_SIZE": str(2 * args.batch_size)} if args.workers > 1 else {}
    if args.torch_threads:
        farm["LCMQ_TORCH_THREADS"] = str(args.torch_threads)
    if args.profile:
        root = str(Path(__file__).resolve().parents[1])
        farm |= {"LCMQ_TEST_HOOKS": "bench.profile_hooks", "LCMQ_PROFILE_DIR": args.profile, "PYTHONPATH": root}
    if args.runtime == "openvino":  # the workers and (A) read the profile from this lcmq.toml
        (work / "lcmq.toml").write_text(f'[profiles.{args.model}]\nruntime = "{args.openvino}"\n')
        farm["LCMQ_CONFIG"] = str(work / "lcmq.toml")
    with bench_world(work, LCMQ_MODELS_DIR=models, LCMQ_BATCH_SIZE=str(args.batch_size), **farm) as (env, _, _):
        from lcmq.profiles import get_profile
        from lcmq.settings import get_settings
        from worker.pipeline import load_pipeline

        # (A)'s pipeline, loaded once, before any worker starts: it takes every core.
        loaded = load_pipeline(get_profile(args.model), get_settings())
        # Started together: each registers before either loads, so each counts both.
        workers = [Process(env, work / f"worker{n}.log", "worker", "--model", args.model) for n in range(args.workers)]
        try:
            for worker in workers:
                worker.wait_ready()
            started = time.perf_counter()
            bare_loop(loaded, prompts(args.batch_size, -1), args.batch_size, args.steps, work / "warm")
            poll_s = max(0.02, (time.perf_counter() - started) / args.batch_size * args.images / 100)
            warm = prompts(2 * args.batch_size * args.workers, -1)
            lcmq_run(warm, args.model, args.steps, poll_s)  # (B) warm: every worker renders once
            bare, queued = [], []
            for round_no in range(args.rounds):
                bare.append(
                    bare_loop(
                        loaded, prompts(args.images, round_no), args.batch_size, args.steps, work / f"bare{round_no}"
                    )
                )
                queued.append(lcmq_run(prompts(args.images, round_no), args.model, args.steps, poll_s))
                print(f"round {round_no}: bare_img_s={bare[-1]:.2f} lcmq_img_s={queued[-1]:.2f}", file=sys.stderr)
        finally:
            for worker in workers:
                worker.kill()
                worker.close()
        print(
            f"ratio={max(queued) / max(bare):.3f} lcmq_img_s={max(queued):.2f} bare_img_s={max(bare):.2f} "
            f"model={args.model} images={args.images} batch_size={args.batch_size} rounds={args.rounds} "
            f"workers={args.workers} runtime={args.runtime}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
