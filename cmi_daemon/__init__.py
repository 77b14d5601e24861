"""CMI, the Collaborative Music Inpainter: infills selected bars of MIDI and learns from each request."""

__version__ = "0.1.0"
