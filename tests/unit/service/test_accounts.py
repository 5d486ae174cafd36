"""The accounts file of a pool: what it takes, every error with file:line and field, keys never shown, and the
plan's split over its accounts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wanbatch.errors import ConfigError, ManifestError, ManifestInvalid
from wanbatch.service.accounts import check_pool_serves, load_accounts, split_plan

EXAMPLE = Path(__file__).resolve().parents[3] / "jobs" / "accounts.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "accounts.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ManifestInvalid) as caught:
        load_accounts(path)
    return [str(error) for error in caught.value.errors]


def test_the_example_file_loads_with_its_quotas():
    """jobs/accounts.example.yaml: three accounts in two regions, team-b's raised flash quota kept."""
    pool = load_accounts(EXAMPLE)
    assert pool.names == ("team-a", "team-b", "intl")
    assert pool.regions() == ["beijing", "singapore"]
    assert pool.accounts[1].quotas == {"wan2.2-t2i-flash": {"submit_rps": 4, "concurrency": 4}}
    assert [spec.name for spec in pool.serving("beijing", "wan2.2-t2i-flash")] == ["team-a", "team-b"]


def test_every_error_is_named_with_its_line_and_field(tmp_path):
    """Unknown fields, a repeated name or variable, an unknown region, quotas for a model the region does not sell
    and a missing field: all at once, each at its file:line and field, saying what was found and what is allowed."""
    path = write(
        tmp_path,
        """\
        accounts:
          - {name: team-a, region: beijing, key_env: KEY_A}
          - name: team-a
            region: mars
            key_env: KEY_B
          - {name: x, region: virginia, key_env: KEY_X, quotas: {wan2.2-t2i-flash: {submit_rps: 4}}, colour: red}
          - {name: w, region: beijing, key_env: KEY_A}
          - {name: v, region: beijing}
        spare: 1
        """,
    )
    found = errors_of(path)
    where = path.as_posix()
    expected = [
        f"{where}:3: accounts[1].name: found the name 'team-a' a second time (first at {where}:2)",
        f"{where}:4: accounts[1].region: found text ('mars'); allowed: one of beijing, singapore, virginia",
        f"{where}:6: accounts[2].colour: found an unknown field 'colour'; allowed: name, region, key_env, quotas",
        f"{where}:6: accounts[2].quotas.wan2.2-t2i-flash: found quotas for wan2.2-t2i-flash, which virginia does not",
        f"{where}:7: accounts[3].key_env: found KEY_A, which account team-a uses already",
        f"{where}:8: accounts[4]: found no key_env; allowed: an account has name, region and key_env",
        f"{where}:9: spare: found an unknown field 'spare'; allowed: accounts",
    ]
    assert len(found) == len(expected), found
    for line, wanted in zip(sorted(found), sorted(expected), strict=True):
        assert line.startswith(wanted), (line, wanted)


def test_a_key_written_in_the_file_is_refused_and_never_shown(tmp_path):
    """A `key:` holding a key, or a key where the variable's name belongs: refused, pointing to key_env, the
    value nowhere in the message."""
    path = write(
        tmp_path,
        """\
        accounts:
          - {name: a, region: beijing, key: sk-0123456789abcdef}
          - {name: b, region: beijing, key_env: sk-fedcba9876543210}
        """,
    )
    with pytest.raises(ManifestInvalid) as caught:
        load_accounts(path)
    message = str(caught.value)
    assert "sk-0123456789abcdef" not in message and "sk-fedcba9876543210" not in message
    assert f"{path.as_posix()}:2: accounts[0].key: found an API key written in the file (not shown)" in message
    assert f"{path.as_posix()}:3: accounts[1].key_env: found something that is not an environment variable" in message


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("", "the file is empty; allowed: a mapping with one key, accounts"),
        ("[1, 2]", "found a list; allowed: a mapping with one key, accounts"),
        ("accounts: []", "accounts: found an empty list"),
        ("accounts:\n  - {name: 'bad name!', region: beijing, key_env: K}", "accounts[0].name: found text"),
        (
            "accounts:\n  - {name: a, region: beijing, key_env: K, quotas: {wan2.2-t2i-flash: {concurrency: 0}}}",
            "found a number (0); allowed: a whole number of tasks at once, at least 1",
        ),
    ],
)
def test_shapes_that_are_not_a_pool_are_refused(tmp_path, text, wanted):
    """An empty file, a list, no accounts, a bad name, a quota below one: each refused with what is allowed."""
    path = write(tmp_path, text)
    with pytest.raises(ManifestError, match=None) as caught:
        load_accounts(path)
    assert wanted in str(caught.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_accounts(tmp_path / "nowhere.yaml")


def test_keys_come_from_the_variables_and_an_unset_one_is_named_not_guessed():
    """resolve() takes each key from its variable; the variables not set are all named with the account's line,
    and no value is ever in the message."""
    pool = load_accounts(EXAMPLE)
    environ = {"DASHSCOPE_KEY_TEAM_A": "sk-aaaa", "DASHSCOPE_KEY_INTL": "sk-iiii"}
    with pytest.raises(ConfigError) as caught:
        pool.resolve(environ)
    message = str(caught.value)
    assert "account team-b: DASHSCOPE_KEY_TEAM_B is not set" in message and f"{EXAMPLE.as_posix()}:6" in message
    assert "sk-aaaa" not in message and "sk-iiii" not in message
    accounts = pool.resolve({**environ, "DASHSCOPE_KEY_TEAM_B": "sk-bbbb"})
    assert [(a.name, a.region, a.key) for a in accounts][1] == ("team-b", "beijing", "sk-bbbb")
    assert "sk-bbbb" not in repr(accounts)


def test_the_plan_is_split_by_each_account_s_throughput_and_a_region_without_account_is_refused():
    """Flash at team-a's catalog quota (2 at a time over 40 s) and team-b's raised one (4): team-b takes two
    thirds; the pool's bound is the items over the sum of their rates. A plan into a region the pool lacks is
    refused before anything is sent."""
    pool = load_accounts(EXAMPLE)
    lane = {"region": "beijing", "model": "wan2.2-t2i-flash", "items": 30, "images": 30, "cost": 4.2}
    plan = {"lanes": [{**lane, "currency": "CNY"}], "quota_time_s": 600.0}
    split = split_plan(plan, pool)
    shares = {row["account"]: row["items"] for row in split["accounts"]}
    assert shares == {"team-a": 10, "team-b": 20}
    assert split["quota_time_s"] == pytest.approx(30 / (2 / 40 + 4 / 40))
    assert "estimate" in split["accounts_note"]
    with pytest.raises(ConfigError, match=r"no account of the pool serves wan2\.6-t2i in virginia"):
        check_pool_serves(pool, {"lanes": [{"region": "virginia", "model": "wan2.6-t2i"}]})
