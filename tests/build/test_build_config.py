"""``softcache build --config build.yaml``: a build as a file to commit and share. Keys are the option names (with - or
_); options given on the command line override the file; an unknown key is an error naming the file and the key."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from softcache.cli.main import main

import softcache.build


@pytest.fixture
def calls(monkeypatch):
    """(teacher, data, out, options) the CLI hands to softcache.build.build (nothing is built)."""
    seen = []

    def fake(teacher, data, out, **options):
        seen.append((teacher, data, out, options))
        raise RuntimeError("stop here")

    monkeypatch.setattr(softcache.build, "build", fake)
    return seen


CONFIG = """\
teacher: my-teacher
data: corpus.jsonl
out: my-cache
k: 16
max-length: 512
shard_tokens: 4096
temperatures: [1, 2]
chat-template: true
mask: assistant
"""


def test_config_file_gives_the_options(calls, tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text(CONFIG)
    CliRunner().invoke(main, ["build", "--config", str(path)])
    teacher, data, out, options = calls[0]
    assert (teacher, data, out) == ("my-teacher", "corpus.jsonl", "my-cache")
    assert options["k"] == 16 and options["max_length"] == 512 and options["shard_tokens"] == 4096
    assert options["temperatures"] == [1.0, 2.0] and options["chat_template"] is True and options["mask"] == "assistant"
    assert options["batch_tokens"] == 16384  # not in the file: the option's default


def test_command_line_overrides_the_config(calls, tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text(CONFIG.replace("temperatures: [1, 2]", "temperatures: '1,4'"))
    CliRunner().invoke(main, ["build", "--config", str(path), "--k", "32", "--out", "other", "--temperatures", "3"])
    _, _, out, options = calls[0]
    assert out == "other" and options["k"] == 32 and options["temperatures"] == [3.0]
    assert options["max_length"] == 512


@pytest.mark.parametrize("text, match", [
    ("teacher: t\nmax-lenght: 512\n", r"build.yaml: unknown key 'max-lenght'.*max-length"),
    ("- k\n- 16\n", r"build.yaml: expected a mapping of option names to values"),
    ("k: [1, 2]\n", r"build.yaml: k:"),
    ("config: other.yaml\n", r"build.yaml: unknown key 'config'"),
])  # fmt: skip
def test_bad_config_names_the_file_and_key(calls, tmp_path, text, match):
    path = tmp_path / "build.yaml"
    path.write_text(text)
    out = CliRunner().invoke(main, ["build", "--config", str(path)])
    assert out.exit_code == 2, out.output
    assert re.search(match, " ".join(out.output.split())), out.output
    assert not calls
