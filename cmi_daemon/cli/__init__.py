"""The `cmi-daemon` command: one module per command group, the installers among them."""
