"""The external objective texts (fastmix.data.embedded.texts): package READMEs and
licenses, none of the sources, whose content hashes name the oracle suites' text
objectives, so a build must be deterministic and must not depend on this project."""
import json
from pathlib import Path

from fastmix.data.embedded import texts

ROOT = Path(__file__).resolve().parents[1]


def test_texts_are_deterministic_and_leave_this_project_out(tmp_path):
    a = texts.build_texts(tmp_path / "a", max_bytes=60_000)
    b = texts.build_texts(tmp_path / "b", max_bytes=60_000)
    assert a == b and set(a["texts"]) == {"readmes", "licenses"}
    for name, info in a["texts"].items():
        docs = [json.loads(line)["text"] for line in (tmp_path / "a" / info["file"]).read_text().splitlines()]
        assert docs and len(docs) == info["docs"] and sum(len(d.encode()) for d in docs) <= 60_000
        assert all(len(d) >= texts.MIN_CHARS for d in docs) and len(set(docs)) == len(docs)
    # this project's README changes with every commit: it must not be in the text
    assert texts.OWN not in texts._readmes()
    ours = (ROOT / "README.md").read_text().splitlines()[0]
    readmes = (tmp_path / "a" / "readmes.jsonl").read_text()
    assert json.dumps(ours)[1:-1] not in readmes
