"""Objective evaluation: blanks, metrics, baselines, musicality, simulated users, range sweeps."""
