"""Batch scoring on the hub: jobs in sandboxed subprocesses, and their monitoring samples."""
