"""Which namespaces the operator serves, said once.

The chart passes the namespaces twice: to kopf (`--namespace`, repeated, or
`--all-namespaces`), which decides what it watches, and to the settings
(`LMMR1_WATCH_NAMESPACES` / `LMMR1_WATCH_ALL_NAMESPACES`), which decide what the resync loop
lists. Were they to differ (a hand-edited Deployment), runs in one but not the other would be
reconciled only on some paths; `check_kopf_scope` makes the operator refuse to start instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmmr1_operator.settings import OperatorSettings


def describe_scope(settings: OperatorSettings) -> str:
    namespaces = settings.served_namespaces
    if namespaces is None:
        return "watching every namespace"
    return f"watching {', '.join(namespaces)}"


def kopf_scope(argv: Sequence[str]) -> tuple[frozenset[str] | None, bool]:
    """The namespaces a `kopf run` command line watches (None: every namespace) and
    whether it names a scope at all (an embedded operator or a test has no command line)."""
    namespaces: set[str] = set()
    every = False
    args = list(argv)
    for i, arg in enumerate(args):
        if arg in ("--all-namespaces", "-A"):
            every = True
        elif arg.startswith("--namespace="):
            namespaces.add(arg.removeprefix("--namespace="))
        elif arg in ("--namespace", "-n") and i + 1 < len(args):
            namespaces.add(args[i + 1])
    if every:
        return None, True
    return frozenset(namespaces), bool(namespaces)


def check_kopf_scope(settings: OperatorSettings, argv: Sequence[str]) -> None:
    """Raise when kopf's command line watches other namespaces than the settings serve."""
    watched, named = kopf_scope(argv)
    if not named:
        return
    served = settings.served_namespaces
    served_set = None if served is None else frozenset(served)
    if watched != served_set:
        said = "every namespace" if watched is None else ", ".join(sorted(watched))
        raise ValueError(
            f"kopf watches {said} but the operator's settings say {describe_scope(settings)}: "
            "set the kopf --namespace flags and LMMR1_WATCH_NAMESPACES (or --all-namespaces "
            "and LMMR1_WATCH_ALL_NAMESPACES=true) to the same namespaces (the chart does)"
        )
