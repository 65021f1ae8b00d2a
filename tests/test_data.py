import numpy as np
import pytest
import torch
from PIL import Image

from raydd.config import DataConfig
from raydd import outputs
from raydd.data import DataError, load_digits_data, load_imagefolder_data, resolve_classes, subset_classes
from raydd.generate import DistilledSet
from raydd.outputs import FolderSet, read_distilled, write_distilled


def test_digits_split_is_stratified_disjoint_and_deterministic():
    a, b = load_digits_data(DataConfig(image_size=16)), load_digits_data(DataConfig(image_size=16))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.train.x.shape[1:] == (1, 16, 16) and a.train.x.dtype == torch.uint8
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    for split in (a.train, a.val, a.test):
        assert set(split.y.tolist()) == set(range(10))
    c = load_digits_data(DataConfig(image_size=16, split_seed=1))
    assert not torch.equal(a.test.x, c.test.x)
    assert int(load_digits_data(DataConfig(max_train_per_class=5)).train.y.bincount().max()) == 5


def test_imagenet_subset_label_order_is_file_order():
    wnids = subset_classes("imagenet1k")
    nette = [wnids.index(w) for w in subset_classes("imagenette")]
    woof = [wnids.index(w) for w in subset_classes("imagewoof")]
    assert nette == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert woof == [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]   # not sorted: kept
    assert subset_classes("imageidc") == subset_classes("imagenet100")[:10]
    assert len(subset_classes("imagenet100")) == 100 and len(set(wnids)) == 1000


def _folder(root, classes, n=3, size=20, bad=None):
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.full((size, size, 3), 40 * k % 256, np.uint8)).save(root / c / f"{k}.png")
    if bad:
        (root / classes[0] / "broken.png").write_bytes(b"not a png at all")


def test_imagefolder_with_subset_maps_labels_and_backbone_ids(tmp_path):
    woof = subset_classes("imagewoof")
    _folder(tmp_path / "train", woof + ["n99999999"], n=4)
    data = load_imagefolder_data(DataConfig(dataset="imagefolder", root=str(tmp_path), classes="imagewoof",
                                            image_size=8, channels=3, val_fraction=0.25, test_fraction=0.25))
    assert data.class_names == woof and data.train.x.shape[1:] == (3, 8, 8)
    assert data.backbone_class_ids()[:3] == [193, 182, 258]
    # a DiT trained on these classes (the tiny DiT, its fine-tunes) takes the labels themselves: a tiny DiT on a
    # wnid folder was sampled with ImageNet ids and failed with "index out of range"
    assert data.backbone_class_ids(len(woof)) == list(range(len(woof)))


def test_class_list_errors(tmp_path):
    _folder(tmp_path / "train", ["a", "b"])
    with pytest.raises(DataError, match="duplicate"):
        resolve_classes("a,b,a", ["a", "b"])
    with pytest.raises(DataError, match=r"not found as directories: \['zz'\]"):
        resolve_classes("a,zz", ["a", "b"])
    with pytest.raises(DataError, match="not found"):
        load_imagefolder_data(DataConfig(dataset="imagefolder", root=str(tmp_path), classes="imagenette"))


def test_corrupt_image_is_reported_by_path(tmp_path):
    _folder(tmp_path / "train", ["a", "b"], bad=True)
    with pytest.raises(DataError, match=r"unreadable image .*a/broken\.png"):
        load_imagefolder_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, channels=3))


def test_distilled_folder_by_name_or_index(tmp_path):
    _folder(tmp_path / "named", ["3", "7"], n=2, size=16)
    s = FolderSet(tmp_path / "named", [str(i) for i in range(10)], 16, 1).read()
    assert s.labels.tolist() == [3, 3, 7, 7] and s.images.shape == (4, 1, 16, 16)
    _folder(tmp_path / "idx", ["00001", "00004"], n=1, size=16)
    assert FolderSet(tmp_path / "idx", list("abcdefghij"), 16, 1).read().labels.tolist() == [1, 4]
    _folder(tmp_path / "odd", ["cat"], n=1)
    with pytest.raises(DataError, match="neither the preset's class names"):
        FolderSet(tmp_path / "odd", ["0", "1"], 16, 1)
    _folder(tmp_path / "twice", ["1", "01"], n=1)
    with pytest.raises(DataError, match=r"class folders \['01', '1'\] name a class twice"):
        FolderSet(tmp_path / "twice", ["a", "b"], 16, 1)


def test_an_imagefolder_is_written_as_our_output_a_class_at_a_time_with_its_slots(tmp_path, monkeypatch):
    """#20: `raydd.evaluate` on an ImageFolder converts it class by class (FolderSet -> write_distilled), so no
    process holds the whole folder; our own images/ folder comes back with its slots (10.png after 9.png)."""
    g = torch.Generator().manual_seed(0)
    ds = DistilledSet(torch.randint(0, 255, (36, 1, 8, 8), generator=g, dtype=torch.uint8),
                      torch.arange(3).repeat_interleave(12), torch.arange(12).repeat(3))
    ours = write_distilled(ds, tmp_path / "ours", ["a", "b", "c"])
    reads = []
    read_image = outputs.read_image
    monkeypatch.setattr(outputs, "read_image", lambda f, *a: reads.append(f.parent.name) or read_image(f, *a))
    folder = FolderSet(ours / "images", ["a", "b", "c"], 8, 1)
    first, part = next(folder.classes())
    assert first == 0 and set(reads) == {"a"} and len(part) == 12      # the first class, before the next is read
    back = read_distilled(write_distilled(folder, tmp_path / "back", ["a", "b", "c"], pngs=False))
    assert torch.equal(back.images, ds.images) and torch.equal(back.slots, ds.slots)
    assert torch.equal(back.labels, ds.labels) and not (tmp_path / "back" / "images").exists()
    (ours / "images" / "c" / "broken.png").write_bytes(b"not a png")
    (ours / "images" / "a" / "bad.png").write_bytes(b"nor this")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\) under .*images:\n  unreadable image .*a/bad\.png"):
        write_distilled(FolderSet(ours / "images", ["a", "b", "c"], 8, 1), tmp_path / "broken", ["a", "b", "c"])
    assert not (tmp_path / "broken" / "manifest.json").exists()         # incomplete: never marked complete


def test_write_read_roundtrip_is_atomic(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = DistilledSet(images=torch.randint(0, 255, (6, 1, 8, 8), generator=g, dtype=torch.uint8),
                      labels=torch.tensor([1, 0, 1, 0, 2, 2]), slots=torch.tensor([1, 0, 0, 1, 0, 1]),
                      latents=torch.randn(6, 1, 8, 8, generator=g).half(), scores=torch.arange(6).float())
    out = write_distilled(ds, tmp_path / "set", ["a", "b", "c"])
    back, want = read_distilled(out), ds.sorted()
    assert torch.equal(back.images, want.images) and torch.equal(back.latents, want.latents)
    assert torch.equal(back.labels, torch.tensor([0, 0, 1, 1, 2, 2])) and torch.equal(back.scores, want.scores)
    assert sorted(p.name for p in (out / "images" / "b").iterdir()) == ["0.png", "1.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]          # no partial directory left behind
    png = np.asarray(Image.open(out / "images" / "a" / "0.png"))
    assert np.array_equal(png, want.images[0, 0].numpy())
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete distilled set"):
        read_distilled(out)


def test_a_set_written_to_a_uri_lands_there_and_reads_back_as_from_a_path(tmp_path, monkeypatch):
    """out_dir on a storage URI (file:// here; s3:// and gs:// go through the same pyarrow filesystem): the set is
    at the URI's path (not under the working directory), byte for byte the set written to a path."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    ds = DistilledSet(images=torch.randint(0, 255, (4, 3, 8, 8), generator=g, dtype=torch.uint8),
                      labels=torch.tensor([1, 0, 1, 0]), slots=torch.tensor([1, 0, 0, 1]),
                      latents=torch.randn(4, 4, 2, 2, generator=g).half(), scores=torch.arange(4).float())
    uri = f"file://{tmp_path / 'bucket' / 'set'}"
    assert write_distilled(ds, uri, ["a", "b"]) == uri
    local = write_distilled(ds, tmp_path / "local", ["a", "b"])
    written = sorted(p.relative_to(tmp_path / "bucket" / "set") for p in (tmp_path / "bucket" / "set").rglob("*"))
    assert written == sorted(p.relative_to(local) for p in local.rglob("*"))
    assert all((tmp_path / "bucket" / "set" / p).read_bytes() == (local / p).read_bytes() for p in written
               if p.suffix == ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bucket", "local"]
    back, want = read_distilled(uri), read_distilled(local)
    assert torch.equal(back.images, want.images) and torch.equal(back.latents, want.latents)
    assert torch.equal(back.labels, want.labels) and torch.equal(back.slots, want.slots)
    write_distilled(ds.take(torch.tensor([2, 3])), uri, ["a", "b"])           # a rewrite replaces the old set whole
    assert len(read_distilled(uri)) == 2 and not (tmp_path / "bucket" / "set" / "images" / "b" / "1.png").exists()


def test_digits_read_without_sklearn_equal_load_digits():
    """The CSV that scikit-learn ships, read directly, gives load_digits() exactly; loading the data does
    not import sklearn (1.4 s and 140 MB per process)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from raydd.data import digits_arrays

    images, target = digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target)
    code = ("import sys; from raydd.config import DataConfig; from raydd.data import load_digits_data; "
            "r = load_digits_data(DataConfig(image_size=16)); print('sklearn' in sys.modules, len(r.train))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[0] == "False", out.stdout + out.stderr[-2000:]


def test_imagenet_presets_train_on_the_whole_train_split_and_only_sweeps_hold_out_val(tmp_path):
    """An ImageFolder with its own val/ (the test split): final references, teachers, selectors and fine-tunes
    train on every train image; a sweep's trials hold out 15 % as val, and their config says so."""
    from raydd.config import ConfigError, load_config
    from raydd.sweep import trial_base_config

    woof = subset_classes("imagewoof")
    _folder(tmp_path / "train", woof, n=8)
    _folder(tmp_path / "val", woof, n=2)
    user = load_config("imagewoof", [f"data.root={tmp_path}", "data.image_size=8"])
    data = load_imagefolder_data(user.data)
    assert len(data.train) == 80 and len(data.val) == 0 and len(data.test) == 20
    trial = trial_base_config(user)
    assert trial.data.val_fraction == 0.15 and trial.eval.split == "val"
    held = load_imagefolder_data(trial.data)
    assert len(held.val) == 10 and len(held.train) == 70 and len(held.test) == 20
    assert trial_base_config(load_config("digits")).data.val_fraction == load_config("digits").data.val_fraction
    with pytest.raises(ConfigError, match="data.val_fraction > 0"):
        load_config("imagewoof", [f"data.root={tmp_path}", "eval.split=val"])


def test_max_train_per_class_bounds_what_is_decoded(tmp_path, monkeypatch):
    """The cap used to apply after every image was decoded (it bounded nothing at ImageNet-1K): now only the
    first files of each class are read, enough for the hold-out and the cap."""
    import raydd.data as data_mod

    _folder(tmp_path / "train", ["a", "b"], n=40)
    _folder(tmp_path / "val", ["a", "b"], n=2)
    reads = []
    read = data_mod.read_image
    monkeypatch.setattr(data_mod, "read_image", lambda f, *a: reads.append(f) or read(f, *a))
    d = load_imagefolder_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, channels=3,
                                         val_fraction=0.15, max_train_per_class=5))
    assert torch.bincount(d.train.y).tolist() == [5, 5] and len(d.val) > 0
    train_reads = [f for f in reads if "/train/" in str(f)]
    assert len(train_reads) <= 2 * 8, len(train_reads)         # ceil(5 / 0.85) + 2 = 8 per class, not 40


def test_evaluating_a_set_on_a_uri_reads_our_output_and_names_what_is_wrong(tmp_path):
    from raydd.evaluate import output_counts

    ds = DistilledSet(images=torch.zeros(3, 1, 8, 8, dtype=torch.uint8), labels=torch.tensor([0, 1, 1]),
                      slots=torch.tensor([0, 0, 1]))
    uri = write_distilled(ds, f"file://{tmp_path}/set", ["a", "b"])
    assert output_counts(uri, ["a", "b"]) == [1, 2]
    with pytest.raises(DataError, match="no manifest.json there; a set on a URI is read as raydd's output"):
        output_counts(f"file://{tmp_path}/images", ["a", "b"])
    with pytest.raises(DataError, match=r"has classes \['a', 'b'\]\.\.\., not the preset's \['0', '1'\]"):
        output_counts(uri, ["0", "1"])


@pytest.mark.parametrize("extra", [[], ["--redundancy", "2"]])
def test_evaluate_on_a_missing_folder_fails_before_the_data_mlflow_or_ray(tmp_path, monkeypatch, capsys, extra):
    """Both raydd.evaluate modes check the folder first: a path that is not a directory ends with exit 2 and one
    line naming it, before the tracking store is checked or the real data loaded."""
    from raydd import evaluate, tracking

    def heavy(*a, **k):
        raise AssertionError("heavy work started before the folder was checked")

    monkeypatch.setattr(evaluate, "load_data", heavy)
    monkeypatch.setattr(tracking, "check_reachable", heavy)
    rc = evaluate.main([str(tmp_path / "nosuch"), "--smoke", *extra])
    assert rc == 2 and f"distilled set {tmp_path / 'nosuch'} is not a directory" in capsys.readouterr().err
