"""REAPER action "CMI: Infill selection": rewrite the time selection's bars in the selected MIDI items.

Running it again on the same bars and items asks for another take and tells CMI "not this".
The work is in cmi_reaper.py, next to this file.
"""

import cmi_reaper

cmi_reaper.run_infill()
