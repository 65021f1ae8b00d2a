"""Shard sources: WebDataset tar shards (read by Ray Data's WebDataset reader) prepare into the same store an
ImageFolder of the same images gives, row for row; a Hugging Face dataset's parquet files (Ray Data's parquet reader)
into a store of the same images; bad samples named, bad settings refused before anything runs."""
import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch

from raydd.config import ConfigError, load_config
from raydd.data import DataError, load_real
from test_prepare import WNIDS, cfg_for, make_folder

SOURCE = ["n01440764", WNIDS[0], "n02102040", WNIDS[1]]       # .cls integers 0..3; WNIDS are labels 1 and 3


@pytest.fixture(scope="module", autouse=True)
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder, out, shards: int = 3, extra: dict | None = None) -> None:
    """The ImageFolder's files as WebDataset shards laid out as timm's ImageNet ones: out/wds-train-000s.tar and
    out/wds-validation-000s.tar, samples in (class, file name) order spread over `shards` shards, each an image
    (.jpg, the file's bytes) and its .cls integer (the wnid's place in SOURCE); plus, in every train shard, a
    sample of a class the run does not use (.cls 0). extra: {member name: bytes} added to the first train shard."""
    out.mkdir(parents=True)
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((folder / split).glob("*/*.JPEG"), key=lambda f: (SOURCE.index(f.parent.name), f.name))
        for s, part in enumerate(np.array_split(np.array(files, dtype=object), shards)):
            with tarfile.open(out / f"wds-{name}-{s:04d}.tar", "w") as tar:
                for f in part:
                    add(tar, f"{f.stem}.jpg", f.read_bytes())
                    add(tar, f"{f.stem}.cls", str(SOURCE.index(f.parent.name)).encode())
                if split == "train":
                    add(tar, f"other_{s}.jpg", next(iter(part)).read_bytes())
                    add(tar, f"other_{s}.cls", b"0")
                for member, data in (extra or {}).items() if (split, s) == ("train", 0) else ():
                    add(tar, member, data)


def wds_cfg(root, store, *extra):
    return cfg_for(root, store, "data.dataset=webdataset", f"data.source_classes={','.join(SOURCE)}", *extra)


@pytest.mark.ray
@pytest.mark.parametrize("cap", [0, 2])
def test_shards_prepare_into_the_store_their_imagefolder_gives_row_for_row(tmp_path, cap, capsys):
    from raydd.prepare import main, store_location

    folder = make_folder(tmp_path / "folder")
    make_shards(folder, tmp_path / "wds")
    store, limit = tmp_path / "store", f"data.max_train_per_class={cap}"
    args = ["data.dataset=webdataset", f"data.root={tmp_path / 'wds'}", f"data.source_classes={','.join(SOURCE)}",
            f"data.classes={','.join(WNIDS)}", "data.image_size=16", "data.channels=3", "data.val_fraction=0.2",
            f"data.store={store}", "compute.num_cpus=2", limit]
    assert main(args) == 0
    cfg, folder_cfg = wds_cfg(tmp_path / "wds", store, limit), cfg_for(folder, "", limit)
    assert store_location(cfg.data) in capsys.readouterr().out
    stored, decoded = load_real(cfg.data), load_real(folder_cfg.data)
    assert stored.class_names == WNIDS
    for split in ("train", "val", "test"):
        a, b = stored.split(split), decoded.split(split)
        assert len(a) > 0 and torch.equal(a.y, b.y) and torch.equal(a.x, b.x), split
    assert len(stored.split("train")) == (2 * cap if cap else 8)
    # an ImageFolder store of the same data has another key: the source is part of it
    assert store_location(dataclasses.replace(cfg.data, dataset="imagefolder", root=str(folder))) \
        != store_location(cfg.data)


@pytest.mark.ray
def test_a_corrupt_image_and_a_sample_without_a_label_are_named_and_the_store_stays_incomplete(tmp_path):
    from raydd.prepare import is_complete, load_data, store_location

    make_shards(make_folder(tmp_path / "folder"), tmp_path / "wds",
                extra={"broken.jpg": b"not a jpeg", "broken.cls": b"3", "nolabel.jpg": b"\xff\xd8"})
    cfg = wds_cfg(tmp_path / "wds", tmp_path / "store")
    with pytest.raises(DataError, match=r"(?s)2 unreadable image\(s\).*(broken.*nolabel has no \.cls|nolabel has no "
                                        r"\.cls.*broken)"):
        load_data(cfg)
    assert not is_complete(store_location(cfg.data))


@pytest.mark.ray
def test_a_label_outside_source_classes_is_refused(tmp_path):
    from raydd.prepare import load_data

    make_shards(make_folder(tmp_path / "folder"), tmp_path / "wds", extra={"far.jpg": b"", "far.cls": b"7"})
    with pytest.raises(DataError, match=r"1 sample\(s\) have a \.cls label outside data.source_classes \(labels 0..3\)"
                                        r".*wds-train-0000.tar:far = 7"):
        load_data(wds_cfg(tmp_path / "wds", tmp_path / "store"))


def test_bad_webdataset_settings_fail_in_the_config_naming_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset=webdataset needs data.store=DIR_OR_URI"):
        load_config("digits", ["data.dataset=webdataset", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="data.root must be set when data.dataset=webdataset"):
        load_config("digits", ["data.dataset=webdataset", f"data.store={tmp_path}"])
    with pytest.raises(ConfigError, match="allowed: digits, imagefolder, webdataset, huggingface"):
        load_config("digits", ["data.dataset=tfrecord"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no webdataset files \(\*.tar\) for a train split"):
        load_real(wds_cfg(tmp_path / "empty", tmp_path / "store").data)
    make_shards(make_folder(tmp_path / "folder"), tmp_path / "wds")
    with pytest.raises(DataError, match=r"names 1 class\(es\) not in data.source_classes: \['n09999999'\]"):
        load_real(wds_cfg(tmp_path / "wds", tmp_path / "store", "data.classes=n09999999").data)


def make_hf_parquet(folder, out) -> None:
    """The ImageFolder's files as a Hugging Face dataset's parquet files, laid out as the hub does: data/train-*
    (two files), data/validation-*, and data/test-* (unlabelled, label -1: not a split raydd reads). Columns: image
    {bytes, path}, label (the wnid's place in SOURCE)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "data").mkdir(parents=True)
    files = {s: sorted((folder / s).glob("*/*.JPEG"), key=lambda f: f.name) for s in ("train", "val")}
    parts = {"train-00000-of-00002": files["train"][::2], "train-00001-of-00002": files["train"][1::2],
             "validation-00000-of-00001": files["val"], "test-00000-of-00001": files["val"][:2]}
    for name, part in parts.items():
        image = [{"bytes": f.read_bytes(), "path": f.name} for f in part]
        label = [-1 if name.startswith("test") else SOURCE.index(f.parent.name) for f in part]
        table = pa.table({"image": image, "label": pa.array(label, pa.int64())})
        pq.write_table(table, out / "data" / f"{name}.parquet")


def make_hf_saved(folder, out) -> None:
    """The same images as make_hf_parquet, as `datasets` itself saves a DatasetDict (save_to_disk: Arrow IPC stream
    files, train in two of them, next to its JSON files)."""
    import datasets

    files = {s: sorted((folder / s).glob("*/*.JPEG"), key=lambda f: f.name) for s in ("train", "val")}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def part(images, test=False):
        return datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in images],
                                           "label": [-1 if test else SOURCE.index(f.parent.name) for f in images]},
                                          features=features)

    saved = datasets.DatasetDict({"train": part(files["train"]), "validation": part(files["val"]),
                                  "test": part(files["val"][:2], test=True)})
    saved.save_to_disk(str(out), num_shards={"train": 2, "validation": 1, "test": 1})


def by_content(split) -> list[tuple[int, bytes]]:
    return sorted(zip(split.y.tolist(), (x.numpy().tobytes() for x in split.x)))


@pytest.mark.ray
@pytest.mark.parametrize("layout", [make_hf_parquet, make_hf_saved], ids=["hub-parquet", "save_to_disk"])
def test_a_hugging_face_dataset_prepares_into_a_store_of_the_same_images_in_a_fixed_order(tmp_path, layout):
    from raydd.prepare import load_data

    folder = make_folder(tmp_path / "folder")
    layout(folder, tmp_path / "hf")
    hf = ["data.dataset=huggingface", "data.val_fraction=0"]      # every train image in train: compare them all
    first = load_data(cfg_for(tmp_path / "hf", tmp_path / "store1", *hf, f"data.source_classes={','.join(SOURCE)}"))
    second = load_data(cfg_for(tmp_path / "hf", tmp_path / "store2", *hf, f"data.source_classes={','.join(SOURCE)}"))
    decoded = load_real(cfg_for(folder, "", "data.val_fraction=0").data)
    for split in ("train", "test"):                                # test: the validation files
        a, b = first.split(split), decoded.split(split)
        assert len(a) == len(b) > 0 and by_content(a) == by_content(b), split
        again = second.split(split)                                # prepared afresh: the same rows, in the same order
        assert torch.equal(a.x, again.x) and torch.equal(a.y, again.y)
    capped = load_data(cfg_for(tmp_path / "hf", tmp_path / "store3", *hf, f"data.source_classes={','.join(SOURCE)}",
                               "data.max_train_per_class=2")).split("train")
    assert capped.y.tolist() == [0, 0, 1, 1] and set(by_content(capped)) <= set(by_content(decoded.split("train")))


@pytest.mark.parametrize("dataset, names, want", [
    ("webdataset", ["train/0000.tar", "train/0001.tar", "val/0000.tar"],
     {"train": ["train/0000.tar", "train/0001.tar"], "val": ["val/0000.tar"]}),
    ("webdataset", ["b.tar", "a.tar", "notes.txt", ".partial.tar"], {"train": ["a.tar", "b.tar"]}),
    ("webdataset", ["in1k-train-0000.tar", "in1k-validation-0000.tar", "in1k-test-0000.tar"],
     {"train": ["in1k-train-0000.tar"], "val": ["in1k-validation-0000.tar"]}),
    ("huggingface", ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                     "data/validation-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"],
     {"train": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
      "val": ["data/validation-00000-of-00001.parquet"]}),
    ("huggingface", ["default/train/0000.parquet", "default/validation/0000.parquet"],
     {"train": ["default/train/0000.parquet"], "val": ["default/validation/0000.parquet"]}),
    ("huggingface", ["dataset_dict.json", "train/data-00000-of-00002.arrow", "train/data-00001-of-00002.arrow",
                     "train/state.json", "validation/data-00000-of-00001.arrow", "test/data-00000-of-00001.arrow"],
     {"train": ["train/data-00000-of-00002.arrow", "train/data-00001-of-00002.arrow"],
      "val": ["validation/data-00000-of-00001.arrow"]}),
    ("huggingface", ["data-00000-of-00001.arrow", "state.json"], {"train": ["data-00000-of-00001.arrow"]}),
])
def test_a_shard_sources_splits_come_from_its_folders_or_file_names(tmp_path, dataset, names, want):
    from raydd.data import source_files

    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert source_files(dataset, str(tmp_path)) == {k: [f"{tmp_path}/{n}" for n in v] for k, v in want.items()}


def test_a_folder_with_both_hugging_face_layouts_is_refused(tmp_path):
    from raydd.data import DataError, source_files

    for name in ("data/train-00000-of-00001.parquet", "train/data-00000-of-00001.arrow"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"mixes \.arrow and \.parquet files"):
        source_files("huggingface", str(tmp_path))
