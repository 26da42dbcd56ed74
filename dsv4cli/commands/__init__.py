"""One module per command; each registers itself on the root app in `dsv4cli.app`."""
