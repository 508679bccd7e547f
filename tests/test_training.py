import pytest
import torch

from nhle.config import TrainConfig
from nhle.training import load_checkpoint, resolve_device, save_checkpoint, train_model


def test_training_is_seeded_and_learns(digits):
    config = TrainConfig(epochs=1)
    a, seconds = train_model(digits, config, seed=3, progress=False)
    b, _ = train_model(digits, config, seed=3, progress=False)
    c, _ = train_model(digits, config, seed=4, progress=False)
    assert seconds > 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_retrain_excludes_the_classes(digits, monkeypatch):
    from nhle import training

    seen = []
    real = training.train_one_epoch
    monkeypatch.setattr(training, "train_one_epoch", lambda m, data, *a: seen.append(data.labels) or real(m, data, *a))
    train_model(digits, TrainConfig(epochs=1), seed=0, exclude=[2, 9], progress=False)
    assert not torch.isin(torch.cat(seen), torch.tensor([2, 9])).any()


def test_checkpoint_is_a_plain_dict_that_round_trips(trained, tmp_path):
    from nhle.unlearning import apply_class_weight_mask
    import copy

    model = copy.deepcopy(trained)
    apply_class_weight_mask(model, [6])
    path = save_checkpoint(tmp_path / "m" / "model.pt", model, class_names=list("0123456789"), data_fingerprint="abc")
    raw = torch.load(path, weights_only=True)
    assert {"state_dict", "model_spec", "forgotten_classes", "class_names", "data_fingerprint"} <= set(raw)
    assert raw["forgotten_classes"] == [6]
    loaded, checkpoint = load_checkpoint(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x)) and checkpoint["data_fingerprint"] == "abc"
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left


def test_failed_write_leaves_no_half_written_model(trained, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous good model")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, trained)
    assert path.read_bytes() == b"previous good model" and len(list(tmp_path.iterdir())) == 1


def test_bad_checkpoint_and_device_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable nhle checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
