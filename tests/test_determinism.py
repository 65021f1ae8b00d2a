"""Sharded sampling on a real local Ray: the same seed gives bit-identical output with 1 and 2 actors,
and every (class, slot) appears exactly once."""
import dataclasses

import pytest
import torch

from raydd.config import ComputeConfig, FaultConfig
from raydd.errors import RayddError

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raydd.distributed.cluster import init_ray

    init_ray(ComputeConfig(num_cpus=2))
    yield
    ray.shutdown()


def test_one_and_two_actors_bit_identical(ray_local, digits_cfg, spec):
    from raydd.distributed.data import generate_ray
    from raydd.generate import make_rows

    sampler = dataclasses.replace(digits_cfg.sampler, steps=6)
    rows = make_rows(num_classes=10, per_class=3, run_seed=7, unit_size=8)   # 30 rows, 4 units mixing classes
    one = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=1, batch_size=8))
    two = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=2, batch_size=8))
    assert len(one) == 30 and torch.equal(one.labels, torch.arange(10).repeat_interleave(3))
    assert torch.equal(one.slots, torch.arange(3).repeat(10))
    assert torch.equal(one.images, two.images) and torch.equal(one.latents, two.latents)
    other = generate_ray(spec, sampler, make_rows(10, 3, run_seed=8, unit_size=8), ComputeConfig(num_actors=2))
    assert not torch.equal(one.latents, other.latents)                        # the seed matters


def test_actor_killed_mid_run_changes_nothing(ray_local, digits_cfg, spec, tmp_path):
    """Fault injection: one actor exits after its first batch. The run completes, every (class, slot)
    appears exactly once, and the output equals an undisturbed run bit for bit."""
    from raydd.distributed.data import generate_ray
    from raydd.generate import make_rows

    sampler = dataclasses.replace(digits_cfg.sampler, steps=4)
    rows = make_rows(num_classes=10, per_class=2, run_seed=3, unit_size=5)          # 4 units
    calm = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=2, batch_size=5))
    faulty = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=2, batch_size=5), faults=FaultConfig(actor_after=1),
                          scratch=tmp_path)
    assert (tmp_path / "actor_fault_injected").exists()                             # an actor really died
    pairs = list(zip(faulty.labels.tolist(), faulty.slots.tolist()))
    assert len(pairs) == len(set(pairs)) == 20
    assert torch.equal(calm.images, faulty.images) and torch.equal(calm.latents, faulty.latents)


@pytest.mark.timeout(300)
def test_a_runners_stages_share_a_warm_pool_which_a_train_job_releases(ray_local, digits_cfg, spec, tmp_path):
    """Consecutive stages run in the same actor processes with the backbone loaded once in each; sampling there
    equals sampling in a pool of its own, bit for bit; a Train job then runs although the pool held both CPUs."""
    from raydd.distributed.data import generate_ray, map_ray
    from raydd.distributed.runner import RayRunner
    from raydd.generate import make_rows

    class Loaded:           # (defined here: pickled by value, the workers cannot import tests/)
        """A map stage that answers, for each row, which process ran it and which backbone object it held."""

        def __init__(self, spec):
            self.backbone = spec.load("cpu")

        def __call__(self, batch):
            import os

            import numpy as np

            n = len(batch["unit"])
            return {"unit": batch["unit"], "pid": np.full(n, os.getpid()), "model": np.full(n, id(self.backbone))}

    compute = dataclasses.replace(digits_cfg.compute, num_actors=2, cpus_per_actor=1, share_stages=False)
    cfg = dataclasses.replace(digits_cfg, compute=compute, sampler=dataclasses.replace(digits_cfg.sampler, steps=4))
    runner = RayRunner(cfg, tmp_path)
    rows = make_rows(num_classes=10, per_class=2, run_seed=5, unit_size=5)                   # 4 units

    def processes(stage):
        return set(zip(stage["pid"].tolist(), stage["model"].tolist()))

    cold = processes(map_ray(Loaded, {"spec": spec}, rows, compute))         # no runner: a pool of its own ...
    alone = generate_ray(spec, cfg.sampler, rows, compute)
    first = processes(runner.map(Loaded, {"spec": spec}, rows))              # ... which ended with its stage
    warm = runner.generate(spec, rows)
    second = processes(runner.map(Loaded, {"spec": spec}, {**rows, "seed": rows["seed"] + 1}))
    assert len({pid for pid, _ in first}) == 2 and first == second
    assert not {pid for pid, _ in cold} & {pid for pid, _ in first}
    assert torch.equal(warm.sorted().images, alone.images) and torch.equal(warm.sorted().latents, alone.latents)

    def ran(config, hooks):                 # nested: pickled by value for the Ray workers
        open(config["marker"], "w").close()

    assert len(runner.pool.actors) == 2                                     # it holds both CPUs
    runner.train(ran, {"marker": str(tmp_path / "ran")}, name="after-the-pool", num_workers=1, cpus_per_worker=1)
    assert (tmp_path / "ran").exists() and runner.pool.actors == []


def test_a_stage_that_waits_for_another_process_running_it_gives_its_pools_actors_back(ray_local, digits_cfg, tmp_path):
    """Sweep trials take turns on a shared stage: the one waiting must not hold actors the running one may need."""
    import fcntl
    import threading
    import time

    import numpy as np

    from raydd.distributed.data import map_ray
    from raydd.distributed.pool import WarmPool

    class Echo:             # (defined here: pickled by value, the workers cannot import tests/)
        def __call__(self, batch):
            return batch

    compute = dataclasses.replace(digits_cfg.compute, num_actors=1, cpus_per_actor=1)
    cols = {"unit": np.array([0, 0, 1]), "x": np.array([1.0, 2.0, 3.0])}
    pool = WarmPool(compute)
    map_ray(Echo, {}, cols, compute, pool=pool)
    assert len(pool.actors) == 1
    stage, out = tmp_path / "map-echo", {}
    with open(tmp_path / ".map-echo.lock", "w") as held:                   # another process runs the stage
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: out.update(map_ray(Echo, {}, cols, compute, str(stage), pool=pool)))
        waiter.start()
        deadline = time.time() + 60
        while pool.actors and time.time() < deadline:
            time.sleep(0.2)
        assert pool.actors == [] and waiter.is_alive()                       # released while it waits
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(120)
    assert sorted(out["x"].tolist()) == [1.0, 2.0, 3.0] and len(pool.actors) == 1   # then it ran, on a new actor
    pool.release()


def test_a_run_that_waits_for_another_process_training_a_cached_job_gives_its_pools_actors_back(
        ray_local, digits_cfg, tmp_path):
    """Two trials need the same cached job (IGDS's estimator): the one waiting must not hold actors the
    training one may need."""
    import fcntl
    import threading
    import time

    import numpy as np

    from raydd.config import config_hash
    from raydd.context import train_cached
    from raydd.distributed.runner import RayRunner

    class Echo:
        def __call__(self, batch):
            return batch

    cfg = dataclasses.replace(digits_cfg, compute=dataclasses.replace(digits_cfg.compute, num_actors=1,
                                                                      cpus_per_actor=1))
    runner = RayRunner(cfg, tmp_path / "scratch")
    runner.map(Echo, {}, {"unit": np.array([0]), "x": np.array([1.0])})
    assert len(runner.pool.actors) == 1
    config, out = {"steps": 1}, {}
    entry = tmp_path / "cache" / "jobs" / config_hash(config)
    (tmp_path / "cache" / ".locks").mkdir(parents=True)
    with open(tmp_path / "cache" / ".locks" / f"jobs-{entry.name}.lock", "w") as held:   # another trains it
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: out.update(
            path=train_cached(runner, tmp_path / "cache", "jobs", lambda c, h: None, config, log=lambda m: None)))
        waiter.start()
        deadline = time.time() + 60
        while runner.pool.actors and time.time() < deadline:
            time.sleep(0.2)
        assert runner.pool.actors == [] and waiter.is_alive()              # released while it waits
        entry.mkdir(parents=True)                                          # the other process's job is cached
        (entry / ".complete").write_text("")
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(60)
    assert out["path"] == entry                                            # and it used that entry


def test_train_job_restores_from_checkpoint_after_worker_failure(ray_local, tmp_path):
    """A Ray Train worker that crashes once is restarted (FailureConfig) from its last checkpoint."""
    from raydd.distributed.train import fit

    def crash_once_loop(config, hooks):          # nested: pickled by value for the Ray workers
        import os
        import tempfile
        import time

        start = 0
        if hooks.restore_dir():
            start = int(open(os.path.join(hooks.restore_dir(), "step.txt")).read())
        for step in range(start + 1, config["steps"] + 1):
            with tempfile.TemporaryDirectory() as d:
                open(os.path.join(d, "step.txt"), "w").write(str(step))
                hooks.report({"step": step, "resumed_from": start}, checkpoint_dir=d)
            if step == 3 and not os.path.exists(config["marker"]):
                open(config["marker"], "w").close()
                # the controller takes reports when it polls the worker (every 0.25 s here): a death right
                # after reporting can lose the last ones (once it resumed from step 1), so give it time
                time.sleep(3.0)
                os._exit(1)                              # the worker process dies

    import signal

    before = signal.getsignal(signal.SIGINT)
    result = fit(crash_once_loop, {"marker": str(tmp_path / "crashed"), "steps": 6}, name="restore-test",
                 storage=tmp_path / "train", max_failures=1)
    # Ray Train's own Ctrl-C handler is gone again (left installed, it swallowed every later Ctrl-C)
    assert signal.getsignal(signal.SIGINT) is before
    assert (tmp_path / "crashed").exists()
    # resumed from a persisted checkpoint (not from scratch): step 3, or 2 should the controller not have
    # polled in the 3 s before the crash
    assert 2 <= result.metrics["resumed_from"] <= 3 and result.metrics["step"] == 6, result.metrics


def test_map_stage_resumes_only_missing_units(ray_local, digits_cfg, tmp_path):
    """RayRunner.map keeps every finished unit under scratch: a rerun (the driver died) computes only
    the units that were not saved, and returns the same rows."""
    import numpy as np

    from raydd.distributed.runner import RayRunner

    class CountingSquare:        # nested: pickled by value for the actors; leaves a file per unit it computes
        def __init__(self, log_dir: str):
            self.log_dir = log_dir

        def __call__(self, batch):
            import os

            for u in set(batch["unit"].tolist()):
                open(os.path.join(self.log_dir, f"{u}-{os.getpid()}-{id(batch)}"), "w").close()
            return {"unit": batch["unit"], "row": batch["row"], "square": batch["x"] ** 2}

    cfg = dataclasses.replace(digits_cfg, compute=ComputeConfig(num_actors=1))
    runner = RayRunner(cfg, tmp_path / "scratch")
    cols = {"unit": np.repeat(np.arange(4), 3), "row": np.arange(12), "x": np.arange(12, dtype=np.float32)}
    logs = tmp_path / "calls"
    logs.mkdir()
    first = runner.map(CountingSquare, {"log_dir": str(logs)}, cols)
    assert sorted({p.name.split("-")[0] for p in logs.iterdir()}) == ["0", "1", "2", "3"]
    (stage,) = (tmp_path / "scratch").glob("map-CountingSquare-*")
    (stage / "unit-2.npz").unlink()                                  # as if the driver died before unit 2 was saved
    for p in logs.iterdir():
        p.unlink()
    again = runner.map(CountingSquare, {"log_dir": str(logs)}, cols)
    assert {p.name.split("-")[0] for p in logs.iterdir()} == {"2"}   # only the missing unit ran again
    order = np.argsort(first["row"]), np.argsort(again["row"])
    assert np.array_equal(first["square"][order[0]], again["square"][order[1]])
    assert np.array_equal(np.sort(again["row"]), np.arange(12))
    changed = dict(cols, x=cols["x"] + 1)                            # other inputs: a different stage, not a stale resume
    third = runner.map(CountingSquare, {"log_dir": str(logs)}, changed)
    assert np.array_equal(third["square"][np.argsort(third["row"])], (cols["x"] + 1) ** 2)


def test_student_jobs_resume_after_driver_death_and_worker_failure(ray_local, digits_cfg, tmp_path):
    """Student evaluation checkpoints after every round of jobs. A fit that dies after round 1 (as when the
    driver dies) is continued by a new fit of the same name; in that fit a worker dies after its next round
    and FailureConfig restores it. Only unfinished jobs are re-run and every result equals an undisturbed run.
    The last round has one job: it runs on the threads of both workers (the idle one lends its CPU)."""
    from dataclasses import asdict

    from raydd.data import load_real
    from raydd.distributed.train import fit
    from raydd.jobs import eval_loop
    from raydd.generate import random_subset

    data = load_real(digits_cfg.data)
    subset = random_subset(data.train, 2, seed=0)
    ecfg = dataclasses.replace(digits_cfg.eval, students=["convnet_d1"], seeds=5, epochs=1, ranking=False)
    config = {"data": asdict(digits_cfg.data), "eval": asdict(ecfg), "teacher": "",
              "source": {"kind": "arrays", "x": subset.images.numpy(), "y": subset.labels.numpy()},
              "jobs": [{"kind": "syn", "student": "convnet_d1", "seed": s, "protocol": "hard", "ipc": 2}
                       for s in range(5)]}                    # 5 jobs on 2 workers: rounds of 2, 2 and 1

    def results(r):
        import json
        import os

        by_index = json.loads(open(os.path.join(r.checkpoint_dir, "results.json")).read())
        return {i: {k: v for k, v in res.items() if k not in ("images_per_s", "train_s")}   # timings vary
                for i, res in by_index.items()}

    clean = fit(eval_loop, config, name="eval-clean", storage=tmp_path / "train", num_workers=2)
    counts = lambda r: {k: r.metrics[k] for k in ("jobs_done", "jobs_restored")}  # noqa: E731
    assert counts(clean) == {"jobs_done": 5, "jobs_restored": 0} and clean.metrics["stage"] == 1
    assert [results(clean)[str(i)]["threads"] for i in range(5)] == [1, 1, 1, 1, 2]   # Ray: 1 thread per 1-CPU worker

    storage = tmp_path / "run-scratch"
    first = {**config, "fault": {"after_rounds": 1, "marker": str(tmp_path / "died-1")}}
    with pytest.raises(Exception):
        fit(eval_loop, first, name="eval-resumable", storage=storage, num_workers=2, max_failures=0, resume=True)
    assert (tmp_path / "died-1").exists()
    second = {**config, "fault": {"after_rounds": 1, "marker": str(tmp_path / "died-2")}}
    resumed = fit(eval_loop, second, name="eval-resumable", storage=storage, num_workers=2, max_failures=1, resume=True)
    assert (tmp_path / "died-2").exists()
    # round 1 came from the first fit (else the second fit's first attempt would have saved only 2 jobs);
    # round 2 was saved by the second fit before its worker died; the restarted attempt ran round 3 only
    assert counts(resumed) == {"jobs_done": 5, "jobs_restored": 4}
    assert results(resumed) == results(clean)


def test_train_cached_trains_once_when_two_need_it_at_once(tmp_path):
    """Two sweep trials that need the same cached job (e.g. IGDS's estimator) at once: one trains, the other
    waits on the entry's lock and reuses the result; nothing half-written is ever visible."""
    import threading
    import time

    from raydd.context import train_cached
    from raydd.train_hooks import TrainResult

    calls, logs = [], []

    class SlowRunner:                     # stands in for LocalRunner / RayRunner: only these two are used
        def release_pools(self):
            pass

        def train(self, loop, config, name, cpus_per_worker=None, datasets=None):
            calls.append(name)
            time.sleep(1.0)
            ckpt = tmp_path / f"ckpt-{len(calls)}"
            ckpt.mkdir()
            (ckpt / "weights.txt").write_text(str(config))
            return TrainResult({"done": 1}, str(ckpt))

    paths, built = [], []

    def datasets():                        # listing a store's files: only for the job that trains
        built.append(1)
        return {}

    def need():
        paths.append(train_cached(SlowRunner(), tmp_path / "cache", "est", None, {"steps": 3}, log=logs.append,
                                  datasets=datasets))

    threads = [threading.Thread(target=need) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and paths[0] == paths[1] and len(built) == 1     # the cache hit built no datasets
    assert (paths[0] / ".complete").exists() and (paths[0] / "weights.txt").read_text() == "{'steps': 3}"
    assert any(line.startswith("waiting for another process training est") for line in logs)


def test_loops_travel_to_ray_train_by_name_only_when_importable():
    from raydd.distributed.train import loop_ref
    from raydd.jobs import eval_loop

    def local_loop(config, hooks):
        pass

    assert loop_ref(eval_loop) == "raydd.jobs:eval_loop"
    assert loop_ref(local_loop) is local_loop                      # defined in a function: pickled by value
    local_loop.__module__, local_loop.__qualname__ = "__main__", "local_loop"
    assert loop_ref(local_loop) is local_loop                      # a script's own loop: not importable by name


def test_actors_and_train_workers_reserve_the_memory_they_declare(ray_local, digits_cfg, tmp_path):
    """compute.memory_per_actor_gib / memory_per_worker_gib become Ray memory reservations, so a node runs only
    as many DiT actors or workers as fit its memory (#20: a DiT-XL/2 actor used 6-9 GiB and reserved nothing)."""
    import numpy as np

    from raydd.distributed.runner import RayRunner
    from raydd.distributed.train import fit

    class Assigned:
        def __call__(self, batch):
            import ray

            memory = ray.get_runtime_context().get_assigned_resources().get("memory", 0.0)
            return {"unit": batch["unit"], "memory": np.full(len(batch["unit"]), memory)}

    def loop(config, hooks):
        import tempfile

        import ray

        with tempfile.TemporaryDirectory() as d:      # the result keeps the metrics of checkpointed reports
            hooks.report({"memory": ray.get_runtime_context().get_assigned_resources().get("memory", 0.0)}, d)

    cfg = dataclasses.replace(digits_cfg, compute=ComputeConfig(num_actors=1, memory_per_actor_gib=0.25))
    out = RayRunner(cfg, tmp_path / "scratch").map(Assigned, {}, {"unit": np.arange(2), "row": np.arange(2)})
    assert (out["memory"] == 0.25 * 2**30).all()
    result = fit(loop, {}, name="memory-test", storage=tmp_path / "train", memory_gib_per_worker=0.5)
    assert result.metrics["memory"] == 0.5 * 2**30


def test_check_fits_fails_on_a_local_ray_and_warns_on_a_joined_cluster(ray_local, capsys):
    from raydd.distributed.cluster import check_fits

    check_fits(ComputeConfig(cpus_per_actor=2, cpus_per_worker=1), joined=False)       # the 2-CPU node fits
    with pytest.raises(RayddError, match=r"compute.gpus_per_worker=1000, but no node .* has 1000 GPU "
                                         r"\(the largest has (\d+)\); allowed: 0 to \1$"):
        check_fits(ComputeConfig(gpus_per_worker=1000), joined=False)
    with pytest.raises(RayddError, match=r"compute.train_workers=3 x compute.cpus_per_worker=1 needs 3 CPU, but "
                                         r"this Ray cluster has 2; allowed: compute.train_workers <= 2"):
        check_fits(ComputeConfig(train_workers=3), joined=False)        # one Train job's workers start together
    with pytest.raises(RayddError, match=r"compute.memory_per_actor_gib=4096, but no node .* has 4096 GiB memory "
                                         r"\(the largest has [\d.]+ GiB\); allowed: 0 to [\d.]+$"):
        check_fits(ComputeConfig(memory_per_actor_gib=4096), joined=False)
    check_fits(ComputeConfig(cpus_per_actor=3), joined=True)              # an autoscaler may add a larger node
    assert "[raydd] warning: compute.cpus_per_actor=3, but no node" in capsys.readouterr().out


def test_whole_cluster_jobs_split_a_node_between_their_workers(ray_local, digits_cfg):
    """The tiny backbone trains with a whole node per worker; two workers on this one 2-CPU node used to ask
    for 2 CPUs each, and Ray Train waited for them forever."""
    from raydd.distributed.runner import RayRunner

    cpus = lambda workers: RayRunner(dataclasses.replace(digits_cfg, compute=dataclasses.replace(  # noqa: E731
        digits_cfg.compute, train_workers=workers)), None).max_cpus_per_worker()
    assert (cpus(1), cpus(2)) == (2.0, 1.0)


def test_whole_cluster_share_fits_every_worker_at_once():
    from raydd.distributed.runner import whole_cluster_share

    assert whole_cluster_share([2.0], 1) == 2.0 and whole_cluster_share([2.0], 2) == 1.0
    assert whole_cluster_share([0.0, 8.0, 2.0], 2) == 2.0      # a 0-CPU head runs none; the 2nd largest fits both
    assert whole_cluster_share([8.0, 4.0], 4) == 2.0            # 2 workers per node: the 4-CPU node split
    assert whole_cluster_share([0.0], 1) == 0.0                 # no CPUs yet: the caller's configured size


def test_actors_that_cannot_start_end_the_stage_with_their_own_error(ray_local, digits_cfg):
    import numpy as np

    from raydd.distributed.data import map_ray

    class CannotStart:                  # (defined here: pickled by value, the workers cannot import tests/)
        """A map stage's actor whose constructor fails, as with weights that do not load."""

        def __init__(self):
            raise ValueError("refusing to load /weights/dit.pt: not a state dict")

        def __call__(self, batch):
            return batch

    cols = {"unit": np.array([0, 0, 1]), "x": np.array([1.0, 2.0, 3.0])}
    with pytest.raises(RuntimeError, match=r"^the CannotStart actors could not start: ValueError: refusing to load "
                                           r"/weights/dit.pt: not a state dict$") as bug:
        map_ray(CannotStart, {}, cols, digits_cfg.compute)
    assert not isinstance(bug.value, RayddError)                  # a plain error in a constructor: a bug

    class BadWeights:
        def __init__(self):
            from raydd.errors import CheckpointError
            raise CheckpointError("checkpoint /weights/dit.pt does not fit the DiT")

        def __call__(self, batch):
            return batch

    with pytest.raises(RayddError, match="BadWeights actors could not start: .*CheckpointError: checkpoint"):
        map_ray(BadWeights, {}, cols, digits_cfg.compute)           # bad input: one line, exit 2 in a CLI
