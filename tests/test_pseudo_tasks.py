"""Pseudo meta-tasks and the label-budget schedules, on a hand-made pseudo-mask group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data import store
from tasks.fewshot.config import TrainConfig
from tasks.fewshot.training import episode_stream, total_steps, train
from tasks.labelfree.pseudo_tasks import PseudoEpisodeSampler


@pytest.fixture
def no_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of a label array, through the Dataset API or zarr, fails the test."""
    def refuse(*_a, **_k):
        raise AssertionError("a label array was read")

    for name in ("mask", "original_mask", "pixels"):
        monkeypatch.setattr(store.Dataset, name, refuse)
    monkeypatch.setattr(store.Dataset, "class_pixels", property(refuse))
    open_array = store._RowReader.array  # every read of Dataset, Derived, ... opens through it

    def guarded(self, key):
        if not self.where.startswith("derived group") and key != "images":
            refuse()
        return open_array(self, key)

    monkeypatch.setattr(store._RowReader, "array", guarded)


def _sampler(url: str, key: str, **kw) -> PseudoEpisodeSampler:
    ds = store.open_dataset(url, "synth")
    return PseudoEpisodeSampler(ds, store.open_derived(url, "synth", key), **kw)


def test_filters_topk_and_determinism(tiny_store: str, pseudo_key: str, no_labels) -> None:
    s = _sampler(tiny_store, pseudo_key, shots=2, min_pixels=100, top_k=3, seed=5)
    assert s.clusters == [0, 1, 2]  # 3 is background-like
    rows = [s.pseudo.row(i) for i in s.ids[s.eligible[0]]]
    assert rows and all(r % 2 == 0 for r in rows)  # odd rows hold no cluster 0
    assert len(s.eligible[1]) == len(s.ids)
    for i in range(20):
        ep = s.episode(i)
        cluster = ep.classes[0]
        assert ep.query_id not in ep.support_ids and len(set(ep.support_ids)) == 2
        assert set(np.unique(ep.query_mask)) <= {0, 1, 255}
        assert (ep.support_masks == 1).any(axis=(1, 2)).all()
        # supports are among the top-3 most similar images of the cluster
        q = s._protos[list(s.ids).index(ep.query_id), cluster]
        members = [m for m in s.eligible[cluster] if s.ids[m] != ep.query_id]
        sims = {s.ids[m]: float(s._protos[m, cluster] @ q) for m in members}
        top = sorted(sims, key=lambda k: -sims[k])[:3]
        assert set(ep.support_ids) <= set(top)
    a, b = s.episode(7), s.episode(7)
    assert a.query_id == b.query_id and np.array_equal(a.support_masks, b.support_masks)
    with pytest.raises(ValueError, match="no cluster"):
        _sampler(tiny_store, pseudo_key, min_pixels=10**6)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"pseudo": "x", "steps": 4} | kw))


def test_budget_mode_schedules() -> None:
    assert [episode_stream(_cfg(pseudo=None), s) for s in range(3)] == ["labelled"] * 3
    # finetune at 0 %: the pseudo phase alone, the start of every labelled budget's schedule.
    zero = _cfg(budget=0.0, pseudo_steps=3)
    assert total_steps(zero) == 3 and {episode_stream(zero, s) for s in range(3)} == {"pseudo"}
    zero_mixed = _cfg(budget=0.0, budget_mode="mixed")
    assert total_steps(zero_mixed) == 4
    assert {episode_stream(zero_mixed, s) for s in range(4)} == {"pseudo"}
    fine = _cfg(budget=0.2, pseudo_steps=3)
    assert total_steps(fine) == 7
    assert [episode_stream(fine, s) for s in range(7)] == ["pseudo"] * 3 + ["labelled"] * 4
    mixed = _cfg(budget=0.2, budget_mode="mixed", mixed_pseudo_fraction=0.5)
    assert total_steps(mixed) == 4
    assert [episode_stream(mixed, s) for s in range(4)] == ["labelled", "pseudo"] * 2
    third = _cfg(budget=1.0, budget_mode="mixed", mixed_pseudo_fraction=1 / 3, steps=6)
    assert [episode_stream(third, s) for s in range(6)].count("pseudo") == 2
    for budget in (0.0, 0.2):
        with pytest.raises(ValueError, match="pseudo_steps"):
            _cfg(budget=budget)
    with pytest.raises(ValueError, match="1-way"):
        _cfg(ways=2)


def test_zero_budget_trains_on_pseudo_tasks_without_labels(
        tiny_store: str, pseudo_key: str, tmp_path: Path, no_labels) -> None:
    cfg = TrainConfig(model="umt", store=tiny_store, dataset="synth", budget=0.0,
                      pseudo="latest", pseudo_steps=3, batch_size=2, checkpoint_every=3,
                      min_pixels=100, model_args={"dim": 32, "n_fg_protos": 4,
                                                  "n_bg_protos": 6, "heads": 2,
                                                  "freeze_backbone": False})
    logged: dict[str, float] = {}
    result = train(cfg, tmp_path / "run", progress=False,
                   on_metrics=lambda metrics, step: logged.update(metrics))
    assert result.steps == 3 and result.best_step == 3
    assert np.isnan(result.best_val_miou)
    # The label-free monitor scored held-out pseudo episodes; nothing labelled was validated.
    assert 0.0 <= logged["val_pseudo/miou"] <= 1.0 and "val/miou" not in logged
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()


def _umt(url: str, tmp_path: Path, **kw) -> TrainConfig:
    base = dict(model="umt", store=url, dataset="synth", pseudo="latest", pseudo_steps=4,
                steps=4, batch_size=2, checkpoint_every=2, val_every=2, val_episodes=4,
                min_pixels=64, out_dir=str(tmp_path / "runs"),
                model_args={"dim": 32, "n_fg_protos": 4, "n_bg_protos": 6, "heads": 2,
                            "freeze_backbone": False})
    return TrainConfig(**(base | kw))


def test_pseudo_phase_is_trained_once_and_every_labelled_budget_starts_from_it(
        tiny_store: str, pseudo_key: str, tmp_path: Path) -> None:
    from tasks.data.store import open_dataset
    from tasks.fewshot.training import load_state, pseudo_phase_dir

    zero = _umt(tiny_store, tmp_path, budget=0.0)
    logged: dict[int, dict[str, float]] = {}
    a = train(zero, tmp_path / "zero", progress=False,
              on_metrics=lambda m, s: logged.setdefault(s, {}).update(m))
    phase = pseudo_phase_dir(zero, open_dataset(tiny_store, "synth"))
    phase_last = phase / "checkpoints" / "last.pt"
    stamp = phase_last.stat().st_mtime_ns
    # The 0 % model is exactly the pseudo phase's final model.
    pseudo_final = load_state(phase_last)["model"]
    zero_best = load_state(tmp_path / "zero" / "checkpoints" / "best.pt")
    assert a.steps == 4 and all(torch.equal(v, zero_best["model"][k])
                                for k, v in pseudo_final.items())
    assert zero_best["config"]["budget"] == 0.0 and sorted(logged) == [1, 2, 3, 4]

    steps: dict[int, dict[str, float]] = {}
    for budget in (0.5, 1.0):
        cfg = _umt(tiny_store, tmp_path, budget=budget)
        assert pseudo_phase_dir(cfg, open_dataset(tiny_store, "synth")) == phase
        steps.clear()
        result = train(cfg, tmp_path / f"b{budget}", progress=False,
                       on_metrics=lambda m, s: steps.setdefault(s, {}).update(m))
        assert phase_last.stat().st_mtime_ns == stamp  # reused, not retrained
        assert result.steps == 8
        # The labelled phase has its own warm-up + cosine over its 4 steps: it starts at the
        # full rate again (the pseudo phase's schedule had decayed to ~0 by its step 4).
        assert steps[4]["train/lr"] < 0.2 * cfg.lr
        assert steps[5]["train/lr"] == pytest.approx(cfg.lr)
        # Only labelled-phase checkpoints compete for best.pt.
        assert result.best_step > cfg.pseudo_steps or np.isnan(result.best_val_miou)
        assert load_state(tmp_path / f"b{budget}" / "checkpoints" / "best.pt")["step"] > 4


def test_a_crashed_labelled_phase_resumes_to_the_same_weights(
        tiny_store: str, pseudo_key: str, tmp_path: Path) -> None:
    from tasks.fewshot.training import load_state

    cfg = _umt(tiny_store, tmp_path, budget=0.5)
    train(cfg, tmp_path / "straight", progress=False)
    crashed = train(cfg, tmp_path / "crashed", progress=False, stop_after=3)
    assert crashed.steps == 7  # the shared pseudo phase (4, reused) + 3 labelled steps
    train(cfg, tmp_path / "crashed", progress=False)
    a = load_state(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_state(tmp_path / "crashed" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
