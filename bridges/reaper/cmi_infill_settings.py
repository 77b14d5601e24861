"""REAPER action "CMI: Infill settings": how dense, how many notes at once, which pitches, how long,
how loud and on which grid CMI writes, kept with the project; empty fields follow each track.

The work is in cmi_reaper.py, next to this file.
"""

import cmi_reaper

cmi_reaper.run_settings()
