"""Microbenchmarks of hybridpar_ext against what a user would use instead: ``python -m bench``."""
