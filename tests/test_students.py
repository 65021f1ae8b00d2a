"""Student networks: every registered student builds, runs forward and backward, and errors are clear."""
import subprocess
import sys

import pytest
import timm
import torch

from raydd.students import OWN_STUDENTS, create_student, list_students

NUM_CLASSES = 7


def sizes_for(name: str) -> list[int]:
    """Image sides each student supports (checked below), smallest first, at most two."""
    if name.startswith("convnet_d"):
        depth = int(name[len("convnet_d"):])
        return [s for s in (16, 32, 64) if s >= 2 ** depth][:2]   # d6 needs 64 px
    if name == "resnetap10":
        return [16, 32]
    return [32]   # stock timm models: 32 px keeps them fast on CPU


CASES = [(name, c, s) for name in list_students() for c in (1, 3) for s in sizes_for(name)]


def test_list_students_exact():
    assert list_students() == ["convnet_d1", "convnet_d2", "convnet_d3", "convnet_d4", "convnet_d5",
                               "convnet_d6", "resnetap10", "resnet18", "resnet50", "resnet101",
                               "efficientnet_b0", "mobilenetv2_100"]


@pytest.mark.parametrize("name,in_chans,size", CASES)
def test_forward_backward(name, in_chans, size):
    torch.manual_seed(0)
    model = create_student(name, num_classes=NUM_CLASSES, in_chans=in_chans, image_size=size)
    model.train()
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()   # a loss that reaches every logit
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for n, p in params:
        assert p.grad is not None, f"{name}: no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {n}"


def test_own_models_registered_in_timm():
    from raydd.students import register_in_timm

    register_in_timm()
    register_in_timm()                                   # idempotent: no duplicate registration
    assert set(timm.list_models("convnet_d*")) >= {f"convnet_d{d}" for d in range(1, 7)}
    assert "resnetap10" in timm.list_models("resnetap*")
    model = timm.create_model("convnet_d3", num_classes=10, in_chans=1, img_size=16)
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)


def test_convnet_shapes_follow_depth():
    # ConvNet-D: width 128, each block halves the side -> features 128 * (side / 2^D)^2
    for depth in range(1, 5):
        model = create_student(f"convnet_d{depth}", num_classes=10, in_chans=3, image_size=32)
        assert model.num_features == 128 * (32 // 2 ** depth) ** 2
        norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) == depth and all(m.num_groups == m.num_channels == 128 for m in norms)


def test_resnetap_uses_avgpool_not_strided_convs():
    model = create_student("resnetap10", num_classes=10, in_chans=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.stride == (1, 1) for m in convs)
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in model.modules()) == 6   # 3 stages x (main + shortcut)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    big = create_student("resnetap10", num_classes=10, in_chans=3, image_size=128)   # 7x7 stride-2 stem
    assert big.stem[0].kernel_size == (7, 7) and big(torch.randn(2, 3, 128, 128)).shape == (2, 10)


def test_unknown_student_lists_allowed_names():
    with pytest.raises(ValueError) as err:
        create_student("convnet_d9", num_classes=10, in_chans=3, image_size=32)
    for name in list_students():
        assert name in str(err.value)


def test_too_deep_convnet_errors_clearly():
    with pytest.raises(ValueError, match="at least 64x64"):
        create_student("convnet_d6", num_classes=10, in_chans=1, image_size=16)
    with pytest.raises(ValueError, match="at least 16x16"):
        create_student("resnetap10", num_classes=10, in_chans=1, image_size=8)


def test_own_students_refuse_pretrained():
    for name in OWN_STUDENTS:
        with pytest.raises(ValueError, match="no pretrained"):
            timm.create_model(name, pretrained=True, num_classes=10, in_chans=3, img_size=64)


def test_own_students_do_not_import_timm():
    """timm (and torchvision through it) costs about 2 s and 190 MB per process: the evaluation workers and
    the driver of a default run never import it."""
    code = ("import sys; from raydd.students import create_student; import raydd.jobs, raydd.distill; "
            "m = create_student('convnet_d3', 10, 1, 16); "
            "print('timm' in sys.modules, 'torchvision' in sys.modules, type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "ConvNet"], out.stdout + out.stderr[-2000:]
