"""The policy file: the shipped numbers, and errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.config import ConfigError
from retention.policy import RetentionPolicy, load_policy


def test_shipped_policy_has_the_documented_numbers(policy: RetentionPolicy) -> None:
    dirs = policy.directories
    assert (dirs["traffic-logs"].keep_days, dirs["traffic-logs"].expire_by) == (30, "day-folder")
    assert (dirs["worker-artifacts"].keep_days, dirs["worker-artifacts"].expire_by) == (
        90,
        "last-modified",
    )
    assert dirs["financial"].keep_days == 7 * 365 + 2 and dirs["financial"].never_delete
    assert dirs["checkpoints"].keep_days is None and dirs["checkpoints"].compress_after_days == 7
    assert sorted(policy.deleting()) == ["traffic-logs", "worker-artifacts"]
    assert "*.lock" in policy.protected_patterns
    assert policy.index_fields.model_dump() == {"bodies": 14, "headers": 90, "usage": None}


GOOD = """\
directories:
  traffic-logs:
    keep_days: 30
    expire_by: day-folder
  financial:
    keep_days: 2557
    never_delete: true
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("keep_days: 30", "keep_days: thirty", "line 3: directories.traffic-logs.keep_days:"),
        ("    expire_by: day-folder\n", "", "line 2: directories.traffic-logs: keep_days needs"),
        (
            "never_delete: true",
            "never_delete: false\n    expire_by: last-modified",
            "line 1: directories: financial must set never_delete: true",
        ),
        ("expire_by: day-folder", "expire_by: age", "line 4: directories.traffic-logs.expire_by:"),
        ("  financial:", "  ../etc:", "line 5: directories.../etc.[key]:"),
        ("    keep_days: 2557", "    keep_days: 2557\n    shred: true", "line 7: "),
    ],
)
def test_a_bad_policy_names_file_line_and_field(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    path = tmp_path / "retention-policies.yaml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert f"{path}: {expected}" in str(caught.value)


def test_good_policy_loads_and_lock_files_stay_protected(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD + "protected: ['*.pid']\n")
    policy = load_policy(path)
    assert policy.protected_patterns == ("*.lock", "*.pid")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("directories:\n  traffic-logs: [\n")
    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML"):
        load_policy(path)
