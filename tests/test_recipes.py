"""The papers' evaluation recipes (eval.recipe, raydd/recipes/*.yaml) and the augmentations they turn on."""
import dataclasses

import pytest
import torch

from raydd.config import ConfigError, EvalConfig, list_recipes, load_config
from raydd.protocols import augment, color_jitter_lighting, shuffle_patches, train_student


def test_a_recipe_overlays_the_preset_and_the_users_own_eval_keys_still_win():
    plain, ims3 = load_config("digits"), load_config("digits", ["eval.recipe=ims3"])
    assert plain.eval.students == ["convnet_d3"] and plain.eval.lr == 0.01 and plain.eval.randaugment[0] == 0
    assert ims3.eval.students == ["resnetap10"] and ims3.eval.lr == 0.1 and ims3.eval.randaugment == [1, 6]
    assert ims3.eval.color_jitter == 0.4 and ims3.eval.lighting == 0.1        # from minimax, which it extends
    assert ims3.eval.epochs_by_ipc == plain.eval.epochs_by_ipc                # the preset's epochs stay
    for order in (["eval.lr=0.05", "eval.recipe=ims3"], ["eval.recipe=ims3", "eval.lr=0.05"]):
        assert load_config("digits", order).eval.lr == 0.05
    igd = load_config("digits", ["eval.recipe=igd"]).eval
    assert (igd.optimizer, igd.lr, igd.weight_decay) == ("adamw", 0.001, 0.01)
    cao2 = load_config("digits", ["eval.recipe=cao2"], smoke=True).eval
    assert (cao2.protocol, cao2.students, cao2.teacher_arch, cao2.shuffle_patches) == ("soft", ["resnet18"], "resnet18", 2)
    assert cao2.soft_epochs == load_config("digits", smoke=True).eval.soft_epochs


def test_every_recipe_loads_on_every_world_and_an_unknown_one_names_the_allowed():
    assert list_recipes() == ["cao2", "igd", "ims3", "minimax", "rded"]
    for recipe in list_recipes():
        for preset in ("digits", "digits-latent", "imagewoof"):
            load_config(preset, [f"eval.recipe={recipe}"] + (["data.root=/x"] if preset == "imagewoof" else []))
    with pytest.raises(ConfigError, match="eval.recipe='idc' is not allowed; allowed: cao2, igd, ims3, minimax, rded"):
        load_config("digits", ["eval.recipe=idc"])


def test_shuffle_patches_puts_the_halves_back_in_some_order():
    x = torch.arange(2 * 16).float().view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out = shuffle_patches(x, g, 2)
        for b in range(2):
            img = x[b]                                               # [C, H, W]
            widths = [torch.cat(p, 2) for p in ((img[..., :2], img[..., 2:]), (img[..., 2:], img[..., :2]))]
            arrangements = [torch.cat(p, 1) for v in widths for p in ((v[:, :2], v[:, 2:]), (v[:, 2:], v[:, :2]))]
            match = [k for k, a in enumerate(arrangements) if torch.equal(out[b], a)]
            assert len(match) == 1
            seen.add(match[0])
    assert seen == {0, 1, 2, 3}                                     # every arrangement occurs


def test_colour_jitter_and_lighting_change_images_by_a_seeded_amount_and_only_when_on():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(color_jitter_lighting(x, torch.Generator(), 0.0, 0.0), x)
    a = color_jitter_lighting(x, torch.Generator().manual_seed(5), 0.4, 0.1)
    b = color_jitter_lighting(x, torch.Generator().manual_seed(5), 0.4, 0.1)
    assert torch.equal(a, b) and not torch.allclose(a, x)
    lit = color_jitter_lighting(x, torch.Generator().manual_seed(5), 0.0, 0.1) - x    # one RGB offset per image
    assert torch.allclose(lit, lit[:, :, :1, :1].expand_as(lit)) and lit.abs().max() > 0
    gray = x[:, :1]
    assert torch.equal(color_jitter_lighting(gray, torch.Generator(), 0.0, 0.1), gray)   # lighting: RGB only


def test_augment_applies_randaugment_and_shuffles_only_in_the_soft_protocol():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    base = EvalConfig()

    def run(cfg, soft, seed=0):
        torch.manual_seed(seed)                                      # RandAugment draws from the global RNG
        return augment(x, torch.Generator().manual_seed(seed), cfg, soft=soft)

    shuffled = dataclasses.replace(base, shuffle_patches=2)
    assert torch.equal(run(shuffled, soft=False), run(base, soft=False))        # hard protocol: never shuffled
    assert any(not torch.equal(run(shuffled, True, s), run(base, True, s)) for s in range(3))
    ra = dataclasses.replace(base, randaugment=[2, 9])
    assert torch.equal(run(ra, False), run(ra, False))                           # seeded
    assert not torch.allclose(run(ra, False), run(base, False), atol=1e-3) and run(ra, False).shape == x.shape


def test_a_recipe_trains_a_student_and_its_optimizer_is_the_papers():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 1, 16, 16), generator=g, dtype=torch.uint8), torch.arange(40) % 4
    ims3 = load_config("digits", ["eval.recipe=ims3"]).eval
    res = train_student(x, y, x, y, student="convnet_d1", num_classes=4, cfg=ims3, epochs=2, seed=0)
    assert res["best_acc"] * 40 == round(res["best_acc"] * 40)      # a count over the 40 images
    igd = load_config("digits", ["eval.recipe=igd"]).eval
    runs = {o: train_student(x, y, None, None, student="convnet_d1", num_classes=4, epochs=1, seed=0,
                             cfg=dataclasses.replace(igd, optimizer=o), return_model=True)["model"]
            for o in ("sgd", "adamw")}
    w = {o: torch.cat([p.flatten() for p in m.parameters()]) for o, m in runs.items()}
    assert not torch.allclose(w["sgd"], w["adamw"])                 # same lr, seed and batches: the optimizer differs
