"""How a Harbor task is graded, named apart from the trial config so that a runner, which grades
it, does not import the config's models (a sixth of a runner's start)."""

HARBOR_PARSER = "harbor"
"""A Harbor task's grading: its `tests/test.sh` run from /tests, the reward it writes to
/logs/verifier (`reward.txt` or `reward.json`), else its exit status (`workers.grading`)."""
HARBOR_TEST = "tests/test.sh"
"""The one FAIL_TO_PASS id of a Harbor task: its verifier script."""
