"""The Ray Train jobs raydd runs besides the methods' own: classifiers on the real data (teacher, selector,
encoders: `real_classifier`, `teacher_loop`), a classifier on a set (`set_classifier_loop`), and evaluating a
distilled set (`evaluate_set`, `eval_loop`; the CLI is raydd.evaluate, the student protocols raydd.protocols).

Evaluating a set: (student x seed) jobs, plus the DD-Ranking references (the same
students trained on the full real data with hard labels, and on random real subsets at the same
IPC under the same protocol), run as one training job whose workers split the job list.

`eval_loop` is a plain training loop (raydd.train_hooks): under Ray Train each worker takes
jobs[rank::world_size] and the results are gathered to rank 0. References and soft-label teachers
are cached by config hash under <cache_dir>, so repeated runs only train the distilled set's students.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from raydd.config import Config, DataConfig, EvalConfig, config_hash
from raydd.data import (RealData, Split, StreamedSplit, load_real, store_manifest, stream_spec,
                        streamed_split)
from raydd.generate import random_picks, random_subset
from raydd.protocols import dd_ranking, epochs_for, fit_student, split_accuracy, train_teacher
from raydd.train_hooks import TrainHooks


INLINE_LIMIT = 512 * 2**20  # sets up to this size travel inside the job config (no shared file system needed)


def set_source(path: str) -> dict:
    """How evaluation workers get a written set (our output at `path`): the arrays themselves when small (workers on
    other nodes need no shared file system), else the path, from which they stream it (streamed_set; then it must
    be on shared storage). The size comes from the files' shapes: a large set is never read here."""
    from raydd.outputs import image_nbytes, read_distilled

    if image_nbytes(path) <= INLINE_LIMIT:
        s = read_distilled(path)
        return {"kind": "arrays", "x": s.images.numpy(), "y": s.labels.numpy(), "path": path}
    return {"kind": "parquet", "path": path}


def load_set(source: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """source (set_source): {"kind": "arrays", "x", "y"} or {"kind": "parquet", "path"} (our output) -> (x, y)."""
    if source["kind"] == "arrays":
        # copies: arrays from Ray's object store are read-only, and torch warns about (and may write to) them
        return torch.from_numpy(source["x"].copy()), torch.from_numpy(source["y"].copy())
    from raydd.outputs import read_distilled

    s = read_distilled(source["path"])
    return s.images, s.labels


def streamed_set(source: dict) -> tuple[dict, dict]:
    """(source, datasets) for a Train job that trains on a distilled set (set_source): a set too large to travel
    inline (a "parquet" source) streams to every worker as the job's "syn" dataset (set_dataset), the counts of its
    classes added to the source for the labels; a small one (its arrays) goes as it is, with no dataset."""
    if source["kind"] != "parquet":
        return source, {}
    from raydd.distributed.store import set_dataset

    return source | {"counts": store_manifest(source["path"])["counts"]}, {"syn": set_dataset(source["path"])}


def synthetic_split(source: dict, hooks: TrainHooks, dcfg: DataConfig) -> Split | StreamedSplit:
    """The distilled set in an evaluation worker: streamed from the job's "syn" dataset when it has one (a set too
    large to travel inline, evaluate_set), holding a shuffle buffer, else held (load_set)."""
    stream = hooks.dataset("syn")
    if stream is None:
        return Split(*load_set(source))
    labels = np.repeat(np.arange(len(source["counts"])), source["counts"])
    return StreamedSplit(stream, labels, (dcfg.channels, dcfg.image_size, dcfg.image_size))


def load_student(path: str, arch: str, data: RealData, dcfg: DataConfig) -> torch.nn.Module:
    """A student of `arch` from its safetensors state dict (the soft protocol's teacher, a given real-data
    reference), frozen, in eval mode."""
    from safetensors.torch import load_file

    from raydd.students import create_student

    model = create_student(arch, data.num_classes, dcfg.channels, dcfg.image_size)
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


def real_split(cfg: DataConfig, hooks: TrainHooks, data: RealData, split: str, key: str) -> Split | StreamedSplit:
    """A real split in a Train worker: streamed from the job's dataset `key` when it has one (`real_datasets`),
    else held (data.split(split))."""
    source = hooks.dataset(key)
    return data.split(split) if source is None else streamed_split(source, stream_spec(cfg, split), cfg)


def real_train(cfg: DataConfig, hooks: TrainHooks, data: RealData) -> Split | StreamedSplit:
    return real_split(cfg, hooks, data, "train", "train")


def streams(cfg: Config) -> bool:
    """Whether the real data is read from a prepared store as a stream (any source with data.store)."""
    return bool(cfg.data.store)


def real_datasets(cfg: Config, *keys: str, latents: str = "") -> dict:
    """The real splits a Train job reads, as Ray Datasets (raydd.distributed.store.part_dataset) when the data has
    a store, else {} (each worker holds what it reads). keys: "train" (the train split), "val" (its hold-out) and
    "eval" (eval.split: the val hold-out or the test split); the loop reads each with real_split. latents: the
    location of the train split's stored latents (raydd.prepare.prepare_latents): "train" streams those."""
    if not streams(cfg):
        return {}
    from raydd.distributed.store import part_dataset

    split_of = {"train": "train", "val": "val", "eval": cfg.eval.split}
    return {key: part_dataset(cfg.data, stream_spec(cfg.data, split_of[key]), seed=cfg.data.split_seed,
                              latents=latents if key == "train" else "")
            for key in keys}


def _job_epochs_and_size(job: dict, n_syn: int, n_real: int, num_classes: int, ecfg: EvalConfig) -> tuple[int, int]:
    """(epochs, training-set size) of one job: its cost is about their product. A job's own "epochs"
    (a stage of a sweep trial) overrides the protocol's."""
    soft = job["protocol"] == "soft"
    if job.get("checkpoint"):                          # a given real-data student: scored, not trained
        return 0, 0
    if job["kind"] == "real":
        n, ipc = n_real, n_real // num_classes
    else:
        n, ipc = (n_syn if job["kind"] == "syn" else job["ipc"] * num_classes), job["ipc"]
    return job.get("epochs") or epochs_for(ipc, ecfg, soft=soft), n


def _save_results(hooks: TrainHooks, done: dict[int, dict], metrics: dict) -> None:
    """Every worker reports (Ray Train reports are collective); rank 0's checkpoint holds the results of
    every finished job (results.json, keyed by the job's index)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        if hooks.world_rank == 0:
            Path(d, "results.json").write_text(json.dumps({str(i): r for i, r in sorted(done.items())}))
        hooks.report(metrics, checkpoint_dir=d if hooks.world_rank == 0 else None)


def round_threads(peers: list[tuple[str, int]], busy: int, rank: int) -> int:
    """Torch threads for `rank` in a round where ranks 0..busy-1 have a job; peers[r] = (node, threads given
    to rank r). Each node's threads are shared out among its busy ranks, the first ones getting one more
    when they do not divide evenly. Thread counts change the order of float sums, so a job's numbers may
    differ slightly from the same job on other thread counts (as they do between machines)."""
    here = [r for r in range(len(peers)) if peers[r][0] == peers[rank][0]]
    busy_here = [r for r in here if r < busy]
    share, extra = divmod(sum(peers[r][1] for r in here), len(busy_here))
    return share + int(busy_here.index(rank) < extra)


def trains_on_real(job: dict) -> bool:
    """A real reference or a random subset trains on the real train split; a given checkpoint does not."""
    return job["kind"] != "syn" and not job.get("checkpoint")


def eval_loop(config: dict, hooks: TrainHooks) -> None:
    """config: {"data", "eval", "jobs": [{kind, student, seed, protocol, ipc[, stage, epochs, checkpoint]}], "source",
    "teacher"} (+ "fault": {"after_rounds", "marker"} in tests: rank 0 dies once after that many rounds).

    Jobs run stage by stage (a job's "stage", default 1; a sweep trial's stages train the students for
    1/4, 1/2 and all of the epochs). Within a stage they run in rounds of world_size, longest first, so the
    workers of one round finish at about the same time. Every round ends in a report with a checkpoint of
    all finished results: a worker failure (FailureConfig) or a rerun of the same run after the driver died
    resumes with only the unfinished jobs. A stage's last report also carries {"stage", "acc"}: the mean
    top-1 of its synthetic-set jobs (what a Tune trial reports)."""
    dcfg, ecfg = DataConfig(**config["data"]), EvalConfig(**config["eval"])
    jobs = config["jobs"]
    # only real and random-subset jobs, and a val split held out of train, need the train split in this worker;
    # given as streams (a store), neither it nor the evaluation split is ever held
    streamed = hooks.dataset("train") is not None
    data = load_real(dcfg, train=not streamed and (ecfg.split == "val" or any(map(trains_on_real, jobs))))
    target = real_split(dcfg, hooks, data, ecfg.split, "eval")
    real = real_train(dcfg, hooks, data) if any(map(trains_on_real, jobs)) else None
    syn = synthetic_split(config["source"], hooks, dcfg) if config.get("source") else None
    teacher = load_student(config["teacher"], ecfg.teacher_arch, data, dcfg) if config.get("teacher") else None
    done: dict[int, dict] = {}
    if hooks.restore_dir() and Path(hooks.restore_dir(), "results.json").exists():
        done = {int(i): r for i, r in json.loads(Path(hooks.restore_dir(), "results.json").read_text()).items()}
    restored = len(done)
    n_syn = len(syn) if syn is not None else 0

    def cost(i: int) -> int:
        epochs, n = _job_epochs_and_size(jobs[i], n_syn, len(real) if real else 0, data.num_classes, ecfg)
        return epochs * n

    def run(job: dict) -> dict:
        if job.get("checkpoint"):                     # the user's student trained on the real data: only scored
            model = load_student(job["checkpoint"], job["student"], data, dcfg).to(hooks.device)
            acc = split_accuracy(model, target, device=hooks.device)
            return {**job, "best_acc": acc, "final_acc": acc, "given": True,
                    "eval_streamed": isinstance(target, StreamedSplit)}
        if job["kind"] == "syn":
            train = syn
        elif job["kind"] == "real":
            train = real
        elif isinstance(real, StreamedSplit) and job["ipc"] * data.num_classes * math.prod(real.shape) > config["hold"]:
            # "random" too large to hold (over INLINE_LIMIT, as a set): its picks streamed on their own
            train = real.subset(random_picks(real.y, job["ipc"], job["seed"]).numpy())
        else:  # "random": a fresh random real subset per repeat (from a stream: one pass that keeps the picks)
            r = random_subset(real, job["ipc"], seed=job["seed"])
            train = Split(r.images, r.labels)
        soft = job["protocol"] == "soft"
        epochs, _ = _job_epochs_and_size(job, n_syn, len(real) if real else 0, data.num_classes, ecfg)
        tag = f"[{job['kind']} {job['student']} {job['protocol']} seed {job['seed']}]"
        res = fit_student(train, target, student=job["student"], num_classes=data.num_classes,
                          cfg=ecfg, epochs=epochs, seed=job["seed"], protocol=job["protocol"],
                          teacher=teacher if soft else None, device=hooks.device,
                          log=lambda line, tag=tag: print(tag, line, flush=True))
        return {**job, **{k: res[k] for k in ("best_acc", "final_acc", "images_per_s", "train_s", "epochs", "curve")},
                "threads": torch.get_num_threads(), "eval_streamed": isinstance(target, StreamedSplit),
                "train_streamed": isinstance(train, StreamedSplit)} | (      # (the set, or a random subset)
                    {} if job["kind"] == "syn" else {"streamed": streamed})        # the real split came as a stream

    # A round with fewer jobs than workers (the last of 3 seeds on 2 workers) leaves some workers waiting in
    # all_gather, which costs no CPU: the busy workers on their node take over their threads (one digits
    # convnet_d3 job here: 23 s on 1 thread, 13 s on 2; the default run's evaluation 63-68 s -> 53-56 s).
    # Ray sets a worker's threads to its CPUs.
    own_threads, on_cpu = torch.get_num_threads(), hooks.device.type == "cpu"
    peers = hooks.all_gather((hooks.node_id, own_threads))                      # [(node, threads)] by rank
    fault, rounds_run = config.get("fault") or {}, 0
    for stage in sorted({job.get("stage", 1) for job in jobs}):
        in_stage = [i for i in range(len(jobs)) if jobs[i].get("stage", 1) == stage]
        syn_jobs = [i for i in in_stage if jobs[i]["kind"] == "syn" and jobs[i]["protocol"] == ecfg.protocol]
        todo = sorted((i for i in in_stage if i not in done), key=lambda i: (-cost(i), i))
        # [[]]: a stage restored whole still reports (its stage metrics, and the final checkpoint)
        rounds = [todo[k:k + hooks.world_size] for k in range(0, len(todo), hooks.world_size)] or [[]]
        for n, round_jobs in enumerate(rounds, start=1):
            mine = round_jobs[hooks.world_rank:hooks.world_rank + 1]            # [] or [job index]
            if mine and on_cpu:
                torch.set_num_threads(round_threads(peers, len(round_jobs), hooks.world_rank))
            finished = [(i, run(jobs[i])) for i in mine]
            torch.set_num_threads(own_threads)
            for part in hooks.all_gather(finished):
                done.update(part)
            metrics = {"jobs_done": len(done), "jobs_restored": restored}
            if n == len(rounds) and syn_jobs:                                   # the stage is complete
                metrics |= {"stage": stage, "acc": statistics.mean(done[i]["best_acc"] for i in syn_jobs)}
            _save_results(hooks, done, metrics)
            rounds_run += bool(round_jobs)
            if (hooks.world_rank == 0 and round_jobs and rounds_run == fault.get("after_rounds")
                    and not Path(fault["marker"]).exists()):
                # fault injection: this worker process dies during the next round. Ray Train's controller
                # collects reports when it polls the workers (at most every 2 s): wait for that, so the test
                # knows what was saved (a real death right after a report may lose it and cost one round)
                time.sleep(3.0)
                Path(fault["marker"]).touch()
                os._exit(1)


def set_classifier_loop(config: dict, hooks: TrainHooks) -> None:
    """Train a classifier on a distilled set (config: source (set_source, streamed_set), data, arch, num_classes,
    eval, epochs, seed, evaluate): LGD's θ_{i−1}. Hard labels, the eval protocol's recipe; saves model.safetensors.
    With config["evaluate"] it also reports "eval_acc", its top-1 on eval.split: streamed from the job's "eval"
    dataset (a store), else held here."""
    import tempfile

    from safetensors.torch import save_file

    dcfg, ecfg = DataConfig(**config["data"]), EvalConfig(**config["eval"])
    train = synthetic_split(config["source"], hooks, dcfg)
    res = fit_student(train, None, student=config["arch"], num_classes=config["num_classes"], cfg=ecfg,
                      epochs=config["epochs"], seed=config["seed"], device=hooks.device, return_model=True)
    metrics = {"train_s": res["train_s"], "epochs": res["epochs"], "streamed": isinstance(train, StreamedSplit)}
    if config["evaluate"]:
        held = None if hooks.dataset("eval") is not None else load_real(dcfg, train=ecfg.split == "val")
        target = real_split(dcfg, hooks, held, ecfg.split, "eval")
        metrics |= {"eval_acc": split_accuracy(res["model"], target, device=hooks.device),
                    "eval_streamed": isinstance(target, StreamedSplit)}
    with tempfile.TemporaryDirectory() as d:
        if hooks.world_rank == 0:
            save_file({k: v.contiguous().cpu() for k, v in res["model"].state_dict().items()}, f"{d}/model.safetensors")
        hooks.report(metrics, checkpoint_dir=d if hooks.world_rank == 0 else None)


def teacher_loop(config: dict, hooks: TrainHooks) -> None:
    import tempfile

    from safetensors.torch import save_file

    dcfg, ecfg = DataConfig(**config["data"]), EvalConfig(**config["eval"])
    data = load_real(dcfg, train=hooks.dataset("train") is None)
    train = real_train(dcfg, hooks, data)
    model = train_teacher(train, arch=ecfg.teacher_arch, num_classes=data.num_classes,
                          cfg=ecfg, epochs=ecfg.teacher_epochs, seed=config["seed"], device=hooks.device,
                          log=lambda line: print("[teacher]", line, flush=True))
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, f"{d}/teacher.safetensors")
        hooks.report({"done": 1, "streamed": isinstance(train, StreamedSplit)}, checkpoint_dir=d)


def _ref_key(kind: str, student: str, cfg: Config, protocol: str) -> str:
    e = asdict(cfg.eval)
    relevant = {k: e[k] for k in e if k not in ("students", "ranking", "teacher", "real_acc", "real_checkpoint")}
    ipc = cfg.ipc if kind == "random" else 0
    return config_hash(kind, student, protocol, ipc, cfg.data, relevant)


def real_classifier(cfg: Config, runner, arch: str = "", epochs: int = 0) -> Path:
    """A hard-label classifier trained on the real train split (raydd.protocols.train_teacher), cached under
    teachers/ by its config: the soft protocol's teacher, the diagnostics' teacher, CaO2's selector, LGD's θ*
    and S3's encoder are one job when their arch and epochs agree. arch / epochs: "" / 0 = eval.teacher_*."""
    from raydd.context import train_cached

    e = asdict(cfg.eval) | {"students": [], "seeds": 0, "teacher": "", "teacher_arch": arch or cfg.eval.teacher_arch,
                            "teacher_epochs": epochs or cfg.eval.teacher_epochs}
    config = {"data": asdict(cfg.data), "eval": e, "seed": 0}
    return train_cached(runner, cfg.resolved_cache_dir(), "teachers", teacher_loop, config,
                        datasets=lambda: real_datasets(cfg, "train")) / "teacher.safetensors"


def ensure_teacher(cfg: Config, runner) -> str:
    """The soft protocol's teacher: the user's checkpoint, or one trained on the real train split (cached)."""
    if cfg.eval.teacher:
        if not Path(cfg.eval.teacher).exists():
            raise FileNotFoundError(f"eval.teacher={cfg.eval.teacher} does not exist")
        return cfg.eval.teacher
    return str(real_classifier(cfg, runner))


def teacher_encoder(cfg: Config, data: RealData, runner) -> dict:
    """The real-data teacher as a feature/score model spec for raydd.subgroups.load_encoder (trained once, cached)."""
    d = cfg.data
    return {"kind": "student", "arch": cfg.eval.teacher_arch, "path": ensure_teacher(cfg, runner),
            "num_classes": data.num_classes, "channels": d.channels, "image_size": d.image_size}


def eval_key(config: dict) -> str:
    """Names an evaluation job by everything that decides its results (the set's arrays by their sha256), so
    a rerun of the same run resumes its finished jobs and a changed evaluation starts afresh."""
    import hashlib

    source = dict(config.get("source") or {})
    for k in ("x", "y"):
        if k in source:
            source[k] = hashlib.sha256(source[k].tobytes()).hexdigest()
    return config_hash({**config, "source": source})


def evaluate_set(cfg: Config, source: dict, runner, max_workers: int = 1, stages: tuple[float, ...] = (1.0,),
                 callbacks: list | None = None) -> dict:
    """Train every (student, seed) on the distilled set and summarise; add DD-Ranking references.

    stages: fractions of the protocol's epochs; each stage trains every (student, seed) afresh for that
    many epochs and reports {"stage", "acc"} to `callbacks` (Ray Train callbacks: a sweep trial forwards
    them to Tune, so ASHA can stop it after a short stage). The summary is the last stage's.
    Returns {"students": {name: {"acc_mean","acc_std","accs",...}}, "ranking": {...}, "jobs": [...],
    "stages": [mean acc per stage]}"""
    e = cfg.eval
    full = epochs_for(cfg.ipc, e, soft=e.protocol == "soft")
    last = len(stages)
    jobs = [{"kind": "syn", "student": s, "seed": r, "protocol": e.protocol, "ipc": cfg.ipc}
            | ({"stage": k, "epochs": max(1, round(full * frac))} if last > 1 else {})
            for k, frac in enumerate(stages, start=1) for s in e.students for r in range(e.seeds)]
    if e.ranking and e.protocol == "soft":   # HLR / LRS need the set's hard-label accuracy: train that too
        jobs += [{"kind": "syn", "student": s, "seed": r, "protocol": "hard", "ipc": cfg.ipc}
                 | ({"stage": last} if last > 1 else {}) for s in e.students for r in range(e.seeds)]
    refs_dir = cfg.resolved_cache_dir() / "references"
    cached: dict[tuple, list] = {}
    if e.ranking:
        for s in e.students:
            for kind, protocol in (("real", "hard"), ("random", "hard"), ("random", e.protocol)):
                f = refs_dir / f"{_ref_key(kind, s, cfg, protocol)}.json"
                if (kind, s, protocol) in cached:
                    continue
                if kind == "real" and s in e.real_acc:               # given by the user: nothing to train
                    cached[(kind, s, protocol)] = [{"best_acc": float(e.real_acc[s]), "given": True}]
                elif kind == "real" and s in e.real_checkpoint:      # the user's trained student: scored only
                    cached[(kind, s, protocol)] = []
                    jobs += [{"kind": kind, "student": s, "seed": 0, "protocol": protocol, "ipc": cfg.ipc,
                              "checkpoint": e.real_checkpoint[s]} | ({"stage": last} if last > 1 else {})]
                elif f.exists():
                    cached[(kind, s, protocol)] = json.loads(f.read_text())
                else:
                    cached[(kind, s, protocol)] = []
                    jobs += [{"kind": kind, "student": s, "seed": r, "protocol": protocol, "ipc": cfg.ipc}
                             | ({"stage": last} if last > 1 else {}) for r in range(e.seeds)]
    teacher = ensure_teacher(cfg, runner) if any(j["protocol"] == "soft" for j in jobs) else ""
    source, syn = streamed_set(source)                           # a large set streams to every worker
    config = {"data": asdict(cfg.data), "eval": asdict(e), "jobs": jobs, "source": source, "teacher": teacher,
              "hold": INLINE_LIMIT}                              # a random reference's subset larger than this streams
    p = cfg.compute.parallel_jobs
    workers = max(1, min(len(jobs), max_workers if p <= 0 else p))
    streams = real_datasets(cfg, *(["train"] if any(map(trains_on_real, jobs)) else []), "eval")
    streams |= syn
    if streams and p <= 0:
        # some of the stream's Ray Data tasks ask for a CPU: workers holding every CPU left them pending forever
        # (two 1-CPU nodes, two workers); leave one
        workers = max(1, min(workers, max_workers - 1))
    result = runner.train(eval_loop, config, name=f"eval-{cfg.resolved_run_name()}", num_workers=workers,
                          resume_key=eval_key(config), callbacks=callbacks, datasets=streams)
    by_index = json.loads(Path(result.checkpoint_dir, "results.json").read_text())
    staged = [by_index[str(i)] for i in range(len(jobs))]
    own = [r for r in staged if r["kind"] == "syn" and r["protocol"] == e.protocol]   # the protocol's own jobs
    stage_accs = [statistics.mean(r["best_acc"] for r in own if r.get("stage", 1) == k) for k in range(1, last + 1)]
    results = [r for r in staged if r.get("stage", last) == last]
    for r in results:
        key = (r["kind"], r["student"], r["protocol"])
        if r["kind"] != "syn":
            cached[key].append(r)
    refs_dir.mkdir(parents=True, exist_ok=True)
    for (kind, s, protocol), rs in cached.items():
        f = refs_dir / f"{_ref_key(kind, s, cfg, protocol)}.json"
        if rs and not f.exists() and not rs[0].get("given"):
            f.write_text(json.dumps(rs))
    summary: dict = {"students": {}, "ranking": {}, "jobs": results, "stages": stage_accs}
    for s in e.students:
        mine = [r for r in results if r["kind"] == "syn" and r["student"] == s and r["protocol"] == e.protocol]
        accs, finals = [r["best_acc"] for r in mine], [r["final_acc"] for r in mine]
        # acc: the best of the ~20 test evaluations during training (the reference repos' number; three
        # students often tie on it, e.g. 431/450 each); final: the last one, selected on nothing
        summary["students"][s] = {"acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs),
                                  "accs": accs, "final_mean": statistics.mean(finals), "finals": finals,
                                  "protocol": e.protocol,
                                  "images_per_s": statistics.mean(r["images_per_s"] for r in mine)}
        if e.ranking:
            mean = lambda rs: statistics.mean(r["best_acc"] for r in rs)  # noqa: E731
            real_hard = mean(cached[("real", s, "hard")])
            rand_hard, rand_proto = mean(cached[("random", s, "hard")]), mean(cached[("random", s, e.protocol)])
            syn = summary["students"][s]["acc_mean"]
            # HLR needs the synthetic set's hard-label accuracy: `syn` under the hard protocol, its own jobs under soft
            syn_hard = syn if e.protocol == "hard" else mean([r for r in results if r["kind"] == "syn"
                                                              and r["student"] == s and r["protocol"] == "hard"])
            rank = {"acc_real_hard": real_hard, "acc_random": rand_proto, "acc_random_hard": rand_hard,
                    "acc_syn_hard": syn_hard}
            summary["ranking"][s] = rank | dd_ranking(real_hard, syn_hard, syn, rand_proto)
    return summary
