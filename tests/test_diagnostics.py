"""Set diagnostics (raydd.diagnostics): the real-data teacher's accuracy on a distilled set, the set's
per-class diversity in the teacher's features, and the latents' spread."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from raydd.diagnostics import TeacherScores, summarise
from raydd.students import create_student


def test_summarise_on_a_hand_made_table():
    # class 0: two identical features (cosine 1); class 1: orthogonal ones (cosine 0) -> mean cosine 0.5
    scores = {"class_idx": np.array([0, 0, 1, 1]), "correct": np.array([1, 1, 1, 0], dtype=np.float32),
              "feature": np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)}
    out = summarise(scores, 2.3)
    assert out["distilled/teacher_acc"] == pytest.approx(0.75)
    assert out["distilled/diversity"] == pytest.approx(0.5)
    assert out["distilled/latent_std"] == 2.3
    one_per_class = summarise({k: v[[0, 2]] for k, v in scores.items()}, None)
    assert set(one_per_class) == {"distilled/teacher_acc"}          # IPC 1: no diversity; real images: no latents


def test_teacher_scores_use_the_teachers_own_predictions(tmp_path):
    torch.manual_seed(0)
    model = create_student("convnet_d1", 3, 1, 8).eval()
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        pred = model(images.float() / 127.5 - 1).argmax(1).numpy()     # raydd's [-1, 1] normalisation
    labels = np.array([0, 1, 2] * 4)
    enc = {"kind": "student", "arch": "convnet_d1", "path": str(path), "num_classes": 3, "channels": 1, "image_size": 8}
    out = TeacherScores(enc)({"class_idx": labels, "unit": labels, "image": images.numpy()})
    np.testing.assert_array_equal(out["correct"], (pred == labels).astype(np.float32))
    assert out["feature"].shape[0] == 12
    np.testing.assert_allclose(np.linalg.norm(out["feature"], axis=1), 1.0, rtol=1e-5)
