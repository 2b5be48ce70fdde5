"""The ``match`` rule kind: one alert per matching event."""

from __future__ import annotations

from tocsin import Event, Firing, RuleKind


class MatchKind(RuleKind):
    """Fires once for every event that passes the rule's ``match`` and ``when``."""

    name = "match"

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        return [Firing("firing", event, (event.id, "firing"))]
