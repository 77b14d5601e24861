"""What each track of a song plays (melody, accompaniment, bass, drums), and the instrument bins
that tell tracks of one program apart.

Most DAW tracks have no program change (a MIDI item feeding a plugin instrument), and POP909's
MELODY, BRIDGE and PIANO are all program 0: in token space such tracks are one piano bin, and a
model asked for the melody writes accompaniment. `song_roles` tells the tracks apart from hints
(a track name such as "Bass" or "Lead", a drum flag from channel 10 or a Live Drum Rack) and, where
the name says nothing, from the notes themselves (register, how often one note sounds alone, how
many notes); `distinct_bins` gives the tracks of one bin a bin each by role. The engine uses it
only with a model trained on role-assigned bins (the bundle's `tokenizer.role_bins`), and the
training augmentation draws its bins from the same roles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from . import vocab
from .notes import Note
from .regions import track_bin
from .tokens import Song

MELODY, ACCOMPANIMENT, BASS, DRUMS = "melody", "accompaniment", "bass", "drums"
ROLES = (MELODY, ACCOMPANIMENT, BASS, DRUMS)
NAME_HINTS = (
    (DRUMS, re.compile(r"drum|kit|perc|beat|kick|snare|hat|cymbal|tom\b", re.IGNORECASE)),
    (BASS, re.compile(r"bass|\bsub\b|808", re.IGNORECASE)),
    (MELODY, re.compile(r"melod|lead|vocal|\bvox\b|voice|solo|topline|theme|tune|sing", re.IGNORECASE)),
    (ACCOMPANIMENT, re.compile(r"chord|pad|comp\b|rhythm|keys|piano|guitar|string|arp|harmon|accomp|organ|bridge",
                               re.IGNORECASE)),
)
"""A track name matching one of these (first match wins) says its role."""
ROLE_BINS = {
    MELODY: (11, 10, 9, 6, 7),      # lead, flute, sax, violin, trumpet
    ACCOMPANIMENT: (8, 5, 12, 6, 3),  # piano, guitar, pad, violin (strings), marimba
    BASS: (4,),
    DRUMS: (vocab.PERCUSSION_BIN,),
}
"""Bins each role takes, in order of preference, when tracks of one bin need telling apart."""
MONOPHONIC_SHARE = 0.9
"""A melody or a bass line plays one note at a time at least this share of its onsets."""
MELODY_MONOPHONY_EXPONENT = 100
"""Of the mostly monophonic tracks, the melody has the most onsets x monophonic share ** this: a
melody plays strictly one note at a time (share 0.99 counts 0.37 of 1.0). Without names, this finds
POP909's MELODY in 97% of 291 songs (dev and the first 200 of train), onsets alone in 32%."""
BASS_MEDIAN_PITCH = 50
"""A mostly monophonic line whose median pitch is below this (D3) is a bass line."""


@dataclass(frozen=True)
class TrackFeatures:
    n_onsets: int
    median_pitch: float
    monophonic_share: float
    """Share of onsets (distinct start times) at which one note starts."""


def track_features(notes: Sequence[Note]) -> Optional[TrackFeatures]:
    """A track's register, monophony and size; None for a track without notes."""
    if not notes:
        return None
    _, per_onset = np.unique(np.round([n.start_qn for n in notes], 3), return_counts=True)
    return TrackFeatures(len(per_onset), float(np.median([n.pitch for n in notes])),
                         float(np.mean(per_onset == 1)))


def name_role(name: str) -> Optional[str]:
    for role, pattern in NAME_HINTS:
        if pattern.search(name or ""):
            return role
    return None


def part_role(song: Song, track_index: int) -> str:
    """The role of a track from what it is, not what it plays (a new, empty part): its drum flag,
    its name (NAME_HINTS), else the first role whose ROLE_BINS hold its instrument bin, else
    accompaniment."""
    track = song.tracks[track_index]
    if track.is_drum:
        return DRUMS
    instrument_bin = track_bin(song, track_index)
    return name_role(track.name) or next((role for role in (MELODY, BASS, ACCOMPANIMENT)
                                          if instrument_bin in ROLE_BINS[role]), ACCOMPANIMENT)


def song_roles(song: Song, drum_hints: Sequence[bool] = ()) -> list[Optional[str]]:
    """The role of each track (None for a track without notes and without a telling name).

    Drums: a drum track (channel 10), a drum hint from the bridge (a Live Drum Rack) or a drum
    name. Else a name that says the role. Else from the notes: a mostly monophonic low line is a
    bass; of the mostly monophonic tracks the most strictly monophonic with the most onsets is the
    melody (unless a track is named as one), and every other track is accompaniment."""
    roles: list[Optional[str]] = []
    features = [track_features(track.notes) for track in song.tracks]
    for index, track in enumerate(song.tracks):
        hinted = track.is_drum or (index < len(drum_hints) and drum_hints[index])
        roles.append(DRUMS if hinted else name_role(track.name))
    for index, feature in enumerate(features):
        if roles[index] is None and feature is not None and feature.monophonic_share >= MONOPHONIC_SHARE \
                and feature.median_pitch < BASS_MEDIAN_PITCH:
            roles[index] = BASS
    if MELODY not in roles:
        lines = [(f.monophonic_share ** MELODY_MONOPHONY_EXPONENT * f.n_onsets, i) for i, f in enumerate(features)
                 if roles[i] is None and f is not None and f.monophonic_share >= MONOPHONIC_SHARE]
        if lines:
            roles[max(lines)[1]] = MELODY
    return [ACCOMPANIMENT if role is None and features[i] is not None else role for i, role in enumerate(roles)]


def distinct_bins(song: Song, tracks: Sequence[int], roles: Sequence[Optional[str]]) -> dict[int, int]:
    """Track -> bin for the given tracks, where two or more share a bin: each gets the first free
    bin of its role's ROLE_BINS (its own bin first if the role plays it; of one role, the track with
    the most notes chooses first), so no two of them share one."""
    bins = {t: track_bin(song, t) for t in tracks}
    shared = {t for t in tracks if not song.tracks[t].is_drum and list(bins.values()).count(bins[t]) > 1}
    taken = {b for t, b in bins.items() if t not in shared}
    for track in sorted(shared, key=lambda t: (ROLES.index(roles[t] or ACCOMPANIMENT), -len(song.tracks[t].notes))):
        choices = ROLE_BINS[roles[track] or ACCOMPANIMENT]
        own = (bins[track],) if bins[track] in choices else ()
        free = [b for b in (*own, *choices) if b not in taken and b != vocab.PERCUSSION_BIN]
        bins[track] = free[0] if free else bins[track]
        taken.add(bins[track])
    return bins


def with_distinct_bins(song: Song, roles: Optional[Sequence[Optional[str]]] = None) -> Song:
    """The song with every group of tracks sharing a bin given a bin each by role (`distinct_bins`
    over all tracks, roles from `song_roles` unless given): what a model trained with role bins
    reads, and what its training's engine-bin copies are."""
    roles = song_roles(song) if roles is None else roles
    return with_bins(song, distinct_bins(song, range(len(song.tracks)), roles))


def with_bins(song: Song, bins: dict[int, int]) -> Song:
    """The song with each named track playing the stand-in program of its new bin."""
    tracks = [replace(track, program=vocab.BIN_STAND_IN_PROGRAM[bins[i]]) if i in bins and not track.is_drum
              else track for i, track in enumerate(song.tracks)]
    return replace(song, tracks=tracks)
