"""Many simulated devices in one process, each a real agent over a real MQTT connection."""

from simulator.fleet import Fleet, run_fleet

__all__ = ["Fleet", "run_fleet"]
