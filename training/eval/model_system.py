"""The trained model as an evaluated infilling system: the daemon's engine for the infills, and
the bundle's torch generator for teacher-forced log-probabilities (the NLL columns).

    python -m training.evaluate --data DIR --out DIR --model BUNDLE_DIR
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmi_daemon.inference.bundle import load_torch_models
from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.inference.sampling import MAX_SEED
from cmi_daemon.music import vocab
from cmi_daemon.music.regions import Region, ilm_parts, jepa_sequence
from cmi_daemon.music.tokens import Note, Song
from training.eval.baselines import Blank


class ModelSystem:
    """InfillSystem backed by a model bundle; `logprob_fn` follows metrics.LogprobFn."""

    def __init__(self, bundle_dir: Path, name: str, options: InfillOptions = InfillOptions()):
        self.name = name
        self.engine = Engine(bundle_dir)
        self.options = options
        self.generator, self.jepa = load_torch_models(self.engine.bundle)

    def infill(self, song: Song, blank: Blank, target_tracks: Sequence[int],
               rng: np.random.Generator) -> dict[int, list[Note]]:
        seed = int(rng.integers(0, MAX_SEED, endpoint=True))
        options = InfillOptions(n_candidates=1, seed=seed, sampling=self.options.sampling,
                                max_answer_tokens=self.options.max_answer_tokens)
        result = self.engine.infill(song, blank.start_qn, blank.end_qn, target_tracks, options)
        return result.candidates[0].notes

    def region(self, song: Song, start_qn: float, end_qn: float, targets: Sequence[int]) -> Region:
        """The region the engine infills: context bounded to the model's window."""
        return self.engine.region(song, start_qn, end_qn, targets)

    def conditioning(self, ilm_ids: Sequence[int]):
        """The JEPA conditioning vector (1, E) of an ILM sequence: its answer is the blank."""
        prefix, suffix, answer = ilm_parts(ilm_ids)
        sequence = jepa_sequence(prefix, answer or [vocab.PAD_ID], suffix)
        target_mask = torch.from_numpy(sequence.blank)[None]
        return self.jepa.conditioning(torch.tensor([sequence.token_ids]), ~target_mask, target_mask)

    @property
    def conditioned(self) -> bool:
        return self.jepa is not None

    def logprob_fn(self, ilm_ids: Sequence[int], answer_start: int) -> list[float]:
        ilm_ids = [int(t) for t in ilm_ids]
        return self._logprobs(ilm_ids, answer_start, self.conditioning(ilm_ids) if self.conditioned else None)

    def average_conditioning_logprob_fn(self, ilm_ids: Sequence[int], answer_start: int) -> list[float]:
        """logprob_fn with the training blanks' mean conditioning vector in place of the blank's own."""
        return self._logprobs([int(t) for t in ilm_ids], answer_start, self.generator.cond_mean[None])

    @torch.no_grad()
    def _logprobs(self, ilm_ids: list[int], answer_start: int, cond) -> list[float]:
        logits, _ = self.generator(torch.tensor([ilm_ids[:-1]]), cond=cond)
        log_probabilities = torch.log_softmax(logits[0].double(), dim=-1)
        targets = torch.tensor(ilm_ids[answer_start:])
        return log_probabilities[torch.arange(answer_start - 1, len(ilm_ids) - 1), targets].tolist()


def evaluation_system(bundle_dir: Path, name: str) -> ModelSystem:
    return ModelSystem(bundle_dir, name)
