"""Which namespaces the operator serves: the settings read from the chart's environment, and
the start-up check that kopf's command line watches the same ones."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmmr1_operator.scope import check_kopf_scope, describe_scope, kopf_scope
from lmmr1_operator.settings import OperatorSettings

KOPF = ["kopf", "run", "--module=lmmr1_operator.main", "--standalone"]


def test_no_namespace_listed_serves_the_operators_own_namespace_only() -> None:
    settings = OperatorSettings.from_env({"POD_NAMESPACE": "ops"})
    assert settings.served_namespaces == ("ops",)
    assert settings.watch_all_namespaces is False


def test_listed_namespaces_are_served_in_order_and_spaces_are_ignored() -> None:
    settings = OperatorSettings.from_env(
        {"POD_NAMESPACE": "ops", "LMMR1_WATCH_NAMESPACES": "team-a, team-b,"}
    )
    assert settings.served_namespaces == ("team-a", "team-b")
    assert describe_scope(settings) == "watching team-a, team-b"


def test_every_namespace_only_when_asked_for() -> None:
    settings = OperatorSettings.from_env(
        {"LMMR1_WATCH_NAMESPACES": "", "LMMR1_WATCH_ALL_NAMESPACES": "true"}
    )
    assert settings.served_namespaces is None
    assert describe_scope(settings) == "watching every namespace"
    chart_default = {"LMMR1_WATCH_NAMESPACES": "ops", "LMMR1_WATCH_ALL_NAMESPACES": "false"}
    assert OperatorSettings.from_env(chart_default).served_namespaces == ("ops",)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"LMMR1_WATCH_NAMESPACES": "team-a,Team_B"}, "watch_namespaces.1"),
        ({"LMMR1_WATCH_NAMESPACES": "team-a,team-a"}, "lists a namespace twice"),
        (
            {"LMMR1_WATCH_NAMESPACES": "team-a", "LMMR1_WATCH_ALL_NAMESPACES": "true"},
            "exclude each other",
        ),
        ({"LMMR1_WATCH_ALL_NAMESPACES": "maybe"}, "watch_all_namespaces"),
    ],
)
def test_a_bad_scope_is_refused_naming_the_setting(env: dict[str, str], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        OperatorSettings.from_env(env)


def test_the_old_single_namespace_variable_names_its_replacement() -> None:
    with pytest.raises(ValueError, match="replaced by LMMR1_WATCH_NAMESPACES"):
        OperatorSettings.from_env({"LMMR1_WATCH_NAMESPACE": "team-a"})
    # An empty one (what the old chart set by default) is no request at all.
    assert OperatorSettings.from_env({"LMMR1_WATCH_NAMESPACE": ""}).served_namespaces


def test_kopf_scope_reads_every_spelling_of_the_flags() -> None:
    assert kopf_scope([*KOPF, "--namespace=a", "-n", "b", "--namespace", "c"]) == (
        frozenset({"a", "b", "c"}),
        True,
    )
    assert kopf_scope([*KOPF, "--all-namespaces"]) == (None, True)
    assert kopf_scope([*KOPF, "-A"]) == (None, True)
    assert kopf_scope(["pytest", "-x"]) == (frozenset(), False)


def test_the_operator_refuses_to_start_when_kopf_watches_other_namespaces() -> None:
    served = OperatorSettings(watch_namespaces=("team-a", "team-b"))
    check_kopf_scope(served, [*KOPF, "--namespace=team-b", "--namespace=team-a"])
    check_kopf_scope(served, ["python", "-m", "pytest"])  # no command-line scope: embedded
    with pytest.raises(ValueError, match=r"kopf watches team-a but .* watching team-a, team-b"):
        check_kopf_scope(served, [*KOPF, "--namespace=team-a"])
    with pytest.raises(ValueError, match="kopf watches every namespace"):
        check_kopf_scope(served, [*KOPF, "--all-namespaces"])
    everywhere = OperatorSettings(watch_all_namespaces=True)
    check_kopf_scope(everywhere, [*KOPF, "--all-namespaces"])
    with pytest.raises(ValueError, match="watching every namespace"):
        check_kopf_scope(everywhere, [*KOPF, "--namespace=team-a"])
