"""REAPER action "CMI: Accept infill": tell CMI you keep its last infill, so it learns what you like.

The work is in cmi_reaper.py, next to this file.
"""

import cmi_reaper

cmi_reaper.run_accept()
