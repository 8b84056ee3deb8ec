"""Who is trusted: the hub's signing keys and root rotation (``keys.py``), the roots it publishes to devices
(``roots_publish.py``) and the operators' API tokens and roles (``tokens.py``)."""
