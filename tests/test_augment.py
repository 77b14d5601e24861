"""Training augmentation on real songs: role-drawn bins, the split-off bass, keys and loudness per example."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from cmi_daemon.music import vocab
from cmi_daemon.music.roles import BASS, MELODY, ROLE_BINS, distinct_bins, song_roles
from cmi_daemon.music.tokens import read_midi, tokenize
from tests.conftest import GROOVE_FIXTURES, POP909_FIXTURES
from training.data.augment import (BASS_SPLIT_MAX_PITCH, RANDOM_ROLE_BINS, Augmentation, augment, augment_window,
                              split_bass)


def transposed_song(song, semitones):
    return replace(song, tracks=[replace(t, notes=[n._replace(pitch=n.pitch + (0 if t.is_drum else semitones))
                                                   for n in t.notes]) for t in song.tracks])


@pytest.mark.parametrize("path", [POP909_FIXTURES[0], GROOVE_FIXTURES[0]], ids=lambda p: p.stem)
@pytest.mark.parametrize("semitones", [-5, 3, 6])
def test_transposing_tokens_is_tokenizing_the_transposed_song(path, semitones):
    song = read_midi(path)
    assert all(0 <= n.pitch + semitones <= 127 for t in song.tracks for n in t.notes)
    expected = tokenize(transposed_song(song, semitones)).ids
    assert vocab.transposed_ids(tokenize(song).ids, semitones).tolist() == expected


def test_transposed_pitches_fold_by_octaves_and_velocities_stay_note_ons():
    ids = [vocab.note_id(8, 2, 5), vocab.note_id(8, 125, 11), vocab.note_id(8, 125, 0), vocab.note_id(0, 36, 1),
           vocab.wait_id(7), vocab.MASK_ID]
    moved = vocab.transposed_ids(ids, -5, -1).tolist()
    assert [vocab.note_fields(t) for t in moved[:4]] == [(8, 9, 4), (8, 120, 10), (8, 120, 0), (0, 36, 1)]
    assert moved[4:] == ids[4:]


def test_a_window_is_augmented_the_same_way_for_the_same_draw():
    ids = np.array(tokenize(read_midi(POP909_FIXTURES[0])).ids[:500])
    first = augment_window(ids, np.random.default_rng([3, 9]))
    assert np.array_equal(first, augment_window(ids, np.random.default_rng([3, 9])))
    keys = {int(np.median([vocab.note_fields(t)[1] for t in augment_window(ids, np.random.default_rng([3, i]))
                           if vocab.is_note(t)])) for i in range(40)}
    assert len(keys) >= 8  # draws cover most of the 12 keys


def bins_of(song):
    return [t.instrument_bin for t in song.tracks]


def test_role_copies_put_each_pop909_part_on_a_bin_of_its_role():
    song = read_midi(POP909_FIXTURES[0])
    assert bins_of(song) == [8, 8, 8]
    roles = song_roles(song)
    engine_copy = augment(song, Augmentation(seed=1, engine_bins=True, split_bass=False))
    assert {i: b for i, b in enumerate(bins_of(engine_copy))} == distinct_bins(song, range(3), roles)
    seen_melody_bins = set()
    for seed in range(30):
        copy = augment(song, Augmentation(seed=seed, engine_bins=False, split_bass=False))
        pitched = bins_of(copy)
        assert len(set(pitched)) == len(pitched)  # tracks stay told apart
        for role, instrument_bin in zip(roles, pitched):
            assert instrument_bin in RANDOM_ROLE_BINS[role]
        seen_melody_bins.add(pitched[roles.index(MELODY)])
        assert [t.notes for t in copy.tracks] == [t.notes for t in song.tracks]
    assert len(seen_melody_bins) >= 4


def test_the_piano_parts_lowest_voice_becomes_a_monophonic_bass_line():
    song = read_midi(POP909_FIXTURES[0])
    split = split_bass(song)
    assert len(split.tracks) == len(song.tracks) + 1
    bass = split.tracks[-1]
    assert song_roles(split)[-1] == BASS and bass.instrument_bin == ROLE_BINS[BASS][0]
    assert len(bass.notes) >= 30 and all(n.pitch < BASS_SPLIT_MAX_PITCH for n in bass.notes)
    assert all(a.start_qn + a.duration_qn <= b.start_qn + 1e-9 for a, b in zip(bass.notes, bass.notes[1:]))
    # Every note is still played, by the piano or the bass (the bass's may end sooner).
    before = sorted((n.start_qn, n.pitch) for t in song.tracks for n in t.notes)
    after = sorted((n.start_qn, n.pitch) for t in split.tracks for n in t.notes)
    assert before == after


def test_drums_stay_percussion_and_keep_their_keys():
    song = read_midi(GROOVE_FIXTURES[0])
    for seed in range(5):
        copy = augment(song, Augmentation.draw(random.Random(seed), tempo_relative=False))
        assert bins_of(copy) == [vocab.PERCUSSION_BIN] * len(song.tracks)
        assert [n.pitch for t in copy.tracks for n in t.notes] == [n.pitch for t in song.tracks for n in t.notes]
