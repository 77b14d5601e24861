"""One profile's adapted JEPA: a trainable copy of the bundle's context encoder and predictor, the
EMA target encoder, AdamW, and the two kinds of DIL step.

- iteration-wise (eq. 2): the piece holds the content the musician did not want; the context
  encoder sees it without the unsatisfied span and without a neutral span; the predictor's
  neutral-span prediction is pulled towards the target encoder's (positive pair) and its
  unsatisfied-span prediction pushed away from the rejected content's (negative pair);
- sample-wise (eq. 3): the context is the piece without the range; the range's prediction is
  pulled towards the accepted version's target representation and pushed away from the first
  version's.
Each step is followed by the target encoder's EMA update. A step whose margin is already met
has no gradient and is skipped (AdamW's momentum would still move the weights).
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import numpy as np
import torch

from ..inference.bundle import WEIGHTS_DTYPE
from ..model.jepa import JEPA
from ..music.regions import JEPASequence
from .losses import iteration_loss, sample_loss
from .settings import DILSettings

TRAINED_MODULES = ("context_encoder.", "predictor.")


def graph_weights(state: dict[str, torch.Tensor], initializers: dict[str, dict[str, str]]
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Graph file -> initializer name -> the JEPA weight it holds (from state, a JEPA state dict), in
    the bundle's storage dtype; initializers is Engine.jepa_initializers (name -> state-dict key)."""
    dtype = np.dtype(WEIGHTS_DTYPE)
    return {graph: {name: state[key].detach().cpu().numpy().astype(dtype) for name, key in names.items()}
            for graph, names in initializers.items()}


class ProfileModel:
    """The adapted JEPA of one profile and its optimizer; all state lives on `device`."""

    def __init__(self, base: JEPA, settings: DILSettings, device: torch.device,
                 trainable_keys: Optional[Iterable[str]] = None):
        self.settings = settings
        self.device = device
        self.jepa = copy.deepcopy(base).to(device).eval()
        parameters = dict(self.jepa.named_parameters())
        allowed = set(trainable_keys) if trainable_keys is not None else set(parameters)
        self.trainable = {name: p for name, p in parameters.items()
                          if name.startswith(TRAINED_MODULES) and name in allowed}
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in self.trainable)
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=settings.lr,
                                           weight_decay=settings.weight_decay)
        self.steps = 0
        self.signals = 0

    # ----- steps -----

    def _apply(self, loss: torch.Tensor) -> bool:
        if float(loss.detach()) <= 0.0:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.jepa.update_target(self.settings.ema_momentum)
        self.steps += 1
        return True

    def _tensor(self, values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), device=self.device)[None]

    def iteration_step(self, rejected: JEPASequence, neutral: tuple[int, int]) -> dict:
        """One eq. 2 step on the piece holding the rejected content; returns the loss terms before it."""
        token_ids = self._tensor(rejected.token_ids)
        unsatisfied = self._tensor(rejected.blank)
        neutral_mask = self._tensor(rejected.span(*neutral))
        spans = unsatisfied | neutral_mask
        predicted, positions, _ = self.jepa.predict(token_ids, ~spans, spans)
        targets = self.jepa.target_representations(token_ids)[0, positions[0]]
        loss, terms = iteration_loss(predicted[0], targets, unsatisfied[0, positions[0]], neutral_mask[0, positions[0]],
                                     self.settings.loss, self.settings.margin)
        terms["stepped"] = self._apply(loss)
        return terms

    def sample_step(self, accepted: JEPASequence, first: JEPASequence) -> dict:
        """One eq. 3 step: accepted version positive, first version negative."""
        token_ids = self._tensor(accepted.token_ids)
        blank = self._tensor(accepted.blank)
        predicted, _, _ = self.jepa.predict(token_ids, ~blank, blank)
        accepted_targets = self.jepa.target_representations(token_ids)[0, blank[0]]
        first_ids = self._tensor(first.token_ids)
        first_targets = self.jepa.target_representations(first_ids)[0, self._tensor(first.blank)[0]]
        loss, terms = sample_loss(predicted[0], accepted_targets, first_targets,
                                  self.settings.loss, self.settings.margin)
        terms["stepped"] = self._apply(loss)
        return terms

    # ----- state -----

    def graph_weights(self, initializers: dict[str, dict[str, str]]) -> dict[str, dict[str, np.ndarray]]:
        """Graph file -> initializer name -> the adapted weight in the bundle's storage dtype."""
        return graph_weights(self.jepa.state_dict(), initializers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything to restore this profile: `jepa.*` weights and `adam.*` optimizer state, fp32 on CPU."""
        tensors = {f"jepa.{k}": v.detach().float().cpu().contiguous() for k, v in self.jepa.state_dict().items()}
        for name, parameter in self.trainable.items():
            for field, value in self.optimizer.state.get(parameter, {}).items():
                tensors[f"adam.{field}.{name}"] = torch.as_tensor(value).detach().float().cpu().contiguous()
        return tensors

    def load_tensors(self, tensors: dict[str, torch.Tensor], steps: int, signals: int) -> None:
        """Restore what tensors() gave (strict: every JEPA weight must be there)."""
        weights = {k[len("jepa."):]: v for k, v in tensors.items() if k.startswith("jepa.")}
        self.jepa.load_state_dict(weights, strict=True)
        for name, parameter in self.trainable.items():
            state = {field: tensors[f"adam.{field}.{name}"].to(self.device)
                     for field in ("step", "exp_avg", "exp_avg_sq") if f"adam.{field}.{name}" in tensors}
            if len(state) == 3:
                state["step"] = state["step"].cpu()
                self.optimizer.state[parameter] = state
        self.steps = steps
        self.signals = signals
