"""docs/DECISIONS.md's index: one line per decision (each `- **...**` bullet) with a
link to its section, between the index markers. `python scripts/decisions_index.py`
rewrites it; `--check` exits 1 if it is out of date (tests/test_config.py)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "DECISIONS.md"
START, END = "<!-- index:start -->", "<!-- index:end -->"


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def index(text: str) -> str:
    lines, section = [], None
    for line in text[text.index(END) + len(END):].splitlines() if END in text else text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        m = re.match(r"- \*\*(.+?)\*\*", line)
        if m and section:
            lead = m.group(1).rstrip(".:")
            lines.append(f"- [{section.split(' (')[0]}](#{anchor(section)}): {lead}")
    return "\n".join([START, *lines, END])


def rewritten(text: str) -> str:
    new = index(text)
    if START in text:
        return text[:text.index(START)] + new + text[text.index(END) + len(END):]
    head, _, rest = text.partition("\n## ")  # first time: after the preamble
    return f"{head}\n{new}\n\n## {rest}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = rewritten(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} index is out of date: run python scripts/decisions_index.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
