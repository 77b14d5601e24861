"""REAPER action "CMI: Infill settings": how dense, how many notes at once, which pitches, how long,
how loud and on which grid CMI writes, and how closely it follows the song's repeats, kept with
the project; empty fields follow each track (and the daemon's default).

The work is in cmi_reaper.py, next to this file.
"""

import cmi_reaper

cmi_reaper.run_settings()
