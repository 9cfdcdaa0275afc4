"""Every relative link in README.md and docs/*.md points to a file that exists.

A link with an anchor (`page.md#section`) must also name a heading of that
page, as GitHub spells its anchors; links to web pages are not checked.
"""

import glob
import os
import re

import pytest

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(path):
  """The page's text outside fenced code blocks."""
  lines, fence = [], False
  for line in open(path, encoding="utf-8"):
    if line.startswith("```"):
      fence = not fence
    elif not fence:
      lines.append(line)
  return "".join(lines)


def _anchors(path):
  """GitHub's anchor of each heading: lower case, punctuation dropped, spaces to '-'."""
  found = set()
  for line in _prose(path).splitlines():
    m = re.match(r"#{1,6} (.*)", line)
    if m:
      found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
  return found


def test_the_pages_exist():
  assert len(PAGES) > 1, "docs/ has no pages"


def _dead_links(page):
  """The page's relative links whose file, or heading, does not exist."""
  dead = []
  for target in LINK.findall(_prose(page)):
    if re.match(r"[a-z]+:", target):
      continue  # https:, mailto:
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(resolved):
      dead.append(target)
    elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
      dead.append(target + " (no such heading)")
  return dead


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
  dead = _dead_links(page)
  assert not dead, f"{os.path.relpath(page, ROOT)}: dead links {dead}"


def test_a_dead_link_is_found(tmp_path):
  (tmp_path / "docs").mkdir()
  page = tmp_path / "docs" / "page.md"
  page.write_text("# A page, its title\n\n[self](page.md#a-page-its-title) [up](../docs/page.md) "
                  "[web](https://example.com/x.md) [gone](missing.md) [bad](#nowhere)\n"
                  "```\n[in code](not_checked.md)\n```\n")
  assert _dead_links(str(page)) == ["missing.md", "#nowhere (no such heading)"]
