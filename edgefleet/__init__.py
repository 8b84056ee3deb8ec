"""edgefleet: the command line and the pieces that wire hub, broker, agents and simulator together."""

__version__ = "0.1.0"
