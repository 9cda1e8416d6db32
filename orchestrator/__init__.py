"""Orchestrator: control API, scheduler and state DB. Composes the other planes."""
