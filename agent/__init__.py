"""The edgefleet device agent: enrol, hold an MQTT session, install signed bundles, run and report modules."""

from agent.core import Agent
from agent.daemon import run_agent
from agent.identity import Identity, enroll, load_identity

# agent.workload (the synthetic load, NumPy) is imported by those who use it: the daemon never loads NumPy otherwise.
__all__ = ["Agent", "Identity", "enroll", "load_identity", "run_agent"]
