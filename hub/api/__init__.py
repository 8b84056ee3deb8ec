"""The HTTP API on top of everything: the FastAPI app (``app.py``), its dependencies (``deps.py``) and routes.

Nothing else in the hub imports from here (tests/test_architecture.py): services raise ``hub.errors``
and the app maps them to HTTP statuses.
"""
