"""The retention policy (`configs/retention-policies.yaml`) as a Pydantic model.

Two rules hold whatever the file says: nothing under `financial/` is deleted by a machine, and
files matching `*.lock` are never deleted. The file can add to them, not take them away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from contracts.config import load_catalog

NEVER_DELETED_DIRECTORIES = frozenset({"financial"})
"""Top-level data-root folders retention never deletes from, whatever the policy says."""
ALWAYS_PROTECTED = ("*.lock",)
"""File-name patterns never deleted, whatever the policy says."""

DirName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
"""A top-level folder of the data root: one path component, so never `..` or a nested path."""
NamePattern = Annotated[str, Field(pattern=r"^[^/]+$")]
Days = Annotated[int, Field(ge=1, le=100 * 366)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DirectoryPolicy(_Strict):
    keep_days: Days | None
    """Age in whole days up to which things are kept; null keeps them forever."""
    expire_by: Literal["day-folder", "last-modified"] | None = None
    """How the age of a `<project>/<folder>/` is read: the UTC date that names it
    (`day-folder`, `YYYY-MM-DD`), or the newest mtime inside it (`last-modified`)."""
    never_delete: bool = False
    """Keep it whatever its age: `keep_days` is then what people are told, not what runs."""
    compress_after_days: Days | None = None
    """LZ4-compress files older than this many days, in place (`retention.compress`)."""

    @model_validator(mode="after")
    def _expiry_is_readable(self) -> DirectoryPolicy:
        if self.deletes and self.expire_by is None:
            raise ValueError(
                "keep_days needs expire_by: day-folder or last-modified "
                "(or never_delete: true, or keep_days: null to keep forever)"
            )
        return self

    @property
    def deletes(self) -> bool:
        """Whether anything here may ever be deleted automatically."""
        return self.keep_days is not None and not self.never_delete


class ServiceLogs(_Strict):
    paths: list[Annotated[str, Field(pattern=r"^[^/\s][^\s]*$")]] = Field(
        default_factory=lambda: ["run/*.log"]
    )
    """Globs relative to the data root, rotated by logrotate (no spaces)."""
    keep_days: Days = 30
    """Days of rotated logs kept."""

    @model_validator(mode="after")
    def _inside_root(self) -> ServiceLogs:
        for path in self.paths:
            if ".." in Path(path).parts:
                raise ValueError(f"{path!r} leaves the data root")
        return self


class IndexFields(_Strict):
    """Days the traffic index keeps each field group; null keeps it forever."""

    bodies: Days | None = 14
    """Request and response bodies: the largest, and the most likely to hold secrets."""
    headers: Days | None = 90
    usage: Days | None = None
    """Tokens and cost: what the ledger is reconciled against, kept forever."""


class RetentionPolicy(_Strict):
    """Per data-root folder and per indexed field group, how long things are kept."""

    directories: dict[DirName, DirectoryPolicy]
    """Top-level data-root folders; folders not named here are never touched."""
    protected: list[NamePattern] = Field(default_factory=lambda: list(ALWAYS_PROTECTED))
    """File-name patterns never deleted (`*.lock` is always among them)."""
    service_logs: ServiceLogs = Field(default_factory=ServiceLogs)
    index_fields: IndexFields = Field(default_factory=IndexFields)

    @field_validator("directories")
    @classmethod
    def _financial_is_never_deleted(
        cls, value: dict[str, DirectoryPolicy]
    ) -> dict[str, DirectoryPolicy]:
        for name in sorted(NEVER_DELETED_DIRECTORIES & set(value)):
            if not value[name].never_delete:
                raise ValueError(f"{name} must set never_delete: true (never deleted by a machine)")
        return value

    @property
    def protected_patterns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*ALWAYS_PROTECTED, *self.protected]))

    def deleting(self) -> dict[str, DirectoryPolicy]:
        """The folders retention may delete from, by name."""
        return {
            name: rule
            for name, rule in sorted(self.directories.items())
            if rule.deletes and name not in NEVER_DELETED_DIRECTORIES
        }


def load_policy(path: Path) -> RetentionPolicy:
    """Read and validate a policy file; errors are `file: line N: field: message`."""
    return load_catalog(path, RetentionPolicy)
