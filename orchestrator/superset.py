"""Superset dashboard bundle: `configs/superset/` (Superset's export format v1) → an import zip.

The source holds one database per embedded store (SQLite URIs with `${AUTOVIBE_DATA}` in them),
the datasets, charts and one dashboard, and an Elasticsearch database and dataset for the
production traffic store. The builder writes the data root into the SQLite URIs and, when an
Elasticsearch URL is given, adds a second dashboard whose traffic charts read Elasticsearch:
copies of the SQLite traffic charts with derived uuids, pointed at the Elasticsearch twin of
their dataset (same column and metric names, so the chart parameters carry over unchanged).
"""

from __future__ import annotations

import datetime as dt
import io
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlsplit

import yaml

from contracts.settings import PROJECT_ROOT

SUPERSET_VERSION = "4.0.2"
"""The Superset release the bundle is tested with; docker-compose.yml runs the same image tag."""
SOURCE = PROJECT_ROOT / "configs" / "superset"
BUNDLE_FOLDER = "autovibe_superset"
"""Top folder inside the zip; Superset strips it on import, as it does for its own exports."""
ES_URI_VARIABLE = "ELASTICSEARCH_SQLALCHEMY_URI"
ELASTICSEARCH_TWINS = {
    # SQLite traffic dataset (datasets/autovibe_traffic/flows.yaml) → its Elasticsearch twin
    # (datasets/autovibe_elasticsearch/autovibe-traffic-usage.yaml).
    "ce637d61-adc0-4956-9e95-63e00423e749": "a16af37f-94fc-43dc-8f76-815fa8d2f21b",
}
_ES_NAMESPACE = uuid.UUID("5d1f6c8e-2f4b-4b7e-9a0e-5e2f3c9b8a71")
"""Namespace of the uuids derived for the Elasticsearch copies of charts and dashboards."""


class BundleError(ValueError):
    """The source or an argument cannot make a bundle; the message names which and why."""


@dataclass(frozen=True)
class Bundle:
    """The bundle's files (path inside the bundle → YAML document), ready to zip."""

    files: dict[str, dict[str, Any]]

    def of_kind(self, folder: str) -> dict[str, dict[str, Any]]:
        """Files under `databases/`, `datasets/`, `charts/` or `dashboards/`."""
        return {p: c for p, c in self.files.items() if p.startswith(folder + "/")}

    def zip_bytes(self) -> bytes:
        """The import zip, byte for byte the same for the same bundle (fixed timestamps)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(self.files):
                info = zipfile.ZipInfo(f"{BUNDLE_FOLDER}/{path}", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                text = yaml.safe_dump(self.files[path], sort_keys=False, allow_unicode=True)
                archive.writestr(info, text)
        return buffer.getvalue()

    def write(self, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.zip_bytes())
        return out


def build(data: Path, es_url: str | None = None, source: Path = SOURCE) -> Bundle:
    """The bundle over the stores under data root `data`; with `es_url`, Elasticsearch's too."""
    files = _load(source)
    variables = {"AUTOVIBE_DATA": str(data.resolve())}
    if es_url is not None:
        variables[ES_URI_VARIABLE] = elasticsearch_uri(es_url)
    es_databases = set()
    for path, config in _kind(files, "databases").items():
        template = str(config["sqlalchemy_uri"])
        if f"${{{ES_URI_VARIABLE}}}" in template:
            es_databases.add(str(config["uuid"]))
            if es_url is None:
                continue
        try:
            config["sqlalchemy_uri"] = Template(template).substitute(variables)
        except (KeyError, ValueError) as exc:
            raise BundleError(f"{source / path}: sqlalchemy_uri {template!r}: {exc}") from exc
    if es_url is None:
        files = _without_databases(files, es_databases)
    else:
        files.update(_elasticsearch_variant(files, source))
    return Bundle(files)


def elasticsearch_uri(url: str) -> str:
    """`https://u:pw@es:9200` → `elasticsearch+https://u:pw@es:9200/` (elasticsearch-dbapi)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BundleError(f"--es {url!r}: expected http(s)://[user:password@]host[:port]")
    return f"elasticsearch+{parts.scheme}://{parts.netloc}/"


def derived_uuid(original: str) -> str:
    """The uuid of the Elasticsearch copy of a chart or dashboard (stable across builds)."""
    return str(uuid.uuid5(_ES_NAMESPACE, original))


def _load(source: Path) -> dict[str, dict[str, Any]]:
    if not (source / "metadata.yaml").is_file():
        raise BundleError(f"{source}: no metadata.yaml; is this a Superset bundle source?")
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(source.rglob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if not isinstance(document, dict):
            raise BundleError(f"{path}: expected a YAML mapping")
        files[path.relative_to(source).as_posix()] = document
    files["metadata.yaml"]["timestamp"] = dt.datetime.now(dt.UTC).isoformat()
    return files


def _kind(files: dict[str, dict[str, Any]], folder: str) -> dict[str, dict[str, Any]]:
    return {p: c for p, c in files.items() if p.startswith(folder + "/")}


def _without_databases(
    files: dict[str, dict[str, Any]], databases: set[str]
) -> dict[str, dict[str, Any]]:
    """The files less these databases and the datasets on them."""
    return {
        path: config
        for path, config in files.items()
        if not (path.startswith("databases/") and str(config["uuid"]) in databases)
        and not (path.startswith("datasets/") and str(config["database_uuid"]) in databases)
    }


def _elasticsearch_variant(
    files: dict[str, dict[str, Any]], source: Path
) -> dict[str, dict[str, Any]]:
    """Copies of the dashboards whose traffic charts read the Elasticsearch twin datasets."""
    datasets = {str(c["uuid"]) for c in _kind(files, "datasets").values()}
    for sqlite_uuid, es_uuid in ELASTICSEARCH_TWINS.items():
        if not {sqlite_uuid, es_uuid} <= datasets:
            raise BundleError(f"{source}: dataset {sqlite_uuid} or its twin {es_uuid} is missing")
    added: dict[str, dict[str, Any]] = {}
    moved: dict[str, str] = {}
    for path, chart in _kind(files, "charts").items():
        twin = ELASTICSEARCH_TWINS.get(str(chart["dataset_uuid"]))
        if twin is None:
            continue
        copy = {**chart, "uuid": derived_uuid(str(chart["uuid"])), "dataset_uuid": twin}
        copy["slice_name"] = f"{chart['slice_name']} (Elasticsearch)"
        moved[str(chart["uuid"])] = copy["uuid"]
        added[path.replace(".yaml", "_elasticsearch.yaml")] = copy
    for path, dashboard in _kind(files, "dashboards").items():
        copy = yaml.safe_load(yaml.safe_dump(dashboard))
        copy["uuid"] = derived_uuid(str(dashboard["uuid"]))
        copy["dashboard_title"] = f"{dashboard['dashboard_title']} (Elasticsearch traffic)"
        copy["slug"] = f"{dashboard['slug']}-elasticsearch" if dashboard.get("slug") else None
        for item in copy["position"].values():
            if isinstance(item, dict) and item.get("type") == "CHART":
                meta = item["meta"]
                if meta.get("uuid") in moved:
                    meta["uuid"] = moved[meta["uuid"]]
                    meta["sliceName"] = f"{meta['sliceName']} (Elasticsearch)"
            elif isinstance(item, dict) and item.get("type") == "HEADER":
                item["meta"]["text"] = copy["dashboard_title"]
        added[path.replace(".yaml", "_elasticsearch.yaml")] = copy
    return added
