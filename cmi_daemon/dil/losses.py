"""DIL losses on span-mean representations.

The paper writes both losses as max(0, Neg - Pos + alpha) with Neg and Pos cosine similarities
between a predicted and a target representation of a span. We compare span means (the mean
over the span's token positions) because the generator only ever reads the predictor through
the mean over the blank (the conditioning vector): a loss on span means moves exactly what
the next infill sees, and it stays defined when the two contents of one blank have different
token counts (sample-wise: the accepted and the first version).

`distance_margin_loss` is the variant of the authors' code: a margin on distances plus a
regression term pulling the positive pair together; it is kept to measure the difference.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .settings import LOSS_VARIANTS, MARGIN


def span_mean(representations: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Mean of representations (N, E) over the positions where span (N,) is True -> (E,)."""
    weights = span.to(representations.dtype)[:, None]
    return (representations * weights).sum(dim=0) / weights.sum().clamp(min=1.0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sim(a, b) = a.b / (|a| |b|) of two vectors (E,)."""
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8)


def cosine_margin_loss(predicted_pos: torch.Tensor, target_pos: torch.Tensor, predicted_neg: torch.Tensor,
                       target_neg: torch.Tensor, margin: float = MARGIN) -> tuple[torch.Tensor, dict]:
    """max(0, Neg - Pos + margin), Pos = Sim(target_pos, predicted_pos), Neg = Sim(target_neg, predicted_neg)."""
    positive = cosine(target_pos, predicted_pos)
    negative = cosine(target_neg, predicted_neg)
    loss = torch.relu(negative - positive + margin)
    return loss, _terms(positive, negative, loss)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b|_2 / sqrt(E): a distance whose scale does not grow with the width."""
    return torch.linalg.vector_norm(a - b) / a.shape[-1] ** 0.5


def distance_margin_loss(predicted_pos: torch.Tensor, target_pos: torch.Tensor, predicted_neg: torch.Tensor,
                         target_neg: torch.Tensor, margin: float = MARGIN) -> tuple[torch.Tensor, dict]:
    """max(0, d_pos - d_neg + margin) + smooth-L1(predicted_pos, target_pos): the authors' code's form."""
    positive = rms_distance(target_pos, predicted_pos)
    negative = rms_distance(target_neg, predicted_neg)
    loss = torch.relu(positive - negative + margin) + F.smooth_l1_loss(predicted_pos, target_pos)
    return loss, _terms(positive, negative, loss)


LOSSES = dict(zip(LOSS_VARIANTS, (cosine_margin_loss, distance_margin_loss)))
"""Loss variants by name: `cosine` (the paper, the default) and `distance` (the authors' code)."""


def iteration_loss(predicted: torch.Tensor, targets: torch.Tensor, unsatisfied: torch.Tensor,
                   neutral: torch.Tensor, variant: str = "cosine", margin: float = MARGIN):
    """Eq. 2: predicted (N, E) from the context without both spans; targets (N, E) of the piece
    holding the rejected content; the neutral span is the positive pair, the unsatisfied the negative."""
    return LOSSES[variant](span_mean(predicted, neutral), span_mean(targets, neutral),
                           span_mean(predicted, unsatisfied), span_mean(targets, unsatisfied), margin)


def sample_loss(predicted_blank: torch.Tensor, accepted_targets: torch.Tensor, first_targets: torch.Tensor,
                variant: str = "cosine", margin: float = MARGIN):
    """Eq. 3: the blank's prediction (Nb, E) against the target encoder's blank representations of
    the accepted version (positive, (N1, E)) and of the first version (negative, (N2, E))."""
    predicted = predicted_blank.mean(dim=0)
    return LOSSES[variant](predicted, accepted_targets.mean(dim=0), predicted, first_targets.mean(dim=0), margin)


def _terms(positive: torch.Tensor, negative: torch.Tensor, loss: torch.Tensor) -> dict:
    return {"pos": float(positive.detach()), "neg": float(negative.detach()), "loss": float(loss.detach())}
