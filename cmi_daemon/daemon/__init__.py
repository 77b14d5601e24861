"""The daemon: its protocol and messages, settings, server, backend and process lifecycle."""
