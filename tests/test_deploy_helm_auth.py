"""Issue 10 (authentication) in the Helm chart: the internal plane is always on (its token from a Secret
the chart makes and keeps, or from auth.existingSecret); the public API token with auth.apiToken.enabled."""

from __future__ import annotations

import base64

import pytest

from test_deploy_helm import ROLES, _render_values, chart  # noqa: F401  (a fixture)


def _secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}


def test_the_internal_token_is_on_by_default_from_a_secret_the_chart_makes(chart):  # noqa: F811
    r = _render_values(chart, {})
    secret = r.get("Secret", "demo-dsv32-serve-auth")
    assert len(base64.b64decode(secret["data"]["internal-token"])) == 40 and "api-token" not in secret["data"]
    for role in ROLES:
        refs = _secret_refs(r.container(role))
        assert refs["DSV32_INTERNAL_TOKEN"] == ("demo-dsv32-serve-auth", "internal-token"), role
        assert "DSV32_API_TOKEN" not in refs


@pytest.mark.parametrize("existing", ["", "my-secrets"])
def test_the_api_token_when_enabled_and_an_existing_secret_instead_of_ours(chart, existing):  # noqa: F811
    r = _render_values(chart, {"auth": {"existingSecret": existing, "apiToken": {"enabled": True}}})
    name = existing or "demo-dsv32-serve-auth"
    assert bool(r.of("Secret") and [s for s in r.of("Secret") if s["metadata"]["name"] == "demo-dsv32-serve-auth"]) \
        == (not existing)
    for role in ROLES:
        refs = _secret_refs(r.container(role))
        assert refs["DSV32_INTERNAL_TOKEN"] == (name, "internal-token")
        assert refs["DSV32_API_TOKEN"] == (name, "api-token")
