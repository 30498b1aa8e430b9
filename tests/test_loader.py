"""The prefetching episode loader: the same batches in the same order whoever reads them, the
global RNG untouched, and training with it bit-identical to training without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.conventions import IMAGENET_MEAN, IMAGENET_STD
from tasks.data.folds import base_classes
from tasks.data.store import open_dataset
from tasks.fewshot.config import ConfigError, TrainConfig, config_digest, from_dict
from tasks.fewshot.episodes import (
    EpisodeSampler,
    batch_to_tensors,
    episodes_for_step,
)
from tasks.fewshot.loader import CUDA_WORKERS, StepBatch, step_batches, workers_for
from tasks.fewshot.training import load_state, train

BATCH = 2
STEPS = range(3, 9)  # a resumed phase starts past 0


def _stream(url: str):
    """Two samplers (other seeds, other ways) alternating by step, like a mixed phase."""
    ds = open_dataset(url, "synth")
    classes = base_classes(len(ds.classes) - 1, 0, 4, "auto")
    one = EpisodeSampler(ds, split="train", classes=classes, min_pixels=64, seed=1)
    two = EpisodeSampler(ds, split="train", classes=classes, ways=2, min_pixels=64, seed=2)
    return lambda step: two if step % 3 == 2 else one


def _expected(url: str) -> list[StepBatch]:
    stream = _stream(url)
    return [StepBatch.of(s, episodes_for_step(stream(s), s, BATCH)) for s in STEPS]


def _same(got: list[StepBatch], want: list[StepBatch]) -> None:
    assert [b.step for b in got] == list(STEPS)
    for g, w in zip(got, want, strict=True):
        assert g.episodes == w.episodes, g.step
        assert g.tensors.keys() == w.tensors.keys()
        for key, tensor in w.tensors.items():
            assert g.tensors[key].dtype == tensor.dtype and torch.equal(g.tensors[key], tensor)
            assert g.tensors[key].stride() == tensor.stride(), key  # same memory layout


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_loader_yields_the_steps_batches_in_order(tiny_store: str, workers: int) -> None:
    before = torch.get_rng_state()
    got = list(step_batches(_stream(tiny_store), BATCH, STEPS, workers=workers))
    # Reading ahead draws nothing from torch's global RNG (checkpointed and resumed).
    assert torch.equal(torch.get_rng_state(), before)
    _same(got, _expected(tiny_store))


def test_normalisation_table_matches_the_arithmetic() -> None:
    # Every pixel value of every channel, as the float32 arithmetic on a whole image gives it.
    pixels = np.stack([np.roll(np.arange(256, dtype=np.uint8), c) for c in range(3)], -1)
    images = pixels.reshape(1, 16, 16, 3)
    x = torch.from_numpy(images).movedim(-1, -3).float().div_(255)
    arithmetic = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)

    class One:  # the fields batch_to_tensors reads
        classes = [1]
        support_images = images
        support_masks = np.zeros((1, 16, 16), np.uint8)
        query_image = images[0]
        query_mask = np.zeros((16, 16), np.uint8)

    batch = batch_to_tensors([One()])
    assert torch.equal(batch["query_img"][0], arithmetic[0])
    assert batch["query_img"][0].stride() == arithmetic[0].stride()


def _cfg(url: str, out: Path, workers: int, **kw) -> TrainConfig:
    return TrainConfig(
        model="metasegnet", store=url, dataset="synth", fold=0, steps=6, batch_size=2,
        checkpoint_every=2, val_every=2, val_episodes=4, test_episodes=4, test_shots=[1],
        min_pixels=64, threads=1, loader_workers=workers, experiment="test",
        model_args={"embed_dim": 16, "global_dim": 32, "local_dim": 16}, out_dir=str(out),
        **kw)


def test_prefetched_training_is_bit_identical_and_resumes_exactly(tiny_store: str,
                                                                  tmp_path: Path) -> None:
    plain = train(_cfg(tiny_store, tmp_path, 0), tmp_path / "plain", progress=False)
    cfg = _cfg(tiny_store, tmp_path, 2)
    crashed = train(cfg, tmp_path / "prefetched", progress=False, stop_after=3)
    assert crashed.steps == 3
    resumed = train(cfg, tmp_path / "prefetched", progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    assert [h[1] for h in resumed.history] == [h[1] for h in plain.history]
    assert (resumed.best_step, resumed.best_val_miou) == (plain.best_step, plain.best_val_miou)
    for name in ("last.pt", "best.pt"):
        a = load_state(tmp_path / "plain" / "checkpoints" / name)
        b = load_state(tmp_path / "prefetched" / "checkpoints" / name)
        assert a["model"].keys() == b["model"].keys()
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)
        if name == "last.pt":
            assert torch.equal(a["rng"], b["rng"])
    # How batches are read is not what is trained: the run's name (digest) does not change.
    assert config_digest(cfg, "v") == config_digest(_cfg(tiny_store, tmp_path, 0), "v")


def test_loader_workers_default_by_device() -> None:
    assert TrainConfig().loader_workers is None
    assert workers_for(None, torch.device("cpu")) == 0  # today's loop on CPU
    assert 1 <= workers_for(None, torch.device("cuda")) <= CUDA_WORKERS  # prefetching on a GPU
    assert workers_for(3, torch.device("cpu")) == 3 and workers_for(0, torch.device("cuda")) == 0
    with pytest.raises(ConfigError, match="loader_workers: expected an integer >= 0"):
        from_dict({"loader_workers": -1})
