"""tools/browse_dataset.py: the images the trainer is served (same batches, flips and noise), drawn without a model."""

import torch
from torchvision.io import read_image

from detlib.data.build import build_datasets
from detlib.data.sampler import TrainBatchSampler
from detlib.engine.trainer import _loader
from detlib.tools import browse_dataset


def test_served_images_are_the_trainers_batches(data_root):
    _, typed = browse_dataset.load_config(None, ["experiment=smoke", f"data.root={data_root}", "seed=3"])
    train_set, _ = build_datasets(typed.data)
    bs = typed.data.batch_size
    sampler = TrainBatchSampler(len(train_set), bs, typed.seed, 5)
    items = browse_dataset.served(train_set, sampler, 5, 2 * bs)
    loader = iter(_loader(train_set, bs, 0, typed.seed, 5, 7, torch.device("cpu")))
    expected = [(im, t) for images, targets in loader for im, t in zip(images, targets)]
    assert [it for it, _, _ in items] == [5] * bs + [6] * bs
    assert len(expected) == len(items)
    for (_, image, target), (im, t) in zip(items, expected):
        assert target["image_id"] == t["image_id"] and target["hflip"] == t["hflip"]
        assert torch.equal(image, im) and torch.equal(target["boxes"], t["boxes"])
    assert any(t["hflip"] for _, _, t in items) and not all(t["hflip"] for _, _, t in items)


def test_noise_is_drawn_against_the_clean_boxes(data_root, tmp_path, capsys):
    out = tmp_path / "browse"
    args = ["experiment=smoke", f"data.root={data_root}", "data.noise.outliers=1.0", "--num", "3", "--scale", "2",
            "--out", str(out)]
    assert browse_dataset.main(args) == 0
    assert "annotation noise drawn against the clean boxes" in capsys.readouterr().out
    files = sorted(out.glob("*.png"))
    assert len(files) == 3 and all(read_image(str(f)).shape[1:] == (256, 256) for f in files)  # 128 px x 2
    _, typed = browse_dataset.load_config(None, args[:3])
    train_set, _ = build_datasets(typed.data)
    _, image, target = browse_dataset.served(train_set, TrainBatchSampler(len(train_set), 2, typed.seed), 0, 1)[0]
    clean = browse_dataset.clean_boxes(train_set, target, image.shape[-1])
    assert clean.shape == target["boxes"].shape and not torch.allclose(clean, target["boxes"])


def test_a_misspelt_key_is_one_line_naming_it(data_root, capsys):
    assert browse_dataset.main(["experiment=smoke", f"data.root={data_root}", "data.noise.outlier=0.2"]) == 1
    err = capsys.readouterr().err
    assert "browse_dataset.py: error:" in err and "outlier" in err and len(err.strip().splitlines()) == 1
