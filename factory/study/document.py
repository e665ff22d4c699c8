"""The report as a list of blocks (headings, paragraphs, tables, figures), rendered twice: as Markdown that links
its figures, and as one self-contained HTML page whose figures are inline `data:` URIs (no external CSS, script or
font; a Content-Security-Policy that allows only inline styles and data: images, so the page opens offline and
requests nothing but itself).

    blocks = [Heading(1, "Study"), Table(["run", "PSNR"], [[Cell("pretrained"), Cell("22.10", best=True)]])]
    markdown = to_markdown(blocks)                 # figures as ![title](report/name.png)
    html = to_html(blocks, root=study_dir)         # figures read from root / path, base64-inlined
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    level: int  # 1 = the title
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str  # plain text (escaped in HTML; Markdown shows it as it is)


@dataclass(frozen=True)
class Cell:
    text: str
    best: bool = False  # the best value of its column: bold in both renderings


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""  # one line above the table


@dataclass(frozen=True)
class FigureBlock:
    path: str  # relative to the study folder, e.g. "report/table1-edsr-ntire.png"
    caption: str


@dataclass
class Document:
    title: str
    blocks: list[Heading | Paragraph | Table | FigureBlock] = field(default_factory=list)


def _markdown_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|")
    return f"**{text}**" if cell.best else text


def _markdown_table(table: Table) -> list[str]:
    lines = [f"*{table.caption}*", ""] if table.caption else []
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "|".join("---" for _ in table.header) + "|")
    lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in table.rows]
    return lines


def to_markdown(document: Document) -> str:
    """The report as Markdown; figures link to their files beside it."""
    lines = [f"# {document.title}", ""]
    for block in document.blocks:
        if isinstance(block, Heading):
            lines += ["#" * (block.level + 1) + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines += [*_markdown_table(block), ""]
        else:
            lines += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


# Everything the page may load: its own inline styles and data: images. A stray external reference is refused by
# the browser (and logged as a console error) instead of reaching the network.
_CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #111; background: #fff; max-width: 1400px; }
table { border-collapse: collapse; margin: 8px 0 20px 0; }
th { background: #dde6f5; }
th, td { border: 1px solid #8a94a6; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #fff2b3; }
figure { margin: 8px 0 24px 0; }
figure img { border: 3px solid #c86400; max-width: 100%; }
figcaption { font-style: italic; font-size: 90%; }
p.caption { font-style: italic; margin-bottom: 2px; }
"""


def _html_table(table: Table) -> list[str]:
    lines = [f'<p class="caption">{html.escape(table.caption)}</p>'] if table.caption else []
    lines.append("<table>")
    lines.append("<tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in table.header) + "</tr>")
    for row in table.rows:
        cells = "".join(
            f'<td class="best">{html.escape(cell.text)}</td>'
            if cell.best
            else f"<td>{html.escape(cell.text)}</td>"
            for cell in row
        )
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    return lines


def _html_figure(figure: FigureBlock, root: Path) -> str:
    encoded = base64.b64encode((root / figure.path).read_bytes()).decode("ascii")
    caption = html.escape(figure.caption)
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def to_html(document: Document, root: Path) -> str:
    """The report as one HTML page; each figure is read from `root / path` and inlined."""
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CONTENT_SECURITY_POLICY}">',
        f"<title>{html.escape(document.title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(document.title)}</h1>",
    ]
    for block in document.blocks:
        if isinstance(block, Heading):
            level = min(6, block.level + 1)
            lines.append(f"<h{level}>{html.escape(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            lines.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            lines += _html_table(block)
        else:
            lines.append(_html_figure(block, root))
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"
