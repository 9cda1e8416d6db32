"""One resolver for every plane's adapters (`contracts.adapters`): short names, an operator's
dotted path where the server picks, never a dotted path from a trial, one error naming the
allowed names."""

from __future__ import annotations

from pathlib import Path

import pytest

from budget import open_counters
from budget.sqlite import SqliteCounters
from contracts.adapters import UnknownAdapter, resolve
from contracts.dataroot import DataRoot
from secretstore import store_from_env
from traffic.sqlite_store import SqliteTrafficStore
from traffic.stores import get_store
from workers.agents import AGENTS, get_agent
from workers.driver import get_driver
from workers.local import LocalDriver


def test_each_plane_names_its_allowed_adapters_in_one_error(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    cases = [
        (lambda: get_agent("aidr"), "agent 'aidr'; allowed: aider, builtin, claude-code"),
        (lambda: get_driver("k8s"), "worker driver 'k8s'; allowed: local, nomad, vm"),
        (
            lambda: open_counters("etcd", path=tmp_path / "c.sqlite"),
            "counter store 'etcd'; allowed: redis, sqlite",
        ),
        (lambda: get_store("solr", root), "traffic store 'solr'; allowed: elasticsearch, sqlite"),
        (
            lambda: store_from_env({"AUTOVIBE_SECRET_STORE": "consul"}),
            "secret store 'consul' ($AUTOVIBE_SECRET_STORE); allowed: file, vault",
        ),
    ]
    for pick, message in cases:
        with pytest.raises(UnknownAdapter) as caught:
            pick()
        assert message in str(caught.value)


def test_a_server_chosen_adapter_may_be_a_dotted_path(tmp_path: Path) -> None:
    store = get_store("traffic.sqlite_store:SqliteTrafficStore", DataRoot.at(tmp_path))
    assert isinstance(store, SqliteTrafficStore)
    store.close()
    counters = open_counters("budget.sqlite.SqliteCounters", path=tmp_path / "c.sqlite")
    assert isinstance(counters, SqliteCounters)
    counters.close()
    assert isinstance(get_driver("workers.local:LocalDriver"), LocalDriver)
    with pytest.raises(UnknownAdapter, match=r"cannot import nowhere.mod:Store"):
        get_store("nowhere.mod:Store", DataRoot.at(tmp_path))


def test_a_trial_names_agents_by_short_name_only() -> None:
    # What a trial names is data: a dotted path is never imported for it.
    for name in ("os:system", "subprocess.Popen", "workers.agents.builtin:BuiltinAgent"):
        with pytest.raises(UnknownAdapter, match="allowed: aider"):
            get_agent(name)
    assert {get_agent(name).name for name in AGENTS} == set(AGENTS)


def test_resolve_imports_only_what_is_picked() -> None:
    registry = {"here": "contracts.adapters:resolve", "broken": "nowhere.at.all:Thing"}
    assert resolve("thing", "here", registry) is resolve
    with pytest.raises(UnknownAdapter, match=r"thing 'broken' \(cannot import"):
        resolve("thing", "broken", registry)
