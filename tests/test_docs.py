"""The README and docs/ show only commands that exist: every `raysrec` command parses with today's CLI (its
sub-command and every flag), every `python bench|jobs/...` script exists and knows each flag shown, every `make`
target exists; each sub-command's --help works; and the README's quickstart runs as written, in a fresh working
directory, up to answers from the served model over HTTP."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from raysrec.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code_blocks(text: str) -> list[str]:
    """Lines of the fenced code blocks, backslash continuations joined, comments and prompts dropped."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _inline_spans(text: str) -> list[str]:
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", without_blocks)]


def _commands(page: Path) -> list[tuple[str, bool]]:
    """(command, runnable) for every raysrec / python / make command on the page; ``runnable`` when it sits in a
    fenced block (literal arguments), not in prose or tables (placeholders like DIR, [--flag N])."""
    text = page.read_text()
    found = [(line, True) for line in _code_blocks(text)] + [(span, False) for span in _inline_spans(text)]
    out = []
    for command, runnable in found:
        if " -- " in command:                 # ray job submit ... -- python jobs/pipeline.py ...
            command = command.split(" -- ", 1)[1].strip()
        if re.match(r"(raysrec|python3?|make) \S", command):
            out.append((command, runnable))
    return out


ALL = [(page.relative_to(REPO).as_posix(), command, runnable) for page in PAGES for command, runnable in _commands(page)]


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, action.choices


def test_the_pages_show_commands():
    assert len(ALL) > 40 and {p for p, _, _ in ALL} >= {"README.md", "docs/training.md", "docs/serving.md"}


@pytest.mark.parametrize("page,command,runnable", ALL, ids=[f"{p}:{c[:60]}" for p, c, _ in ALL])
def test_every_documented_command_exists(page, command, runnable):
    words = command.split()
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert words[1] in targets, f"{page}: make target {words[1]!r} does not exist"
        return
    if words[0].startswith("python"):
        script = REPO / words[1]
        assert script.is_file(), f"{page}: {words[1]} does not exist"
        source = script.read_text()
        forwarded = re.search(r'entry\(\["([\w-]+)", \*sys\.argv\[1:\]\]\)', source)
        if not forwarded:
            for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert f'"{flag}"' in source, f"{page}: {words[1]} has no option {flag}"
            return
        # jobs/<stage>.py is `raysrec <stage>` under `ray job submit`: checked as that command
        command = " ".join(["raysrec", forwarded.group(1), *words[2:]])
        words = command.split()
    parser, subs = _subparsers()
    sub = words[1].strip(".,;:")
    if "|" in sub or sub.startswith("<"):        # `raysrec prepare|train|tune|serve`, `raysrec <stage>`
        assert all(s in subs for s in re.split(r"[|<>]", sub) if s and s != "stage"), f"{page}: {command}"
        return
    assert sub in subs, f"{page}: `raysrec {sub}` is not a command"
    if runnable:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit as exc:
            pytest.fail(f"{page}: `{command}` does not parse with today's CLI (exit {exc.code})")
        return
    target, rest = subs[sub], words[2:]
    nested = next((a for a in target._actions if a.__class__.__name__ == "_SubParsersAction"), None)
    if nested is not None and rest and rest[0] in nested.choices:      # `raysrec events ingest ...`
        target, rest = nested.choices[rest[0]], rest[1:]
    known = target._option_string_actions
    for token in rest:
        flag = re.sub(r"[^\w-].*$", "", token.lstrip("[").split("=")[0])
        if re.fullmatch(r"--?[a-zA-Z][\w-]*", flag):
            assert flag in known, f"{page}: `raysrec {sub}` has no option {flag}"


@pytest.mark.parametrize("command", sorted(_subparsers()[1]))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: raysrec" in capsys.readouterr().out


def _quickstart() -> tuple[list[str], list[str]]:
    """The README's quickstart: the raysrec commands, then the curl requests sent while `raysrec serve` runs."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart"):text.index("## Stages")]
    lines = _code_blocks(section)
    return [c for c in lines if c.startswith("raysrec ")], [c for c in lines if c.startswith("curl ")]


def _send(curl: str) -> requests.Response:
    """A `curl -s [-X METHOD] URL [-H 'k: v'] [-d BODY]` line, sent as written."""
    words = shlex.split(curl)[1:]
    headers, body, url, method = {}, None, None, None
    it = iter(words)
    for word in it:
        if word == "-H":
            key, _, value = next(it).partition(":")
            headers[key.strip()] = value.strip()
        elif word == "-d":
            body = next(it)
        elif word == "-X":
            method = next(it)
        elif not word.startswith("-"):
            url = word if "://" in word else f"http://{word}"
    method = method or ("POST" if body is not None else "GET")
    return requests.request(method, url, data=body, headers=headers, timeout=30)


def _live_session() -> list[str]:
    """The README's "Live service" curl session."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Live service"):]
    section = section[:section.index("\n## ", 1)]
    return [c for c in _code_blocks(section) if c.startswith("curl ")]


def test_the_readme_quickstart_runs_as_written(ray_local, tmp_path, ray_tmp, monkeypatch, capsys):
    commands, requests_shown = _quickstart()
    assert [c.split()[1] for c in commands] == ["synth", "prepare", "train", "evaluate", "recommend", "serve"]
    monkeypatch.chdir(tmp_path)                       # relative paths, a working directory of the user's own
    *offline, serve = commands
    for command in offline:
        words = shlex.split(command)
        if words[1] != "train":
            assert main(words[1:]) == 0, command
            continue
        # `raysrec train` as its own process, as typed (joining the session's Ray through RAY_ADDRESS, as on a
        # cluster; `raysrec serve` below starts a local Ray of its own): its output is what the user sees
        env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
        proc = subprocess.run([sys.executable, "-m", "raysrec.cli", *words[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-3000:]
        epochs = int(words[words.index("--epochs") + 1])
        assert len([line for line in output.splitlines() if "valid ndcg@10" in line]) == epochs, output[-3000:]
        assert "Reporting training result" not in output and "Checkpoint successfully created" not in output
        assert "Traceback" not in output, output[-3000:]
    out = capsys.readouterr().out
    assert '"ndcg@10"' in out and "recommendations: runs/quick/recs/recommendations/*.parquet" in out
    assert (tmp_path / "runs/quick/model/metrics.json").is_file()
    assert (tmp_path / "runs/quick/model/checkpoint/model.pt").is_file()

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000, the README's, is taken on this machine")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAYSREC_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "raysrec.cli", *shlex.split(serve)[1:]], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                if requests.get("http://127.0.0.1:8000/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:          # not listening yet, or accepting before it answers
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(1)
        recommend, model = (_send(c) for c in requests_shown)
        assert recommend.status_code == 200 and len(recommend.json()["items"]) == 5, recommend.text
        assert model.status_code == 200 and model.json()["num_items"] == 200
        # the README's live session, on the same server (its state in ./raysrec-state, the default store)
        posted, first, posted_again, second, history, forgot = (_send(c) for c in _live_session())
        assert posted.json() == {"accepted": 2, "duplicates": 0, "unknown_items": []}, posted.text
        assert (first.json()["form"], first.json()["history_events"], second.json()["history_events"]) == \
            ("user_id", 2, 3)
        assert posted_again.json()["accepted"] == 1 and first.json()["items"] != second.json()["items"]
        assert [e["item_id"] for e in history.json()["events"]] == [12, 7, 30]
        assert forgot.json()["deleted"] == 3 and (tmp_path / "raysrec-state" / "events.db").is_file()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
