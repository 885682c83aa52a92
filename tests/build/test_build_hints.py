"""Errors and options of the teacher pass that a new user meets first: a chat dataset without --chat-template is told
about it; --temperatures names itself when it cannot be read and accumulates when given twice."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from softcache.cli.main import main

import softcache.build
from softcache.build import build

CHAT = [{"role": "user", "content": "add two numbers"}, {"role": "assistant", "content": "def add(a, b): ..."}]


def test_chat_data_without_chat_template_suggests_it(teacher, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(3)))
    with pytest.raises(ValueError, match=r"no column 'text'.*'messages'.*--chat-template"):
        build(str(teacher), str(data), str(tmp_path / "a"), quiet=True)
    with pytest.raises(ValueError, match=r"column 'messages' holds list, not text.*--chat-template"):
        build(str(teacher), str(data), str(tmp_path / "b"), field="messages", quiet=True)


@pytest.fixture
def calls(monkeypatch):
    """What the CLI hands to softcache.build.build (nothing is built)."""
    seen = []

    def fake(teacher, data, out, **options):
        seen.append(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(softcache.build, "build", fake)
    return seen


ARGS = ["build", "--teacher", "t", "--data", "d", "--out", "o"]


def test_unreadable_temperatures_name_the_option(calls):
    out = CliRunner().invoke(main, [*ARGS, "--temperatures", "0,abc"])
    assert out.exit_code == 2 and "--temperatures" in out.output and "'abc'" in out.output, out.output
    assert not calls


def test_temperatures_given_twice_accumulate(calls):
    CliRunner().invoke(main, [*ARGS, "--temperatures", "1", "--temperatures", "2,4"])
    assert calls[0]["temperatures"] == [1.0, 2.0, 4.0]
    CliRunner().invoke(main, ARGS)
    assert calls[1]["temperatures"] == [1.0]
