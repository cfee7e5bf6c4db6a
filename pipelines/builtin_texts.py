"""The built-in texts, made from files that installed packages ship: no network, same text everywhere.

- `builtin:enwiki`: the shortened English Wikipedia dump of gensim's test data (pages 10 to 30302).
  Main-namespace pages that are not redirects and keep at least 500 characters of text after markup
  stripping are articles: 105 of them, converted once to plain text under `<cache>/data/`. An article
  whose title's SHA-1 is 0 mod 10 is held out for evaluation: 96 calibration articles (581,124 SmolLM2
  tokens), 9 evaluation articles (74,940 tokens).
- `builtin:news`: the Lee background corpus of gensim's test data, 300 Australian news articles
  (2001-2002; bushfires, politics, sport, world news), one per line, 293 once repeats are dropped;
  every 10th is held out for evaluation: 264 calibration articles (316,616 characters) and 29
  evaluation articles (35,804 characters). Text of another kind than encyclopaedia articles, for
  measuring how pruning and fine-tuning carry over.

`pipelines.sources` resolves the `builtin:` names to these functions and the package files.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import logging
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Split = Literal["calibration", "evaluation"]

ENWIKI_BZ2 = (
    "gensim",
    "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
LEE_NEWS = ("gensim", "test/test_data/lee_background.cor")
EVAL_EVERY = 10
_ENWIKI_CACHE = "enwiki-v2.json"
_MIN_ARTICLE_CHARS = 500

_NESTED_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|wikt|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_DROP_ELEMENT = re.compile(r"<(gallery|math|timeline|score|syntaxhighlight|source|imagemap)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_EMPHASIS = re.compile(r"'{2,5}")
_BEHAVIOUR = re.compile(r"__[A-Z]+__")
_LINE_PREFIX = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t]{2,}")


def _strip_tables(text: str) -> str:
    """Drop `{| ... |}` tables, nesting included (line-based, as MediaWiki parses them)."""
    out, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            out.append(line)
    return "\n".join(out)


def _replace_link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _DROP_LINK.match(inner):
        return ""
    return inner.split("|")[-1] if "|" in inner else inner


def _repeat(pattern: re.Pattern[str], repl: str | Callable[[re.Match[str]], str], text: str) -> str:
    """Apply a substitution until nothing changes (innermost first, for nested markup)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def wiki_to_text(markup: str) -> str:
    """Plain paragraphs from MediaWiki markup: templates, tables, refs, files, categories and tags
    removed; links, bold/italic and headings reduced to their text; list markers dropped."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    text = _DROP_ELEMENT.sub("", text)
    text = _repeat(_NESTED_TEMPLATE, "", text)
    text = _strip_tables(text)
    text = _repeat(_LINK, _replace_link, text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = html.unescape(_BEHAVIOUR.sub("", text))
    lines: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(2)
        line = _SPACES.sub(" ", _LINE_PREFIX.sub("", _EMPHASIS.sub("", line))).strip()
        if line and not line.startswith(("{{", "}}", "|", "!")):
            lines += ["", line, ""] if heading else [line]
        else:
            lines.append("")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _iter_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of main-namespace, non-redirect pages of a MediaWiki XML dump."""
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            ns = element.findtext("{*}ns")
            title = element.findtext("{*}title") or ""
            body = element.findtext("{*}revision/{*}text") or ""
            if ns == "0" and element.find("{*}redirect") is None:
                yield title, body
            element.clear()


def _write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def enwiki_articles(source: Path, cache_dir: Path) -> list[dict[str, str]]:
    """The Wikipedia excerpt at `source` (a bz2 XML dump) as `[{"title", "text"}]`, converted once and cached."""
    cached = cache_dir / "data" / _ENWIKI_CACHE
    if cached.is_file():
        return json.loads(cached.read_text())
    articles = []
    for title, body in _iter_pages(source):
        text = wiki_to_text(body)
        if len(text) >= _MIN_ARTICLE_CHARS:
            articles.append({"title": title, "text": text})
    logger.info("converted %d Wikipedia articles from %s", len(articles), source)
    _write_json_atomic(cached, articles)
    return articles


def is_evaluation_article(title: str) -> bool:
    """Held out for evaluation iff the title's SHA-1 is 0 mod 10 (stable, order-independent)."""
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % EVAL_EVERY == 0


def enwiki_split(source: Path, split: Split, cache_dir: Path) -> str:
    """The calibration or evaluation articles of the Wikipedia excerpt, joined by blank lines."""
    want_eval = split == "evaluation"
    return "\n\n".join(a["text"] for a in enwiki_articles(source, cache_dir)
                        if is_evaluation_article(a["title"]) == want_eval)


def news_split(source: Path, split: Split) -> str:
    """The calibration or evaluation articles of the news corpus at `source` (one article per line):
    every 10th article (index 9, 19, ...) is held out for evaluation, as local text's paragraphs are."""
    lines = (line.strip() for line in source.read_text(encoding="utf-8").splitlines())
    articles = list(dict.fromkeys(line for line in lines if line))  # the corpus repeats a few articles
    want_eval = split == "evaluation"
    return "\n\n".join(a for i, a in enumerate(articles) if (i % EVAL_EVERY == EVAL_EVERY - 1) == want_eval)
