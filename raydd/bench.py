"""python -m raydd.bench [--only NAME[,NAME]] [--out bench.json] [--smoke]

Speed and memory of raydd, measured (never asserted in tests). Each comparison is a ratio taken in
one run on the same machine. Writes JSON and logs one MLflow run (experiment raydd-bench).

  sharding   images/s through the Ray Data actor pool (1 actor) vs the same sampler in-process  (>= 0.95x)
  scaling    1 -> 2 sampling actors, torch threads = cpus per actor                               (>= 1.7x)
  batching   batched sampler vs a batch-1 loop (how the reference repos sample), a curve        (>= 5x)
  guidance   s/image of guided sampling vs unguided per guided step, full vs x0 gradients   (<= 2.5x, <= 1.3x)
  train      Ray Train's own cost: a fit that only reports 3 times, controller polling every 2 s vs 0.25 s
  student    student-training images/s vs a plain PyTorch loop on the same data                   (>= 0.9x)
  memory     peak RSS (driver + Ray processes) of the default distill run and of a 2-actor run    (<= 4 GiB)
  schedulers images/s of the sampling loop (1 thread, as one actor) per sampler.scheduler x steps, on both embedded
             worlds' DiT sizes (random weights): ddpm-50 vs dpm++ / unipc / euler / ddim at 10, 15, 25  (>= 2x)
  gpu        DiT-XL/2 (random weights, 256 px, 50-step DDPM + CFG): images/s in fp32/tf32/bf16, SDPA,
             torch.compile, next to the limit: measured bf16 matmul rate / counted FLOP per image (>= 40%)
  guided-memory  (only with --only) one guided DiT-XL/2 + SD VAE step: peak memory per image, micro-batch, checkpointing
  startup    where a sampling actor's and a Train job's start-up goes: imports, actor start, model load, first
             unit, a whole 1-unit sampling stage and a 1-worker fit, next to the warm sampling time (#23 part 3)
  scale      (only with --only) peak PSS of a distillation + evaluation with N vs 4N real train images per class
             (<= 1.2x), and store preparation images/s vs a plain multi-process PIL loop              (>= 0.9x)
  prepare    (only with --only) store preparation images/s from an ImageFolder, WebDataset shards and a Hugging
             Face dataset's parquet files of the same images, each vs a plain multi-process PIL loop  (>= 0.9x)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raydd.config import ComputeConfig, SamplerConfig, load_config
from raydd.generate import BackboneSpec, SampleBatches, make_rows
from raydd.sampling import Guidance, sample

TARGETS = {"sharding": 0.95, "scaling": 1.7, "batching": 5.0, "guidance_full_per_step": 2.5,
           "guidance_x0_per_step": 1.3, "student": 0.9, "memory_pss_gib": 4.0, "gpu_fraction_of_limit": 0.40,
           "schedulers_speedup": 2.0, "scale_pss_ratio_max": 1.2, "prepare_over_pil_pool": 0.9}   # images/s of the fewest steps that keep DDPM-50's accuracy (README table)


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def tiny_spec(tmp: Path) -> BackboneSpec:
    """The digits preset's backbone architecture with random weights (speed does not depend on weights)."""
    from raydd.backbone import save_transformer, tiny_dit

    cfg = load_config("digits")
    b = cfg.backbone
    torch.manual_seed(0)
    save_transformer(tiny_dit(10, 1, 16, b.hidden_size, b.depth, b.heads, b.patch_size), str(tmp / "transformer"))
    return BackboneSpec(dataclasses.replace(b, source=str(tmp / "transformer")), 10, 1, 16, list(range(10)))


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------------------------
def bench_sharding_and_scaling(spec: BackboneSpec, sampler: SamplerConfig, n: int, batch: int) -> dict:
    """End-to-end rates (actor start-up and model load included, as a short run pays them) and marginal
    rates: (n - n/4) images / (t(n) - t(n/4)), which cancel the fixed start-up cost out."""
    import ray

    from raydd.distributed.cluster import init_ray
    from raydd.distributed.data import generate_ray

    small = max(batch, n // 4)
    rows = {k: make_rows(10, k // 10, run_seed=0, unit_size=batch) for k in (small, n)}
    torch.set_num_threads(1)                       # the in-process loop gets what one actor gets
    local = SampleBatches(spec, sampler, threads=1)
    local(make_rows(1, 2, 0, 2))                   # warm-up
    t_local = {k: timed(lambda r=r: local(r)) for k, r in rows.items()}
    torch.set_num_threads(os.cpu_count() or 1)
    init_ray(ComputeConfig())
    one = ComputeConfig(num_actors=1, cpus_per_actor=1, batch_size=batch)
    two = ComputeConfig(num_actors=2, cpus_per_actor=1, batch_size=batch)
    generate_ray(spec, sampler, make_rows(10, 1, 0, batch), one)          # warm-up: imports, object store
    t_one = {k: timed(lambda r=r: generate_ray(spec, sampler, r, one), 2) for k, r in rows.items()}
    t_two = {k: timed(lambda r=r: generate_ray(spec, sampler, r, two), 2) for k, r in rows.items()}
    ray.shutdown()

    def marginal(t):
        return (n - small) / max(t[n] - t[small], 1e-9)

    return {"images": n, "images_small": small, "batch": batch, "steps": sampler.steps,
            "local_images_per_s": n / t_local[n], "ray_1actor_images_per_s": n / t_one[n],
            "ray_2actor_images_per_s": n / t_two[n],
            "sharding_ratio_end_to_end": t_local[n] / t_one[n], "scaling_ratio_end_to_end": t_one[n] / t_two[n],
            "local_marginal_images_per_s": marginal(t_local), "ray_1actor_marginal_images_per_s": marginal(t_one),
            "ray_2actor_marginal_images_per_s": marginal(t_two),
            "sharding_ratio": marginal(t_one) / marginal(t_local), "scaling_ratio": marginal(t_two) / marginal(t_one),
            "ray_startup_s": t_one[n] - n / marginal(t_one)}


def bench_batching(spec: BackboneSpec, sampler: SamplerConfig, n: int, sizes: list[int]) -> dict:
    """images/s over batch sizes, in fp32 and, where this CPU has native bf16, under bf16 autocast
    (compute.precision=bf16)."""
    from raydd.generate import autocast_for, cpu_has_bf16

    torch.set_num_threads(1)
    backbone = spec.load("cpu")
    seeds = list(range(n))
    y = torch.arange(n) % 10
    out: dict = {"images": n}
    for precision in ["fp32"] + (["bf16"] if cpu_has_bf16() else []):
        dtype = autocast_for(precision, torch.device("cpu"))
        curve = {}
        for bs in sizes:
            def run(bs=bs):
                for k in range(0, n, bs):
                    sample(backbone, y[k:k + bs], seeds[k:k + bs], sampler, autocast_dtype=dtype)
            curve[bs] = n / timed(run, 2)
        prefix = "" if precision == "fp32" else f"{precision}_"
        out[f"{prefix}images_per_s_by_batch"] = curve
        out[f"{prefix}batching_ratio"] = curve[max(sizes)] / curve[1]
    if "bf16_images_per_s_by_batch" in out:   # what bf16 buys where batching is compute-bound
        out["bf16_speedup_at_largest_batch"] = (out["bf16_images_per_s_by_batch"][max(sizes)]
                                                / out["images_per_s_by_batch"][max(sizes)])
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def bench_guidance(spec: BackboneSpec, sampler: SamplerConfig, n: int) -> dict:
    """A toy objective with the cost profile of a real one (a small classifier on x0_hat)."""
    from raydd.students import create_student

    torch.set_num_threads(1)
    backbone = spec.load("cpu")
    clf = create_student("convnet_d3", 10, 1, 16).eval().requires_grad_(False)

    def objective(x0, t, y, state):      # log p(y | x0_hat): what classifier-guided methods ascend
        return torch.log_softmax(clf(x0), dim=1).gather(1, y[:, None]).squeeze(1)

    y, seeds = torch.arange(n) % 10, list(range(n))
    base = timed(lambda: sample(backbone, y, seeds, sampler), 2)

    def objective_step():                # what x0 guidance adds at least: the objective's forward + backward
        x0 = torch.randn(n, spec.channels, spec.image_size, spec.image_size, requires_grad=True)
        torch.autograd.grad(objective(x0, None, y, None).sum(), x0)
    objective_fraction = timed(objective_step, 5) / (base / sampler.steps)
    out = {"unguided_s_per_image": base / n, "objective_fraction_of_step": objective_fraction}
    for mode in ("full", "x0"):
        g = Guidance(objective, scale=1.0, mode=mode)
        t = timed(lambda: sample(backbone, y, seeds, sampler, guidance=g), 2)
        out[f"{mode}_s_per_image"] = t / n
        out[f"guidance_{mode}_per_step"] = t / base        # every step guided: the per-step ratio
        half = Guidance(objective, scale=1.0, mode=mode, window=(0, sampler.steps // 2 - 1))
        out[f"{mode}_half_window_ratio"] = timed(lambda: sample(backbone, y, seeds, sampler, guidance=half), 2) / base
    # the sampler's own overhead for guidance, beyond paying for the objective itself
    out["x0_overhead_beyond_objective"] = out["guidance_x0_per_step"] - 1 - objective_fraction
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def bench_student(epochs: int, repeats: int = 2) -> dict:
    """raydd.protocols.train_student vs a plain loop doing the same work (same model, batch, aug, CutMix).
    Interleaved repeats, best of each: whichever runs first otherwise pays oneDNN's warm-up."""
    from raydd.data import load_digits_data
    from raydd.config import DataConfig
    from raydd.protocols import cutmix, random_resized_crop_flip, to_float, train_student
    from raydd.students import create_student

    cfg = load_config("digits")
    data = load_digits_data(DataConfig(image_size=16))
    x, y = data.train.x[:500], data.train.y[:500]
    ecfg = dataclasses.replace(cfg.eval, eval_every=epochs)

    def raydd_loop() -> float:
        return train_student(x, y, None, None, student="convnet_d3", num_classes=10, cfg=ecfg, epochs=epochs,
                             seed=0)["images_per_s"]

    def plain_loop() -> float:
        torch.manual_seed(0)
        model = create_student("convnet_d3", 10, 1, 16)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)
        xf = to_float(x)
        t0, seen = time.perf_counter(), 0
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for k in range(0, len(y) - 1, ecfg.batch_size):
                idx = perm[k:k + ecfg.batch_size]
                xb = random_resized_crop_flip(xf[idx], gen, scale=(ecfg.rrc_scale_min, 1.0), flip_p=0.0)
                xb, ya, yb, lam = cutmix(xb, y[idx], gen, ecfg.cutmix_beta)
                out = model(xb)
                loss = lam * torch.nn.functional.cross_entropy(out, ya) + (1 - lam) * torch.nn.functional.cross_entropy(out, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen += len(idx)
        return seen / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {"raydd": [], "plain": []}
    for _ in range(repeats):
        rates["raydd"].append(raydd_loop())
        rates["plain"].append(plain_loop())
    best_raydd, best_plain = max(rates["raydd"]), max(rates["plain"])
    return {"raydd_images_per_s": best_raydd, "plain_images_per_s": best_plain, "student_ratio": best_raydd / best_plain}


def _three_reports(config: dict, hooks) -> None:
    """A Ray Train loop that does nothing but report three times with a small checkpoint."""
    for i in range(3):
        with tempfile.TemporaryDirectory() as d:
            Path(d, "step.txt").write_text(str(i))
            hooks.report({"i": i}, checkpoint_dir=d if hooks.world_rank == 0 else None)


def bench_train(repeats: int) -> dict:
    """Ray Train's own cost: wall time of a 1-worker fit whose loop only reports 3 times (controller and
    worker start-up, reports, shutdown), with the controller polling the workers every 2 s (Ray's default)
    and every 0.25 s (what raydd sets on a Ray it starts). fit() hands the setting to its controller."""
    import ray

    from raydd.distributed.cluster import init_ray
    from raydd.distributed.train import fit

    init_ray(ComputeConfig())
    key, before = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    out = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fit(_three_reports, {}, name="bench-warmup", storage=tmp)            # worker imports, object store
            for interval in ("2", "0.25"):
                os.environ[key] = interval
                out[f"fit_s_poll_{interval}s"] = timed(lambda: fit(_three_reports, {}, name="bench", storage=tmp),
                                                       repeats)
    finally:                                             # the later sections see the setting they started with
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
        ray.shutdown()
    return out | {"speedup": out["fit_s_poll_2s"] / out["fit_s_poll_0.25s"]}


class _StartupProbe:
    """A sampling actor that notes when things happened (time.time()): its process was created, its constructor
    began (after Ray's worker start and the import of this module: torch, raydd), the model was loaded, the
    first batch was sampled."""

    def __init__(self, spec: BackboneSpec, sampler: SamplerConfig):
        import psutil

        self.t = {"process": psutil.Process().create_time(), "init": time.time()}
        self.batches = SampleBatches(spec, sampler, threads=1)
        self.t["loaded"] = time.time()

    def first_batch(self, rows: dict) -> dict:
        self.batches(rows)
        return self.t | {"first_batch": time.time()}


_IMPORTS = """import time
t0 = time.perf_counter(); import torch
t1 = time.perf_counter(); import raydd.generate, raydd.distributed.data
t2 = time.perf_counter(); import raydd.backbone, diffusers.models.transformers.dit_transformer_2d
t3 = time.perf_counter(); import raydd.jobs, raydd.distributed.train
t4 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)"""


def bench_startup(spec: BackboneSpec, sampler: SamplerConfig) -> dict:
    """#23 part 3: where a sampling actor's and a Train job's start-up time goes, on the digits world's DiT.
    (1) imports in a fresh interpreter, one after the other: torch; raydd's sampling modules; diffusers' DiT
    (the model load's own import); the Train job modules. (2) A 1-CPU actor on a fresh local Ray: submit ->
    constructor (process start, Ray's worker, imports) -> model loaded -> first unit sampled, next to the same
    unit sampled in an already warm process. (3) One sampling stage (generate_ray, 1 actor, 1 unit) in a pool of its
    own, start to finish, minus that warm sampling time; and the same stage in a warm pool (raydd.distributed.pool,
    as a runner's stages after its first). (4) A 1-worker Ray Train fit that only reports 3 times (bench_train)."""
    import ray

    from raydd.distributed.cluster import init_ray
    from raydd.distributed.data import generate_ray
    from raydd.distributed.pool import WarmPool
    from raydd.distributed.train import fit

    out: dict = {}
    imports = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=True)
    names = ("import_torch_s", "import_raydd_sampling_s", "import_diffusers_dit_s", "import_train_jobs_s")
    out |= dict(zip(names, map(float, imports.stdout.split())))
    rows = make_rows(10, 1, run_seed=0, unit_size=10)                  # one unit: 10 images, one per class
    torch.set_num_threads(1)
    warm = SampleBatches(spec, sampler, threads=1)
    warm(rows)
    out["sample_unit_warm_s"] = timed(lambda: warm(rows), 2)
    torch.set_num_threads(os.cpu_count() or 1)
    init_ray(ComputeConfig())
    try:
        time.sleep(5)                                                 # let Ray's own start-up work finish
        submit = time.time()
        probe = ray.remote(num_cpus=1)(_StartupProbe).remote(spec, sampler)
        t = ray.get(probe.first_batch.remote(rows))
        ray.kill(probe)
        out |= {"actor_to_constructor_s": t["init"] - submit, "actor_process_age_at_constructor_s": t["init"] - t["process"],
                "actor_model_load_s": t["loaded"] - t["init"], "actor_first_unit_s": t["first_batch"] - t["loaded"],
                "actor_to_first_unit_s": t["first_batch"] - submit}
        one = ComputeConfig(num_actors=1, cpus_per_actor=1, batch_size=10)
        out["stage_s"] = timed(lambda: generate_ray(spec, sampler, rows, one), 2)      # a pool of its own
        out["stage_overhead_s"] = out["stage_s"] - out["sample_unit_warm_s"]
        pool = WarmPool(one)                                          # a runner's: stages after the first are warm
        generate_ray(spec, sampler, rows, one, pool=pool)
        out["warm_stage_s"] = timed(lambda: generate_ray(spec, sampler, rows, one, pool=pool), 2)
        out["warm_stage_overhead_s"] = out["warm_stage_s"] - out["sample_unit_warm_s"]
        pool.release()
        with tempfile.TemporaryDirectory() as tmp:
            out["train_fit_s"] = timed(lambda: fit(_three_reports, {}, name="bench-startup", storage=tmp), 2)
    finally:
        ray.shutdown()
    return out


def peak_tree_rss(cmd: list[str], env: dict, cwd: str, output: str | None = None) -> tuple[int, float, float, float, list]:
    """Run cmd (its stdout and stderr to the file `output`, or discarded); every 0.5 s sum the memory of it and
    all its descendants (Ray workers included).
    Returns (exit code, peak summed RSS GiB, peak summed PSS GiB, wall s, the largest processes at the PSS
    peak as [name, PSS MiB]). RSS counts shared pages (torch's libraries, the object store) once per
    process; PSS splits them between the processes sharing them."""
    import psutil

    sink = open(output, "w") if output else subprocess.DEVNULL
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
    proc, peak_rss, peak_pss, top, t0 = psutil.Process(p.pid), 0, 0, [], time.time()
    while p.poll() is None:
        rss = pss = 0
        procs = []
        for q in [proc] + proc.children(recursive=True):
            try:
                info = q.memory_full_info()
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                procs.append((getattr(info, "pss", info.rss), " ".join(q.cmdline())[:60] or q.name()))
            except psutil.Error:
                pass
        peak_rss = max(peak_rss, rss)
        if pss > peak_pss:
            peak_pss, top = pss, [[name, round(m / 2**20)] for m, name in sorted(procs, reverse=True)[:8]]
        time.sleep(0.5)
    if output:
        sink.close()
    return p.returncode, peak_rss / 2**30, peak_pss / 2**30, time.time() - t0, top


def bench_memory(quick: bool) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
        base = [sys.executable, "-m", "raydd.distill", "--method", "dit"] + (["--smoke"] if quick else [])
        for label, extra in (("default", []), ("two_actors", ["compute.num_actors=2", "run_name=bench2"])):
            rc, rss, pss, secs, top = peak_tree_rss(base + extra, env, tmp)
            out[f"{label}_rc"], out[f"{label}_wall_s"] = rc, secs
            out[f"{label}_peak_rss_gib"], out[f"{label}_peak_pss_gib"] = rss, pss
            out[f"{label}_largest_processes_pss_mib"] = top
    out["note"] = "summed over the driver and every Ray process it started; PSS shares pages between processes"
    return out


def _pil_pool_rate(files: list[Path], size: int, processes: int) -> float:
    """Images/s of a plain multi-process PIL loop (raydd.data.read_image: decode, resize, centre crop)."""
    import functools
    import multiprocessing

    from raydd.data import read_image

    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(functools.partial(read_image, size=size, channels=3), files, chunksize=16)
    return len(files) / (time.perf_counter() - t0)


def bench_scale(quick: bool) -> dict:
    """#20's scale check. (1) Peak PSS of the whole process tree (driver, Ray, actors, Train workers) of
    `python -m raydd.distill --method random --preset imagenette --smoke` (a distillation and its evaluation, on a
    CPU) on a synthetic ImageFolder with N and 4N train images per class: the ratio should stay near 1 when no
    process holds the real data. With and without data.store. The real-data job is the diagnostics' teacher
    (one epoch over the train split), a convnet_d1 in batches of 32 here, so that a CPU runs it in minutes and
    its activations (~9 GiB at the protocol's batch of 256 at 256 px) do not drown the data. (2) Store
    preparation (raydd.prepare, Ray Data) images/s next to a plain multi-process PIL loop over the same files
    (both with every CPU)."""
    from raydd.data import subset_classes
    from raydd.realarch import write_imagefolder, write_models

    n = 20 if quick else 50                                             # 4N = 2000 train images: a CPU-sized teacher epoch
    wnids = subset_classes("imagenette")
    out: dict = {"train_per_class": [n, 4 * n], "classes": len(wnids)}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
        dit, vae = write_models(Path(tmp), "s")                        # random DiT-S/2 + SD VAE: `random` samples nothing
        for k, per_class in (("N", n), ("4N", 4 * n)):
            root = Path(tmp) / f"folder{per_class}"
            write_imagefolder(root, wnids, train=per_class, val=5)      # 256 px noisy JPEGs, ~ImageNet's file size
            for store in ("", f"{tmp}/stores"):
                label = f"{k}_{'store' if store else 'decode'}"
                cmd = [sys.executable, "-m", "raydd.distill", "--method", "random", "--preset", "imagenette", "--smoke",
                       f"data.root={root}", f"data.store={store}", f"backbone.source={dit}", f"backbone.vae={vae}",
                       "compute.gpus_per_actor=0", "compute.gpus_per_worker=0", "compute.memory_per_actor_gib=0",
                       "eval.ranking=false", "eval.teacher_arch=convnet_d1", "eval.batch_size=32",
                       f"run_name=scale-{label}", f"out_dir={tmp}/outputs"]
                # a cache of its own: cache keys leave data.store out, so a shared cache gave the store runs the
                # decode runs' teacher, and they measured no real-data job at all
                rc, rss, pss, secs, top = peak_tree_rss(cmd, env | {"RAYDD_CACHE": f"{tmp}/cache-{label}"}, tmp,
                                                        output=f"{tmp}/{label}.log")
                if rc != 0:
                    raise RuntimeError(f"bench scale: {' '.join(cmd)} exited {rc}:\n"
                                       + Path(f"{tmp}/{label}.log").read_text()[-3000:])
                out[f"{label}_peak_pss_gib"], out[f"{label}_wall_s"], out[f"{label}_largest_pss_mib"] = pss, secs, top
        for mode in ("decode", "store"):
            out[f"pss_ratio_4N_over_N_{mode}"] = out[f"4N_{mode}_peak_pss_gib"] / out[f"N_{mode}_peak_pss_gib"]
        out |= prepare_rates(Path(tmp) / f"folder{4 * n}", Path(tmp) / "rate-store")       # (2), on the 4N folder
    return out


def prepare_rates(root: Path, store: Path, sources: tuple[str, ...] = ("imagefolder",)) -> dict:
    """Store preparation (raydd.prepare on a fresh local Ray, every CPU, after a warm-up) vs a plain multi-process
    PIL loop with every CPU, over the same ImageFolder (train/ and val/), in images/s; with "webdataset" /
    "huggingface" in `sources`, also from the same images as that source (raydd.realarch.write_shards), each into
    its own store."""
    import ray

    from raydd.distributed.cluster import init_ray
    from raydd.prepare import prepare_store
    from raydd.realarch import write_shards

    files = sorted(root.rglob("*.JPEG"))
    cpus = os.cpu_count() or 1
    out = {"cpus": cpus, "images": len(files), "pil_pool_images_per_s": _pil_pool_rate(files, 256, cpus)}
    classes = ",".join(sorted(p.name for p in (root / "train").iterdir()))
    cfg = load_config("imagenette", [f"data.root={root}", f"data.store={store}", f"data.classes={classes}",
                                     "compute.gpus_per_actor=0", "compute.gpus_per_worker=0",
                                     "compute.memory_per_actor_gib=0"])
    init_ray(cfg.compute)
    try:
        # a warm-up store (2 images a class) first: Ray Data's workers start and import once, as they do once in
        # a preparation of ImageNet; measured cold, whichever source came first paid for it (about 2x slower here)
        prepare_store(dataclasses.replace(cfg.data, max_train_per_class=2, store=f"{store}-warm-up"))
        for source in sources:
            data = cfg.data
            if source != "imagefolder":
                write_shards(root, root.parent / f"{root.name}-{source}", source)
                data = dataclasses.replace(data, dataset=source, root=str(root.parent / f"{root.name}-{source}"))
            t0 = time.perf_counter()
            prepare_store(data)
            key = "prepare" if source == "imagefolder" else f"prepare_{source}"
            out[f"{key}_images_per_s"] = len(files) / (time.perf_counter() - t0)
            out[f"{key}_over_pil_pool"] = out[f"{key}_images_per_s"] / out["pil_pool_images_per_s"]
    finally:
        ray.shutdown()
    return out


def bench_prepare(quick: bool) -> dict:
    """Store preparation from each source (ImageFolder, WebDataset shards, a Hugging Face dataset's parquet files)
    of the same synthetic 256 px JPEGs (10 imagenette classes, 200 train + 5 val each; 50 with --smoke), next to a
    plain multi-process PIL loop over the files (prepare_rates)."""
    from raydd.data import subset_classes
    from raydd.realarch import write_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        write_imagefolder(root, subset_classes("imagenette"), train=50 if quick else 200, val=5)
        return prepare_rates(root, Path(tmp) / "stores", ("imagefolder", "webdataset", "huggingface"))


DIT_XL_2 = {"hidden_size": 1152, "depth": 28, "heads": 16, "patch_size": 2}   # DiT-XL/2
DIT_S_2 = {"hidden_size": 384, "depth": 12, "heads": 6, "patch_size": 2}      # DiT-S/2
ARCHS = {"xl": DIT_XL_2, "s": DIT_S_2}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}   # sd-vae-ft-*: 8x down, 4 channels


def random_backbone(arch: dict, vae_arch: dict, image_size: int, num_classes: int = 1000):
    """A DiT of `arch` and an SD-style VAE of `vae_arch`, random weights (speed does not depend on them).
    Built on the current default device (the meta device for counting FLOPs)."""
    from diffusers import AutoencoderKL

    from raydd.backbone import SDVAE, Backbone, _build_dit

    blocks = len(vae_arch["block_out_channels"])
    vae = AutoencoderKL(block_out_channels=vae_arch["block_out_channels"], layers_per_block=vae_arch["layers_per_block"],
                        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        latent_channels=4, sample_size=image_size)
    latent = image_size // 2 ** (blocks - 1)
    transformer = _build_dit(num_classes=num_classes, in_channels=4, out_channels=8, sample_size=latent, **arch)
    return Backbone(transformer, SDVAE(vae)).eval().requires_grad_(False)


def count_flops(arch: dict, vae_arch: dict, image_size: int) -> tuple[float, float]:
    """(FLOP of one DiT forward, FLOP of one VAE decode) for one image, counted by torch's FlopCounterMode
    on the meta device (no memory, no compute). DiT-XL/2 at 256 px: 237 GFLOP (the DiT paper's 118.6
    GMACs), the SD VAE decode: 622 GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        backbone = random_backbone(arch, vae_arch, image_size)
        x = torch.zeros(1, *backbone.latent_shape)
        with FlopCounterMode(display=False) as dit:
            backbone(x, torch.tensor([500]), torch.tensor([0]))
        with FlopCounterMode(display=False) as vae:
            backbone.vae.decode(x)
    return float(dit.get_total_flops()), float(vae.get_total_flops())


def _guided_step_peak(arch: str, mode: str, batch: int, micro_batch: int, checkpoint: bool, device: str) -> dict:
    """In a fresh process: one guided step (J on the VAE-decoded x̂0, as LGD/IGDS) of `batch` rows through a
    random DiT of `arch` + SD VAE at 256 px, fp32. -> peak memory above the loaded models, in GiB."""
    import resource

    from raydd.sampling import Guidance, guided_eps

    torch.manual_seed(0)
    dev = torch.device(device)
    backbone = random_backbone(ARCHS[arch], SD_VAE, 256).to(dev)
    x = torch.randn(batch, *backbone.latent_shape, device=dev)
    t, y = torch.full((batch,), 500, device=dev), torch.arange(batch, device=dev)
    guidance = Guidance(lambda img, t, y, st: img.flatten(1).mean(1), scale=1.0, mode=mode, on_images=True)
    cfg = SamplerConfig(cfg_scale=4.0, guidance_micro_batch=micro_batch, guidance_checkpoint=checkpoint)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.time()
    guided_eps(backbone, guidance, x, t, y, 0.5, 0.02, cfg)
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"extra_gib": (peak - base) / 2 ** 30, "seconds": seconds}


def bench_guided_memory(arch: str, batch: int, device: str = "cpu") -> dict:
    """Peak memory of one guided step above the models, per mode (full: through the DiT; x0: ε̂ constant),
    sampler.guidance_micro_batch (mb0 = the whole batch at once, mb1 = a row at a time) and
    sampler.guidance_checkpoint (_ckpt: activations recomputed in the backward pass). Each in a fresh process."""
    import concurrent.futures
    import multiprocessing

    out = {"arch": arch, "batch": batch, "device": device}
    ctx = multiprocessing.get_context("spawn")
    for mode in ("x0", "full"):
        for mb, ckpt in ((0, False), (1, False), (0, True), (1, True)):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                r = pool.submit(_guided_step_peak, arch, mode, batch, mb, ckpt, device).result()
            key = f"{mode}_mb{mb}" + ("_ckpt" if ckpt else "")
            out[f"{key}_gib"], out[f"{key}_s"] = r["extra_gib"], r["seconds"]
        out[f"{mode}_per_image_gib"] = out[f"{mode}_mb0_gib"] / batch
        out[f"{mode}_ckpt_per_image_gib"] = out[f"{mode}_mb0_ckpt_gib"] / batch
    return out


def bench_gpu(steps: int, batch: int, compile_model: bool, device: str = "cuda", arch: dict = DIT_XL_2,
              vae_arch: dict = SD_VAE, image_size: int = 256, matmul_n: int = 8192) -> dict:
    """DiT-XL/2 at 256 px with random weights: DDPM with CFG + VAE decode, images/s per GPU in fp32, tf32 and
    bf16 autocast (SDPA attention, diffusers' default), optionally torch.compile; next to the physical limit
    = measured bf16 matmul rate / FLOP per image (`steps` x 2 DiT forwards for CFG + one decode, counted).
    The arguments after `compile_model` shrink it to run anywhere (the tests run it on CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=torch.bfloat16)
    a @ a
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    sync()
    tflops = 20 * 2 * matmul_n**3 / (time.perf_counter() - t0) / 1e12
    dit_flop, vae_flop = count_flops(arch, vae_arch, image_size)
    flop_per_image = steps * 2 * dit_flop + vae_flop
    limit = tflops * 1e12 / flop_per_image
    backbone = random_backbone(arch, vae_arch, image_size).to(dev)
    sampler = SamplerConfig(steps=steps, cfg_scale=4.0)
    y, seeds = torch.randint(0, 1000, (batch,)), list(range(batch))
    out = {"matmul_bf16_tflops": tflops, "dit_forward_gflop": dit_flop / 1e9, "vae_decode_gflop": vae_flop / 1e9,
           "flop_per_image": flop_per_image, "limit_images_per_s": limit}

    def run(dtype):
        z = sample(backbone, y, seeds, sampler, device=dev, autocast_dtype=dtype)["z0"]
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            backbone.vae.decode(z)
        sync()

    variants = [("fp32", None, False), ("bf16", torch.bfloat16, True)]
    if dev.type == "cuda":
        variants.insert(1, ("tf32", None, True))
    for label, dtype, tf32 in variants:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        run(dtype)                                              # warm-up (cuDNN autotuning, allocator)
        out[f"{label}_images_per_s"] = batch / timed(lambda: run(dtype), 2)
    if compile_model:
        backbone.transformer = torch.compile(backbone.transformer)
        run(torch.bfloat16)                                     # compiles
        out["bf16_compile_images_per_s"] = batch / timed(lambda: run(torch.bfloat16), 2)
    best = max(v for k, v in out.items() if k.endswith("_images_per_s") and not k.startswith("limit"))
    out["gpu_fraction_of_limit"] = best / limit
    return out


SCHEDULER_GRID = [("ddpm", 50)] + [(name, k) for name in ("dpm++", "unipc", "euler", "ddim") for k in (10, 15, 25)]


def bench_schedulers(n: int, grid: list[tuple[str, int]] = SCHEDULER_GRID) -> dict:
    """images/s of sample() per (scheduler, steps), one thread (what one sampling actor gets), on the DiT sizes
    of `digits` (1x16x16 pixels, clip_x0) and `digits-latent` (4x8x8 latents, unclipped). Only the loop: the
    VAE decode, once per image whatever the scheduler, is left out. Accuracy at each setting is not a speed
    figure: the README's table comes from `python -m raydd.distill ... sampler.scheduler=S sampler.steps=K`."""
    from raydd.backbone import Backbone, IdentityVAE, tiny_dit

    torch.set_num_threads(1)
    out: dict = {"images": n}
    for world, (channels, side, clip) in {"digits": (1, 16, True), "digits-latent": (4, 8, False)}.items():
        b = load_config(world).backbone
        torch.manual_seed(0)
        backbone = Backbone(tiny_dit(10, channels, side, b.hidden_size, b.depth, b.heads, b.patch_size),
                            IdentityVAE()).eval()
        y, seeds = torch.arange(n) % 10, list(range(n))
        rates = {}
        for name, steps in grid:
            if clip and name == "euler":
                continue                                   # euler does not clip x0_hat (config rejects it)
            cfg = SamplerConfig(scheduler=name, steps=steps, cfg_scale=4.0, clip_x0=clip)
            rates[f"{name}-{steps}"] = n / timed(lambda: sample(backbone, y, seeds, cfg), 2)
        out[world] = {"images_per_s": rates, "speedup_vs_ddpm50": {k: v / rates["ddpm-50"] for k, v in rates.items()}}
    torch.set_num_threads(os.cpu_count() or 1)
    return out


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raydd.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", default="", help="comma list of: sharding,batching,guidance,schedulers,train,student,"
                                              "memory,startup,gpu; not in the default set: guided-memory (minutes at DiT-XL/2 "
                                              "on a CPU), scale (#20: real-data memory and store throughput), "
                                              "prepare (store throughput from each source)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--smoke", "--quick", dest="quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else {"sharding", "batching", "guidance", "schedulers", "train",
                                                         "student", "memory", "startup", "gpu"}
    q = args.quick
    sampler = SamplerConfig(steps=10 if q else 50, cfg_scale=4.0, clip_x0=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                     "targets": TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        spec = tiny_spec(Path(tmp))
        if "sharding" in only:
            log("sharding and scaling ...")
            results["sharding"] = bench_sharding_and_scaling(spec, sampler, n=100 if q else 800, batch=50)
        if "batching" in only:
            log("batching ...")
            results["batching"] = bench_batching(spec, sampler, n=32 if q else 64, sizes=[1, 4, 16, 32] if q else [1, 4, 16, 64])
        if "guidance" in only:
            log("guidance ...")
            results["guidance"] = bench_guidance(spec, sampler, n=20 if q else 50)
        if "startup" in only:
            log("start-up ...")
            results["startup"] = bench_startup(spec, sampler)
    if "schedulers" in only:
        log("schedulers ...")
        results["schedulers"] = bench_schedulers(n=20 if q else 100)
    if "train" in only:
        log("Ray Train overhead ...")
        results["train"] = bench_train(repeats=1 if q else 3)
    if "student" in only:
        log("student training ...")
        results["student"] = bench_student(epochs=5 if q else 20, repeats=1 if q else 2)
    if "memory" in only:
        log("memory (runs python -m raydd.distill twice) ...")
        results["memory"] = bench_memory(q)
    if "guided-memory" in only:
        log("guided-memory (one guided step of a random DiT + SD VAE at 256 px, in fresh processes) ...")
        results["guided_memory"] = bench_guided_memory("s" if q else "xl", batch=2,
                                                       device="cuda" if torch.cuda.is_available() else "cpu")
    if "scale" in only:
        log("scale (random + evaluation on a synthetic 256 px ImageFolder, N and 4N per class; store throughput) ...")
        results["scale"] = bench_scale(q)
    if "prepare" in only:
        log("prepare (a store from an ImageFolder, WebDataset shards and parquet files of the same images) ...")
        results["prepare"] = bench_prepare(q)
    if "gpu" in only:
        log("gpu ...")
        results["gpu"] = bench_gpu(steps=10 if q else 50, batch=8 if q else 32, compile_model=not q)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    log(f"wrote {args.out}")
    for section, r in results.items():
        if section in ("machine", "targets"):
            continue
        log(f"{section}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                         if not isinstance(v, (dict, list))))
    if not args.no_mlflow:
        from raydd.config import TrackingConfig, flatten
        from raydd.tracking import Tracker

        tracker = Tracker(TrackingConfig(experiment="raydd-bench"), f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
        flat = flatten({k: v for k, v in results.items() if k != "targets"})
        tracker.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_dict(results, "bench.json")
        tracker.end()
    return 0


if __name__ == "__main__":
    sys.exit(main())
