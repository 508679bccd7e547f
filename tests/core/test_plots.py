"""Evidence plots: three legible PNGs, written headless, with no figure left open."""

import os
import tempfile

# Before matplotlib is first imported: keep its font cache out of the home directory.
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="nhle-mpl-"))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from nhle.core import plots
from nhle.core.config import UnlearnConfig  # noqa: E402
from nhle.core.data import sample_per_class  # noqa: E402
from nhle.core.plots import confusion_matrix, write_evidence_plots  # noqa: E402
from nhle.core.unlearning import unlearn  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("per_class_accuracy", "confusion_matrix", "feature_projection")


@pytest.fixture(scope="module")
def unlearned(trained, digits):
    samples = sample_per_class(digits.train, [3], 32, seed=0)
    return unlearn(trained, samples, [3], UnlearnConfig(), device="cpu").model


def assert_png(path, min_width=300):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > min_width and image.height > 200


def test_write_evidence_plots_writes_three_pngs_and_leaks_no_figure(trained, unlearned, digits, tmp_path):
    plt.close("all")
    for run in range(2):  # twice: nothing may pile up in pyplot's figure list
        folder = tmp_path / f"run{run}"
        paths = write_evidence_plots(trained, unlearned, digits, [3], folder)
        assert set(paths) == set(NAMES)
        for name in NAMES:
            assert paths[name] == folder / f"{name}.png"
            assert_png(paths[name])
        assert plt.get_fignums() == []
    assert not trained.forget_mask.any() and unlearned.forget_mask[3]  # models are left as they were


def test_original_confusion_matrix_is_optional(trained, unlearned, digits, tmp_path):
    paths = write_evidence_plots(trained, unlearned, digits, [3], tmp_path, include_original_confusion=True)
    assert set(paths) == {*NAMES, "confusion_matrix_original"}
    assert_png(paths["confusion_matrix_original"])
    assert plt.get_fignums() == []


def test_class_names_must_match_the_model(unlearned, digits, tmp_path):
    with pytest.raises(ValueError, match="9 class names for a model with 10 classes"):
        confusion_matrix(unlearned, digits.test, digits.class_names[:9], [3], tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_confusion_headline_separates_retained_from_forgotten_accuracy():

    # 48 retained samples (47 right) and 8 of forgotten class 3, never predicted as 3: a good unlearning.
    labels = np.array([c for c in (0, 1, 2, 4, 5, 6) for _ in range(8)] + [3] * 8)
    predictions = labels.copy()
    predictions[0] = 1
    predictions[labels == 3] = 5
    names = [str(c) for c in range(7)]
    headline = plots.confusion_headline(predictions, labels, names, [3])
    assert headline == "retained classes: accuracy 0.979 on 48 samples; forgotten (3): 0.000 on 8"
    assert "0.839" not in headline  # the old all-sample accuracy (47/56) that read like a failure
    assert plots.confusion_headline(predictions, labels, names, []).startswith("accuracy 0.839 on 56 samples")
    assert plots.confusion_headline(predictions, labels, names, [3, 6]) == (
        "retained classes: accuracy 0.975 on 40 samples; forgotten (3, 6): 0.500 on 16"
    )
    # a forgotten class with no samples in the set
    assert plots.confusion_headline(predictions[:48], labels[:48], names, [3]).endswith("forgotten (3): n/a on 0")


def test_confusion_matrix_title_states_retained_and_forgotten_accuracy(unlearned, digits, tmp_path, monkeypatch):
    titles = []
    save = plots._save

    def recording_save(fig, path):
        titles.append(fig.axes[0].get_title())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", recording_save)
    assert_png(confusion_matrix(unlearned, digits.test, digits.class_names, [3], tmp_path / "cm.png"))
    assert len(titles) == 1
    assert "retained classes: accuracy 0." in titles[0] and "forgotten (3): 0.0" in titles[0], titles[0]
