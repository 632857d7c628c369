"""The one training loop every organism stage uses: AdamW, linear warm-up then cosine decay, optional early stop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

BatchFn = Callable[[int], Mapping[str, torch.Tensor]]  # step -> model inputs with ``labels``
CheckFn = Callable[[int], Mapping[str, float]]  # step -> metrics; ``{"stop": 1.0}`` ends training early


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings of one stage."""

    steps: int
    lr: float
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    check_every: int = 0  # 0 = never call ``check`` before the end


@dataclass
class StageLog:
    """What one stage did: steps run, seconds, a loss trace (every 10 steps) and the checks' metrics."""

    name: str
    steps: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    checks: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "seconds": round(self.seconds, 2),
                "final_loss": self.losses[-1][1] if self.losses else None, "losses": self.losses,
                "checks": self.checks}


def lr_at(step: int, schedule: Schedule) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    if schedule.warmup and step < schedule.warmup:
        return schedule.lr * (step + 1) / schedule.warmup
    span = max(1, schedule.steps - schedule.warmup)
    progress = min(1.0, (step - schedule.warmup) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return schedule.lr * (schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * cosine)


def train(
    name: str,
    model: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    next_batch: BatchFn,
    schedule: Schedule,
    check: CheckFn | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> StageLog:
    """Run ``schedule.steps`` optimiser steps of ``model(**next_batch(step)).loss`` over ``params``.

    ``check(step)`` runs every ``check_every`` steps and at the end (model in eval mode meanwhile); a returned
    ``stop`` > 0 ends training there. ``on_step(step, loss)`` reports progress.
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    log = StageLog(name)
    start = time.perf_counter()
    model.train()
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = model(**next_batch(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        log.steps = step + 1
        if step % 10 == 0 or step == schedule.steps - 1:
            log.losses.append((step, round(value, 5)))
        if on_step is not None:
            on_step(step, value)
        last = step == schedule.steps - 1
        if check is not None and (last or (schedule.check_every and (step + 1) % schedule.check_every == 0)):
            model.eval()
            metrics = dict(check(step + 1))
            model.train()
            log.checks.append({"step": step + 1, **metrics})
            if metrics.get("stop", 0) > 0:
                break
    model.eval()
    log.seconds = time.perf_counter() - start
    return log
