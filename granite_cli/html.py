"""A report's markdown as one self-contained HTML page: the plots embedded as data URIs, the tables
sortable by a click on a heading (a few lines of inline script), no stylesheet, script, font or
image fetched from anywhere, so it opens offline from a CI artifact or a mail attachment.

It reads the subset of markdown granite's reports write: `#` headings, `- ` bullets (two spaces per
level), `|` tables, `![alt](file.png)` images, fenced code, paragraphs, and inline `code` (any
backtick fence), **bold**, backslash escapes and [links](https://...). The page links to nothing
and runs nothing but its own sorting script: a link is made only for an absolute http(s) URL, an
image only for a PNG beside the report (embedded), and every other character is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#1b1b1b}
h1,h2,h3{line-height:1.2}code{background:#f2f2f2;padding:0 .2em;border-radius:3px;font-size:90%}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
table{border-collapse:collapse;margin:1em 0;font-size:12px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#eee;cursor:pointer;position:sticky;top:0}th[aria-sort]::after{content:attr(data-arrow)}
td:first-child,th:first-child{text-align:left}img{max-width:100%;height:auto}
"""

# Click a heading to sort by it (again to reverse). Numbers sort as numbers, with the report's
# thousands separators, percentages and binary size units understood; blanks sort last.
_SCRIPT = r"""
(function(){
var U={B:1,KiB:1024,MiB:1048576,GiB:1073741824,TiB:1099511627776,'%':1,s:1,ms:1,x:1};
function key(t){t=t.trim().replace(/,/g,'');var m=t.match(/^(-?[0-9.]+(?:e-?[0-9]+)?)\s*([A-Za-z%]*)$/);
 if(m&&(m[2]===''||m[2] in U)){return [0,parseFloat(m[1])*(U[m[2]]||1)];}return t===''?[2,'']:[1,t];}
function cmp(a,b){if(a[0]!==b[0])return a[0]-b[0];return a[1]<b[1]?-1:a[1]>b[1]?1:0;}
document.querySelectorAll('table.sortable').forEach(function(tb){
 var ths=tb.querySelectorAll('thead th');
 ths.forEach(function(th,i){th.addEventListener('click',function(){
  var body=tb.tBodies[0],rows=Array.prototype.slice.call(body.rows);
  var dir=th.getAttribute('aria-sort')==='ascending'?-1:1;
  ths.forEach(function(h){h.removeAttribute('aria-sort');h.removeAttribute('data-arrow');});
  th.setAttribute('aria-sort',dir===1?'ascending':'descending');
  th.setAttribute('data-arrow',dir===1?' \u25B2':' \u25BC');
  rows.sort(function(r1,r2){var a=key(r1.cells[i].textContent),b=key(r2.cells[i].textContent);
   if(a[0]===2||b[0]===2)return a[0]-b[0];return dir*cmp(a,b);});
  rows.forEach(function(r){body.appendChild(r);});});});
 tb.setAttribute('data-sortable','ready');});
})();
"""

# An escaped character, a code span (fenced by a run of backticks; its text is literal), bold, an image,
# a link: the inline markdown granite writes. Text from elsewhere reaches the markdown escaped
# (granite_cli.render.md_text), so whatever of this it holds renders as text.
_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|(?<!`)(`+)(.+?)(?<!`)\2(?!`)|\*\*(.+?)\*\*|!\[([^\]]*)\]\(([^)\s]+)\)"
                     r"|\[([^\]]+)\]\(([^)\s]+)\)")
_SAFE_SCHEMES = ("http", "https")


def _inline(text: str, folder: Path) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        esc, _, code, bold, alt, src, label, href = m.groups()
        if esc is not None:
            out.append(html.escape(esc))
        elif code is not None:
            if len(code) > 1 and code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{_inline(bold, folder)}</strong>")
        elif src is not None:
            out.append(_image(alt, src, folder))
        elif _safe_href(href):
            out.append(f'<a href="{html.escape(href, quote=True)}">{_inline(label, folder)}</a>')
        else:  # javascript:, data:, a relative path...: shown as the text it is, never a link
            out.append(html.escape(m.group(0)))
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _safe_href(href: str) -> bool:
    """Only absolute http(s) URLs become links."""
    from urllib.parse import urlsplit

    if any(ord(c) < 33 or ord(c) == 127 for c in href):
        return False
    try:
        u = urlsplit(href)
    except ValueError:
        return False
    return u.scheme.lower() in _SAFE_SCHEMES and bool(u.netloc)


def _image(alt: str, src: str, folder: Path) -> str:
    """A PNG beside the report, embedded; anything else (or missing) is its alt text, never a fetch."""
    p = folder / src
    if "/" in src or "\\" in src or not src.endswith(".png") or not p.is_file():
        return f"<em>[{html.escape(alt)}]</em>"
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def _cells(line: str) -> list[str]:
    body = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    cells, cur, esc = [], [], False
    for ch in body:
        if esc:  # a cell's \| is its text's |; every other escape is the inline text's to read
            cur.append(ch if ch == "|" else "\\" + ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    cells.append("".join(cur).strip())
    return cells


def _table(lines: list[str], folder: Path) -> str:
    head = _cells(lines[0])
    rows = [_cells(x) for x in lines[2:]]
    th = "".join(f'<th scope="col">{_inline(c, folder)}</th>' for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{_inline(c, folder)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="sortable"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def _bullets(lines: list[str], folder: Path) -> str:
    """Nested lists from "- " items indented two spaces per level."""
    out, depth = [], -1
    for line in lines:
        level = (len(line) - len(line.lstrip(" "))) // 2
        if level > depth:
            out.append("<ul>" * (level - depth))
        else:
            out.append("</li>" + "</ul></li>" * (depth - level))
        depth = level
        out.append("<li>" + _inline(line.strip()[2:], folder))
    out.append("</li>" + "</ul></li>" * depth + "</ul>")
    return "".join(out)


def markdown_to_html(text: str, folder: Path, title: str) -> str:
    """The page for a report's markdown `text`, its images read from `folder`."""
    lines = text.splitlines()
    parts, i = [], 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s:
            i += 1
        elif s.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            parts.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", s):
            n = len(m.group(1))
            parts.append(f"<h{n}>{_inline(m.group(2), folder)}</h{n}>")
            i += 1
        elif s.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|?$", lines[i + 1].strip()):
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            parts.append(_table([x.strip() for x in lines[i:j]], folder))
            i = j
        elif re.match(r"^\s*- ", line):
            j = i
            while j < len(lines) and re.match(r"^\s*- ", lines[j]):
                j += 1
            parts.append(_bullets(lines[i:j], folder))
            i = j
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not re.match(r"^(#|\||- |```)", lines[j].strip()):
                j += 1
            parts.append("<p>" + _inline(" ".join(x.strip() for x in lines[i:j]), folder) + "</p>")
            i = j
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")
