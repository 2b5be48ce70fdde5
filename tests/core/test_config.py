from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus
from pydantic import model_validator

from support import make_registry, write_config
from tocsin import Secret, Source, SourceConfig, hookimpl
from tocsin.config import load_config, load_daemon_config
from tocsin.errors import ConfigError
from tocsin.fields import SecretValue, format_duration, parse_duration

GOOD = """
[daemon]
state_dir = "state"
include = ["rules.d/*.toml"]

[sources.eos]
plugin = "testpush"
url = "ws://127.0.0.1:1/feed"
token = { env = "PUSH_TOKEN" }
stale_after = "45s"

[actions.hook]
plugin = "webhook"
url = "http://127.0.0.1:1/hook"
secret = { file = "hook.secret" }

[[rules]]
name = "incoming transfer"
source = "eos"
type = "transfer"
match = { "args.to" = "me" }
actions = ["hook"]
"""

BAD = """
[daemon]
state_dir = "state"
include = ["rules.d/*.toml"]
bogus = 1

[sources.eos]
plugin = "testpush"
url = "ws://127.0.0.1:1/feed"
token = { env = "MISSING_TOKEN_VAR" }
stale_after = "soon"

[sources.other]
plugin = "testpsuh"

[actions.hook]
plugin = "webhook"
url = "http://127.0.0.1:1/hook"
secret = "hunter2-very-secret"
timout = "5s"

[[rules]]
name = "incoming transfer"
source = "eso"
match = { "args.to" = "me" }
actoins = ["hook"]

[[rules]]
name = "incoming transfer"
throttle = "0s"
title = "{{ oops"
actions = ["hoook"]
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("PUSH_TOKEN", "tok-123456")
    return dict(os.environ)


def test_good_config_loads_with_secrets_and_includes(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hook.secret").write_text("s3cret-from-file\n")
    (tmp_path / "rules.d").mkdir()
    (tmp_path / "rules.d" / "more.toml").write_text('[[rules]]\nname = "more"\nmatch = { x = 1 }\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relative secret file is the config's
    config = load_config(write_config(tmp_path / "tocsin.toml", GOOD), make_registry(), env)
    assert [r.config.name for r in config.rules] == ["incoming transfer", "more"]
    assert config.rules[1].file.endswith("more.toml")
    source = config.sources["eos"]
    assert source.stale_after == 45.0
    token = source.token  # type: ignore[attr-defined]
    assert isinstance(token, SecretValue) and token.get() == "tok-123456"
    assert str(token) == repr(token) == f"{token}" == "***"
    assert "tok-123456" not in repr(source)
    secret = config.actions["hook"].secret  # type: ignore[attr-defined]
    assert secret.get() == "s3cret-from-file"
    assert config.daemon.resolved_state_dir() == tmp_path / "state"


def test_credential_secret(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "hook").write_text("from-systemd")
    text = GOOD.replace('{ file = "hook.secret" }', '{ credential = "hook" }').replace(
        'include = ["rules.d/*.toml"]', ""
    )
    config = load_config(
        write_config(tmp_path / "t.toml", text),
        make_registry(),
        {**env, "CREDENTIALS_DIRECTORY": str(tmp_path / "creds")},
    )
    assert config.actions["hook"].secret.get() == "from-systemd"  # type: ignore[attr-defined]


def test_a_secret_that_cannot_be_read_is_one_problem(tmp_path: Path, env: dict[str, str]) -> None:
    # The unread secret's value is "": what validation says of it would only repeat it.
    text = (
        GOOD.replace('url = "ws://127.0.0.1:1/feed"', 'url = { env = "NO_FEED_URL" }')
        .replace('include = ["rules.d/*.toml"]', "")
        .replace('{ file = "hook.secret" }', '{ env = "NO_HOOK_SECRET" }')
        .replace(
            "[[rules]]",
            '[actions.phone]\nplugin = "apprise"\n'
            'urls = ["json://127.0.0.1:1/", { env = "NO_PHONE_URL" }, "nosuch://x"]\n\n[[rules]]',
        )
    )
    path = write_config(tmp_path / "t.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry(), env)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}: sources.eos.url: environment variable NO_FEED_URL is not set",
        f"{path}: actions.hook.secret: environment variable NO_HOOK_SECRET is not set",
        f"{path}: actions.phone.urls[1]: environment variable NO_PHONE_URL is not set",
        f"{path}: actions.phone.urls[2]: not a URL Apprise understands",
    ]


@pytest.mark.parametrize(
    ("secret", "make", "message"),
    [
        ('{ file = "/dev/zero" }', None, "cannot read secret file '/dev/zero': not a regular file"),
        ('{ file = "fifo" }', "fifo", "cannot read secret file '{dir}/fifo': not a regular file"),
        ('{ file = "empty" }', "empty", "secret file '{dir}/empty' is empty"),
        ('{ file = "big" }', "big", "cannot read secret file '{dir}/big': larger than 64 KiB"),
        ('{ env = "EMPTY_SECRET" }', None, "environment variable EMPTY_SECRET is empty"),
    ],
)
def test_a_secret_must_be_a_small_regular_file_or_a_set_variable_and_not_empty(
    tmp_path: Path, env: dict[str, str], secret: str, make: str | None, message: str
) -> None:
    # /dev/zero made tocsin check grow to 1.35 GB and die with a traceback, a FIFO hung
    # it, and an empty secret signed webhooks with an empty HMAC key (config audit).
    if make == "fifo":
        os.mkfifo(tmp_path / "fifo")
    elif make == "empty":
        (tmp_path / "empty").write_text("\n")
    elif make == "big":
        (tmp_path / "big").write_text("x" * 70_000)
    text = GOOD.replace('{ file = "hook.secret" }', secret).replace(
        'include = ["rules.d/*.toml"]', ""
    )
    path = write_config(tmp_path / "t.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry(), {**env, "EMPTY_SECRET": ""})
    expected = f"{path}: actions.hook.secret: " + message.replace("{dir}", str(tmp_path))
    assert [str(p) for p in caught.value.problems] == [expected]


def test_a_config_must_be_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(Path("/dev/zero"), make_registry())
    assert [str(p) for p in caught.value.problems] == ["/dev/zero: cannot read: not a regular file"]


def test_a_match_may_test_fields_named_like_secret_references(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # match = { env = "prod" } was read as the secret in $prod (and { file = ... } read
    # that file): there was no way to write such a rule.
    path = write_config(
        tmp_path / "t.toml",
        '[[rules]]\nname = "prod"\nmatch = { env = "prod" }\n'
        '[[rules]]\nname = "file"\nmatch = { file = "/etc/hostname" }\n',
    )
    config = load_config(path, make_registry(), env)
    assert [r.config.match for r in config.rules] == [{"env": "prod"}, {"file": "/etc/hostname"}]


def test_every_problem_is_listed_with_file_and_path(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "rules.d").mkdir()
    (tmp_path / "rules.d" / "x.toml").write_text(
        '[[rules]]\nname = "x"\nkind = "treshold"\n[sources.no]\nplugin = "a"\n'
    )
    path = write_config(tmp_path / "tocsin.toml", BAD)
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry(), env)
    lines = [str(p) for p in caught.value.problems]
    main, inc = str(path), str(tmp_path / "rules.d" / "x.toml")
    expected = [
        f'{main}: daemon: unknown key "bogus"',
        f"{main}: sources.eos.token: environment variable MISSING_TOKEN_VAR is not set",
        f"{main}: sources.eos.stale_after: 'soon' is not a duration",
        f'{main}: sources.other.plugin: unknown source plugin "testpsuh" (did you mean "testpush"?)',
        f'{main}: actions.hook: unknown key "timout" (did you mean "timeout"?)',
        f'{main}: rules[0] "incoming transfer": unknown key "actoins" (did you mean "actions"?)',
        f'{main}: rules[0] "incoming transfer": source: unknown source "eso" (did you mean "eos"?)',
        f'{main}: rules[1] "incoming transfer": duplicate rule name',
        f'{main}: rules[1] "incoming transfer": throttle: throttle must be longer than 0s',
        f'{main}: rules[1] "incoming transfer": title: invalid template',
        f'{main}: rules[1] "incoming transfer": actions: unknown action "hoook" (did you mean "hook"?)',
        f'{inc}: rules[0] "x": kind: unknown rule kind "treshold"',
        f'{inc}: only [[rules]] may appear in an included file, not "sources"',
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), f"missing: {want}\ngot:\n" + "\n".join(
            lines
        )
    assert len(lines) == len(expected), "\n".join(lines)
    assert "hunter2" not in str(caught.value)


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path / "t.toml", "[daemon\nx = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry())
    assert "invalid TOML" in str(caught.value) and "line 1" in str(caught.value)


def test_unknown_top_level_table(tmp_path: Path) -> None:
    path = write_config(tmp_path / "t.toml", "[rule]\nname = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry())
    assert 'unknown table or key "rule" (did you mean "rules"?)' in str(caught.value)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:9187", "127.3.2.1:1", "localhost:9187", "LocalHost:80", "::1:9187", "[::1]:9187"],
)
def test_http_on_loopback_is_accepted(tmp_path: Path, address: str) -> None:
    path = write_config(tmp_path / "t.toml", f'[daemon]\nhttp = "{address}"\n')
    host, _, port = address.rpartition(":")
    config = load_config(path, make_registry())
    assert config.daemon.http_address() == (host.strip("[]"), int(port))


def http_problem(tmp_path: Path, address: str) -> str:
    """The one problem of ``[daemon] http = address``, at ``daemon.http``: its message."""
    path = write_config(tmp_path / "t.toml", f'[daemon]\nhttp = "{address}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry())
    [problem] = caught.value.problems
    assert problem.path == "daemon.http"
    return problem.message


@pytest.mark.parametrize("address", ["127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:\u00b2", "9187"])
def test_http_needs_a_port(tmp_path: Path, address: str) -> None:
    assert 'expected "HOST:PORT"' in http_problem(tmp_path, address)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "[::]", "example.com", "10.0.0.1"])
def test_http_elsewhere_is_refused_unless_allowed(tmp_path: Path, host: str) -> None:
    message = http_problem(tmp_path, f"{host}:9187")
    bare = host.strip("[]")
    assert f'"{bare}" is not a loopback address' in message
    assert "http_allow_remote = true" in message
    allowed = write_config(
        tmp_path / "t.toml", f'[daemon]\nhttp = "{host}:9187"\nhttp_allow_remote = true\n'
    )
    assert load_config(allowed, make_registry()).daemon.http_address() == (bare, 9187)


def test_check_command_refuses_remote_http(tmp_path: Path) -> None:
    path = write_config(tmp_path / "t.toml", '[daemon]\nhttp = "0.0.0.0:9187"\n')
    run = subprocess.run(
        [sys.executable, "-m", "tocsin.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f'{path}: daemon.http: "0.0.0.0" is not a loopback address' in run.stderr


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("7d", 604800),
        ("1h30m", 5400),
        (12, 12),
        (1.5, 1.5),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["", "5", "5x", "m5", "-1s", -3, True, "1h 3", float("nan"), float("inf")]
)
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative|finite"):
        parse_duration(bad)


def test_format_duration_round_trips() -> None:
    for seconds in (0.25, 1, 59, 61, 3600, 86400 + 61):
        assert parse_duration(format_duration(seconds)) == seconds


def test_check_command_lists_all_and_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path / "tocsin.toml", BAD.replace('include = ["rules.d/*.toml"]', ""))
    env = {**os.environ, "TOCSIN_LOAD_PLUGINS": "builtin"}
    env.pop("MISSING_TOKEN_VAR", None)
    run = subprocess.run(
        [sys.executable, "-m", "tocsin.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "hunter2" not in run.stderr + run.stdout
    # The test source plugin is not installed for the CLI, so its source is unknown too.
    assert 'actions.hook: unknown key "timout" (did you mean "timeout"?)' in run.stderr
    assert (
        'rules[1] "incoming transfer": actions: unknown action "hoook" (did you mean "hook"?)'
        in run.stderr
    )
    assert run.stderr.strip().splitlines()[-1].endswith("problems; nothing was started")


def test_check_command_ok(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "t.toml",
        '[actions.console]\nplugin = "log"\n[[rules]]\nname = "a"\nmatch = { x = 1 }\n[[rules]]\nname = "b"\nenabled = false\n',
    )
    run = subprocess.run(
        [sys.executable, "-m", "tocsin.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "ok: 0 source(s), 1 action(s), 1 rule(s) (1 disabled)" in run.stdout


def test_values_of_the_wrong_shape_are_problems_not_crashes(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "t.toml",
        """
[sources.eos]
plugin = ["x"]
[actions.console]
plugin = "log"
[[rules]]
name = "listed kind"
kind = []
[[rules]]
name = "misspelt"
kind = "threshhold"
source = "eso"
actions = ["nope"]
when = "x ==="
""",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, make_registry())
    text = str(err.value)
    assert 'rules[0] "listed kind": kind: expected the name of a rule kind' in text
    # An unknown kind hides none of the rule's other problems.
    assert 'rules[1] "misspelt": kind: unknown rule kind "threshhold"' in text
    assert 'rules[1] "misspelt": source: unknown source "eso"' in text
    assert 'rules[1] "misspelt": actions: unknown action "nope"' in text
    assert 'rules[1] "misspelt": when: invalid expression' in text
    assert "sources.eos" in text


def test_a_secret_never_shows_in_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S_DUR", "SECRET-DURATION-3")
    monkeypatch.setenv("S_PLUGIN", "SECRET-PLUGIN-7")
    monkeypatch.setenv("S_SOURCE", "SECRET-SOURCE-8")
    path = write_config(
        tmp_path / "t.toml",
        """
[actions.p]
plugin = { env = "S_PLUGIN" }
[[rules]]
name = "r"
throttle = { env = "S_DUR" }
source = { env = "S_SOURCE" }
""",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, make_registry())
    text = "\n".join(str(p) for p in err.value.problems)
    assert "rules[0] \"r\": throttle: '***' is not a duration" in text
    assert 'actions.p.plugin: unknown action plugin "***"' in text
    assert 'rules[0] "r": source: unknown source "***"' in text
    assert "SECRET" not in text + str(err.value)


def test_the_outbox_reads_the_daemon_table_alone(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "t.toml",
        """
[daemon]
state_dir = "state"
fsync = true
[actions.hook]
plugin = "webhook"
url = "http://127.0.0.1:1/"
secret = { credential = "hmac" }
[[rules]]
name = "broken"
kind = "nope"
""",
    )
    environ = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    with pytest.raises(ConfigError):
        load_config(path, make_registry(), environ)
    daemon = load_daemon_config(path, make_registry(), environ)
    assert daemon.resolved_state_dir() == tmp_path / "state" and daemon.fsync
    bad = write_config(
        tmp_path / "bad.toml", '[daemon]\nstate_dir = 3\n[sources.x]\nplugin = "?"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_daemon_config(bad, make_registry(), environ)
    assert [p.path for p in err.value.problems] == ["daemon.state_dir"]


def test_an_include_pattern_that_matches_the_config_itself_leaves_it_out(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # include = ["*.toml"] beside the config read it again: "only [[rules]] may appear in
    # an included file" and each rule a duplicate of itself (config audit).
    (tmp_path / "more.toml").write_text('[[rules]]\nname = "more"\n')
    path = write_config(
        tmp_path / "main.toml",
        '[daemon]\ninclude = ["*.toml"]\n[[rules]]\nname = "main"\n',
    )
    config = load_config(path, make_registry(), env)
    assert [r.config.name for r in config.rules] == ["main", "more"]


def test_a_credential_name_stays_in_the_credentials_directory(
    tmp_path: Path, env: dict[str, str]
) -> None:
    path = write_config(
        tmp_path / "t.toml",
        '[actions.hook]\nplugin = "webhook"\nurl = "http://127.0.0.1:1/"\n'
        'secret = { credential = "../outside" }\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry(), {**env, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert [str(p) for p in caught.value.problems] == [
        f"{path}: actions.hook.secret: credential '../outside': a credential's name has no '/'"
    ]


class FussyConfig(SourceConfig):
    key: Secret
    level: int = 0

    @model_validator(mode="after")
    def _level(self) -> FussyConfig:
        if self.level == 4:  # a plugin's bug: not a ValueError, and quoting its secret
            raise TypeError(f"unsupported key {self.key.get()}\nat level 4")
        if self.level == 5:  # the secret where the message is cut
            raise TypeError("x" * 290 + f" {self.key.get()}")
        return self


class FussySource(Source):
    name = "fussy"
    Config = FussyConfig

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError


class FussyPlugin:
    @staticmethod
    @hookimpl
    def register_sources(register: Callable[[type[Source]], None]) -> None:
        register(FussySource)


def test_a_plugin_validator_raising_anything_is_a_problem_without_its_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, a TypeError from a plugin's validator escaped: tocsin check printed a
    # traceback ending in the secret, and exited 1 (the plugin audit).
    monkeypatch.setenv("FUSSY_KEY", "SECRET-FUSSY-1")
    text = '[sources.f]\nplugin = "fussy"\nkey = { env = "FUSSY_KEY" }\nlevel = 4\n'
    path = write_config(tmp_path / "t.toml", text + '[actions.a]\nplugin = "nope"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, make_registry(FussyPlugin()))
    problems = [str(p) for p in err.value.problems]
    assert problems == [
        f"{path}: sources.f: FussyConfig failed: TypeError: unsupported key *** at level 4",
        f'{path}: actions.a.plugin: unknown action plugin "nope" (installed: apprise, log, webhook)',
    ]  # every problem is still listed
    assert "SECRET" not in str(err.value)
    # A secret of several lines (a PEM key from a file), and one the 300-character cut
    # would split: masked before the message is made one line and cut (review of c65ed1b).
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN KEY-----\nSECRET-LINE-1\n  SECRET-LINE-2\n-----END KEY-----\n")
    for level in (4, 5):
        text = f'[sources.f]\nplugin = "fussy"\nkey = {{ file = "key.pem" }}\nlevel = {level}\n'
        path = write_config(tmp_path / "t.toml", text)
        with pytest.raises(ConfigError) as err:
            load_config(path, make_registry(FussyPlugin()))
        assert "SECRET" not in str(err.value) and "***" in str(err.value)
