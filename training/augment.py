"""Data augmentation on songs: transposition (drums untouched), tempo stretch, velocity scaling."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from cmi_daemon.tokens import Song

TRANSPOSE_SEMITONES = tuple(range(-5, 7))
TEMPO_FACTORS = (0.9, 0.95, 1.0, 1.05, 1.1)
VELOCITY_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2)


@dataclass(frozen=True)
class Augmentation:
    transpose_semitones: int = 0
    tempo_factor: float = 1.0
    velocity_factor: float = 1.0

    @classmethod
    def draw(cls, rng: random.Random) -> "Augmentation":
        return cls(rng.choice(TRANSPOSE_SEMITONES), rng.choice(TEMPO_FACTORS), rng.choice(VELOCITY_FACTORS))


def _fold_into_range(pitch: int) -> int:
    """Move a transposed pitch back into 0..127 by octaves."""
    while pitch < 0:
        pitch += 12
    while pitch > 127:
        pitch -= 12
    return pitch


def augment(song: Song, augmentation: Augmentation) -> Song:
    """A copy of the song transposed (not drum tracks), played faster or slower, louder or softer."""
    tracks = []
    for track in song.tracks:
        shift = 0 if track.is_drum else augmentation.transpose_semitones
        notes = [n._replace(pitch=_fold_into_range(n.pitch + shift),
                            velocity=max(1, min(127, round(n.velocity * augmentation.velocity_factor))))
                 for n in track.notes]
        tracks.append(replace(track, notes=notes))
    return replace(song, tracks=tracks, tempo_map=song.tempo_map.scaled(augmentation.tempo_factor))
