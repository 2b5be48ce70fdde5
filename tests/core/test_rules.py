from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import make_registry, write_config
from tocsin import Event
from tocsin.config import load_config
from tocsin.errors import ConfigError
from tocsin.rules import Engine, Rule, RuleIndex, compile_rules

HEADER = """
[daemon]
state_dir = "state"
[actions.console]
plugin = "log"
"""


def engine_for(tmp_path: Path, rules: str, **kw: Any) -> Engine:
    path = write_config(tmp_path / "tocsin.toml", HEADER + rules)
    registry = make_registry()
    return Engine(compile_rules(load_config(path, registry), registry), **kw)


def transfer(
    to: str, qty: str = "150.0000 EOS", id: str = "", frm: str = "alice", source: str = "eos"
) -> Event:
    data = {
        "contract": "eosio.token",
        "action": "transfer",
        "args": {"from": frm, "to": to, "quantity": qty, "memo": "m"},
        "trx_id": "t" + to,
    }
    return Event(
        id=id or f"{to}-{frm}-{qty}", source=source, provider="eospark", type="action", data=data
    )


def test_ten_thousand_rules_examine_few_candidates(tmp_path: Path) -> None:
    rules = "".join(
        f'[[rules]]\nname = "r{i}"\nmatch = {{ contract = "eosio.token", "args.to" = "acct{i}" }}\n'
        for i in range(10_000)
    )
    engine = engine_for(tmp_path, rules)
    for i in range(0, 10_000, 97):
        alerts = engine.process(transfer(f"acct{i}"))
        assert [a.alert.rule for a in alerts] == [f"r{i}"]
    engine.process(transfer("nobody"))
    events = engine.stats.events
    # The index works: about one candidate per event, not 10,000.
    assert engine.stats.examined <= events
    assert engine.stats.examined >= events - 1


def test_the_engine_wants_what_a_rule_may_fire_on_and_every_removal(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
[[rules]]
name = "to me"
match = { "args.to" = "me" }
when = "args.quantity | asset_amount >= 1000"

[[rules]]
name = "every ping"
type = "ping"
""",
    )
    # A candidate is wanted even when its when would fail: process judges it in full.
    assert engine.wants(transfer("me"))
    assert engine.stats.events == 0  # counted by process, not here
    # No rule can fire on it: counted as evaluated, and not wanted.
    assert not engine.wants(transfer("nobody"))
    assert engine.stats.events == 1
    assert engine.process(transfer("nobody")) == []  # what the daemon saves by asking
    # A rule without match takes every event of its type.
    assert engine.wants(Event(id="p", source="eos", provider="eospark", type="ping", data={}))
    # A removal may retract what any rule fired: always wanted.
    removal = transfer("nobody")
    assert engine.wants(dataclasses.replace(removal, removed=True))
    assert engine.stats.events == 2  # the one not wanted, and the one processed

    # An event the index fails on goes on to process, which logs and counts it as a whole.
    class Unhashable(str):
        def __hash__(self) -> int:
            raise RuntimeError("a plugin's odd value")

    odd = transfer("nobody")
    odd.data["args"]["to"] = Unhashable("me")
    assert engine.wants(odd)
    with pytest.raises(RuntimeError):
        engine.process(odd)


def test_match_lists_paths_and_when(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
[[rules]]
name = "big to us"
type = "action"
match = { "args.to" = ["me", "you"], action = "transfer" }
when = "args.quantity | asset_amount >= 100"
title = "{{ args.quantity }} from {{ args.from }}"
""",
    )
    assert [a.alert.title for a in engine.process(transfer("me"))] == ["150.0000 EOS from alice"]
    assert [a.alert.title for a in engine.process(transfer("you", id="2"))] == [
        "150.0000 EOS from alice"
    ]
    assert engine.process(transfer("them")) == []
    assert engine.process(transfer("me", qty="99.0000 EOS")) == []


def test_rules_without_match_are_found_by_source_and_type(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
[[rules]]
name = "down"
type = ["source.down", "source.stale"]
title = "{{ source }} {{ event.type }}"
""",
    )
    down = Event(
        id="d1",
        source="eos",
        provider="eospark",
        type="source.down",
        data={"source": "eos", "reason": "x"},
    )
    assert [a.alert.title for a in engine.process(down)] == ["eos source.down"]
    assert engine.process(transfer("me")) == []


def test_throttle_per_group_key(tmp_path: Path) -> None:
    now = [1000.0]
    engine = engine_for(
        tmp_path,
        """
[[rules]]
name = "t"
match = { action = "transfer" }
throttle = "1m"
group_by = ["args.from"]
""",
        clock=lambda: now[0],
    )
    assert len(engine.process(transfer("me", id="1", frm="alice"))) == 1
    assert len(engine.process(transfer("me", id="2", frm="bob"))) == 1
    assert engine.process(transfer("me", id="3", frm="alice")) == []
    now[0] += 61
    assert len(engine.process(transfer("me", id="4", frm="alice"))) == 1
    assert engine.stats.throttled == 1


def test_same_event_id_fires_once(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '[[rules]]\nname = "a"\nmatch = { action = "transfer" }\n')
    first = engine.process(transfer("me", id="same"))
    assert len(first) == 1
    assert engine.process(transfer("me", id="same")) == []
    assert engine.stats.duplicates == 1


def test_alert_ids_are_stable_and_distinct(tmp_path: Path) -> None:
    rules = '[[rules]]\nname = "a"\nmatch = { action = "transfer" }\n[[rules]]\nname = "b"\nmatch = { action = "transfer" }\n'
    one = engine_for(tmp_path, rules).process(transfer("me", id="x"))
    two = engine_for(tmp_path, rules).process(transfer("me", id="x"))
    assert [a.alert.id for a in one] == [a.alert.id for a in two]
    assert len({a.alert.id for a in one}) == 2


def test_default_title_and_body(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '[[rules]]\nname = "plain"\nmatch = { action = "transfer" }\n')
    (alert,) = engine.process(transfer("me"))
    assert alert.alert.title == "plain"
    assert alert.alert.body.startswith("action from eos: ")
    assert alert.alert.payload()["event"]["data"]["args"]["to"] == "me"


@pytest.mark.parametrize(
    "key, text",
    [
        ("when", "args.__class__"),
        ("when", "args|attr('__class__')"),
        ("when", "''.format_map(args)"),
        ("title", "{{ args.__class__.__mro__ }}"),
        ("title", "{{ args['__class__'] }}"),
        ("title", "{{ (args|attr('items'))() }}"),
        ("body", "{{ ''.__class__.__base__.__subclasses__() }}"),
        ("body", "{{ '{0.__class__}'.format_map(args) }}"),
        ("body", "{{ '{0.__class__}'.format(args) }}"),
        ("when", "'{0[_x]}'.format(args)"),
        ("title", "{{ [event]|map(attribute='__class__')|list }}"),
        ("title", "{{ [args]|selectattr('__class__')|list }}"),
        ("title", "{{ [args]|rejectattr('x.__class__')|list }}"),
        ("title", "{{ [args]|sort(attribute='__class__.__name__') }}"),
        ("body", "{{ [args]|groupby('__class__') }}"),
        ("body", "{{ [args]|sum(attribute='_x') }}"),
    ],
)
def test_template_escapes_are_refused_at_load(tmp_path: Path, key: str, text: str) -> None:
    rule = f'[[rules]]\nname = "evil"\n{key} = """{text}"""\n'
    with pytest.raises(ConfigError) as err:
        engine_for(tmp_path, rule)
    assert f'rules[0] "evil": {key}' in str(err.value)


def test_computed_escapes_are_stopped_by_the_sandbox(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
[[rules]]
name = "sneaky"
match = { action = "transfer" }
title = "{{ args[('__cla' ~ 'ss')][('__na' ~ 'me')] }}"
body = "{{ ('{0.__cla' ~ 'ss__}').format(args) }}"
""",
    )
    (alert,) = engine.process(transfer("me"))
    # Nothing of Python's internals comes out: the sandbox renders the escapes as empty,
    # so the rule's defaults (its name, the event summary) stand in.
    assert alert.alert.title == "sneaky"
    assert alert.alert.body.startswith("action from eos: ")
    assert "dict" not in alert.alert.body and "<class" not in alert.alert.body


def test_filters_reading_plain_attributes_still_load(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
[[rules]]
name = "lists"
match = { action = "transfer" }
title = "{{ [args]|map(attribute='to')|join }} {{ [args]|selectattr('memo')|list|length }}"
body = "{{ '{0} to {1}'.format(args['from'], args.to) }} {{ 'a_b'|replace('_', ' ') }}"
""",
    )
    (alert,) = engine.process(transfer("me"))
    assert alert.alert.title == "me 1"
    assert alert.alert.body == "alice to me a b"


@pytest.mark.parametrize(
    "when",
    [
        "(7 ** (x * 1000000 + 2)) == 49",
        "('ab' * (x * 10000000 + 2)) == 'abab'",
        "((x * 10000000 + 2) * [1]) == [1, 1]",
        # A width or precision the event chooses (an audit made 300 MB strings of each).
        "('%.*f' % (x * 60000000 + 2, 1.5)) == '1.50'",
        "('%0*d' % (x * 60000000 + 2, 7)) == '07'",
        "('{:.{}f}'.format(1.5, x * 60000000 + 2)) == '1.50'",
        "('{:>{}}'.format('a', x * 60000000 + 2)) == ' a'",
        "('a' | center(x * 60000000 + 2)) == 'a '",
        "('a'.ljust(x * 60000000 + 2)) == 'a '",
        "('%0*d' | format(x * 60000000 + 2, 7)) == '07'",
        "(('a' * 10000) | replace('a', 'b' * (x * 19999 + 1))) == 'b' * 10000",
        "(('a' * 10000).replace('a', 'b' * (x * 19999 + 1))) == 'b' * 10000",
        # A %(key) may hold parentheses: the width after it is checked all the same.
        "(('%(a(b)c)0' ~ (x * 60000000 + 2) ~ 'd') % {'a(b)c': 7}) == '07'",
        # One string repeated in a list, then joined: 2 GB in one C call, before.
        "(([('x' * 100000)] * (x * 4000 + 1)) | join | length) == 100000",
        "(('-'.join([('x' * 100000)] * (x * 4000 + 1))) | length) == 100000",
        # Many operations each within bounds: the characters of one evaluation add up.
        "(range(x * 4000 + 1) | map('center', 100000) | list | length) == 1",
        # Time: items drawn from range, in all (10 ** 10 here, before).
        "([range(100000)] * (x * 19999 + 1)) | map('sum') | sum == 4999950000",
    ],
)
def test_event_values_cannot_blow_up_an_expression(tmp_path: Path, when: str) -> None:
    engine = engine_for(tmp_path, f'[[rules]]\nname = "big"\nwhen = "{when}"\n')
    small = Event(id="s", source="s", provider="p", type="t", data={"x": 0})
    assert len(engine.process(small)) == 1  # the operators still work within bounds
    huge = Event(id="h", source="s", provider="p", type="t", data={"x": 5})
    assert engine.process(huge) == []
    assert engine.stats.when_errors == 1


def test_a_bounded_range_still_slices_and_reverses(tmp_path: Path) -> None:
    # range is tocsin's own (its items drawn from a budget); a slice of it raised
    # TypeError, as the slice was built through range() with no argument.
    engine = engine_for(
        tmp_path,
        '[[rules]]\nname = "r"\n'
        'when = "(range(10)[2:5] | list) == [2, 3, 4] and (range(3) | reverse | list) == [2, 1, 0]"\n',
    )
    assert len(engine.process(transfer("me"))) == 1
    assert engine.stats.when_errors == 0


def test_a_template_that_runs_too_long_is_cut_off_and_counted(tmp_path: Path) -> None:
    # Loops over the event's own list: no range to count, so the clock stops it.
    rules = (
        '[[rules]]\nname = "slow"\n'
        'title = "{% for a in n %}{% for b in n %}{% for c in n %}{% endfor %}{% endfor %}'
        '{% endfor %}done"\n'
        '[[rules]]\nname = "long"\ntitle = "{% for a in n %}{{ \'%0999d\' % a }}{% endfor %}"\n'
    )
    engine = engine_for(tmp_path, rules)
    event = Event(id="e", source="s", provider="p", type="t", data={"n": list(range(3000))})
    slow, long = engine.process(event)
    assert slow.alert.title == "(title could not be rendered: Overrun)"
    assert long.alert.title == "(title could not be rendered: Overrun)"  # 3 MB of output
    assert engine.stats.template_errors == 2
    event = Event(id="f", source="s", provider="p", type="t", data={"n": [1, 2]})
    assert [p.alert.title for p in engine.process(event)] == ["done", f"{1:0999d}{2:0999d}"]


def test_a_constant_bomb_is_not_folded_when_the_config_loads(tmp_path: Path) -> None:
    # Jinja folds constant expressions as it compiles: an audit saw tocsin check take
    # 15 s on this title. Bounded operators are not folded, and fail as the event's do.
    engine = engine_for(tmp_path, '[[rules]]\nname = "c"\ntitle = "{{ \'%0999999999d\' % 1 }}"\n')
    (alert,) = engine.process(transfer("me"))
    assert alert.alert.title == "(title could not be rendered: SecurityError)"


def test_when_error_does_not_fire_and_is_counted(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '[[rules]]\nname = "w"\nwhen = "args.quantity > 5"\n')
    assert engine.process(transfer("me")) == []  # str > int raises inside the sandbox
    assert engine.stats.when_errors == 1


# -- property: the index finds exactly the rules a full scan finds; may_fire and filter agree

values = st.sampled_from(["a", "b", "c", 1, 2, True])
paths = st.sampled_from(["x", "y", "n.z"])
rule_match = st.dictionaries(
    paths, st.one_of(values, st.lists(values, min_size=1, max_size=3)), max_size=3
)
event_data = st.fixed_dictionaries(
    {
        "x": values,
        "y": st.one_of(values, st.lists(values)),
        # Not always a dict: may_fire subscripts first and must fall back as get_path.
        "n": st.one_of(st.fixed_dictionaries({"z": values}), values, st.lists(values)),
    }
)


@settings(max_examples=150, deadline=None)
@given(
    matches=st.lists(rule_match, min_size=1, max_size=12),
    sources=st.lists(st.sampled_from([None, "s1", "s2"]), min_size=12, max_size=12),
    data=st.lists(event_data, min_size=1, max_size=5),
)
def test_index_equals_brute_force(
    matches: list[dict[str, Any]], sources: list[str | None], data: list[dict[str, Any]]
) -> None:
    from tocsin.events import split_path
    from tocsin.rulekind import RuleConfig

    rules = []
    for i, match in enumerate(matches):
        cfg = RuleConfig(name=f"r{i}", match=match, source=sources[i])
        rules.append(
            Rule(
                config=cfg,
                kind=None,  # type: ignore[arg-type]
                position=i,
                actions=(),
                sources=frozenset([sources[i]]) if sources[i] else None,
                types=None,
                match=tuple(
                    (split_path(k), frozenset(v if isinstance(v, list) else [v]))
                    for k, v in sorted(match.items())
                ),
                group_by=(),
            )
        )
    index = RuleIndex(rules)
    wanted = pickle.loads(pickle.dumps(index.filter()))  # noqa: S301  # as a child gets it
    for item in data:
        for source in ("s1", "s2"):
            event = Event(id="e", source=source, provider="p", type="t", data=item)
            found = [r.name for r in index.candidates(event) if r.selects(event)]
            brute = [r.name for r in rules if r.selects(event)]
            assert found == brute
            may_fire = index.may_fire(event.source, event.type, event.data)
            assert may_fire == bool(index.candidates(event))
            assert wanted.may_fire(event.source, event.type, event.data) == may_fire


def test_match_tells_true_and_false_from_one_and_zero(tmp_path: Path) -> None:
    rules = "".join(
        f'[[rules]]\nname = "{name}"\nmatch = {{ x = {value} }}\n'
        for name, value in [
            ("true", "true"),
            ("false", "false"),
            ("one", "1"),
            ("zero", "0.0"),
            ("any", "[true, 0]"),
        ]
    )
    engine = engine_for(tmp_path, rules)

    def fired(value: Any, n: int) -> list[str]:
        event = Event(id=f"e{n}", source="s", provider="p", type="t", data={"x": value})
        return [a.alert.rule for a in engine.process(event)]

    assert fired(True, 1) == ["true", "any"]
    assert fired(False, 2) == ["false"]
    assert fired(1, 3) == ["one"]
    assert fired(1.0, 4) == ["one"]
    assert fired(0, 5) == ["zero", "any"]
    assert fired("true", 6) == []
    # tocsin explain's view of the same keys.
    rule = engine.rules["any"]
    assert [(w, ok) for _, w, _, ok in rule.match_results({"x": False})] == [("0 or true", False)]
    assert [ok for *_, ok in rule.match_results({"x": True})] == [True]


def test_templates_see_data_fields_before_the_alerts_own_names(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
[[rules]]
name = "failed"
when = "status == 'failed'"
title = "{{ id }} is {{ status }} ({{ alert.status }} by {{ alert.rule }})"
body = "{{ rule }} {{ alert.id }}"
""",
    )
    event = Event(
        id="c1", source="w", provider="ewallet", type="t", data={"id": "txc_1", "status": "failed"}
    )
    (pending,) = engine.process(event)
    assert pending.alert.title == "txc_1 is failed (firing by failed)"
    assert pending.alert.body == f"failed {pending.alert.id}"
    plain = Event(
        id="c2", source="w", provider="p", type="t", data={"status": "failed", "rule": "r9"}
    )
    (pending,) = engine.process(plain)
    assert pending.alert.body == f"r9 {pending.alert.id}"


def test_the_throttle_table_is_bounded_forgetting_the_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tocsin.rules

    monkeypatch.setattr(tocsin.rules, "_RECENT_ALERTS", 100)
    now = [1000.0]
    engine = engine_for(
        tmp_path,
        '[[rules]]\nname = "t"\nmatch = { action = "transfer" }\nthrottle = "1h"\ngroup_by = ["args.from"]\n',
        clock=lambda: now[0],
    )
    for i in range(250):  # 250 groups, each throttled for an hour
        now[0] += 1
        assert len(engine.process(transfer("me", id=f"e{i}", frm=f"sender{i}"))) == 1
        assert len(engine._throttle) <= 100
    assert "more than 100 groups are throttled at once" in caplog.text
    # The newest groups are still throttled; the oldest were forgotten and may alert again.
    assert engine.process(transfer("me", id="again-new", frm="sender249")) == []
    assert len(engine.process(transfer("me", id="again-old", frm="sender0"))) == 1


@pytest.mark.parametrize(
    "when",
    [
        "(([('x' * 100000)] * (x * 4000 + 1)) | join | length) == 100000",
        "(range(x * 4000 + 1) | map('center', 100000) | join | length) == 100000",
    ],
)
def test_a_bounded_evaluation_stays_small_in_memory_too(tmp_path: Path, when: str) -> None:
    # The clock cuts a long evaluation, but only between Python steps: one C call (a
    # join) could first make gigabytes. The peak RSS may not grow by hundreds of MB.
    import resource

    engine = engine_for(tmp_path, f'[[rules]]\nname = "big"\nwhen = "{when}"\n')
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    huge = Event(id="h", source="s", provider="p", type="t", data={"x": 5})
    assert engine.process(huge) == []
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak RSS grew by {grown_mb:.0f} MB"
