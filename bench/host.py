"""The host side at GPU rates: can one worker's CPUs encode, upload and record images as fast as a
fast GPU renders them? A stand-in GPU feeds the real worker loop and finds out.

    .venv/bin/python bench/host.py [--quick] [--seconds 4] [--batch-size 8]
    .venv/bin/python bench/host.py --smoke     # a few seconds: the whole path, one short trial

The stand-in is the `null` profile, paced (worker/null_render.py): a real `lcmq worker --model
null` (claim, the store pipeline, encode, upload, record) whose render call sleeps n ÷ R seconds
for n images and hands out photo-like images prepared before any timing (a procedural scene:
gradient, soft shapes, multi-octave texture, mild noise; distinct seeds, so nothing caches).
The PNG bytes per pixel of those images are printed: photos are ~1.2–2.5.

For each format (PNG, WebP, JPEG) and size (512², 1024²), to file:// and to the S3 stand-in
(moto server): first an unpaced trial (the renderer returns at once) measures what the host
side can absorb, C; then trials paced at R = C, 0.9 C, 0.8 C … until one sustains ≥ 95 %
(images recorded per second ÷ R, over the middle 80 % of the run: the steady state). Each trial
prints where the time goes (claim, encode, upload, record per image, from the worker's own
`chunk done` timings) and the CPU each process used per image (/proc).

Starts its own Redis, database (Postgres at LCMQ_BENCH_PG) and moto server. Last line (file://):
`png512_img_s=… png1024_img_s=… webp512_img_s=… jpeg512_img_s=… cores=…`
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dispatch import PARTS, chunk_timings, cpu_per_job, cpu_snapshot  # noqa: E402
from bench.harness import Process, bench_world, done, wait_until  # noqa: E402

SUSTAINED = 0.95  # images recorded per second ÷ R
STEPS_DOWN = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # fractions of the unpaced capacity tried in turn


@dataclass(frozen=True)
class Case:
    image_format: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.image_format}{self.size}"


FILE_CASES = (Case("png", 512), Case("png", 1024), Case("webp", 512), Case("jpeg", 512))
S3_CASES = FILE_CASES


# --- the images ---------------------------------------------------------------------------------


def scene(seed: int, size: int):
    """A photo-like RGB image: smooth gradient, soft shapes, fine texture, mild noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(20, 200, 3)
    image = top * (1 - y[..., None]) + bottom * y[..., None]  # 1. the gradient (sky to ground)
    for _ in range(12):  # 2. soft-edged shapes
        cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        edge = np.clip((((x - cx) ** 2 + (y - cy) ** 2) / radius**2 - 1) * 6, -30, 30)
        alpha = (1 / (1 + np.exp(edge)))[..., None] * rng.uniform(0.5, 0.9)
        image = image * (1 - alpha) + rng.uniform(0, 255, 3) * alpha
    texture = np.zeros((size, size), np.float32)  # 3. texture: value noise at several scales
    for cells, amplitude in ((8, 10), (32, 7), (128, 5), (size // 2, 4)):
        grid = Image.fromarray(rng.standard_normal((cells + 1, cells + 1)).astype(np.float32), mode="F")
        texture += amplitude * np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))
    image = image + texture[..., None] + rng.normal(0, 2.0, image.shape)  # 4. sensor noise
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def prepare_images(folder: Path, sizes: list[int], per_size: int) -> dict[str, float]:
    """Write the stand-in's images (lossless PNG) and measure what they compress to, per pixel."""
    from lcmq.formats import FORMATS
    from worker.encode import encode_png

    folder.mkdir(parents=True, exist_ok=True)
    sizes_bpp: dict[str, float] = {}
    for size in sizes:
        images = [scene(size * 1000 + n, size) for n in range(per_size)]
        for n, image in enumerate(images):
            image.save(folder / f"{size}-{n:02d}.png", compress_level=1)
        pixels = size * size * len(images)
        sizes_bpp[f"png{size}_bytes_per_px"] = round(sum(len(encode_png(im, "")) for im in images) / pixels, 2)
        for name, pil in (("webp", "WEBP"), ("jpeg", "JPEG")):
            total = 0
            for image in images:
                buffer = io.BytesIO()
                image.save(buffer, format=pil, quality=FORMATS[name].default_quality)
                total += buffer.tell()
            sizes_bpp[f"{name}{size}_bytes_per_px"] = round(total / pixels, 3)
    return sizes_bpp


def encoder_levers(sizes: list[int], cores: int) -> list[dict]:
    """The PNG lever side by side in one run: Pillow's encoder at level 4 (what lcmq used before)
    against lcmq's writer (worker/encode.py) at levels 1, 4 and 6; CPU ms per image on one thread,
    bytes per pixel, and images/s with one thread against one per core (does it scale past the GIL?)."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from worker.encode import encode_png

    def pillow(image, level: int) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    rows = []
    for size in sizes:
        images = [scene(size * 7 + n, size) for n in range(4)]
        candidates = [("pillow", 4, partial(pillow, level=4))] + [
            ("lcmq", level, partial(encode_png, parameters="", level=level)) for level in (1, 4, 6)
        ]
        for name, level, encode in candidates:
            cpu_started = time.thread_time()  # CPU, not wall: what a shared machine cannot skew
            sizes_out = [len(encode(image)) for image in images]
            cpu_ms = (time.thread_time() - cpu_started) * 1000 / len(images)
            rates = {}
            for threads in sorted({1, cores}):
                work = images * (2 if size <= 512 else 1)
                with ThreadPoolExecutor(threads) as pool:
                    started = time.perf_counter()
                    list(pool.map(encode, work))
                    rates[threads] = len(work) / (time.perf_counter() - started)
            rows.append(
                {
                    "encoder": name,
                    "level": level,
                    "size": size,
                    "cpu_ms_per_image": round(cpu_ms, 1),
                    "bytes_per_px": round(sum(sizes_out) / (len(images) * size * size), 3),
                    "img_s_1_thread": round(rates[1], 1),
                    f"img_s_{cores}_threads": round(rates[cores], 1),
                }
            )
    return rows


# --- one trial ----------------------------------------------------------------------------------


def steady_rate(finished: list[float]) -> float:
    """Images recorded per second in the steady state: a micro-batch is recorded at one instant,
    so count whole records, from the end of the first tenth of them to the end of the ninth
    tenth (the start-up and the tail are left out)."""
    records: dict[float, int] = {}
    for at in finished:
        records[at] = records.get(at, 0) + 1
    times = sorted(records)
    first, last = len(times) // 10, len(times) - 1 - len(times) // 10
    span = times[last] - times[first]
    return sum(records[at] for at in times[first + 1 : last + 1]) / span if span > 0 else float("inf")


def trial(env: dict[str, str], work: Path, case: Case, rate: float | None, seconds: float, batch: int) -> dict:
    """One worker paced at `rate` (None: unpaced) over about `seconds` of images."""
    from lcmq import api

    expected = rate or 60.0 * 512 * 512 / case.size**2  # unpaced: a first guess at the capacity
    images = max(12 * batch, int(expected * seconds) // batch * batch)  # 12 records at least
    chunk = max(2 * batch, int(expected) // batch * batch)  # a task of about a second
    paced = {"LCMQ_NULL_IMAGES_PER_S": f"{rate:.3f}"} if rate else {}
    trial_env = {k: v for k, v in env.items() if k != "LCMQ_NULL_IMAGES_PER_S"} | paced
    trial_env["LCMQ_CHUNK_SIZE"] = str(chunk)
    os.environ.update(trial_env)
    os.environ.pop("LCMQ_NULL_IMAGES_PER_S", None)  # the bench's own process submits only
    from lcmq.settings import reset_settings

    reset_settings()
    worker = Process(trial_env, work / f"{case.name}-{time.time_ns()}.log", "worker", "--model", "null")

    def submit(prompts: list[str]) -> str:
        return api.submit(
            prompts, model="null", width=case.size, height=case.size, image_format=case.image_format
        ).batch_id

    try:
        worker.wait_ready()
        warm = submit([f"warm {n}" for n in range(2 * batch)])
        wait_until(lambda: done(warm), 120, interval_s=0.05, what="the warm-up batch")
        cpu_before = cpu_snapshot([worker], int(env["LCMQ_BENCH_MOTO_PID"]))
        started = time.perf_counter()
        batch_id = submit([f"a photo {n} {time.time_ns()}" for n in range(images)])
        wait_until(lambda: done(batch_id), 600, interval_s=0.05, what="the batch")
        wall_s = time.perf_counter() - started
        cpu = cpu_per_job(cpu_before, cpu_snapshot([worker], int(env["LCMQ_BENCH_MOTO_PID"])), images)
        jobs = api.repository().jobs(batch_id)
        assert sum(job.state == "succeeded" for job in jobs) == images, "not every image was recorded"
        recorded_per_s = steady_rate([job.finished_at.timestamp() for job in jobs])
    finally:
        worker.terminate()
    parts = chunk_timings([worker.log], batch_id)
    return {
        "case": case.name,
        "rate": round(rate, 1) if rate else None,
        "images": images,
        "wall_s": round(wall_s, 2),
        "recorded_per_s": round(recorded_per_s, 1),
        "sustained": round(recorded_per_s / rate, 3) if rate else None,
        "per_image_ms": {k.removesuffix("_ms"): round(v / images, 2) for k, v in parts.items() if k in PARTS},
        "cpu_ms_per_image": cpu,
    }


def highest_rate(env: dict[str, str], work: Path, case: Case, seconds: float, batch: int, log) -> dict:
    """The unpaced capacity, then paced trials stepping down from it until one sustains ≥ 95 %."""
    capacity = trial(env, work, case, None, seconds, batch)
    log(capacity | {"trial": "unpaced"})
    for fraction in STEPS_DOWN:
        rate = capacity["recorded_per_s"] * fraction
        result = trial(env, work, case, rate, seconds, batch)
        log(result | {"trial": f"paced {fraction:.1f} C"})
        if result["sustained"] >= SUSTAINED:
            return result
    return result | {"rate": 0.0}  # nothing sustained: reported as 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="images per trial: this many seconds' worth")
    parser.add_argument("--batch-size", type=int, default=8, help="images per render call (a GPU micro-batch)")
    parser.add_argument("--images-per-size", type=int, default=8, help="distinct prepared images of each size")
    parser.add_argument("--quick", action="store_true", help="shorter trials, and S3 for PNG 512² only")
    parser.add_argument("--smoke", action="store_true", help="one short paced trial of PNG 512² to file://")
    parser.add_argument("--levers", action="store_true", help="only the PNG encoders side by side, then stop")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 2.5)
    work = Path(tempfile.mkdtemp(prefix="lcmq-host-"))
    from worker.threads import machine_cores

    cores = machine_cores()
    sizes = [512] if args.smoke else [512, 1024]
    started = time.perf_counter()
    bpp = prepare_images(work / "images", sizes, 2 if args.smoke else args.images_per_size)
    print(json.dumps({"prepared_s": round(time.perf_counter() - started, 1), **bpp}), flush=True)
    if not args.smoke:
        for row in encoder_levers(sizes, cores):
            print(json.dumps(row), flush=True)
        if args.levers:
            return 0

    def log(record: dict) -> None:
        print(json.dumps(record), flush=True)

    settings = {
        "LCMQ_BATCH_SIZE": str(args.batch_size),
        "LCMQ_NULL_IMAGES_DIR": str(work / "images"),
        "LCMQ_LOG_JSON": "true",
    }
    with bench_world(work, **settings) as (env, _, s3):
        env = env | {"LCMQ_BENCH_MOTO_PID": str(s3.proc.pid)}
        file_env = env | {"LCMQ_STORAGE_URL": f"file://{work}/out"}
        if args.smoke:
            result = trial(file_env, work, Case("png", 512), 20.0, 1.0, args.batch_size)
            log(result)
            print(f"png512_img_s={result['recorded_per_s']} sustained={result['sustained']} cores={cores}")
            return 0
        found: dict[str, float] = {}
        for storage, storage_env, cases in (
            ("file", file_env, FILE_CASES),
            ("s3", env, S3_CASES[:1] if args.quick else S3_CASES),
        ):
            for case in cases:
                result = highest_rate(storage_env, work, case, args.seconds, args.batch_size, log)
                found[f"{storage}_{case.name}"] = result["rate"]
                log({"storage": storage, "case": case.name, "highest_rate_img_s": result["rate"]})
        log({"highest_rates_img_s": found, "seconds": round(time.perf_counter() - started, 1)})
        print(" ".join(f"{case.name}_img_s={found[f'file_{case.name}']}" for case in FILE_CASES) + f" cores={cores}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
