"""Every bar-aligned range of a data set through the region builder, and a sample of them through
the engine: no range may raise.

    python -m training.sweep_infills --data ../shared/data/pop909/dev [--widths 1,2,4,8]
        [--sample-infills 40] [--model DIR] [--glob PATTERN] [--songs N] [--seed 0]

Every range of W consecutive bars (W in --widths; bar lines from `annotations.bar_lines_qn`) of
every MIDI file under --data is built as a region for all tracks and for each single track
(`regions.SongCutter`, what build_region uses). --sample-infills of those (range, targets) cases, drawn uniformly over
the whole sweep, are then infilled by the engine (one candidate, the model's window) and their
notes checked to lie inside the range on target tracks. Failures are counted by cause (exception
type and message with its numbers replaced by N), each with the first song and range it happened
on; the exit code is 1 when anything failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.regions import SongCutter
from cmi_daemon.music.tokens import Song, read_midi
from cmi_daemon.paths import default_model_dir
from training.data.failures import Failures
from training.eval.blanks import check_infill, song_paths

DEFAULT_WIDTHS_BARS = (1, 2, 4, 8)
DEFAULT_SAMPLE_INFILLS = 40


@dataclass(frozen=True)
class Case:
    """One range of one song and the tracks to infill there."""
    path: Path
    first_bar: int
    """Counted from 1, as `cmi-daemon infill --bars` counts."""
    width_bars: int
    start_qn: float
    end_qn: float
    targets: tuple[int, ...]

    def __str__(self) -> str:
        last = self.first_bar + self.width_bars - 1
        return (f"{self.path} --bars {self.first_bar}-{last} (QN {self.start_qn:g}-{self.end_qn:g}) "
                f"--tracks {','.join(str(t + 1) for t in self.targets)}")


def target_sets(song: Song) -> list[tuple[int, ...]]:
    """All tracks, then each track alone (once when the song has one track)."""
    every = tuple(range(len(song.tracks)))
    return [every] + ([(t,) for t in every] if len(every) > 1 else [])


def song_cases(path: Path, song: Song, widths_bars: Sequence[int]):
    """(start_qn, end_qn, first bar, width) of every range of whole bars of the song."""
    lines_qn, _ = bar_lines_qn(song, path)
    for width in widths_bars:
        for first in range(len(lines_qn) - width):
            yield lines_qn[first], lines_qn[first + width], first + 1, width


@dataclass
class Sweep:
    regions_built: int = 0
    songs: int = 0
    infills: int = 0
    failures: Failures = field(default_factory=Failures)
    sample: list = field(default_factory=list)
    """A uniform sample of the cases seen (reservoir), to infill."""


def sweep_regions(paths: Sequence[Path], widths_bars: Sequence[int], n_sample: int,
                  rng: np.random.Generator, progress: bool = True) -> Sweep:
    """Build every case's region; keep a uniform sample of n_sample cases."""
    result = Sweep()
    seen = 0
    for path in tqdm(paths, desc="regions", unit="song", disable=not progress):
        try:
            song = read_midi(path)
        except Exception as error:  # a file the reader refuses is a failure of the sweep too
            result.failures.add("read", error, str(path))
            continue
        result.songs += 1
        sets = target_sets(song)
        cutter = SongCutter(song)
        for start_qn, end_qn, first_bar, width in song_cases(path, song, widths_bars):
            try:
                result.regions_built += len(cutter.regions(start_qn, end_qn, sets))
            except Exception as error:
                result.failures.add("region", error, str(Case(path, first_bar, width, start_qn, end_qn, sets[0])))
                continue
            for targets in sets:
                seen += 1
                case = Case(path, first_bar, width, start_qn, end_qn, targets)
                if len(result.sample) < n_sample:
                    result.sample.append(case)
                else:
                    slot = int(rng.integers(seen))
                    if slot < n_sample:
                        result.sample[slot] = case
    return result


def sweep_infills(engine: Engine, cases: Sequence[Case], failures: Failures, seed: int,
                  progress: bool = True) -> int:
    """Infill each case (one candidate) and check its notes; the number of infills done."""
    songs: dict[Path, Song] = {}
    done = 0
    for index, case in enumerate(tqdm(sorted(cases, key=str), desc="infills", unit="infill", disable=not progress)):
        try:
            if case.path not in songs:
                songs[case.path] = read_midi(case.path)
            song = songs[case.path]
            result = engine.infill(song, case.start_qn, case.end_qn, case.targets,
                                   InfillOptions(n_candidates=1, seed=seed + index))
            check_infill("the engine", result.candidates[0].notes, case.start_qn, case.end_qn, case.targets)
            done += 1
        except Exception as error:
            failures.add("infill", error, str(case))
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.sweep_infills", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder searched for .mid files")
    parser.add_argument("--widths", default=",".join(map(str, DEFAULT_WIDTHS_BARS)),
                        help="range widths in bars, comma-separated (default %(default)s)")
    parser.add_argument("--sample-infills", type=int, default=DEFAULT_SAMPLE_INFILLS,
                        help="cases infilled by the engine, drawn over the whole sweep (0: none)")
    parser.add_argument("--model", type=Path, help="model bundle for the infills (default: the shipped model)")
    parser.add_argument("--glob", default="**/*", help="files under --data to sweep (default: all .mid files; "
                        "'*/*.mid' takes POP909's songs without their versions/)")
    parser.add_argument("--songs", type=int, help="only the first N files, in path order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        widths = sorted({int(w) for w in args.widths.split(",")})
    except ValueError:
        parser.error(f"--widths {args.widths!r}: expected whole numbers of bars separated by commas")
    if not widths or widths[0] < 1:
        parser.error(f"--widths {args.widths!r}: every width must be at least one bar")
    if args.sample_infills < 0:
        parser.error(f"--sample-infills {args.sample_infills}: must be 0 or more")
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder")
    paths = song_paths(args.data, args.songs, args.glob)

    started = time.perf_counter()
    sweep = sweep_regions(paths, widths, args.sample_infills, np.random.default_rng(args.seed),
                          progress=not args.no_progress)
    regions_s = time.perf_counter() - started
    if sweep.sample:
        engine = Engine(args.model or default_model_dir())
        sweep.infills = sweep_infills(engine, sweep.sample, sweep.failures, args.seed, progress=not args.no_progress)
    total_s = time.perf_counter() - started

    print(f"{args.data}: {sweep.songs} of {len(paths)} files read; {sweep.regions_built} regions built "
          f"(widths {','.join(map(str, widths))} bars, all tracks and each track) in {regions_s:.0f} s; "
          f"{sweep.infills} of {len(sweep.sample)} sampled infills done; {total_s:.0f} s in all")
    if sweep.failures.total:
        print(f"{sweep.failures.total} failures by cause:")
        print("\n".join(sweep.failures.summary()))
        return 1
    print("no failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
