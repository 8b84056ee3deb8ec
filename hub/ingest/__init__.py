"""Ingest of what devices send in bulk: batched writes off the MQTT thread (``writer.py``), extra ingest
processes on a shared subscription (``workers.py``) and telemetry's storage format (``telemetry.py``:
a row per batch, per-minute rollups), which monitoring reads."""
