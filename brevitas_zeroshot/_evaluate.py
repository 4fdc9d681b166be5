"""Top-1/top-5 on real labelled images, and agreement with a reference (float) model."""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import progress, releases_memory, resolve_device

__all__ = ["evaluate"]


@releases_memory
@torch.no_grad()  # not inference mode: an Inductor-compiled PT2E program fails under it
def evaluate(
    model: nn.Module,
    loader: Iterable,
    reference: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Accuracy of ``model`` over ``(images, labels)`` batches.

    Returns ``top1``, ``top5`` (percent) and ``n``; with a ``reference`` model also ``agreement`` (percent of
    images where both predict the same class) and ``kl`` (mean KL(reference || model) of the softmax outputs).
    """
    device = resolve_device(device)
    model.eval()
    if reference is not None:
        reference.eval()
    n = top1 = top5 = agree = 0
    kl = 0.0
    for images, labels in progress(loader, desc="eval", unit="batch"):
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        top1 += (top[:, 0] == labels).sum().item()
        top5 += (top == labels[:, None]).any(dim=1).sum().item()
        if reference is not None:
            ref = reference(images).float()
            agree += (ref.argmax(1) == top[:, 0]).sum().item()
            kl += F.kl_div(logits.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="sum").item()
        n += labels.numel()
    result = {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "n": n}
    if reference is not None:
        result["agreement"] = 100.0 * agree / max(n, 1)
        result["kl"] = kl / max(n, 1)
    return result
