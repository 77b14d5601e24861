"""Data augmentation: instrument roles and tempo when shards are prepared, key and loudness per example.

At preparation (`training.data.prepare`), each training file is written as it is and as copies drawn by
`Augmentation.draw`: the tracks play other instrument bins by role (POP909's MELODY on a melodic
bin, its BRIDGE and PIANO on accompaniment bins, the piano's lowest voice split off as a bass line
on the bass bin; drums stay percussion), and for real-time tokens (8 ms steps) the tempo is
stretched. Half the role draws are exactly what the engine does to a request of tracks that share
a bin (`roles.distinct_bins`), so the model sees requests as the daemon presents them; the other
half draw each role's bin at random, as songs with real programs have them.

Per example, in the training loop (`augment_window`, on token ids, so it costs microseconds): a
transposition drawn uniformly over the 12 keys (percussion untouched) and a shift of every
velocity bin by -1, 0 or +1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
import numpy as np

from cmi_daemon.music import vocab
from cmi_daemon.music.notes import Note
from cmi_daemon.music.roles import (ACCOMPANIMENT, BASS, DRUMS, MELODY, ROLE_BINS, song_roles, with_bins,
                              with_distinct_bins)
from cmi_daemon.music.tokens import Song, Track

TRANSPOSE_SEMITONES = tuple(range(-5, 7))
"""Every key once: a fifth down to a tritone up."""
VELOCITY_BIN_SHIFTS = (-1, 0, 1)
TEMPO_FACTORS = (0.9, 0.95, 1.0, 1.05, 1.1)
"""Tempo stretch for real-time tokens; tempo-relative tokens do not change with tempo."""
ENGINE_BINS_SHARE = 0.5
"""Share of role copies whose bins are the engine's (`roles.distinct_bins`); the rest are random."""
BASS_SPLIT_SHARE = 0.5
"""Share of role copies whose lowest accompaniment voice becomes a bass track."""
RANDOM_ROLE_BINS = {
    MELODY: ROLE_BINS[MELODY] + (8,),
    ACCOMPANIMENT: ROLE_BINS[ACCOMPANIMENT],
    BASS: ROLE_BINS[BASS],
}
"""Bins a role may be drawn onto (a melody is often played on the piano too)."""
BASS_SPLIT_MAX_PITCH = 55
"""The lowest note of an onset is a bass note when it lies below G3 ..."""
BASS_SPLIT_BELOW_MEDIAN = 7
"""... and at least a fifth below the track's median pitch."""
BASS_TRACK_NAME = "Bass"


@dataclass(frozen=True)
class Augmentation:
    """One prepared copy of a song: how its bins are drawn, whether a bass is split off, its tempo."""

    seed: int
    engine_bins: bool
    split_bass: bool
    tempo_factor: float = 1.0

    @classmethod
    def draw(cls, rng: random.Random, tempo_relative: bool) -> "Augmentation":
        return cls(rng.randrange(1 << 31), rng.random() < ENGINE_BINS_SHARE, rng.random() < BASS_SPLIT_SHARE,
                   1.0 if tempo_relative else rng.choice(TEMPO_FACTORS))


def augment(song: Song, augmentation: Augmentation) -> Song:
    """A copy of the song with role-drawn bins (and a split-off bass line), played at another tempo."""
    if augmentation.split_bass:
        song = split_bass(song)
    roles = song_roles(song)
    if augmentation.engine_bins:
        song = with_distinct_bins(song, roles)
    else:
        song = with_bins(song, random_role_bins(song, roles, random.Random(augmentation.seed)))
    return replace(song, tempo_map=song.tempo_map.scaled(augmentation.tempo_factor))


def random_role_bins(song: Song, roles, rng: random.Random) -> dict[int, int]:
    """Track -> a bin drawn from its role's RANDOM_ROLE_BINS, no two pitched tracks on one bin while
    free bins remain (drums keep percussion)."""
    bins, taken = {}, set()
    for index, role in enumerate(roles):
        if role is None or role == DRUMS or song.tracks[index].is_drum:
            continue
        choices = [b for b in RANDOM_ROLE_BINS[role] if b not in taken] or list(RANDOM_ROLE_BINS[role])
        bins[index] = rng.choice(choices)
        taken.add(bins[index])
    return bins


def split_bass(song: Song) -> Song:
    """The song with the lowest voice of its lowest accompaniment track moved to a new bass track,
    when the song has no bass and that track has a low voice (`lowest_voice`)."""
    roles = song_roles(song)
    if BASS in roles:
        return song
    candidates = [(float(np.median([n.pitch for n in t.notes])), i) for i, t in enumerate(song.tracks)
                  if roles[i] == ACCOMPANIMENT and t.notes]
    if not candidates:
        return song
    _, index = min(candidates)
    track = song.tracks[index]
    bass = lowest_voice(track.notes)
    if not bass:
        return song
    chosen = set(bass)
    kept = [n for n in track.notes if n not in chosen]
    line = monophonic(bass)
    tracks = list(song.tracks)
    tracks[index] = replace(track, notes=kept)
    tracks.append(Track(BASS_TRACK_NAME, vocab.BIN_STAND_IN_PROGRAM[ROLE_BINS[BASS][0]], False, line))
    return replace(song, tracks=tracks)


def lowest_voice(notes: list[Note]) -> list[Note]:
    """The lowest note of each onset, where it lies below BASS_SPLIT_MAX_PITCH and a fifth or more
    below the notes' median pitch."""
    median = float(np.median([n.pitch for n in notes]))
    lowest: dict[float, Note] = {}
    for note in notes:
        onset = round(note.start_qn, 3)
        if onset not in lowest or note.pitch < lowest[onset].pitch:
            lowest[onset] = note
    return [n for _, n in sorted(lowest.items())
            if n.pitch < BASS_SPLIT_MAX_PITCH and n.pitch <= median - BASS_SPLIT_BELOW_MEDIAN]


def monophonic(notes: list[Note]) -> list[Note]:
    """Notes sorted by onset, each ended no later than the next one starts."""
    notes = sorted(notes)
    return [n if i + 1 == len(notes) or n.start_qn + n.duration_qn <= notes[i + 1].start_qn else
            n._replace(duration_qn=notes[i + 1].start_qn - n.start_qn) for i, n in enumerate(notes)]


def augment_window(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Token ids transposed by a key drawn from TRANSPOSE_SEMITONES (pitched bins only; a pitch
    leaving 0..127 moves back by octaves) with every note-on's velocity bin shifted by one of
    VELOCITY_BIN_SHIFTS (kept within 1..11). Note-offs move with their note-ons."""
    shift = int(rng.choice(TRANSPOSE_SEMITONES))
    velocity_shift = int(rng.choice(VELOCITY_BIN_SHIFTS))
    return vocab.transposed_ids(ids, shift, velocity_shift)
