"""The one training-loop skeleton, shared by few-shot training (`tasks.fewshot.training`) and
self-supervised pretraining (`tasks.labelfree.pretrain`): resume, optimiser with the warm-up +
cosine schedule, finite-loss check, checkpoints, stop. What a step computes (its batch and
loss) and what happens after it (validation, EMA, logs) is the caller's.

Resuming is exact: the checkpoint holds the model, optimiser, schedule and global RNG state, and
a step's batch depends only on its number, so a run that crashed and resumed ends with the same
weights as one that did not.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tasks.jsonsafe import write_atomic

log = logging.getLogger(__name__)

WARMUP_FRACTION = 0.05  # of a schedule's steps spent warming up linearly (at least one)

Objective = Callable[[int], Mapping[str, Tensor]]  # step -> {"loss": ..., other parts}


def warmup_cosine(total: int, warmup_fraction: float = WARMUP_FRACTION) -> Callable[[int], float]:
    """Learning-rate factor of step i (for `LambdaLR`): linear warm-up over
    `max(1, int(total * warmup_fraction))` steps, then a cosine decay to 0 at `total`."""
    warmup = max(1, int(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: Any) -> None:
    """`torch.save(state)`, atomically: a crash mid-save leaves the previous file intact."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, loaded with ``weights_only`` (a file that
    would run code when unpickled is refused). A file that is not one (garbage, truncated,
    empty, or pickled objects that are not weights) raises a ValueError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # the disk's or the path's fault, not the file's content: the CLI says which
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in any of many ways
        # (UnpicklingError, EOFError, RuntimeError from the zip reader, IndexError, ...)
        text = str(exc)
        if text.startswith("Weights only load failed"):  # torch's refusal, at length: its
            # reason is the paragraph between the advice and the pointer to the docs
            parts = [p for p in re.split(r"\n\s*\n", text)[1:]
                     if p.strip() and not p.strip().startswith("Check the documentation")]
            text = " ".join(parts).split("WeightsUnpickler error:")[-1] or text
        detail = " ".join(text.split())
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        what = "an empty file" if size == 0 else (
            f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__)
        raise ValueError(f"{path}: not a readable checkpoint ({what}); it is truncated, "
                         "damaged, or was not written by this tool") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a checkpoint of this tool (no 'model' entry; keys: "
                         f"{list(state)[:5] if isinstance(state, dict) else type(state).__name__})")
    return state


# --- the loop ----------------------------------------------------------------------------------


class TrainingLoop:
    """`steps` optimiser steps of `model`, checkpointed to `checkpoint` and resumable from it.

    The optimiser (from `make_optimizer`, given the trainable parameters) follows
    `warmup_cosine(steps)`. Seeding is the caller's: it must precede whatever draws random
    numbers before the loop (building the model, say).
    """

    def __init__(self, model: nn.Module,
                 make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], *,
                 steps: int, checkpoint: Path, desc: str, progress: bool = True) -> None:
        self.model, self.steps, self.checkpoint = model, steps, checkpoint
        self.desc, self.progress = desc, progress
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(steps))
        self.step = 0  # optimiser steps done (and checkpointed, after `resume`)

    def resume(self, check: Callable[[dict[str, Any]], None] | None = None
               ) -> dict[str, Any] | None:
        """Restore model, optimiser, schedule, RNG and step from `checkpoint` when it exists;
        returns its state (with the caller's own entries), None when there is none. `check`
        sees the state first and raises to refuse it (other parameters, say)."""
        if not self.checkpoint.exists():
            return None
        state = load_state(self.checkpoint)
        if check is not None:
            check(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d of %d", self.checkpoint, self.step, self.steps)
        return state

    def lr(self) -> float:
        """The learning rate of the last step (of the first parameter group)."""
        return self.scheduler.get_last_lr()[0]

    def run(self, objective: Objective, *, checkpoint_every: int,
            after_step: Callable[[int, Mapping[str, Tensor]], None] | None = None,
            extra_state: Callable[[], dict[str, Any]] | None = None,
            before_checkpoint: Callable[[], None] | None = None,
            stop_after: int | None = None, loss_name: str = "training loss",
            step_offset: int = 0) -> int:
        """Step until `steps` (or `stop_after` steps in this call); returns the steps done.

        Each step: train mode, `objective(step)` (its "loss" is minimised), a FloatingPointError
        if that loss is not finite (`loss_name`, and the step + `step_offset`, say where), the
        optimiser and schedule step, then `after_step(steps done, parts)`. Every
        `checkpoint_every` steps and at the last one, `before_checkpoint()` runs and the
        checkpoint is saved: model, optimiser, schedule, RNG, step, then `extra_state()`.
        """
        bar = tqdm(total=self.steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not self.progress)
        done = 0
        while self.step < self.steps:
            self.model.train()  # every step: validation in `after_step` may switch to eval
            parts = objective(self.step)
            loss = parts["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{loss_name} is {loss.item()} at step "
                                         f"{step_offset + self.step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            done += 1
            if after_step is not None:
                after_step(self.step, parts)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.step % checkpoint_every == 0 or self.step == self.steps:
                if before_checkpoint is not None:
                    before_checkpoint()
                save_checkpoint(self.checkpoint, {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "step": self.step} | (extra_state() if extra_state is not None else {}))
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        return done
