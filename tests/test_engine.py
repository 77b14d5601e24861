"""The engine's answers obey the constraints on real songs, seeds make them reproducible, and it
counts the physical cores it may use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cmi_daemon.inference.engine import Engine, InfillCancelled, InfillOptions, physical_cores
from cmi_daemon.inference.sampling import SamplingOptions, TrackConstraints, fixed_events, requires_note
from cmi_daemon.music import vocab
from cmi_daemon.music.regions import build_region
from cmi_daemon.music.tokens import read_midi
from conftest import POP909_FIXTURES, SHARED_DATA
from tiny_bundle import tiny_bundle_dir

N_INFILLS = 200
CANDIDATES_PER_CALL = 4
DEV_SONGS = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tiny_bundle_dir(tmp_path_factory))


def songs():
    paths = list(POP909_FIXTURES)
    dev = SHARED_DATA / "pop909" / "dev"
    if dev.exists():
        paths += sorted(dev.glob("*/*.mid"))[:DEV_SONGS]
    return [read_midi(path) for path in paths]


def check_answer(song, start_qn, end_qn, targets, candidate, controls):
    """Every constraint of an answer, on its tokens and on its notes (controls: the result's)."""
    region = build_region(song, start_qn, end_qn, targets)
    ids = candidate.answer_ids
    assert ids[-1] == vocab.ANS_ID and vocab.ANS_ID not in ids[:-1]
    fixed = {token_id for _, token_id in fixed_events(region)}
    clock, sounding = 0, {}
    for token_id in ids[:-1]:
        if vocab.is_wait(token_id):
            clock += vocab.wait_steps(token_id)
            assert clock <= region.n_steps, "a wait passes the blank's end"
            continue
        instrument_bin, pitch, velocity_bin = vocab.note_fields(token_id)
        assert instrument_bin in region.target_bins or token_id in fixed, "a note outside the target bins"
        if velocity_bin:
            sounding[instrument_bin, pitch] = clock
        elif (instrument_bin, pitch) in sounding:
            assert sounding.pop((instrument_bin, pitch)) < clock or token_id in fixed, "a zero-length note"
    assert clock == region.n_steps and not sounding, "the answer ends early or leaves a note open"
    assert set(candidate.notes) == set(targets)
    for notes in candidate.notes.values():
        for note in notes:
            assert start_qn <= note.start_qn < end_qn and note.start_qn + note.duration_qn <= end_qn + 1e-9
            assert note.duration_qn > 0
    constraints = {t: TrackConstraints.from_controls(c, song, region) for t, c in controls.items()}
    if requires_note(region, constraints):
        assert any(candidate.notes.values()), "an empty answer in a dense context"


def test_two_hundred_seeded_infills_obey_every_constraint(engine):
    rng = np.random.default_rng(0)
    pool = songs()
    n_checked = 0
    while n_checked < N_INFILLS:
        song = pool[int(rng.integers(len(pool)))]
        n_bars = int(song.meter.bar_at_qn(song.end_qn))
        width = int(rng.integers(1, 5))
        first = int(rng.integers(2, n_bars - width))
        start_qn, end_qn = song.meter.bar_range_qn(first, first + width - 1)
        playing = [i for i, t in enumerate(song.tracks) if t.notes]
        targets = sorted(rng.choice(playing, size=int(rng.integers(1, len(playing) + 1)), replace=False).tolist())
        cap = None if n_checked % 2 else int(rng.integers(8, 200))
        options = InfillOptions(n_candidates=CANDIDATES_PER_CALL, seed=int(rng.integers(1 << 31)), max_answer_tokens=cap)
        result = engine.infill(song, start_qn, end_qn, targets, options)
        for candidate in result.candidates:
            check_answer(song, start_qn, end_qn, targets, candidate, result.controls)
            if cap is not None:
                assert candidate.n_sampled_tokens <= cap
        n_checked += len(result.candidates)


@pytest.fixture(scope="module")
def song():
    return read_midi(POP909_FIXTURES[0])


def notes_of(result):
    return [candidate.notes for candidate in result.candidates]


def test_same_seed_same_notes_and_different_seeds_different_notes(engine, song):
    start_qn, end_qn = song.meter.bar_range_qn(9, 10)
    first = engine.infill(song, start_qn, end_qn, [0, 1], InfillOptions(seed=7))
    again = engine.infill(song, start_qn, end_qn, [0, 1], InfillOptions(seed=7))
    other = engine.infill(song, start_qn, end_qn, [0, 1], InfillOptions(seed=8))
    assert notes_of(first) == notes_of(again) and first.seed == 7
    assert notes_of(first) != notes_of(other)


def test_candidates_decode_as_one_batch_like_separate_runs(engine, song):
    start_qn, end_qn = song.meter.bar_range_qn(17, 18)
    batch = engine.infill(song, start_qn, end_qn, [2], InfillOptions(n_candidates=3, seed=11))
    alone = engine.infill(song, start_qn, end_qn, [2], InfillOptions(n_candidates=1, seed=11))
    assert batch.candidates[0].answer_ids == alone.candidates[0].answer_ids
    answers = [tuple(c.answer_ids) for c in batch.candidates]
    assert len(set(answers)) == 3
    for candidate in batch.candidates:
        check_answer(song, start_qn, end_qn, [2], candidate, batch.controls)


def test_progress_is_reported_and_cancel_stops(engine, song):
    start_qn, end_qn = song.meter.bar_range_qn(9, 10)
    fractions = []
    engine.infill(song, start_qn, end_qn, [0], InfillOptions(seed=1), progress=fractions.append)
    assert fractions and fractions[-1] == 1.0 and all(0 <= f <= 1 for f in fractions)
    with pytest.raises(InfillCancelled):
        engine.infill(song, start_qn, end_qn, [0], InfillOptions(seed=1), cancel=lambda: True)


def test_greedy_decoding_needs_no_seed(engine, song):
    start_qn, end_qn = song.meter.bar_range_qn(9, 9)
    options = [InfillOptions(sampling=SamplingOptions(temperature=0)) for _ in range(2)]
    first, second = (engine.infill(song, start_qn, end_qn, [0], o) for o in options)
    assert first.candidates[0].answer_ids == second.candidates[0].answer_ids


@pytest.mark.skipif(shutil.which("lscpu") is None or not hasattr(os, "sched_setaffinity"),
                    reason="needs lscpu and CPU affinity (Linux) for an independent count")
def test_physical_cores_are_the_machines_within_the_processs_affinity():
    """lscpu's distinct (core, socket) pairs, at most the CPUs this process may use; pinned to one CPU,
    one core (so the engine runs one intra-op thread)."""
    listing = subprocess.run(["lscpu", "-p=CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    machine_cores = len({line for line in listing.splitlines() if line and not line.startswith("#")})
    assert physical_cores() == min(machine_cores, len(os.sched_getaffinity(0)))
    pinned = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from cmi_daemon.inference.engine import default_intra_op_threads, physical_cores; "
              "print(physical_cores(), default_intra_op_threads())")
    shown = subprocess.run([sys.executable, "-c", pinned], capture_output=True, text=True, check=True, timeout=120)
    assert shown.stdout.split() == ["1", "1"]
