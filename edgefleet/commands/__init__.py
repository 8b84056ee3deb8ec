"""The CLI's command groups, one module each; edgefleet/cli.py assembles them."""
