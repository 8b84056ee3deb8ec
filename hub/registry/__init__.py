"""The registry: model versions (``models.py``) and the signed module bundles built from them (``bundles.py``)."""
