"""proxy.addresses: the model plane matched by address (issue 18, finding 4)."""

from __future__ import annotations

import pytest

from proxy.addresses import ModelPlane


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "LOCALHOST.", "0.0.0.0", "127.0.0.2", "127.1", "::1", "[::1]",
     "::ffff:127.0.0.1", "[::ffff:7f00:1]", "::"],
)  # fmt: skip
def test_every_address_of_this_host_is_the_loopback_model_plane(host: str) -> None:
    plane = ModelPlane({("127.0.0.1", 8500)})
    assert plane.serves(host, 8500)
    assert not plane.serves(host, 8501), "another port of this host is not the model plane"


@pytest.mark.parametrize("host", ["10.1.2.3", "192.0.2.7", "api.openai.com.invalid"])
def test_other_hosts_are_not(host: str) -> None:
    assert not ModelPlane({("127.0.0.1", 8500)}).serves(host, 8500)


def test_a_name_that_does_not_resolve_yet_is_matched_by_its_spelling() -> None:
    """docker compose's `ray:8500`: the name resolves only once its container is up."""
    plane = ModelPlane({("model-plane.invalid", 8500)})
    assert plane.serves("Model-Plane.invalid", 8500)
    assert not plane.serves("localhost", 8500)
    assert not plane.serves("model-plane.invalid", 8501)
