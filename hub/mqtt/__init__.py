"""The hub's MQTT side: one paho client on its own thread (``bridge.py``) that routes device messages to
ingest and fleet state, and publishes desired states, roots and bundle parts; ``blob_carousel.py``
decides when bundle parts go out (one copy per wave), so it lives with the client that sends them.

Apart from fleet/ and rollout/: those decide *what* devices should have, this package only carries it.
"""
