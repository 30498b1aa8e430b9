"""Episode samplers and label budgets on a synthetic store (original 64 px, canonical 48 px)."""

from __future__ import annotations

import logging
import random
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from models.conventions import IMAGENET_MEAN, IMAGENET_STD
from tasks.data import ingest, store
from tasks.data.folds import base_classes, fold_classes
from tasks.data.readers import make_reader
from tasks.data.synth import synthesize
from tasks.fewshot.episodes import (
    Episode,
    EpisodeSampler,
    batch_to_tensors,
    label_budget,
)

MIN_PX = 100  # the default 2*32*32 is half of a 64 px synthetic image: too strict here


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> store.Dataset:
    """120 train + 40 val synthetic images; labels at 64 px, canonical size 48 px so that the
    original-size query mask is a different array from the canonical one."""
    root = tmp_path_factory.mktemp("episodes")
    synthesize(root / "synth", n_train=120, n_val=40, size=64, seed=1)
    readers = [make_reader("voc", root / "synth" / "voc", s) for s in ("train", "val")]
    plan = ingest.plan_ingest(readers, "ep", size=48, shard_size=64)
    url = str(root / "s.zarr")
    ingest.ingest_plan(plan, url)
    return store.open_dataset(url, "ep")


def _sampler(ds: store.Dataset, **kw) -> EpisodeSampler:
    kw.setdefault("split", "train")
    kw.setdefault("classes", range(1, 21))
    kw.setdefault("min_pixels", MIN_PX)
    return EpisodeSampler(ds, **kw)


def _expected(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Reference label mapping written independently of the sampler's lookup table."""
    out = np.zeros_like(labels)
    out[labels == 255] = 255
    for c, j in mapping.items():
        out[labels == c] = j
    return out


def _assert_episode_labels(ds: store.Dataset, ep: Episode) -> None:
    """Every mask of ``ep`` is the dataset's label under the protocol's mapping."""
    n = len(ep.classes)
    query_map = {c: j + 1 for j, c in enumerate(ep.classes)}
    np.testing.assert_array_equal(ep.query_mask, _expected(ds.mask(ep.query_id), query_map))
    np.testing.assert_array_equal(ep.query_original_mask,
                                  _expected(ds.original_mask(ep.query_id), query_map))
    assert set(np.unique(ep.query_mask)) <= set(range(n + 1)) | {255}
    for k, sid in enumerate(ep.support_ids):
        j = k // ep.shots
        np.testing.assert_array_equal(ep.support_masks[k],
                                      _expected(ds.mask(sid), {ep.classes[j]: j + 1}))
        assert set(np.unique(ep.support_masks[k])) <= {0, j + 1, 255}
        assert (ep.support_masks[k] == j + 1).any()


def test_label_budget_is_nested_deterministic_and_seeded() -> None:
    ids = [f"img{k:04d}" for k in range(200)]
    budgets = [label_budget(ids, f, seed=3) for f in (0.05, 0.1, 0.2, 1.0)]
    assert [len(b) for b in budgets] == [10, 20, 40, 200]
    for small, large in zip(budgets, budgets[1:], strict=False):
        assert set(small) < set(large)
        assert large[: len(small)] == small  # nested as prefixes of one permutation
    assert set(budgets[-1]) == set(ids)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert label_budget(shuffled, 0.1, seed=3) == budgets[1]  # input order is irrelevant
    assert label_budget(ids, 0.1, seed=4) != budgets[1]
    assert label_budget(ids, 0.0) == [] and len(label_budget(ids, 0.001)) == 1
    assert len(label_budget(ids[:30], 0.05)) == 2  # 1.5 rounds half up
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            label_budget(ids, bad)


def test_training_sampler_never_shows_novel_classes(ds: store.Dataset) -> None:
    base, novel = base_classes(20, 0), set(fold_classes(20, 0))
    sampler = _sampler(ds, classes=base, ways=2, shots=2)
    assert not set(sampler.classes) & novel
    novel_in_queries = 0
    for ep in sampler.episodes(25):
        assert set(ep.classes) <= set(base)
        _assert_episode_labels(ds, ep)  # a novel pixel is 0 in every mask
        novel_in_queries += int(np.isin(ds.mask(ep.query_id), list(novel)).sum())
    assert novel_in_queries > 0  # the mapping was really exercised on novel pixels


def test_k_way_episodes_are_well_formed(ds: store.Dataset) -> None:
    ways, shots = 3, 2
    sampler = _sampler(ds, ways=ways, shots=shots)
    for ep in sampler.episodes(15, start=100):
        assert len(set(ep.classes)) == ways and len(ep.support_ids) == ways * shots
        assert ep.query_id not in ep.support_ids
        assert ep.support_images.shape == (ways * shots, 48, 48, 3)
        assert ep.support_masks.shape == (ways * shots, 48, 48)
        assert ep.query_image.shape == (48, 48, 3) and ep.query_original_mask.shape == (64, 64)
        assert ep.support_images.dtype == ep.support_masks.dtype == np.uint8
        assert max(ds.pixels(ep.query_id)[c] for c in ep.classes) >= MIN_PX
        for j, c in enumerate(ep.classes):
            group = ep.support_ids[j * shots:(j + 1) * shots]  # class-major
            assert len(set(group)) == shots
            assert all(ds.pixels(i)[c] >= MIN_PX for i in group)
        _assert_episode_labels(ds, ep)


def test_min_pixels_is_respected_at_original_resolution(ds: store.Dataset) -> None:
    sampler = _sampler(ds, classes=[1, 2, 3, 4, 5], min_pixels=300)
    for c, ids in sampler.eligible.items():
        assert ids == sorted(i for i in ds.split_ids("train") if ds.pixels(i)[c] >= 300)
    for k in range(200):
        classes, supports, query = sampler.draw(k)
        assert all(ds.pixels(i)[classes[0]] >= 300 for i in [*supports, query])


def test_episodes_are_deterministic_per_seed_and_index(ds: store.Dataset) -> None:
    a, b = _sampler(ds, shots=2, seed=7), _sampler(ds, shots=2, seed=7)
    e1, e2 = a.episode(5), b.episode(5)
    for field in ("classes", "support_ids", "query_id"):
        assert getattr(e1, field) == getattr(e2, field)
    for field in ("support_images", "support_masks", "query_image", "query_mask",
                  "query_original_mask"):
        np.testing.assert_array_equal(getattr(e1, field), getattr(e2, field))
    # Any worker can draw any slice: episode i does not depend on what was drawn before.
    assert [e.query_id for e in a.episodes(3, start=10)] == [a.draw(i)[2] for i in (10, 11, 12)]
    assert [e.query_id for e in b.episodes(3)] == [e.query_id for e in islice(b, 3)]
    reordered = _sampler(ds, shots=2, seed=7, classes=range(20, 0, -1))
    assert [a.draw(i) for i in range(20)] == [reordered.draw(i) for i in range(20)]
    other = _sampler(ds, shots=2, seed=8)
    assert [a.draw(i) for i in range(20)] != [other.draw(i) for i in range(20)]
    assert len({a.draw(i)[2] for i in range(20)}) > 5  # episodes vary with the index
    # The digest names the episodes: equal for the same draws, else different.
    assert a.digest(20) == b.digest(20) == reordered.digest(20)
    assert len({a.digest(20), a.digest(19), other.digest(20),
                _sampler(ds, shots=1, seed=7).digest(20)}) == 4


def test_one_way_test_episodes_share_classes_fairly(ds: store.Dataset) -> None:
    sampler = _sampler(ds, split="val", classes=fold_classes(20, 1), min_pixels=50)
    assert len(sampler.classes) == 5
    sizes = {c: len(v) for c, v in sampler.eligible.items()}
    assert max(sizes.values()) > min(sizes.values())  # unequal image counts...
    counts = Counter(sampler.draw(i)[0][0] for i in range(1000))
    assert all(150 <= counts[c] <= 250 for c in sampler.classes), counts  # ...equal shares


def test_image_ids_restrict_the_pool(ds: store.Dataset) -> None:
    budget = label_budget(ds.split_ids("train"), 0.5, seed=0)
    sampler = _sampler(ds, image_ids=budget, ways=2)
    assert sampler.image_ids == sorted(budget)
    seen = {i for k in range(100) for i in [*sampler.draw(k)[1], sampler.draw(k)[2]]}
    assert seen <= set(budget) and len(seen) > 20
    with pytest.raises(ValueError, match="not ingested images of split 'train'"):
        _sampler(ds, image_ids=budget + ds.split_ids("val")[:1])


def test_unusable_classes_are_dropped_and_too_few_is_a_clear_error(
        ds: store.Dataset, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tasks.fewshot.episodes"):
        sampler = _sampler(ds, min_pixels=600, shots=1)
    assert "dropping classes" in caplog.text
    assert sampler.dropped_classes and not set(sampler.dropped_classes) & set(sampler.classes)
    assert all(len(sampler.eligible[c]) < 2 for c in sampler.dropped_classes)
    with pytest.raises(ValueError, match=r"6-way 1-shot episodes need 6 classes"):
        _sampler(ds, classes=[1, 2, 3, 4, 5], ways=6)
    with pytest.raises(ValueError, match="need 1 classes"):
        _sampler(ds, min_pixels=2 * 32 * 32)  # the default: no 64 px image holds 2048 px
    with pytest.raises(ValueError, match="distinct foreground ids"):
        _sampler(ds, classes=[0, 1])
    with pytest.raises(ValueError, match="ways and shots"):
        _sampler(ds, shots=0)


def test_batch_to_tensors(ds: store.Dataset) -> None:
    sampler = _sampler(ds, ways=2, shots=3)
    eps = list(sampler.episodes(4))
    batch = batch_to_tensors(eps)
    assert batch["support_img"].shape == (4, 6, 3, 48, 48)
    assert batch["support_mask"].shape == (4, 6, 48, 48)
    assert batch["query_img"].shape == (4, 3, 48, 48)
    assert batch["query_mask"].shape == (4, 48, 48)
    assert batch["support_img"].dtype == batch["query_img"].dtype == torch.float32
    assert batch["support_mask"].dtype == batch["query_mask"].dtype == torch.int64
    assert batch["classes"].tolist() == [e.classes for e in eps]
    raw = eps[2].support_images[4, 10, 20].astype(np.float64)
    want = (raw / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(batch["support_img"][2, 4, :, 10, 20].numpy(), want, atol=1e-5)
    np.testing.assert_array_equal(batch["query_mask"][1].numpy(), eps[1].query_mask)
    with pytest.raises(ValueError, match="share ways, shots and size"):
        batch_to_tensors([eps[0], _sampler(ds, ways=2, shots=1).episode(0)])


def test_store_fixture_is_what_the_tests_assume(ds: store.Dataset) -> None:
    # Guards the thresholds above: the labels are 64 px, images 48 px, 120/40 split.
    assert ds.size == 48 and len(ds.split_ids("train")) == 120 and len(ds.split_ids("val")) == 40
    assert ds.original_mask(ds.ids[0]).shape == (64, 64)


def test_held_out_share_is_even_and_nested_across_budgets() -> None:
    from tasks.fewshot.episodes import hold_out

    ids = [f"i{k:03d}" for k in range(200)]
    small, large = label_budget(ids, 0.1, seed=4), label_budget(ids, 0.5, seed=4)
    (train_s, held_s), (train_l, held_l) = hold_out(small, 0.2), hold_out(large, 0.2)
    assert len(held_s) == 4 and len(held_l) == 20
    assert set(held_s) <= set(held_l) and set(train_s) <= set(train_l)  # nested
    assert not set(train_l) & set(held_l) and sorted(train_l + held_l) == sorted(large)
    assert hold_out(small[:4], 0.2) == (small[:4], [])  # too few to hold one out
    assert label_budget(ids, 0.1, seed=5) != small  # another draw, another subset
