"""raydd.prepare: an ImageFolder decoded once into a parquet store by Ray Data, read back exactly as decoded."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raydd.config import load_config
from raydd.data import DataError, load_real

pytestmark = pytest.mark.ray

WNIDS = ["n02086240", "n02087394"]          # two ImageWoof classes


@pytest.fixture(scope="module", autouse=True)
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def make_folder(root, per_class=(5, 2), size=(40, 30)):
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG, random RGB images (JPEG: lossy, as ImageNet)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for w in WNIDS:
            (root / split / w).mkdir(parents=True)
            for k in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / w / f"{w}_{k}.JPEG", quality=90)
    return root


def cfg_for(root, store, *extra):
    return load_config("digits", ["data.dataset=imagefolder", f"data.root={root}", f"data.classes={','.join(WNIDS)}",
                                  "data.image_size=16", "data.channels=3", "data.val_fraction=0.2",
                                  f"data.store={store}", "compute.num_cpus=2", *extra])


def test_the_cli_prepares_a_store_that_reads_back_exactly_as_decoding_and_a_rerun_reuses_it(tmp_path, capsys):
    from raydd.prepare import main, store_location

    root, store = make_folder(tmp_path / "folder"), tmp_path / "store"
    args = ["data.dataset=imagefolder", f"data.root={root}", f"data.classes={','.join(WNIDS)}", "data.image_size=16",
            "data.channels=3", "data.val_fraction=0.2", f"data.store={store}", "compute.num_cpus=2"]
    assert main(args) == 0
    cfg = cfg_for(root, store)
    location = store_location(cfg.data)
    assert location.startswith(str(store)) and location in capsys.readouterr().out
    manifest = json.loads((store / location.rsplit("/", 1)[1] / "manifest.json").read_text())
    assert manifest["classes"] == WNIDS and manifest["counts"] == {"train": [5, 5], "val": [2, 2]}
    stored, decoded = load_real(cfg.data), load_real(dataclasses.replace(cfg.data, store=""))
    for split in ("train", "val", "test"):
        a, b = stored.split(split), decoded.split(split)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and len(a) > 0
    files = sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file() and p.suffix != ".lock")
    assert main(args) == 0                                       # complete: nothing is written again
    assert sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file() and p.suffix != ".lock") == files


def test_a_corrupt_file_is_named_and_the_store_is_not_marked_complete(tmp_path):
    from raydd.prepare import is_complete, load_data, store_location

    root = make_folder(tmp_path / "folder")
    bad = root / "train" / WNIDS[1] / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    cfg = cfg_for(root, tmp_path / "store")
    with pytest.raises(DataError, match=r"(?s)1 unreadable image\(s\).*broken.JPEG"):
        load_data(cfg)
    assert not is_complete(store_location(cfg.data))
    with pytest.raises(DataError, match="is not prepared; run python -m raydd.prepare"):
        load_real(cfg.data)                                      # a worker never reads a partial store
    bad.unlink()
    assert len(load_data(cfg).train) == 8                        # fixed: prepared afresh (10 - 20 % val)


def test_the_store_key_follows_the_data_that_decides_the_rows(tmp_path):
    from raydd.prepare import store_location

    root = make_folder(tmp_path / "folder")
    base = store_location(cfg_for(root, tmp_path / "s").data)
    assert store_location(cfg_for(root, tmp_path / "s", "data.image_size=32").data) != base
    assert store_location(cfg_for(root, tmp_path / "s", "data.max_train_per_class=2").data) != base
    assert store_location(cfg_for(root, tmp_path / "s", "eval.seeds=1").data) == base
    assert store_location(cfg_for(root, "s3://bucket/stores").data).startswith("s3://bucket/stores/")


def test_a_process_that_needs_only_the_test_split_decodes_only_val(tmp_path):
    """Evaluating a set on an ImageFolder with its own val/ (the ImageNet layout) needs no train images: without a
    store, the evaluation workers decode only val/ (#20; from a store every split is read only when used)."""
    root = make_folder(tmp_path / "folder")
    cfg = load_config("digits", ["data.dataset=imagefolder", f"data.root={root}", f"data.classes={','.join(WNIDS)}",
                                 "data.image_size=16", "data.channels=3", "data.val_fraction=0.2"])
    full, only = load_real(cfg.data), load_real(cfg.data, train=False)
    assert len(only.train) == len(only.val) == 0 and only.class_names == full.class_names
    assert torch.equal(only.test.x, full.test.x) and torch.equal(only.test.y, full.test.y) and len(only.test) == 4
    for p in (root / "train").rglob("*.JPEG"):                     # no train file is opened
        p.rename(p.with_suffix(".moved"))
    assert len(load_real(cfg.data, train=False).test) == 4
    with pytest.raises(DataError, match="no images found"):
        load_real(cfg.data)


def test_from_a_store_a_split_is_read_only_when_used(tmp_path):
    """A process that never touches the train split (the driver of most methods) never holds it (#20)."""
    from raydd.prepare import load_data

    root = make_folder(tmp_path / "folder")
    cfg = cfg_for(root, tmp_path / "store")
    load_data(cfg)                                                    # prepares
    data = load_real(cfg.data)
    assert data.describe() == "splits read when used (so far: none)" and data.num_classes == 2
    assert len(data.test) == 4 and data.describe().endswith("(so far: test)")
    assert len(data.train) == 8 and len(data.val) == 2 and data.describe() == "8 train / 2 val / 4 test images"


def test_turning_a_store_on_changes_no_cache_key():
    """Teachers, backbones and fine-tunes are keyed by their data config: data.store (where the same bytes are read
    from) must not retrain them; the digits' store, whose splits are in class order, must."""
    import dataclasses as dc

    from raydd.config import DataConfig, config_hash
    from raydd.finetune import tiny_backbone_config

    cfg = load_config("digits")
    digits = cfg.data
    cfg.data = dc.replace(cfg.data, dataset="imagefolder", root="/data/imagenet")
    with_store = dc.replace(cfg.data, store="/data/stores")
    assert config_hash(cfg.data) == config_hash(with_store)
    assert config_hash(tiny_backbone_config(cfg.backbone, cfg.sampler, cfg.data, seed=0)) == \
        config_hash(tiny_backbone_config(cfg.backbone, cfg.sampler, with_store, seed=0))
    assert config_hash({"data": dc.asdict(with_store)}) == config_hash({"data": dc.asdict(cfg.data)})
    assert config_hash(dc.replace(cfg.data, image_size=32)) != config_hash(cfg.data)   # the content still counts
    assert config_hash({"store": "a"}) != config_hash({"store": "b"})                 # elsewhere "store" is kept
    # stored latents: only the jobs that read them change (raydd.finetune.finetune adds stored_latents)
    assert config_hash(dc.replace(with_store, latents=True)) == config_hash(with_store)
    assert DataConfig().store == ""
    # the digits' store holds the splits in class order, which trains differently: it counts, wherever it is
    assert config_hash(dc.replace(digits, store="/a")) == config_hash(dc.replace(digits, store="s3://b"))
    assert config_hash(dc.replace(digits, store="/a")) != config_hash(digits)


def test_two_commands_preparing_one_store_take_turns(tmp_path, monkeypatch):
    """The second finds the store complete instead of clearing and rewriting it under the first."""
    import threading
    import time

    import raydd.prepare as prepare

    root = make_folder(tmp_path / "folder")
    cfg = cfg_for(root, tmp_path / "store")
    writes = []

    def slow_write(d, location):                                      # stands in for the Ray Data pipeline
        writes.append(location)
        time.sleep(0.5)
        Path(location).mkdir(parents=True)
        (Path(location) / "manifest.json").write_text("{}")
        return location

    monkeypatch.setattr(prepare, "_write_store", slow_write)
    out = []
    threads = [threading.Thread(target=lambda: out.append(prepare.prepare_store(cfg.data))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 1 and out == [writes[0]] * 2


def test_from_a_store_a_part_is_read_alone(tmp_path):
    """The val hold-out is a part of the stored train folder: reading it reads only its rows, batch by batch, and
    does not bring the train split with it (#20: no process holds what it does not use)."""
    from raydd.prepare import load_data

    root = make_folder(tmp_path / "folder", per_class=(10, 2))
    cfg = cfg_for(root, tmp_path / "store")
    load_data(cfg)
    data, decoded = load_real(cfg.data), load_real(dataclasses.replace(cfg.data, store=""))
    assert torch.equal(data.val.x, decoded.val.x) and torch.equal(data.val.y, decoded.val.y) and len(data.val) == 4
    assert data.describe().endswith("(so far: val)")


def test_a_streamed_split_gives_each_row_once_an_epoch_and_the_same_random_picks_as_the_held_one(tmp_path):
    """raydd.distributed.store.part_dataset + raydd.data.StreamedSplit: what a Train worker reads instead of
    holding the split. An epoch is the held split's rows in another order; a random subset taken from the stream
    equals the one taken from the held split; accuracy over the stream equals accuracy over the held split."""
    from raydd.data import streamed_split, stream_spec
    from raydd.distributed.store import part_dataset
    from raydd.generate import random_picks
    from raydd.prepare import load_data
    from raydd.protocols import split_accuracy
    from raydd.students import create_student

    root = make_folder(tmp_path / "folder", per_class=(12, 2))
    cfg = cfg_for(root, tmp_path / "store", "data.max_train_per_class=7")
    held = load_data(cfg).train
    stream = streamed_split(part_dataset(cfg.data, stream_spec(cfg.data), seed=3), stream_spec(cfg.data), cfg.data)
    assert len(stream) == len(held) == 14 and torch.equal(stream.y, held.y)
    for seed in (0, 1):
        batches = list(stream.batches(4, torch.Generator().manual_seed(seed)))
        assert [len(y) for _, y in batches] == [4, 4, 4, 2]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        key = lambda x, y: sorted(zip(y.tolist(), x.flatten(1).tolist()))  # noqa: E731
        assert key(x, y) == key(held.x, held.y)                  # every row once, each with its own label
    picks = random_picks(held.y, 3, seed=5)
    taken = stream.take(picks.numpy())
    assert torch.equal(taken.x, held.x[picks]) and torch.equal(taken.y, held.y[picks])
    sub = stream.subset(picks.numpy())                 # too large to hold: the picks streamed on their own
    batches = list(sub.batches(4, torch.Generator().manual_seed(0)))
    assert len(sub) == 6 and [len(y) for _, y in batches] == [4, 2]          # gathered again into whole batches
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert key(x, y) == key(held.x[picks], held.y[picks])
    model = create_student("convnet_d1", num_classes=2, in_chans=3, image_size=16)
    assert split_accuracy(model, stream) == split_accuracy(model, held)


def test_with_a_store_per_class_statistics_stream_and_the_driver_holds_no_image(tmp_path):
    """RSM+CGS's class means mu_c (ctx.map_real: the store streamed through the actor pool) and IMS3's real
    reference for S3 (only its picks read): equal to what the held split gives, and the driver never reads the
    train split (#20 item 2)."""
    from raydd.context import Context
    from raydd.distributed.runner import RayRunner
    from raydd.generate import BackboneSpec
    from raydd.methods import ims3, rsm_cgs
    from raydd.prepare import load_data

    root = make_folder(tmp_path / "folder", per_class=(12, 2))
    cfg = cfg_for(root, tmp_path / "store", "backbone.vae=identity")
    held_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=""))
    spec = BackboneSpec(cfg.backbone, num_classes=2, channels=3, image_size=16, class_ids=[0, 1])
    stored = Context(cfg, load_data(cfg), spec, runner=RayRunner(cfg, tmp_path / "a"))
    held = Context(held_cfg, load_real(held_cfg.data), spec, runner=RayRunner(held_cfg, tmp_path / "b"))
    means = {}
    for per_class in (0, 4):
        mu = rsm_cgs.real_class_means(stored, rsm_cgs.Config(mu_max_per_class=per_class))      # [2, 3, 16, 16]
        np.testing.assert_allclose(mu, rsm_cgs.real_class_means(held, rsm_cgs.Config(mu_max_per_class=per_class)),
                                   atol=1e-6)
        means[per_class] = mu
    assert not np.allclose(means[0], means[4])                 # the cap is applied: 4 of the 10 train images
    x, y = ims3.real_reference(stored, K=3)
    hx, hy = ims3.real_reference(held, K=3)
    assert torch.equal(x, hx) and torch.equal(y, hy) and len(y) == 6
    assert stored.data.describe() == "splits read when used (so far: none)"


def test_stored_latents_are_the_vaes_encodings_keyed_by_the_vae_and_mu_c_and_the_fine_tune_read_them(tmp_path):
    """#20 item 1, data.latents: the store's train split encoded once by the backbone's VAE on the actor pool
    (fp16 [c, h, w] rows, keyed by the VAE's files and scale, reused when complete); RSM's class means mu_c sum
    the stored latents, and the RSM fine-tune streams them and loads no VAE."""
    import os

    import pyarrow.parquet as pq

    from raydd.autoencoder import tiny_vae
    from raydd.backbone import load_vae, save_transformer, tiny_dit
    from raydd.context import Context
    from raydd.data import class_labels, part_positions, read_store_split, store_manifest
    from raydd.distributed.runner import RayRunner
    from raydd.generate import BackboneSpec
    from raydd.methods import rsm_cgs
    from raydd.prepare import latent_location, load_data, store_location
    from raydd.protocols import to_float

    root = make_folder(tmp_path / "folder", per_class=(12, 2))
    torch.manual_seed(0)
    vae_dir, dit = tmp_path / "vae", tmp_path / "dit" / "transformer"
    tiny_vae(3, 16, 8).save_pretrained(vae_dir)                              # RGB -> 4 latent channels, side / 4
    save_transformer(tiny_dit(2, 4, 4, hidden_size=32, depth=1, heads=2, patch_size=2), str(dit))
    cfg = cfg_for(root, tmp_path / "store", "data.latents=true", f"backbone.vae={vae_dir}", "backbone.vae_scale=0.5",
                  f"backbone.source={dit}", f"cache_dir={tmp_path / 'cache'}")
    data = load_data(cfg)
    spec = BackboneSpec(cfg.backbone, num_classes=2, channels=3, image_size=16, class_ids=[0, 1])
    ctx = Context(cfg, data, spec, runner=RayRunner(cfg, tmp_path / "scratch"))

    location = ctx.stored_latents()
    assert location == latent_location(cfg.data, str(vae_dir), 0.5) != latent_location(cfg.data, str(vae_dir), 0.25)
    assert location.startswith(store_location(cfg.data) + "/latents/")
    assert store_manifest(location)["shape"] == [4, 4, 4]
    rows = pq.read_table(f"{location}/train").to_pydict()
    order = np.lexsort((rows["index"], rows["label"]))                       # (class, file) order, as the images
    z = np.stack([np.frombuffer(rows["latent"][i], np.float16).reshape(4, 4, 4) for i in order])   # [20, 4, 4, 4]
    images = read_store_split(store_location(cfg.data), "train", 16, 3)
    with torch.no_grad():
        expected = load_vae(str(vae_dir), 0.5).encode(to_float(images.x)).numpy()
    np.testing.assert_allclose(z.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert np.array_equal(np.array(rows["label"])[order], images.y.numpy())
    written = os.path.getmtime(f"{location}/manifest.json")
    assert ctx.stored_latents() == location and os.path.getmtime(f"{location}/manifest.json") == written

    counts = store_manifest(store_location(cfg.data))["counts"]["train"]
    train = part_positions(counts, cfg.data, has_val=True)["train"]          # the train part of the train folder
    labels = class_labels(counts)
    mu = rsm_cgs.real_class_means(ctx, rsm_cgs.Config())                     # [2, 4, 4, 4]
    want = np.stack([z[train[labels[train] == c]].astype(np.float64).mean(0) for c in (0, 1)])
    np.testing.assert_allclose(mu, want, rtol=1e-5, atol=1e-6)               # the stored fp16 latents, summed

    tuned = rsm_cgs.rsm_finetune(ctx, rsm_cgs.Config(ft_steps=2, ft_batch=4))
    entry = Path(tuned.cfg.source).parent
    assert {"streamed": True, "stored_latents": True}.items() <= json.loads((entry / "metrics.json").read_text()).items()
    assert all(np.isfinite(r["loss"]) for r in json.loads((entry / "history.json").read_text()))


def test_endless_batches_give_every_row_once_an_epoch_epoch_after_epoch():
    """What the step-counted loops (the DiT trainings, the tiny VAE, IGDS's estimator) draw: full batches, each epoch every row at most
    once (its short last batch skipped), a new order each epoch; a split smaller than a batch comes whole."""
    from raydd.data import Split, endless_batches

    split = Split(torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1), torch.arange(10) % 2)
    draws = endless_batches(split, 4, torch.Generator().manual_seed(0))
    epochs = [[next(draws) for _ in range(2)] for _ in range(3)]              # 10 rows: 2 full batches an epoch
    rows = [torch.cat([x.flatten() for x, _ in e]).tolist() for e in epochs]
    assert all(len(set(r)) == 8 for r in rows) and len({tuple(r) for r in rows}) == 3
    for e in epochs:
        assert all(len(y) == 4 and torch.equal(y, x.flatten().long() % 2) for x, y in e)
    small = next(endless_batches(split, 64, torch.Generator()))
    assert sorted(small[0].flatten().tolist()) == list(range(10))
    with pytest.raises(DataError, match="train split is empty"):
        next(endless_batches(split.take(torch.tensor([], dtype=torch.long)), 4, torch.Generator()))


def test_with_a_store_the_dit_trainings_the_igds_estimator_and_lgds_theta_stream_the_real_splits(tmp_path):
    """#20 item 2: the tiny VAE and tiny DiT (raydd.distill.ensure_backbone), RSM+CGS's and IMS3's DiT fine-tune
    (raydd.finetune.finetune_loop) and IGDS's variational estimator take the real splits as Ray Datasets
    (ctx.train_cached(reads=...)), and so does LGD's θ_{i−1} (ctx.set_classifier) for its accuracy on the eval
    split: no worker holds them, and the driver reads none. (Without a store the same jobs hold them: the digits
    tests run them so, and the no-store pass here cost half of this test's ~7 minutes.)"""
    from raydd.distill import ensure_backbone
    from raydd.backbone import save_transformer, tiny_dit
    from raydd.context import Context
    from raydd.distributed.cluster import init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.generate import BackboneSpec, DistilledSet
    from raydd.methods import igds, rsm_cgs
    from raydd.objectives.information import load_ve
    from raydd.outputs import write_distilled
    from raydd.prepare import load_data

    root = make_folder(tmp_path / "folder", per_class=(12, 2))
    dit = tmp_path / "dit" / "transformer"
    save_transformer(tiny_dit(2, 3, 16, hidden_size=32, depth=1, heads=2, patch_size=4), str(dit))
    ve = igds.Config(ve_steps=3, ve_cls_steps=2, ve_batch=8, ve_queue=16, ve_width=8, ve_embed_dim=16)
    cfg = cfg_for(root, str(tmp_path / "store"), "backbone.vae=identity", f"backbone.source={dit}",
                  f"cache_dir={tmp_path / 'cache'}")
    data = load_data(cfg)
    init_ray(cfg.compute)
    spec = BackboneSpec(cfg.backbone, num_classes=2, channels=3, image_size=16, class_ids=[0, 1])
    runner = RayRunner(cfg, tmp_path / "scratch")
    ctx = Context(cfg, data, spec, runner=runner)
    tiny = dataclasses.replace(cfg, backbone=dataclasses.replace(
        cfg.backbone, source="tiny", vae="tiny", train_steps=3, train_batch=8, vae_train_steps=3, hidden_size=32,
        depth=1, heads=2, patch_size=2))
    made = ensure_backbone(tiny, data, runner)                               # VAE, then the DiT on its latents
    trained = [Path(made.cfg.vae).parent, Path(made.cfg.source).parent]
    assert json.loads((trained[0] / "metrics.json").read_text())["scaling_factor"] > 0
    tuned = rsm_cgs.rsm_finetune(ctx, rsm_cgs.Config(ft_steps=3, ft_batch=4))
    history = json.loads(Path(tuned.cfg.source).parent.joinpath("history.json").read_text())
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)
    ve_dir = igds.ensure_ve(ctx, ve)
    _, meta = load_ve(ve_dir, num_classes=2, channels=3)
    assert meta["estimates"]["train"]["n"] == 20 and meta["estimates"]["val"]["n"] == 4
    for entry in (*trained, Path(tuned.cfg.source).parent, ve_dir):
        assert json.loads((entry / "metrics.json").read_text())["streamed"] is True
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    set_dir = write_distilled(DistilledSet(images, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])),
                              tmp_path / "set", WNIDS)
    _, fit = ctx.set_classifier(set_dir, "convnet_d1", 1, tmp_path / "theta.safetensors", evaluate=True)
    assert fit["eval_streamed"] is True and 0.0 <= fit["eval_acc"] <= 1.0
    assert data.describe() == "splits read when used (so far: none)"


@pytest.mark.slow
def test_with_a_store_the_teacher_and_the_real_references_stream_the_train_split_and_students_the_test_split(tmp_path,
                                                                                                              monkeypatch):
    """#20 item 2: the Train jobs that train on the real train split (the teacher; DD-Ranking's real and random
    references) take it as a Ray Dataset (`datasets=`, hooks.dataset) and no worker holds it. Random references
    train on the same picks as without a store, so they give the same accuracy; a random subset too large to hold
    (over INLINE_LIMIT) streams on its own."""
    import raydd.jobs
    from raydd.distributed.cluster import init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.jobs import evaluate_set, real_classifier
    from raydd.prepare import load_data

    root = make_folder(tmp_path / "folder", per_class=(12, 3))
    runs = {}
    for store in (str(tmp_path / "store"), ""):
        cfg = cfg_for(root, store, "ipc=2", "eval.students=[convnet_d1]", "eval.seeds=1", "eval.epochs=2",
                      "eval.teacher_epochs=1", "eval.teacher_arch=convnet_d1", f"cache_dir={tmp_path / store[-5:]}c")
        data = load_data(cfg)
        init_ray(cfg.compute)
        runner = RayRunner(cfg, tmp_path / f"scratch{store[-5:]}")
        teacher = real_classifier(cfg, runner)
        syn = data.test                                          # any uint8 set will do as "the distilled set"
        source = {"kind": "arrays", "x": syn.x.numpy(), "y": syn.y.numpy()}
        runs[bool(store)] = (json.loads((teacher.parent / "metrics.json").read_text()),
                             evaluate_set(cfg, source, runner))
    for streamed, (teacher_metrics, summary) in runs.items():
        assert teacher_metrics["streamed"] is streamed
        refs = [j for j in summary["jobs"] if j["kind"] != "syn"]
        assert {j["kind"] for j in refs} == {"real", "random"} and all(j["streamed"] is streamed for j in refs)
        assert all(j["eval_streamed"] is streamed for j in summary["jobs"])   # the test split too, syn jobs too
    random = {s: [j["best_acc"] for j in runs[s][1]["jobs"] if j["kind"] == "random"] for s in runs}
    assert random[True] == random[False]
    assert not any(j["train_streamed"] for s in runs for j in runs[s][1]["jobs"] if j["kind"] == "random")
    monkeypatch.setattr(raydd.jobs, "INLINE_LIMIT", 0)                       # every random subset is "large" now
    cfg = cfg_for(root, str(tmp_path / "store"), "ipc=2", "eval.students=[convnet_d1]",
                  "eval.seeds=1", "eval.epochs=2", f"cache_dir={tmp_path / 'large'}")
    summary = evaluate_set(cfg, source, RayRunner(cfg, tmp_path / "scratch-large"))
    (job,) = [j for j in summary["jobs"] if j["kind"] == "random"]
    assert job["train_streamed"] is True and job["epochs"] == 2 and 0.0 <= job["best_acc"] <= 1.0


def test_from_a_store_a_random_subset_reads_only_its_picks(tmp_path):
    """The `random` method's driver: the same picks as from the decoded split, and the train split is not read."""
    from raydd.generate import random_subset
    from raydd.prepare import load_data

    root = make_folder(tmp_path / "folder", per_class=(10, 2))
    cfg = cfg_for(root, tmp_path / "store")
    load_data(cfg)
    data, decoded = load_real(cfg.data), load_real(dataclasses.replace(cfg.data, store=""))
    for seed in (0, 1):
        a, b = random_subset(data.part("train"), 3, seed), random_subset(decoded.train, 3, seed)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.slots, b.slots)
    assert data.describe() == "splits read when used (so far: none)"


def test_on_ray_random_stages_its_picks_in_one_pass_over_the_store_and_holds_no_set(tmp_path, monkeypatch):
    """#20 item 5: `random` on the cluster runner reads its picks in one pass over the store, a batch at a time, and
    writes them to unit files a (batch, class) each; the driver keeps rows of those files (a StagedSet), never the
    set: the same set as the held split's picks, and the same written output."""
    import raydd.data
    from raydd.context import Context
    from raydd.distributed.runner import RayRunner
    from raydd.generate import StagedSet, random_subset
    from raydd.methods import get_method
    from raydd.outputs import read_distilled, write_distilled
    from raydd.prepare import load_data

    root = make_folder(tmp_path / "folder", per_class=(10, 2))
    cfg = dataclasses.replace(cfg_for(root, tmp_path / "store"), ipc=3, seed=1)
    load_data(cfg)
    data, decoded = load_real(cfg.data), load_real(dataclasses.replace(cfg.data, store=""))
    passes, batches, read = [], [], raydd.data.store_batches

    def counting(*args, **kwargs):
        passes.append(1)
        for p, images in read(*args, **{**kwargs, "batch_size": 4}):      # small batches: several per pass
            batches.append(len(p))
            yield p, images

    monkeypatch.setattr(raydd.data, "store_batches", counting)
    monkeypatch.setattr(raydd.data.StoredPart, "take", lambda *a: pytest.fail("the picks were read whole"))
    ctx = Context(cfg, data, None, runner=RayRunner(cfg, tmp_path / "scratch"), scratch=tmp_path / "scratch")
    out = get_method("random").run(ctx, get_method("random").Config())
    want = random_subset(decoded.train, 3, seed=1)
    assert isinstance(out, StagedSet) and passes == [1] and max(batches) <= 4 and sum(batches) == len(want)
    assert all(len(np.unique(out.labels.numpy()[out.units == u])) == 1 for u in np.unique(out.units))  # a class a file
    assert torch.equal(out.images, want.images) and torch.equal(out.labels, want.labels)
    assert torch.equal(out.slots, want.slots) and out.scores is None and out.latents is None
    a, b = write_distilled(out, tmp_path / "a", data.class_names), write_distilled(want, tmp_path / "b", data.class_names)
    assert torch.equal(read_distilled(a).images, read_distilled(b).images)


@pytest.mark.slow
def test_the_digits_go_through_a_store_that_holds_the_held_splits_in_class_order_and_stream(tmp_path):
    """#20 item 5: the digits world goes through the same plane, a small store (`data.store` with the digits): each
    split read back holds the images of the split held without a store, in class order (the same per-class
    random split: the store is in class order, scikit-learn's order within a class), and a Train job streams it."""
    from raydd.distributed.cluster import init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.jobs import real_classifier, streams
    from raydd.prepare import main, store_location

    store = tmp_path / "store"
    extra = [f"data.store={store}", "data.classes=3,1,7", "data.max_train_per_class=20", "compute.num_cpus=2",
             "eval.teacher_epochs=1", "eval.teacher_arch=convnet_d1", f"cache_dir={tmp_path / 'cache'}"]
    assert main(extra) == 0
    cfg = load_config("digits", extra)
    manifest = json.loads((Path(store_location(cfg.data)) / "manifest.json").read_text())
    assert manifest["classes"] == ["3", "1", "7"] and sum(manifest["counts"]["train"]) == 183 + 182 + 179
    stored, held = load_real(cfg.data), load_real(dataclasses.replace(cfg.data, store=""))
    for split in ("train", "val", "test"):
        a, b = stored.split(split), held.split(split)
        order = torch.from_numpy(np.argsort(b.y.numpy(), kind="stable"))
        assert len(a) > 0 and torch.equal(a.y, b.y[order]) and torch.equal(a.x, b.x[order])
    assert len(stored.train) == 60 and streams(cfg)
    init_ray(cfg.compute)
    teacher = real_classifier(cfg, RayRunner(cfg, tmp_path / "scratch"))
    assert json.loads((teacher.parent / "metrics.json").read_text())["streamed"] is True


def test_prepare_without_a_store_says_what_it_needs(capsys):
    from raydd.prepare import main

    assert main([]) == 2                                             # the digits, no data.store
    assert "raydd.prepare needs a store: data.store=DIR_OR_URI" in capsys.readouterr().err
