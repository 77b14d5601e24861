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
from cmi_daemon.inference.sampling import MIN_EXPECTED_NOTES, SamplingOptions
from cmi_daemon.music import vocab
from cmi_daemon.music.regions import build_region, track_bin
from cmi_daemon.music.tokens import ms_to_step, read_midi
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


def step_at(song, qn) -> int:
    """The 8 ms step (from the song's start) a time in QN falls on."""
    return int(ms_to_step(song.tempo_map.ms_at(qn)))


def other_tracks_notes(song, start_qn, end_qn, targets) -> dict[tuple[int, int, int], tuple[int, int]]:
    """The song's notes of the tracks not infilled that start inside the range, as the tokens hold them:
    (onset step from the range start, bin, pitch) -> (end step, velocity bin). A note ends at the range
    end or where the next of its key starts; notes of one key starting in one step are one, the longer
    and louder."""
    range_step = step_at(song, start_qn)
    starts: dict[tuple[int, int, int], tuple[int, int]] = {}
    for index, track in enumerate(song.tracks):
        if index in targets:
            continue
        for note in track.notes:
            if start_qn <= note.start_qn < end_qn:
                onset = (step_at(song, note.start_qn) - range_step, track_bin(song, index), note.pitch)
                end = step_at(song, min(note.start_qn + note.duration_qn, end_qn)) - range_step
                velocity_bin = max(1, vocab.velocity_to_bin(note.velocity))
                old_end, old_velocity_bin = starts.get(onset, (end, velocity_bin))
                starts[onset] = (max(end, old_end), max(velocity_bin, old_velocity_bin))
    notes = {}
    for (step, instrument_bin, pitch), (end, velocity_bin) in starts.items():
        later = [s for s, b, p in starts if (b, p) == (instrument_bin, pitch) and s > step]
        notes[step, instrument_bin, pitch] = (min([end] + later), velocity_bin)
    return notes


def context_is_dense(song, start_qn, end_qn, region, controls) -> bool:
    """Whether the song's notes of the target bins (all their tracks) on each side of the range,
    over as many steps as the context spans there, come at MIN_EXPECTED_NOTES or more per range
    length, and the controls (the result's) expect that many notes too. The context's farthest
    step on each side is left out (a cut context may hold part of its notes), and the steps
    counted are the context's tokens' (which shorten long silences), so this rate is at most the
    context's own."""
    densities = [c.density_per_qn for c in controls.values()]
    if None not in densities and sum(densities) * (end_qn - start_qn) < MIN_EXPECTED_NOTES:
        return False
    before, after = vocab.total_steps(region.prefix_ids), vocab.total_steps(region.suffix_ids)
    if before + after == 0:
        return False
    onsets = set()
    for index, track in enumerate(song.tracks):
        instrument_bin = track_bin(song, index)
        if instrument_bin in region.target_bins:
            for note in track.notes:
                step = step_at(song, note.start_qn)
                if region.start_step - before < step < region.start_step or \
                        region.end_step <= step < region.end_step + after:
                    onsets.add((step, instrument_bin, note.pitch))
    return len(onsets) * region.n_steps / (before + after) >= MIN_EXPECTED_NOTES


def check_answer(song, start_qn, end_qn, targets, candidate, controls):
    """Every constraint of an answer, on its tokens and on its notes (controls: the result's),
    against the song's own notes: the other tracks' notes inside the range are in the answer."""
    region = build_region(song, start_qn, end_qn, targets)
    ids = candidate.answer_ids
    assert ids[-1] == vocab.ANS_ID and vocab.ANS_ID not in ids[:-1]
    others = other_tracks_notes(song, start_qn, end_qn, targets)
    clock, sounding, played = 0, {}, {}
    for token_id in ids[:-1]:
        if vocab.is_wait(token_id):
            clock += vocab.wait_steps(token_id)
            assert clock <= region.n_steps, "a wait passes the blank's end"
            continue
        instrument_bin, pitch, velocity_bin = vocab.note_fields(token_id)
        key = (instrument_bin, pitch)
        if key in sounding:
            onset_step, onset_velocity_bin = sounding.pop(key)
            assert onset_step < clock or (onset_step, *key) in others, "a zero-length note"
            played[(onset_step,) + key] = (clock, onset_velocity_bin)
        if velocity_bin:
            sounding[key] = (clock, velocity_bin)
    assert clock == region.n_steps and not sounding, "the answer ends early or leaves a note open"
    assert set(others) <= set(played), "another track's note inside the range is missing"
    untargeted = {onset: note for onset, note in played.items() if onset[1] not in region.target_bins}
    assert untargeted == {onset: note for onset, note in others.items() if onset[1] not in region.target_bins}, \
        "a note outside the target bins that is not another track's, as the song plays it"
    assert set(candidate.notes) == set(targets)
    for notes in candidate.notes.values():
        for note in notes:
            assert start_qn <= note.start_qn < end_qn and note.start_qn + note.duration_qn <= end_qn + 1e-9
            assert note.duration_qn > 0
    if context_is_dense(song, start_qn, end_qn, region, controls):
        assert any(candidate.notes.values()), "an empty answer in a dense context"


@pytest.mark.slow
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
        options = InfillOptions(n_candidates=CANDIDATES_PER_CALL, seed=int(rng.integers(1 << 31)),
                                max_answer_tokens=cap)
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
@pytest.mark.slow
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
