"""Intake channels: ways into the control plane besides a trial file and the API.

`github`: a queue of labelled GitHub issues, written back to as comments, labels and pull
requests. Each channel is off unless the intake file (`$AUTOVIBE_INTAKE_CONFIG`) configures it;
every action a channel takes is a line of `<data>/audit/intake-<day>.jsonl`.
"""
