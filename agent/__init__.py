"""The edgefleet device agent: enrol, hold an MQTT session, install signed bundles, run and report modules."""

from agent.core import Agent
from agent.daemon import run_agent
from agent.identity import Identity, enroll, load_identity
from agent.workload import Workload

__all__ = ["Agent", "Identity", "Workload", "enroll", "load_identity", "run_agent"]
