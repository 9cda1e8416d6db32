"""Retention plane: policies per directory and per indexed field group (issue 9; not built yet)."""
