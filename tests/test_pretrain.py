"""Dense self-supervised pretraining: view geometry, the loss, no labels, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr.storage

from models.backbones import load_checkpoint, small_resnet
from models.dense_ssl import (
    Augment,
    DenseSSL,
    correspondence,
    crop,
    dense_infonce,
    make_views,
    sample_crops,
)
from tasks.data import store
from tasks.labelfree.pretrain import LabelAccessError, UnlabelledImages, pretrain

EYE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
LABEL_ARRAYS = ("/masks/", "/original_masks/", "/index/class_pixels/")



TINY = dict(steps=4, batch_size=4, lr=1e-3, seed=1, image_size=32, checkpoint_every=2,
            progress=False)


# --- view geometry ---------------------------------------------------------------------------


def test_identity_views_pair_identical_locations() -> None:
    theta = EYE.expand(3, 2, 3)
    index, valid = correspondence(theta, theta, 4, 5)
    assert valid.all()
    assert torch.equal(index, torch.arange(20).expand(3, 20))


def test_known_crop_maps_cell_centres() -> None:
    # View b is the bottom-right 60 % of the image (x_img = 0.6 x_b + 0.4); view a the whole
    # image. The centre of a's cell j, x = (2j + 1) / 8 - 1, lands in b's cell
    # floor(4 ((x - 0.4) / 0.6 + 1)): columns 0-2 fall outside b, 3..7 land in 0, 2, 3, 5, 7.
    expected = {3: 0, 4: 2, 5: 3, 6: 5, 7: 7}
    crop_b = torch.tensor([[[0.6, 0.0, 0.4], [0.0, 0.6, 0.4]]])
    index, valid = correspondence(EYE[None], crop_b, 8, 8)
    index, valid = index.view(8, 8), valid.view(8, 8)
    assert valid[3:, 3:].all() and valid.sum() == 25
    for i, row in expected.items():
        for j, col in expected.items():
            assert index[i, j] == row * 8 + col
    # Flipping view b mirrors the columns it is matched to.
    crop_b[0, 0, 0] = -0.6
    index_f, valid_f = correspondence(EYE[None], crop_b, 8, 8)
    assert torch.equal(valid_f, valid.view(1, -1))
    for i, row in expected.items():
        for j, col in expected.items():
            assert index_f.view(8, 8)[i, j] == row * 8 + 7 - col


def test_random_crops_pair_cells_that_cover_the_same_spot() -> None:
    """Views of an image whose pixels hold their own coordinates: the matched view-b cell is
    the one whose footprint holds the view-a cell's centre, and unmatched cells have none."""
    g = torch.Generator().manual_seed(5)
    size, cells = 128, 8
    ramp = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1
    coords = torch.stack(torch.meshgrid(ramp, ramp, indexing="xy"))[None].expand(6, 2, -1, -1)
    aug = Augment(size=64, scale=(0.1, 1.0))
    ta, tb = sample_crops(6, aug, g), sample_crops(6, aug, g)
    # The mean of a linear field over a cell is its value at the cell's centre.
    pa = F.avg_pool2d(crop(coords, ta, 64), 64 // cells).flatten(2).transpose(1, 2)
    pb = F.avg_pool2d(crop(coords, tb, 64), 64 // cells).flatten(2).transpose(1, 2)
    index, valid = correspondence(ta, tb, cells, cells)
    half = tb[:, [0, 1], [0, 1]].abs().double() / cells  # half a view-b cell, in image units
    # Chebyshev distance from each a-centre to each b-centre, in half-cells of view b.
    dist = ((pa[:, :, None] - pb[:, None]).abs() / half[:, None, None]).amax(-1)
    matched = dist.gather(2, index[..., None]).squeeze(-1)
    tol = 0.02 + 1 / size / half.min()  # the ramp is clamped in the outer half-pixel
    assert 0 < valid.float().mean() < 1
    assert (matched[valid] <= 1 + tol).all()
    assert (dist.amin(-1)[~valid] >= 1 - tol).all()


def test_views_are_seeded_and_stay_in_range() -> None:
    images = torch.rand(3, 3, 48, 48)
    a = make_views(images, Augment(size=32), torch.Generator().manual_seed(0))
    b = make_views(images, Augment(size=32), torch.Generator().manual_seed(0))
    c = make_views(images, Augment(size=32), torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 3, 32, 32) and 0 <= a[0].min() and a[0].max() <= 1


# --- the loss --------------------------------------------------------------------------------


def test_dense_infonce_rewards_the_right_partner() -> None:
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 64, 3, 3), dim=1)
    index, valid = correspondence(EYE.expand(2, 2, 3), EYE.expand(2, 2, 3), 3, 3)
    right = dense_infonce(q, q, index, valid, 0.1)
    wrong = dense_infonce(q, q, (index + 1) % 9, valid, 0.1)
    assert right < 0.5 < wrong
    only_other = dense_infonce(q, q, index, valid, 0.1, other_images_only=True)
    assert only_other < right  # fewer negatives
    assert dense_infonce(q, q, index, torch.zeros_like(valid), 0.1) == 0


@pytest.mark.parametrize("ema", [False, True])
def test_loss_decreases_on_toy_data(ema: bool) -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 48, 48)
    model = DenseSSL(small_resnet(width=8), dim=16, hidden=32, ema=ema,
                     augment=Augment(size=32))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(images, torch.Generator().manual_seed(0))["loss"]  # the same views
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema:
            model.update_target(0.9)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    if ema:
        online, target = model.backbone.conv1.weight, model.target["backbone"].conv1.weight
        assert not torch.equal(online, target) and not target.requires_grad


# --- the pretraining stage -------------------------------------------------------------------


def _record_store_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key any Zarr array or group, or the store's row readers, read from a local store."""
    keys: list[str] = []
    get, get_partial = zarr.storage.LocalStore.get, zarr.storage.LocalStore.get_partial_values

    async def spy_get(self, key, *args, **kwargs):
        keys.append(key)
        return await get(self, key, *args, **kwargs)

    async def spy_partial(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        keys.extend(k for k, _ in key_ranges)
        return await get_partial(self, prototype, key_ranges)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", spy_get)
    monkeypatch.setattr(zarr.storage.LocalStore, "get_partial_values", spy_partial)
    # The store's row readers read bytes of a local store directly (one pread per row).
    read = store._ByteRanges.read

    def spy_read(self, key, *args, **kwargs):
        keys.append(key)
        return read(self, key, *args, **kwargs)

    monkeypatch.setattr(store._ByteRanges, "read", spy_read)
    return keys


def test_pretraining_reads_no_label(tiny_store: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _record_store_reads(monkeypatch)
    read_ids: list[str] = []
    image = UnlabelledImages.image

    def spy_image(self: UnlabelledImages, image_id: str) -> np.ndarray:
        read_ids.append(image_id)
        return image(self, image_id)

    monkeypatch.setattr(UnlabelledImages, "image", spy_image)
    pretrain(tiny_store, "synth", tmp_path / "pt", **(TINY | {"steps": 2}))
    assert any("/images/" in k for k in keys) and any("/index/id/" in k for k in keys)
    assert not [k for k in keys if any(a in k for a in LABEL_ARRAYS)]
    # Only training images are seen.
    ds = store.open_dataset(tiny_store, "synth")
    assert read_ids and set(read_ids) <= set(ds.split_ids("train"))
    # The spy does see label reads when they happen: a full Dataset checks every array's
    # metadata when it opens, and reads the class pixel counts' data on demand.
    def chunks() -> list[str]:
        return [k for k in keys if "/index/class_pixels/" in k and not k.endswith("zarr.json")]

    assert not chunks()
    assert ds.class_pixels.shape[0] == len(ds.index)
    assert chunks()

    view = UnlabelledImages(tiny_store, "synth")
    for name in ("mask", "original_mask", "pixels", "class_pixels", "index", "group"):
        with pytest.raises(LabelAccessError):
            getattr(view, name)
    assert view.image(view.ids[0]).shape == (64, 64, 3)


def test_resume_is_exact_and_rerun_is_a_noop(tiny_store: str, tmp_path: Path) -> None:
    straight = pretrain(tiny_store, "synth", tmp_path / "straight", **TINY)
    pretrain(tiny_store, "synth", tmp_path / "crashed", **TINY, stop_after=3)
    assert not (tmp_path / "crashed" / "backbone.pth").exists()  # died after step 3, saved 2
    resumed = pretrain(tiny_store, "synth", tmp_path / "crashed", **TINY)
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((straight.parent / "pretrain.json").read_text())
    sb = json.loads((resumed.parent / "pretrain.json").read_text())
    assert sa["history"] == sb["history"] and len(sa["history"]) == 4

    stamp = (straight.stat().st_mtime_ns, (straight.parent / "pretrain.json").stat().st_mtime_ns)
    assert pretrain(tiny_store, "synth", tmp_path / "straight", **TINY) == straight
    assert stamp == (straight.stat().st_mtime_ns,
                     (straight.parent / "pretrain.json").stat().st_mtime_ns)
    with pytest.raises(ValueError, match="other parameters.*seed"):
        pretrain(tiny_store, "synth", tmp_path / "straight", **(TINY | {"seed": 2}))


def test_saved_backbone_loads_strictly_and_embeds(tiny_store: str, tmp_path: Path) -> None:
    from tasks.labelfree.embeddings import load_embedder

    path = pretrain(tiny_store, "synth", tmp_path / "pt", **(TINY | {"steps": 1}))
    report = load_checkpoint(small_resnet(), path, strict=True)
    assert report.ok and not report.defaulted
    spec = json.loads((path.parent / "pretrain.json").read_text())["embedder"]
    emb = load_embedder(spec)
    view = UnlabelledImages(tiny_store, "synth")
    images = np.stack([view.image(i) for i in view.ids[:2]])
    assert emb.embed(images).shape == (2, emb.dim, 8, 8)


def test_cli_runs_the_flow(tiny_store: str, tmp_path: Path,
                                                  prefect_api_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from flows.cli.labelfree import add_pretrain_parser

    parser = argparse.ArgumentParser(prog="fss")
    add_pretrain_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", "--store", tiny_store, "--dataset", "synth", "--out",
                              str(tmp_path / "pt"), "--steps", "2", "--batch-size", "4",
                              "--image-size", "32"])
    assert args.func(args) == 0
    first = capsys.readouterr().out
    assert str(tmp_path / "pt" / "backbone.pth") in first and "over 2 steps" in first
    load_checkpoint(small_resnet(), tmp_path / "pt" / "backbone.pth", strict=True)


def test_summary_json_writes_null_for_nan(tmp_path: Path) -> None:
    """pretrain.json is valid JSON: a non-finite value (a loss part that is NaN) becomes null."""
    from tasks.jsonsafe import write_json

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    nan, inf = float("nan"), float("inf")
    write_json(tmp_path / "pretrain.json",
               {"loss_end": nan, "history": [[1, 2.5, inf, nan]], "steps_per_s": None})
    saved = json.loads((tmp_path / "pretrain.json").read_text(), parse_constant=refuse)
    assert saved == {"loss_end": None, "history": [[1, 2.5, None, None]], "steps_per_s": None}


def test_views_are_cut_near_the_canonical_scale() -> None:
    from tasks.labelfree.pretrain import crop_scale, default_view_size

    assert default_view_size(144) == 64 and default_view_size(473) == 216
    lo, hi = crop_scale(64, 144)  # zoom 1 is an area of (64 / 144)^2 = 0.198
    assert lo == pytest.approx(0.0988, abs=1e-4) and hi == pytest.approx(0.3951, abs=1e-4)
    assert crop_scale(300, 144) == (1.0, 1.0)  # views larger than the image: whole images
