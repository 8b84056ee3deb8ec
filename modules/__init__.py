"""Module bundles and the runners that hub and agent share: one signed artifact, one code path."""
