"""Distributed evaluation: top-1, per-class accuracy and the confusion matrix.

Each rank evaluates its own disjoint share of the validation set (no sampler padding), and the
confusion matrix, loss sum and counts are summed across ranks, so the numbers are exactly
those of a single-process evaluation whatever the world size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from videofeat.workers.signals import stop_signals_blocked


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, env,
             autocast: Callable[[], Any]) -> dict[str, Any]:
    """Evaluate ``model`` (the bare module, not the DDP wrapper: ranks may see different counts)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    totals = torch.zeros(2, dtype=torch.float64)  # [loss sum, clips that failed to decode]
    with stop_signals_blocked():  # the DataLoader workers start here: none may die of a stop signal
        batches = iter(loader)
    for batch in batches:
        valid = batch["valid"].bool()
        totals[1] += float((~valid).sum())
        if not valid.any():
            continue
        clips = batch["clips"][valid].flatten(0, 1).to(device, non_blocking=True)
        labels = batch["label"][valid]
        with autocast():
            logits = model(clips).float().cpu()
        totals[0] += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        predictions = logits.argmax(dim=1)
        confusion.index_put_((labels, predictions), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    confusion = env.all_reduce_sum(confusion)
    totals = env.all_reduce_sum(totals)
    model.train(was_training)
    count = int(confusion.sum())
    per_class_total = confusion.sum(dim=1)
    per_class = [float(confusion[c, c] / per_class_total[c]) if per_class_total[c] > 0 else None
                 for c in range(num_classes)]
    return {
        "top1": float(confusion.diag().sum() / count) if count else 0.0,
        "loss": float(totals[0] / count) if count else float("nan"),
        "count": count,
        "failed": int(totals[1]),
        "per_class": per_class,
        "confusion": confusion.long().tolist(),
    }
