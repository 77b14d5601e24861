"""Musical time: quarter notes (QN) <-> milliseconds through a tempo map, bars <-> QN through meters.

Tempo changes are steps (each holds until the next); a time-signature change starts a new bar,
as in REAPER and Live, so a bar cut short by a change still counts as a bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..errors import TimeMapError

MIN_TEMPO_BPM = 1.0
MAX_TEMPO_BPM = 1000.0
DEFAULT_TEMPO_BPM = 120.0
_QN_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TempoMap:
    """Piecewise-constant tempo: `bpm[i]` holds from `start_qn[i]` until the next change."""

    start_qn: tuple[float, ...]
    bpm: tuple[float, ...]

    def __post_init__(self):
        if not self.start_qn or len(self.start_qn) != len(self.bpm):
            raise TimeMapError("a tempo map needs one tempo per change and at least one change")
        if self.start_qn[0] != 0.0:
            raise TimeMapError(f"the first tempo must start at QN 0, not {self.start_qn[0]}")
        for qn, bpm in zip(self.start_qn, self.bpm):
            if not (math.isfinite(bpm) and MIN_TEMPO_BPM <= bpm <= MAX_TEMPO_BPM):
                raise TimeMapError(f"absurd tempo {bpm} BPM at QN {qn}: "
                                   f"tempos must lie in {MIN_TEMPO_BPM:g}..{MAX_TEMPO_BPM:g} BPM")
        if any(not math.isfinite(q) for q in self.start_qn) or any(
                b <= a for a, b in zip(self.start_qn, self.start_qn[1:])):
            raise TimeMapError("tempo changes must be at finite, strictly increasing QN positions")
        qn = np.asarray(self.start_qn, dtype=np.float64)
        ms_per_qn = 60_000.0 / np.asarray(self.bpm, dtype=np.float64)
        start_ms = np.concatenate([[0.0], np.cumsum(np.diff(qn) * ms_per_qn[:-1])])
        object.__setattr__(self, "_qn", qn)
        object.__setattr__(self, "_ms_per_qn", ms_per_qn)
        object.__setattr__(self, "_start_ms", start_ms)

    @classmethod
    def constant(cls, bpm: float = DEFAULT_TEMPO_BPM) -> "TempoMap":
        return cls((0.0,), (float(bpm),))

    @classmethod
    def from_changes(cls, changes: Iterable[tuple[float, float]]) -> "TempoMap":
        """Build from (qn, bpm) pairs in any order; the last change at a position wins,
        and the first tempo also holds before the first change."""
        by_qn: dict[float, float] = {}
        for qn, bpm in changes:
            qn, bpm = float(qn), float(bpm)
            if not math.isfinite(qn) or qn < 0:
                raise TimeMapError(f"tempo change at QN {qn}: positions must be finite and >= 0")
            by_qn[qn] = bpm
        if not by_qn:
            return cls.constant()
        positions = sorted(by_qn)
        if positions[0] > 0.0:
            by_qn[0.0] = by_qn[positions[0]]
            positions.insert(0, 0.0)
        # Drop changes that repeat the running tempo: same map, fewer segments.
        start_qn, bpm = [positions[0]], [by_qn[positions[0]]]
        for qn in positions[1:]:
            if by_qn[qn] != bpm[-1]:
                start_qn.append(qn)
                bpm.append(by_qn[qn])
        return cls(tuple(start_qn), tuple(bpm))

    def ms_at(self, qn):
        """Milliseconds at quarter-note position(s) qn (scalar or array); extrapolates past the end."""
        qn_array = np.asarray(qn, dtype=np.float64)
        segment = np.clip(np.searchsorted(self._qn, qn_array, side="right") - 1, 0, None)
        ms = self._start_ms[segment] + (qn_array - self._qn[segment]) * self._ms_per_qn[segment]
        return float(ms) if ms.ndim == 0 else ms

    def qn_at(self, ms):
        """Quarter-note position(s) at milliseconds ms: the exact inverse of ms_at."""
        ms_array = np.asarray(ms, dtype=np.float64)
        segment = np.clip(np.searchsorted(self._start_ms, ms_array, side="right") - 1, 0, None)
        qn = self._qn[segment] + (ms_array - self._start_ms[segment]) / self._ms_per_qn[segment]
        return float(qn) if qn.ndim == 0 else qn

    def bpm_at(self, qn: float) -> float:
        return float(self.bpm[max(0, int(np.searchsorted(self._qn, qn, side="right")) - 1)])

    def scaled(self, factor: float) -> "TempoMap":
        """The same map played `factor` times faster (tempo-stretch augmentation)."""
        return TempoMap(self.start_qn, tuple(b * factor for b in self.bpm))


@dataclass(frozen=True)
class TimeSignature:
    start_qn: float
    numerator: int
    denominator: int

    @property
    def bar_length_qn(self) -> float:
        return self.numerator * 4.0 / self.denominator


@dataclass(frozen=True)
class Meter:
    """Time signatures and the bars they make. Bars are numbered as musicians count: bar 1 first."""

    signatures: tuple[TimeSignature, ...]

    def __post_init__(self):
        if not self.signatures or self.signatures[0].start_qn != 0.0:
            raise TimeMapError("a meter needs a time signature at QN 0")
        first_bars = [1]
        for previous, current in zip(self.signatures, self.signatures[1:]):
            span_qn = current.start_qn - previous.start_qn
            if not span_qn > 0:
                raise TimeMapError("time signatures must be at strictly increasing QN positions")
            bars = math.ceil(span_qn / previous.bar_length_qn - _QN_TOLERANCE)
            first_bars.append(first_bars[-1] + bars)
        object.__setattr__(self, "_first_bars", tuple(first_bars))

    @classmethod
    def constant(cls, numerator: int = 4, denominator: int = 4) -> "Meter":
        return cls.from_changes([(0.0, numerator, denominator)])

    @classmethod
    def from_changes(cls, changes: Iterable[tuple[float, int, int]]) -> "Meter":
        """Build from (qn, numerator, denominator); 4/4 holds before the first change."""
        by_qn: dict[float, tuple[int, int]] = {}
        for qn, numerator, denominator in changes:
            qn = float(qn)
            if not math.isfinite(qn) or qn < 0:
                raise TimeMapError(f"time signature at QN {qn}: positions must be finite and >= 0")
            if not (isinstance(numerator, int) and 1 <= numerator <= 64):
                raise TimeMapError(f"time signature at QN {qn}: numerator {numerator!r} is not 1..64")
            if denominator not in (1, 2, 4, 8, 16, 32, 64):
                raise TimeMapError(f"time signature at QN {qn}: denominator {denominator!r} is not a power of two")
            by_qn[qn] = (numerator, denominator)
        by_qn.setdefault(0.0, (4, 4))
        signatures: list[TimeSignature] = []
        for qn in sorted(by_qn):
            numerator, denominator = by_qn[qn]
            if signatures and (signatures[-1].numerator, signatures[-1].denominator) == (numerator, denominator):
                # The same signature again starts a new bar only if it falls mid-bar.
                last = signatures[-1]
                offset_bars = (qn - last.start_qn) / last.bar_length_qn
                if abs(offset_bars - round(offset_bars)) < _QN_TOLERANCE:
                    continue
            signatures.append(TimeSignature(qn, numerator, denominator))
        return cls(tuple(signatures))

    def _segment_of_bar(self, bar: float) -> int:
        index = 0
        for i, first_bar in enumerate(self._first_bars):
            if bar >= first_bar:
                index = i
        return index

    def bar_start_qn(self, bar: float) -> float:
        """QN where bar number `bar` (1-based; fractions are positions inside the bar) starts."""
        if not math.isfinite(bar) or bar < 1:
            raise TimeMapError(f"bar {bar} does not exist: bars are counted from 1")
        index = self._segment_of_bar(bar)
        signature = self.signatures[index]
        return signature.start_qn + (bar - self._first_bars[index]) * signature.bar_length_qn

    def bar_at_qn(self, qn: float) -> float:
        """Bar number (1-based, fractional inside a bar) at position qn: the inverse of bar_start_qn."""
        if not math.isfinite(qn) or qn < 0:
            raise TimeMapError(f"QN {qn} is before the start of the song")
        index = max(i for i, s in enumerate(self.signatures) if s.start_qn <= qn)
        signature = self.signatures[index]
        return self._first_bars[index] + (qn - signature.start_qn) / signature.bar_length_qn

    def position_in_bar_qn(self, qn) -> np.ndarray:
        """QN from the start of the bar holding each of qn (an array): bar_at_qn's fraction, in QN."""
        qn = np.asarray(qn, dtype=np.float64)
        starts_qn = np.array([s.start_qn for s in self.signatures])
        index = np.clip(np.searchsorted(starts_qn, qn, side="right") - 1, 0, None)
        bar_qn = np.array([s.bar_length_qn for s in self.signatures])[index]
        offset_qn = qn - starts_qn[index]
        return offset_qn - np.floor(offset_qn / bar_qn + 1e-9) * bar_qn

    def bar_range_qn(self, first_bar: int, last_bar: int) -> tuple[float, float]:
        """[start_qn, end_qn) of bars first_bar..last_bar inclusive, as a musician says "bars 9-12"."""
        if last_bar < first_bar:
            raise TimeMapError(f"bars {first_bar}-{last_bar}: the last bar comes before the first")
        # A bar cut short by a signature change ends at that change, where the next bar starts.
        return self.bar_start_qn(first_bar), self.bar_start_qn(last_bar + 1)

    def downbeats_qn(self, end_qn: float) -> list[float]:
        """Start of every bar before end_qn."""
        downbeats = []
        bar = 1
        while (qn := self.bar_start_qn(bar)) < end_qn:
            downbeats.append(qn)
            bar += 1
        return downbeats

