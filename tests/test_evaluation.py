"""Evaluation protocols: schedules, augmentation, DD-Ranking, and short real trainings on digits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from raydd.config import EvalConfig
from raydd.data import Split
from raydd.protocols import (accuracy, cosine_factor, cutmix, dd_ranking, epochs_for, eval_epochs,
                              random_resized_crop_flip, to_float, train_student, train_teacher)


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------
def test_to_float_maps_to_minus_one_one():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(to_float(x).flatten(), torch.tensor([-1.0, -0.6, 1.0]))
    with pytest.raises(TypeError):
        to_float(x.float())


def test_dd_ranking_hand_computed():
    r = dd_ranking(acc_real_hard=0.9, acc_syn_hard=0.5, acc_syn=0.7, acc_random=0.4)
    # HLR = 0.9 - 0.5 = 0.4; IOR = 0.7 - 0.4 = 0.3; alpha = 0.15 - 0.2 = -0.05
    # LRS = (e^-0.05 - e^-1) / (e - e^-1) = (0.951229 - 0.367879) / (2.718282 - 0.367879) = 0.248192
    assert r["HLR"] == pytest.approx(0.4)
    assert r["IOR"] == pytest.approx(0.3)
    assert r["LRS"] == pytest.approx(0.248192, abs=1e-6)
    # extremes: perfect (alpha = 1) -> 1, worst (alpha = -1) -> 0
    assert dd_ranking(0.0, 1.0, 1.0, 0.0)["LRS"] == pytest.approx(1.0)
    assert dd_ranking(1.0, 0.0, 0.0, 1.0)["LRS"] == pytest.approx(0.0)


def test_dd_ranking_rejects_percentages():
    with pytest.raises(ValueError, match="fractions"):
        dd_ranking(90.0, 50.0, 70.0, 40.0)
    with pytest.raises(ValueError, match="acc_random"):
        dd_ranking(0.9, 0.5, 0.7, -0.1)


def test_epochs_for_picks_row():
    cfg = EvalConfig()   # [[1, 3000], [10, 2000], [50, 1500], [200, 1000]]
    assert [epochs_for(i, cfg) for i in (1, 2, 10, 11, 50, 51, 200)] == [3000, 2000, 2000, 1500, 1500, 1000, 1000]
    assert epochs_for(500, cfg) == 1000          # beyond the last row: last row
    assert epochs_for(10, cfg, soft=True) == 300
    assert epochs_for(10, EvalConfig(epochs=7), soft=True) == 7
    assert epochs_for(3, EvalConfig(epochs_by_ipc=[[50, 5], [2, 9]])) == 5   # rows sorted first


def test_eval_epochs_and_cosine():
    assert eval_epochs(7, 3) == [3, 6, 7]
    marks = eval_epochs(1000, 0)
    assert len(marks) == 20 and marks[-1] == 1000 and marks[0] == 50
    assert eval_epochs(5, 0) == [1, 2, 3, 4, 5]
    assert cosine_factor(0, 100, True) == pytest.approx(1.0)
    assert cosine_factor(100, 100, True) == pytest.approx(0.5)   # RDED quirk: ends at lr / 2
    assert cosine_factor(100, 100, False) == pytest.approx(0.0)
    assert cosine_factor(50, 100, False) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------
def test_random_resized_crop_shape_and_determinism():
    x = torch.randn(6, 3, 16, 16)
    a = random_resized_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_resized_crop_flip(x, torch.Generator().manual_seed(3))
    c = random_resized_crop_flip(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


def test_flip_really_flips_and_identity_is_identity():
    x = torch.randn(4, 2, 8, 12)
    g = torch.Generator().manual_seed(0)
    flipped = random_resized_crop_flip(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(flipped, torch.flip(x, dims=[3]), atol=1e-5)
    same = random_resized_crop_flip(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)


def test_crop_zooms_in():
    # a horizontal ramp over [-1, 1]: a square crop of a quarter of the area is half as wide, so
    # across its width the ramp rises by half its full range (2 / 2 = 1), wherever the crop sits
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(8, 1, 32, 32).contiguous()
    out = random_resized_crop_flip(ramp, torch.Generator().manual_seed(0), scale=(0.25, 0.25),
                                   ratio=(1.0, 1.0), flip_p=0.0)
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]          # [8]
    assert torch.allclose(span, torch.ones(8), atol=0.05)


def test_cutmix_lambda_matches_pasted_area():
    b, h, w = 8, 16, 16
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()  # image i == i
    y = torch.arange(b)
    mixed, ya, yb, lam = cutmix(x, y, torch.Generator().manual_seed(1), beta=1.0)
    assert mixed.shape == x.shape and torch.equal(ya, y)
    assert 0.0 <= lam <= 1.0
    for i in range(b):
        own = (mixed[i, 0] == i).float().mean().item()
        if yb[i] != i:   # pixels not from image i came from its partner, in proportion 1 - lambda
            assert own == pytest.approx(lam)
            assert ((mixed[i, 0] == i) | (mixed[i, 0] == float(yb[i]))).all()
    again = cutmix(x, y, torch.Generator().manual_seed(1), beta=1.0)
    assert torch.equal(again[0], mixed) and again[3] == lam
    # over many draws some boxes are non-empty
    lams = [cutmix(x, y, torch.Generator().manual_seed(s))[3] for s in range(20)]
    assert min(lams) < 0.9


# --------------------------------------------------------------------------------------------
# Training on scikit-learn digits (8x8 upsampled to 16x16), 10 images per class
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)     # [1797, 1, 8, 8]
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)                                   # [1797, 1, 16, 16]
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.permutation(np.flatnonzero(d.target == c))[:10] for c in range(10)])
    test = rng.permutation(np.setdiff1d(np.arange(len(y)), train))[:500]   # 500 held-out images keep eval cheap
    return x[train], y[train], x[test], y[test]


CFG = EvalConfig(eval_every=5)


def test_train_student_hard_beats_chance(digits):
    tx, ty, ex, ey = digits
    lines = []
    res = train_student(tx, ty, ex, ey, student="convnet_d2", num_classes=10, cfg=CFG, epochs=15,
                        seed=0, log=lines.append)
    assert res["best_acc"] > 0.5                     # chance is 0.1
    assert 0.0 <= res["final_acc"] <= res["best_acc"] <= 1.0
    assert [e for e, _ in res["curve"]] == [5, 10, 15]
    assert res["epochs"] == 15 and res["images_per_s"] > 0
    assert len(lines) == 3 and "epoch 15/15" in lines[-1] and "acc" in lines[-1]


def test_train_student_is_deterministic(digits):
    tx, ty, ex, ey = digits
    cfg = EvalConfig(eval_every=1)
    runs = [train_student(tx, ty, ex[:200], ey[:200], student="convnet_d2", num_classes=10, cfg=cfg,
                          epochs=3, seed=7) for _ in range(2)]
    assert runs[0]["best_acc"] == runs[1]["best_acc"]
    assert runs[0]["curve"] == runs[1]["curve"]
    other = train_student(tx, ty, ex[:200], ey[:200], student="convnet_d2", num_classes=10, cfg=cfg,
                          epochs=3, seed=8)
    assert other["curve"] != runs[0]["curve"]


def test_soft_protocol_with_teacher_beats_chance(digits):
    tx, ty, ex, ey = digits
    teacher = train_teacher(Split(tx, ty), arch="convnet_d2", num_classes=10, cfg=CFG, epochs=15, seed=1)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert accuracy(teacher, ex, ey) > 0.5
    res = train_student(tx, ty, ex, ey, student="convnet_d2", num_classes=10, cfg=CFG, epochs=10,
                        seed=0, protocol="soft", teacher=teacher, return_model=True)
    assert res["best_acc"] > 0.5
    assert accuracy(res["model"], ex, ey) == pytest.approx(res["final_acc"])


def test_train_student_argument_errors(digits):
    tx, ty, ex, ey = digits
    with pytest.raises(ValueError, match="teacher"):
        train_student(tx, ty, ex, ey, student="convnet_d2", num_classes=10, cfg=CFG, epochs=1, seed=0,
                      protocol="soft")
    with pytest.raises(ValueError, match="hard, soft"):
        train_student(tx, ty, ex, ey, student="convnet_d2", num_classes=10, cfg=CFG, epochs=1, seed=0,
                      protocol="kd")
    with pytest.raises(ValueError, match="uint8"):
        train_student(to_float(tx), ty, ex, ey, student="convnet_d2", num_classes=10, cfg=CFG, epochs=1, seed=0)


def test_staged_evaluation_reports_each_stage_and_summarises_the_last(digits_cfg):
    """A sweep trial's stages: every (student, seed) trained afresh for 1/4, 1/2 and all of the epochs in one
    job; each stage's last report carries {"stage", "acc"} (what reaches Tune); the summary is the last stage."""
    import dataclasses

    from raydd.context import LocalRunner
    from raydd.data import load_real
    from raydd.jobs import evaluate_set
    from raydd.generate import random_subset

    data = load_real(digits_cfg.data)
    subset = random_subset(data.train, 2, seed=0)
    cfg = dataclasses.replace(digits_cfg, eval=dataclasses.replace(
        digits_cfg.eval, students=["convnet_d1"], seeds=2, epochs=8, ranking=False, split="val"))
    source = {"kind": "arrays", "x": subset.images.numpy(), "y": subset.labels.numpy()}

    class Record:
        def __init__(self):
            self.reports = []

        def after_report(self, run_context, metrics, checkpoint):
            self.reports.append(metrics[0])

    rec = Record()
    summary = evaluate_set(cfg, source, LocalRunner(cfg), stages=(0.25, 0.5, 1.0), callbacks=[rec])
    stage_reports = [r for r in rec.reports if "stage" in r]
    assert [r["stage"] for r in stage_reports] == [1, 2, 3]
    assert [r["acc"] for r in stage_reports] == pytest.approx(summary["stages"])
    assert [j["epochs"] for j in summary["jobs"]] == [8, 8]                    # the last stage's jobs only
    assert summary["students"]["convnet_d1"]["acc_mean"] == pytest.approx(summary["stages"][-1])
    assert rec.reports[-1]["jobs_done"] == 6                                    # 3 stages x 2 seeds, one job
    plain = evaluate_set(cfg, source, LocalRunner(cfg))                         # unstaged: the same last stage
    assert plain["students"]["convnet_d1"]["accs"] == summary["students"]["convnet_d1"]["accs"]


def test_round_threads_share_a_nodes_idle_threads_among_its_busy_ranks():
    from raydd.jobs import round_threads

    two = [("a", 1), ("a", 1)]
    assert [round_threads(two, 2, r) for r in (0, 1)] == [1, 1]          # a full round: each keeps its own
    assert round_threads(two, 1, 0) == 2                                 # the idle rank 1 lends its thread
    # 3 ranks on node a with 2 threads each, 1 on node b: a round of 2 jobs (ranks 0, 1 on node a)
    mixed = [("a", 2), ("a", 2), ("b", 4), ("a", 2)]
    assert [round_threads(mixed, 2, r) for r in (0, 1)] == [3, 3]        # node a's 6 threads, 2 busy ranks
    assert round_threads(mixed, 3, 2) == 4                               # node b lends nothing to node a
    assert [round_threads(mixed, 4, r) for r in range(4)] == [2, 2, 4, 2]
    odd = [("a", 1)] * 5
    assert [round_threads(odd, 2, r) for r in (0, 1)] == [3, 2]          # 5 threads over 2: the first gets one more


def test_soft_protocol_reports_hlr_and_lrs_from_the_sets_own_hard_label_accuracy(digits_cfg, tmp_path):
    """DD-Ranking under the soft protocol: HLR needs acc(syn, hard), so the set is also trained with hard labels;
    the soft accuracy stays the headline and the hard jobs do not leak into it."""
    import dataclasses

    from raydd.context import LocalRunner
    from raydd.data import load_real
    from raydd.jobs import evaluate_set
    from raydd.protocols import dd_ranking
    from raydd.generate import random_subset

    data = load_real(digits_cfg.data)
    subset = random_subset(data.train, 2, seed=0)
    cfg = dataclasses.replace(digits_cfg, cache_dir=str(tmp_path), eval=dataclasses.replace(
        digits_cfg.eval, students=["convnet_d1"], seeds=1, epochs=3, soft_epochs=3, teacher_epochs=1,
        teacher_arch="convnet_d1", protocol="soft", ranking=True))
    source = {"kind": "arrays", "x": subset.images.numpy(), "y": subset.labels.numpy()}
    summary = evaluate_set(cfg, source, LocalRunner(cfg))
    jobs = [(j["kind"], j["protocol"]) for j in summary["jobs"]]
    assert ("syn", "hard") in jobs and ("syn", "soft") in jobs
    soft = [j["best_acc"] for j in summary["jobs"] if j["kind"] == "syn" and j["protocol"] == "soft"]
    hard = [j["best_acc"] for j in summary["jobs"] if j["kind"] == "syn" and j["protocol"] == "hard"]
    s = summary["students"]["convnet_d1"]
    assert s["accs"] == soft and s["protocol"] == "soft"
    r = summary["ranking"]["convnet_d1"]
    assert r["acc_syn_hard"] == pytest.approx(hard[0])
    want = dd_ranking(r["acc_real_hard"], hard[0], s["acc_mean"], r["acc_random"])
    assert r["HLR"] == pytest.approx(want["HLR"]) and r["LRS"] == pytest.approx(want["LRS"])


def test_a_given_real_data_accuracy_replaces_the_real_reference_training(digits_cfg, tmp_path):
    """#20 item 4: DD-Ranking's acc(real, hard) can be given (a published number) instead of training the student
    on the whole train split; the random references still train, and nothing is cached for the given one."""
    import dataclasses

    from raydd.context import LocalRunner
    from raydd.data import load_real
    from raydd.generate import random_subset
    from raydd.jobs import evaluate_set

    data = load_real(digits_cfg.data)
    subset = random_subset(data.train, 2, seed=0)
    cfg = dataclasses.replace(digits_cfg, cache_dir=str(tmp_path), eval=dataclasses.replace(
        digits_cfg.eval, students=["convnet_d1"], seeds=1, epochs=2, ranking=True, real_acc={"convnet_d1": 0.875}))
    summary = evaluate_set(cfg, {"kind": "arrays", "x": subset.images.numpy(), "y": subset.labels.numpy()},
                           LocalRunner(cfg))
    assert sorted({j["kind"] for j in summary["jobs"]}) == ["random", "syn"]          # no "real" job ran
    r = summary["ranking"]["convnet_d1"]
    assert r["acc_real_hard"] == 0.875 and r["HLR"] == pytest.approx(0.875 - r["acc_syn_hard"])
    assert len(list((tmp_path / "references").glob("*.json"))) == 1                    # the random reference only


def test_a_given_real_data_checkpoint_is_scored_on_the_eval_split_instead_of_trained(digits_cfg, tmp_path):
    """#20 item 4, the other way to give the real reference: a student trained on the real data elsewhere (a
    safetensors state dict) is scored on the eval split; no student trains on the real train split, and nothing
    is cached for it."""
    import dataclasses

    from safetensors.torch import save_file

    from raydd.config import ConfigError, load_config
    from raydd.context import LocalRunner
    from raydd.data import load_real
    from raydd.generate import random_subset
    from raydd.jobs import evaluate_set
    from raydd.protocols import fit_student, split_accuracy

    data = load_real(digits_cfg.data)
    model = fit_student(data.train, None, student="convnet_d1", num_classes=data.num_classes, cfg=digits_cfg.eval,
                        epochs=1, seed=3, return_model=True)["model"]
    path = tmp_path / "convnet_d1-real.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    subset = random_subset(data.train, 2, seed=0)
    cfg = dataclasses.replace(digits_cfg, cache_dir=str(tmp_path), eval=dataclasses.replace(
        digits_cfg.eval, students=["convnet_d1"], seeds=1, epochs=2, ranking=True,
        real_checkpoint={"convnet_d1": str(path)}))
    summary = evaluate_set(cfg, {"kind": "arrays", "x": subset.images.numpy(), "y": subset.labels.numpy()},
                           LocalRunner(cfg))
    (real,) = [j for j in summary["jobs"] if j["kind"] == "real"]
    assert real["given"] and "train_s" not in real                                  # scored, not trained
    r = summary["ranking"]["convnet_d1"]
    assert r["acc_real_hard"] == split_accuracy(model, data.test) > 0.5              # that student's test top-1
    assert len(list((tmp_path / "references").glob("*.json"))) == 1                    # the random reference only
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        load_config("digits", [f"eval.real_checkpoint={{convnet_d1: {tmp_path / 'none.safetensors'}}}"])
    with pytest.raises(ConfigError, match="give one reference per student"):
        load_config("digits", [f"eval.real_checkpoint={{convnet_d1: {path}}}", "eval.real_acc={convnet_d1: 0.9}"])


def test_accuracy_predicts_without_autograd_in_batches_that_shrink_with_the_image():
    """At 256 px, 512 images a batch is 17 GiB for one convnet_d1 layer's output alone, by arithmetic (the scale
    bench was killed by Ray's memory monitor): prediction runs in batches of ~4 M input values, under no_grad."""
    from raydd.protocols import predict_batch_size

    assert predict_batch_size((1, 16, 16)) == 512 and predict_batch_size((3, 32, 32)) == 512
    assert predict_batch_size((3, 256, 256)) == 21

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.batches = []

        def forward(self, x):
            assert not torch.is_grad_enabled()
            self.batches.append(len(x))
            return torch.zeros(len(x), 2)

    probe = Probe()
    x = torch.zeros(50, 3, 256, 256, dtype=torch.uint8)
    assert accuracy(probe, x, torch.zeros(50, dtype=torch.long)) == 1.0
    assert probe.batches == [21, 21, 8]
