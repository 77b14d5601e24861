"""The daemon: its protocol and messages, settings, server and backend (the process around it is cli.service)."""
