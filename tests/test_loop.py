"""The training-loop skeleton (tasks/loop.py): its schedule, its checks, and golden numbers that
pin what training computes for every model, so that a refactoring which changes a single step
(the schedule, a loss term, the order of random draws) fails here.

The golden numbers are CPU float32 results of tiny runs on the session's synthetic store, and
they are compared exactly: a run is bit-for-bit reproducible on one platform, but rounding that
differs in the last bit grows over the steps (with two threads instead of one the fourth loss
moves by up to 0.5 %), so the comparison runs only on the platform that recorded them. When a
change of numbers is intended, copy the new ones from the failure message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tasks.fewshot.config import TrainConfig
from tasks.fewshot.training import train
from tasks.labelfree.pretrain import pretrain
from tasks.loop import TrainingLoop, load_state, warmup_cosine

TINY_UMT = {"dim": 32, "n_fg_protos": 4, "n_bg_protos": 6, "heads": 2, "freeze_backbone": False}
TRAIN_CASES = {
    "metasegnet": dict(model="metasegnet", budget=1.0,
                       model_args={"embed_dim": 16, "global_dim": 32, "local_dim": 16}),
    "panet": dict(model="panet", budget=0.5),  # cross-entropy + PAR
    "umt pseudo then labelled": dict(model="umt", budget=0.5, pseudo="latest", pseudo_steps=3,
                                     ce_weight=0.5, model_args=TINY_UMT),
}
# case: (loss of every step, sum of |weights| after the last step, best validation mIoU)
GOLDEN: dict[str, tuple[list[float], float, float]] = {
    "metasegnet": ([0.696836531162262, 0.3427475690841675, 0.8370888829231262, 0.6430305242538452],
                   39680.23905540765, 0.2659479590022237),
    "panet": ([0.6123002171516418, 0.2828860282897949, 0.8131412267684937, 0.37614503502845764],
              38528.803294069294, 0.35443478260869565),
    "umt pseudo then labelled": (
        [0.8016637563705444, 0.7431403398513794, 0.711738646030426, 0.7060133814811707],
        41655.77506735602, 0.0),
    "pretrain": ([4.66304, 4.40975, 4.30874, 4.81771], 90040.94473166864, float("nan")),
}
# torch build, CPU kernels (torch.backends.cpu.get_cpu_capability()), threads
GOLDEN_PLATFORM = ("2.13.0+cpu", "AVX512", 1)


def _platform() -> tuple[str, str, int]:
    return torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()


def _weight_sum(state: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().abs().sum() for t in state.values() if t.is_floating_point()))


@pytest.fixture
def golden_platform() -> None:
    """Skips a test off the golden numbers' platform (checked when the test runs: the session
    sets its one thread after collection)."""
    if _platform() != GOLDEN_PLATFORM:
        pytest.skip(f"golden numbers recorded on {GOLDEN_PLATFORM}, this is {_platform()}")


def _check(case: str, losses: list[float], weights: float, best: float) -> None:
    found = (losses, weights, best)
    assert case in GOLDEN, f"no golden numbers for {case!r}: {found}"
    want_losses, want_weights, want_best = GOLDEN[case]
    same_best = best == want_best or (math.isnan(best) and math.isnan(want_best))
    assert losses == want_losses and weights == want_weights and same_best, (
        f"{case}: {found} (golden {GOLDEN[case]})")


@pytest.mark.usefixtures("golden_platform")
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_matches_its_golden_numbers(case: str, tiny_store: str, pseudo_key: str,
                                             tmp_path: Path) -> None:
    cfg = TrainConfig(**(dict(store=tiny_store, dataset="synth", fold=0, steps=4, batch_size=2,
                              checkpoint_every=2, val_every=2, val_episodes=4, min_pixels=64,
                              device="cpu", out_dir=str(tmp_path / "runs"))
                         | TRAIN_CASES[case]))
    result = train(cfg, tmp_path / "run", progress=False)
    final = load_state(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    _check(case, [loss for _, loss in result.history], _weight_sum(final),
           result.best_val_miou)


@pytest.mark.usefixtures("golden_platform")
def test_pretraining_matches_its_golden_numbers(tiny_store: str, tmp_path: Path) -> None:
    path = pretrain(tiny_store, "synth", tmp_path / "pt", steps=4, batch_size=4, lr=1e-3, seed=1,
                    image_size=32, checkpoint_every=2, progress=False, device="cpu")
    history = json.loads((path.parent / "pretrain.json").read_text())["history"]
    final = load_state(path.parent / "checkpoints" / "last.pt")["model"]
    _check("pretrain", [h[1] for h in history], _weight_sum(final), float("nan"))


def test_schedule_warms_up_then_decays_to_zero() -> None:
    factor = warmup_cosine(100)  # 5 warm-up steps
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(5) == 1.0 and factor(5 + 95 // 2) == pytest.approx(0.5, abs=0.02)
    assert factor(100) == pytest.approx(0.0) and warmup_cosine(3)(0) == 1.0  # 1 warm-up step


class _Quadratic(nn.Module):
    """loss = |w - target|^2: a model whose every step is easy to follow."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def forward(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.w - target) ** 2).sum()}


def _loop(tmp_path: Path, steps: int = 6) -> TrainingLoop:
    model = _Quadratic()
    return TrainingLoop(model, lambda params: torch.optim.SGD(params, lr=0.1), steps=steps,
                        checkpoint=tmp_path / "last.pt", desc="test", progress=False)


def test_loop_checkpoints_resumes_and_stops(tmp_path: Path) -> None:
    target = torch.tensor([1.0, -2.0, 3.0])
    seen: list[int] = []
    extra: dict[str, Any] = {"note": "kept"}
    straight = _loop(tmp_path / "a")
    assert straight.run(lambda step: straight.model(target), checkpoint_every=4,
                        after_step=lambda step, parts: seen.append(step),
                        extra_state=lambda: extra) == 6
    assert seen == [1, 2, 3, 4, 5, 6] and load_state(tmp_path / "a" / "last.pt")["note"] == "kept"
    assert straight.lr() == pytest.approx(0.0)  # the schedule ran to its end

    crashed = _loop(tmp_path / "b")
    assert crashed.run(lambda step: crashed.model(target), checkpoint_every=4, stop_after=5) == 5
    resumed = _loop(tmp_path / "b")
    assert resumed.resume()["step"] == 4  # the checkpoint of step 4; step 5 is done again
    assert resumed.run(lambda step: resumed.model(target), checkpoint_every=4) == 2
    assert torch.equal(resumed.model.w, straight.model.w)

    def refuse(state: dict[str, Any]) -> None:
        raise ValueError(f"made by another run (step {state['step']})")

    again = _loop(tmp_path / "b")
    with pytest.raises(ValueError, match="another run"):
        again.resume(check=refuse)
    assert again.step == 0 and torch.equal(again.model.w, torch.zeros(3))  # nothing restored


def test_a_non_finite_loss_stops_before_the_step(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    target = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(FloatingPointError, match="pretraining loss is nan at step 7"):
        loop.run(lambda step: loop.model(target), checkpoint_every=1,
                 loss_name="pretraining loss", step_offset=7)
    assert torch.equal(loop.model.w, torch.zeros(3)) and not (tmp_path / "last.pt").exists()
