"""Reading docs/PROTOCOL.md §7 ("Transcripts you can replay") into replayable cases, and the
normalisation applied to reply lines before they are compared with the doc.

A case is one ``### `` heading of §7 with at least one fenced block. Fenced blocks tagged ``sh``
are its setup (``twistd … clusterd-server|clusterd-worker …`` lines, files made with printf/seq);
untagged ones are transcripts. A section without an ``sh`` block runs on the cluster of §7's
opening ``sh`` block (the main one), in doc order."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


@dataclass
class Case:
    """One ``### `` section of §7: its title, setup (``sh``) blocks and transcript blocks."""

    title: str
    setup: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)


def section7(text: str | None = None) -> tuple[list[str], list[Case]]:
    """The opening setup blocks of §7, and its cases in doc order (sections with no fenced
    block are left out: they are prose)."""
    text = PROTOCOL.read_text() if text is None else text
    body = text.split("\n## 7. ", 1)[1].split("\n## 8. ", 1)[0]
    intro, *sections = re.split(r"^### ", body, flags=re.M)
    cases = []
    for section in sections:
        title, _, rest = section.partition("\n")
        case = Case(title.strip())
        for lang, block in _FENCE.findall(rest):
            (case.setup if lang == "sh" else case.blocks).append(block)
        if case.setup or case.blocks:
            cases.append(case)
    return [b for lang, b in _FENCE.findall(intro) if lang == "sh"], cases


@dataclass
class Proc:
    """A ``twistd`` line of a setup block: which plugin, and its arguments without twistd's."""

    plugin: str
    args: list[str]


def setup_commands(block: str) -> tuple[list[Proc], list[str]]:
    """The twistd processes a setup block starts, and its other shell lines (mkdir, cd, printf,
    seq, sleep) in order."""
    procs, shell = [], []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        if not line:
            continue
        if not line.startswith("twistd "):
            shell.append(line)
            continue
        words = shlex.split(line.split(">", 1)[0].rstrip("& "))[1:]
        while words[0].startswith("-"):  # twistd's own options; -l takes a value
            words = words[2:] if words[0] in ("-l", "--logfile") else words[1:]
        procs.append(Proc(words[0], words[1:]))
    return procs, shell


def option(args: list[str], name: str, default: str | None = None) -> str | None:
    """The value of ``--name VALUE`` in ``args`` (the first), or ``default``."""
    return args[args.index(name) + 1] if name in args else default


def without(args: list[str], *names: str) -> list[str]:
    """``args`` without the ``--name VALUE`` pairs named."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in names:
            skip = True
        else:
            out.append(a)
    return out


# -- normalisation ------------------------------------------------------------------------------
#
# Written down here, and as narrow as possible. A reply line and the doc's line are equal when
# they are equal after:
#   0. (before anything) the doc's ports (7480, 7481, 7488, 8488, …) and scratch directories
#      (/tmp/cd*) are replaced by this run's free ports and tmp_path directories (Env.local);
#   1. times: the values of "submitted", "finished", "elapsed", "uptime", "connected" and
#      "last_seen" become "<t>"; the "nonce" of a greeting becomes "<nonce>";
#   2. addresses: the value of "address" becomes "<addr>";
#   3. which worker ran what: "worker":"wN" becomes "w?" (and "worker wN" in a message);
#      "ran_on" becomes its total ({"*": N}); a WORKERS list is sorted by name and its
#      per-worker "done"/"failed" counters become "<n>";
#   4. a "traceback" (the worker's, with its file paths and line numbers) becomes its last
#      line, the exception; the doc shows "Traceback (most recent call last):\n  …\n<that line>";
# Everything else (job ids, states, counts, messages, results, every STATS counter) must match
# exactly: counters such as "subtasks_dispatched" are deterministic because a "… later" comment
# makes the replay wait for the state the doc saw (Replay.settle), never for a fixed time.

_TIMES = {"submitted", "finished", "elapsed", "uptime", "connected", "last_seen"}
_JSON_TAIL = re.compile(r"^(OK |HELLO clusterd \d+ |(?:RESULT|PROGRESS) \S+ |FAILED \S+ \S+ )(.*)$")


def _norm(value: object) -> object:
    if isinstance(value, list):
        items = [_norm(v) for v in value]
        if items and all(isinstance(v, dict) and "slots" in v and "name" in v for v in items):
            items.sort(key=lambda v: v["name"])  # a WORKERS reply
            for v in items:
                if "done" in v and "tasks" in v:
                    v["done"] = v["failed"] = "<n>"
        return items
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k in _TIMES:
            v = "<t>"
        elif k == "address":
            v = "<addr>"
        elif k == "nonce":
            v = "<nonce>"
        elif k == "ran_on" and isinstance(v, dict):
            v = {"*": sum(v.values())} if v else {}
        elif k == "traceback" and isinstance(v, str):
            v = "<traceback> " + v.strip().splitlines()[-1]
        elif k == "worker" and isinstance(v, str) and re.fullmatch(r"w\d+", v):
            v = "w?"
        out[k] = _norm(v)
    return out


def normalise(line: str) -> str:
    """``line`` with what may differ between runs replaced (see the list above)."""
    line = re.sub(r"\bworker w\d+ ", "worker w? ", line)
    m = _JSON_TAIL.match(line)
    if m and m.group(2)[:1] in "[{":
        try:
            value = json.loads(m.group(2))
        except ValueError:
            return line
        return m.group(1) + json.dumps(_norm(value), separators=(",", ":"), ensure_ascii=False)
    return line


def fenced_after(marker: str, text: str | None = None) -> str:
    """The first fenced block after the first occurrence of ``marker`` in PROTOCOL.md."""
    text = PROTOCOL.read_text() if text is None else text
    return _FENCE.search(text, text.index(marker)).group(2)
