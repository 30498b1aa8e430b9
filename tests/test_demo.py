"""The demo's study: configs/ablation-synthetic.yaml pointed at the demo's files."""

from __future__ import annotations

from flows.cli.demo import demo_study
from tasks.fewshot.training import total_steps
from tasks.study.ablation import study_from_dict


def _points(quick: bool) -> list:
    spec, overrides = demo_study("/tmp/demo/store.zarr", "/tmp/demo/backbone.pth",
                                 "/tmp/demo/runs", quick)
    return study_from_dict(spec, overrides).points


def test_full_demo_study_schedules() -> None:
    points = _points(quick=False)
    assert len(points) == 5 * 3 + 3 + 1
    assert {p.store for p in points} == {"/tmp/demo/store.zarr"}
    umt = [p for p in points if p.model == "umt"]
    # Three seeds, each its own draw of the labelled subset, for each of five budgets.
    assert sorted({(p.seed, p.budget_seed) for p in umt}) == [(0, 0), (1, 1), (2, 2)]
    assert sorted({p.budget for p in umt}) == [0.0, 0.05, 0.1, 0.2, 1.0]
    by_budget = {p.budget: p for p in umt if p.seed == 0}
    # 0 % is the pseudo phase alone; the labelled budgets continue it with `steps` steps.
    assert total_steps(by_budget[0.0]) == by_budget[0.0].pseudo_steps == 400
    assert total_steps(by_budget[1.0]) == 400 + by_budget[1.0].steps
    metasegnet = [p for p in points if p.model == "metasegnet"]
    assert [(p.ways, p.backbone_checkpoint) for p in metasegnet] == [(2, None)]


def test_quick_demo_overrides_reach_every_point() -> None:
    points = _points(quick=True)
    assert {(p.steps, p.val_every, p.checkpoint_every) for p in points} == {(6, 6, 6)}
    assert {p.pseudo_steps for p in points if p.model == "umt"} == {6}
