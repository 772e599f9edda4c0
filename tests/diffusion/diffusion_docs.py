"""Write a generated section of docs/diffusion_samplers.md between its BEGIN/END markers."""
from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "diffusion_samplers.md"


def write_section(name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` (if the doc has them)."""
    if not DOC.is_file():
        return
    text = DOC.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{body.rstrip()}\n{end}{tail}"
    if new != text:
        DOC.write_text(new)
