"""Monitoring: drift, alerts, data export, time-series queries, retention, and the hub's Prometheus ``/metrics``
(``metrics.py`` over ``prom.py``)."""
