"""TT embedding modules."""
