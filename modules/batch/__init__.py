"""Batch scoring (``edgefleet score``): a table through a module's signed bundle, in parts, resumable.

``plan`` cuts the input into parts and decides what a resumed job still has to do (pure);
``columns`` maps table columns to tensors and back; ``io`` reads parts and writes part files;
``engine`` scores parts (worker side, and the embedded process pool); ``distributed`` runs the
same parts on Dask; ``job`` keeps the job's files and checkpoint in the output.
"""
