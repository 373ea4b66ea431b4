"""Unit tests of the norm rules, one file per family in flashnorm/norms/."""
