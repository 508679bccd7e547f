"""Evidence plots: three legible PNGs, written headless, with no figure left open."""
import os
import tempfile

# Before matplotlib is first imported: keep its font cache out of the home directory.
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="nhle-mpl-"))

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

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
