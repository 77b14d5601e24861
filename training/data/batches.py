"""Training examples from token shards: blank sampling, JEPA and ILM examples, padded batches.

Every example is a pure function of (seed, example index): its random generator is seeded by
both, so the sampler's whole state is one integer (examples consumed so far), a resumed run
draws exactly what an uninterrupted one would, and data-parallel ranks split the global stream
by index without talking to each other.

A blank is one of two kinds, mixed by `BlankConfig.time_aligned_fraction`:
- a random token span (the paper's masking): one contiguous span covering 10-80 % of the window;
- a time-aligned blank, what a musician selects: it starts at a note onset and covers k seconds
  of music, read off the wait tokens. It is cut by `cmi_daemon.music.regions.cut_notes`, the cut the
  daemon makes of a song: notes starting before the blank are kept whole but end at its start,
  notes starting inside it are the answer and end by its end, the rest is the suffix; the prefix
  ends with waits up to the blank start, the answer's waits end exactly at the blank end, the
  suffix continues from there.
The ILM and JEPA sequences of a split are `regions.ilm_sequence` and `regions.jepa_sequence`, the
layouts the engine, the evaluation and DIL use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from cmi_daemon.music import vocab
from cmi_daemon.music.regions import cut_notes, ilm_sequence, jepa_sequence
from cmi_daemon.music.timeunit import TimeUnit
from cmi_daemon.music.tokens import decode_ids
from training.data.augment import augment_window

N_ILM_SPECIAL_TOKENS = 3
"""<mask>, <sep> and <ans> added to a window to make an ILM sequence."""


@dataclass
class BlankConfig:
    time_aligned_fraction: float = 0.5
    """Share of blanks that are time-aligned; the rest are random token spans."""
    min_span_fraction: float = 0.1
    max_span_fraction: float = 0.8
    """Random spans cover this share of the window's tokens; time-aligned ones at most the upper
    share of its duration, so some context is always left."""
    min_blank_qn: float = 2.0
    max_blank_qn: float = 16.0
    """Length of time-aligned blanks: half a bar to four bars of 4/4 (for 8 ms steps, at 120 BPM)."""


def shard_tokenizer(shard_dir: Path) -> dict:
    """The tokenizer settings a shard folder was written with ({} for folders from before they were
    recorded: 8 ms steps, no role bins)."""
    manifest_path = Path(shard_dir) / "manifest.json"
    if not manifest_path.exists():
        return {}
    return dict(json.loads(manifest_path.read_text()).get("tokenizer") or {})


class TokenShard:
    """One split of a prepared shard folder: `<split>.tokens.u16` + `<split>.offsets.npy`."""

    def __init__(self, shard_dir, split: str):
        shard_dir = Path(shard_dir)
        tokens_path = shard_dir / f"{split}.tokens.u16"
        if not tokens_path.exists():
            raise FileNotFoundError(f"no {tokens_path}: prepare shards first "
                                    f"(python -m training.prepare --out {shard_dir})")
        self.tokens = np.memmap(tokens_path, dtype=np.uint16, mode="r")
        self.offsets = np.load(shard_dir / f"{split}.offsets.npy")
        if len(self.offsets) < 2 or self.offsets[-1] == 0:
            raise ValueError(f"{tokens_path} holds no documents")
        self.tokenizer = shard_tokenizer(shard_dir)
        """How the shards were tokenized: `steps_per_qn` (the time unit) and `role_bins`."""
        self.time_unit = TimeUnit(self.tokenizer.get("steps_per_qn"))

    def window(self, rng: np.random.Generator, max_tokens: int) -> list[int]:
        """Up to max_tokens consecutive tokens of one document; every token equally likely to be
        drawn, so long documents are chosen in proportion to their length."""
        position = int(rng.integers(int(self.offsets[-1])))
        document = int(np.searchsorted(self.offsets, position, side="right")) - 1
        start, end = int(self.offsets[document]), int(self.offsets[document + 1])
        first = start + int(rng.integers(max(0, end - start - max_tokens) + 1))
        return self.tokens[first:min(end, first + max_tokens)].astype(np.int64).tolist()


class Split(NamedTuple):
    """A window cut around one blank: `prefix + blank + suffix` is the music, in order."""
    prefix: list[int]
    blank: list[int]
    suffix: list[int]
    time_aligned: bool


def random_span(window: Sequence[int], rng: np.random.Generator, config: BlankConfig) -> Split:
    """One contiguous span of min..max_span_fraction of the window's tokens (at least one)."""
    n = len(window)
    shortest = max(1, math.ceil(config.min_span_fraction * n))
    longest = max(shortest, math.floor(config.max_span_fraction * n))
    length = int(rng.integers(shortest, longest + 1))
    start = int(rng.integers(n - length + 1))
    return Split(list(window[:start]), list(window[start:start + length]), list(window[start + length:]), False)


def cut_at_steps(window: Sequence[int], start_step: int, end_step: int) -> Split:
    """The region cut (`regions.cut_notes`) of a token window (clock 0 at its first token) at
    [start_step, end_step)."""
    cut = cut_notes(decode_ids(window), start_step * vocab.WAIT_STEP_MS, end_step * vocab.WAIT_STEP_MS)
    return Split(cut.prefix_ids, cut.blank_ids, cut.suffix_ids, True)


def time_aligned_span(window: Sequence[int], rng: np.random.Generator, config: BlankConfig,
                      unit: TimeUnit = TimeUnit()):
    """A blank from a note onset lasting min..max_blank_qn in the window's time unit (capped at
    max_span_fraction of the window's duration); None when the window is too short in time or
    would have no context."""
    total_steps = vocab.total_steps(window)
    shortest_steps = max(1, round(config.min_blank_qn * unit.nominal_steps_per_qn))
    longest_steps = min(round(config.max_blank_qn * unit.nominal_steps_per_qn),
                        math.floor(config.max_span_fraction * total_steps))
    if longest_steps < shortest_steps:
        return None
    onset_steps = [step for step in vocab.onset_steps(window) if step + shortest_steps <= total_steps]
    if not onset_steps:
        return None
    start_step = onset_steps[int(rng.integers(len(onset_steps)))]
    n_steps = int(rng.integers(shortest_steps, longest_steps + 1))
    split = cut_at_steps(window, start_step, min(start_step + n_steps, total_steps))
    if not split.prefix and not split.suffix:
        return None
    return split


def draw_split(window: Sequence[int], rng: np.random.Generator, config: BlankConfig,
               unit: TimeUnit = TimeUnit()) -> Split:
    """A time-aligned blank with probability time_aligned_fraction (when the window allows one),
    else a random token span."""
    if rng.random() < config.time_aligned_fraction:
        split = time_aligned_span(window, rng, config, unit)
        if split is not None:
            return split
    return random_span(window, rng, config)


def fit_split(split: Split, max_tokens: int) -> Split:
    """Trim the suffix's end, then the prefix's start, until prefix + blank + suffix fits
    (a time-aligned cut may add a few note-offs and split waits)."""
    excess = len(split.prefix) + len(split.blank) + len(split.suffix) - max_tokens
    if excess <= 0:
        return split
    suffix_cut = min(excess, len(split.suffix))
    prefix_cut = excess - suffix_cut
    return split._replace(prefix=split.prefix[prefix_cut:], suffix=split.suffix[:len(split.suffix) - suffix_cut])


def example_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def ilm_window_tokens(ctx_len: int) -> int:
    """Window size for an ILM sequence of at most ctx_len + 1 tokens (inputs and shifted targets),
    leaving room for the three ILM tokens and a few tokens a time-aligned cut adds."""
    return ctx_len + 1 - N_ILM_SPECIAL_TOKENS - max(4, ctx_len // 16)


def sample_split(shard: TokenShard, seed: int, index: int, max_tokens: int, config: BlankConfig,
                 augmented: bool = False) -> Split:
    """Example number `index` of the stream: a window (augmented in key and loudness when asked,
    `augment.augment_window`) and its blank, fitted into max_tokens."""
    rng = example_rng(seed, index)
    window = shard.window(rng, max_tokens)
    if augmented:
        window = augment_window(np.asarray(window), rng).tolist()
    return fit_split(draw_split(window, rng, config, shard.time_unit), max_tokens)


class ILMExample(NamedTuple):
    """`prefix <mask> suffix <sep> answer <ans>` and which targets carry loss."""
    ids: list[int]
    loss_mask: list[bool]
    """Per target position (ids[1:]): every real music token and <ans>; not <mask> and <sep>,
    whose positions are where the sampler happened to cut, not music."""
    answer_mask: list[bool]
    """Per target position: the answer tokens and <ans> only (what dev NLL is measured on)."""


def ilm_example(split: Split) -> ILMExample:
    """The ILM sequence of a split, as the authors build it (one blank per example).

    Loss choice: the generator learns from all real tokens of the sequence (prefix, suffix,
    answer, <ans>), as ILM does, and never from padding (the authors' code trains on it).
    On a CPU budget the context tokens are most of the supervision a window offers, and they
    keep the generator a good continuation model of the music around the blank; the answer is
    still where conditioning matters, and dev NLL is measured on the answer and <ans> alone.
    """
    sequence = ilm_sequence(split.prefix, split.suffix, split.blank)
    ids = sequence.ids
    answer_mask = [position >= sequence.answer_start for position in range(1, len(ids))]
    not_trained = {sequence.mask_at, sequence.sep_at}
    loss_mask = [position not in not_trained for position in range(1, len(ids))]
    assert len(ids) == len(split.prefix) + len(split.suffix) + len(split.blank) + N_ILM_SPECIAL_TOKENS
    return ILMExample(ids, loss_mask, answer_mask)


class JEPAExample(NamedTuple):
    """The window as music with the blank as targets: context_mask = not blank."""
    ids: list[int]
    target_mask: list[bool]


def jepa_example(split: Split) -> JEPAExample:
    sequence = jepa_sequence(split.prefix, split.blank, split.suffix)
    return JEPAExample(list(sequence.token_ids), sequence.blank.tolist())


def pad(rows: Sequence[Sequence], value, dtype) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=dtype)


@dataclass
class JEPABatch:
    token_ids: torch.Tensor
    """(B, N) int64, PAD_ID past each row's end."""
    valid: torch.Tensor
    context_mask: torch.Tensor
    """(B, N) bool: real tokens outside the blank."""
    target_mask: torch.Tensor
    """(B, N) bool: the blank."""

    def to(self, device) -> "JEPABatch":
        return JEPABatch(*(t.to(device) for t in (self.token_ids, self.valid, self.context_mask, self.target_mask)))


def collate_jepa(examples: Sequence[JEPAExample]) -> JEPABatch:
    token_ids = pad([e.ids for e in examples], vocab.PAD_ID, torch.int64)
    valid = pad([[True] * len(e.ids) for e in examples], False, torch.bool)
    target_mask = pad([e.target_mask for e in examples], False, torch.bool)
    return JEPABatch(token_ids, valid, valid & ~target_mask, target_mask)


@dataclass
class GeneratorBatch:
    input_ids: torch.Tensor
    """(B, T) int64: ILM sequences without their last token, PAD_ID-padded."""
    target_ids: torch.Tensor
    """(B, T) int64: the same shifted by one."""
    loss_mask: torch.Tensor
    answer_mask: torch.Tensor
    """(B, T) bool, both False on padding."""
    jepa: JEPABatch
    """The same music with the blank as targets, for the conditioning vector."""

    def to(self, device) -> "GeneratorBatch":
        return GeneratorBatch(self.input_ids.to(device), self.target_ids.to(device), self.loss_mask.to(device),
                              self.answer_mask.to(device), self.jepa.to(device))


def collate_generator(pairs: Sequence[tuple[ILMExample, JEPAExample]]) -> GeneratorBatch:
    ilm = [pair[0] for pair in pairs]
    return GeneratorBatch(pad([e.ids[:-1] for e in ilm], vocab.PAD_ID, torch.int64),
                          pad([e.ids[1:] for e in ilm], vocab.PAD_ID, torch.int64),
                          pad([e.loss_mask for e in ilm], False, torch.bool),
                          pad([e.answer_mask for e in ilm], False, torch.bool),
                          collate_jepa([pair[1] for pair in pairs]))


class ExampleStream:
    """The seeded stream of examples of one stage over one split; example i is always the same."""

    def __init__(self, shard: TokenShard, stage: str, ctx_len: int, seed: int, blanks: BlankConfig,
                 augmented: bool = False):
        if stage not in ("jepa", "generator"):
            raise ValueError(f"no stage {stage!r}; choose jepa or generator")
        self.shard, self.stage, self.seed, self.blanks, self.augmented = shard, stage, seed, blanks, augmented
        self.window_tokens = ctx_len if stage == "jepa" else ilm_window_tokens(ctx_len)

    def split(self, index: int) -> Split:
        return sample_split(self.shard, self.seed, index, self.window_tokens, self.blanks, self.augmented)

    def batch(self, indices: Sequence[int]):
        splits = [self.split(index) for index in indices]
        if self.stage == "jepa":
            return collate_jepa([jepa_example(s) for s in splits])
        return collate_generator([(ilm_example(s), jepa_example(s)) for s in splits])


def micro_batch_indices(examples_before: int, micro_step: int, rank: int, world_size: int,
                        batch_size: int) -> range:
    """Stream indices of one rank's micro-batch: a step's global batch is consecutive indices,
    micro-step by micro-step, rank by rank, so N ranks of batch B draw what one rank of batch
    N * B would."""
    first = examples_before + (micro_step * world_size + rank) * batch_size
    return range(first, first + batch_size)
