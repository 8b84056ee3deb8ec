"""Monitoring: drift, alerts, data export, time-series queries, retention."""
