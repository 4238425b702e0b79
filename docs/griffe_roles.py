"""A griffe extension for the documentation site: Sphinx roles in docstrings become links.

The docstrings cite names the Sphinx way (``:func:`plot_rf```, ``:class:`~rf_callback.core.result.ReceptiveField```),
which Markdown would print as they are. This extension rewrites each role as an *optional* cross-reference of
mkdocs-autorefs: a link where the name is documented on the site, plain code where it is not (a private helper, a
matplotlib class), so a docstring can never break the strict build. ``~`` keeps only the last part of the name as
its title, as in Sphinx. The source files are not changed; `mkdocs.yml` loads this file.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):`(~?)([\w.]+)(?:\(\))?`")


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles in every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrites the docstrings of ``pkg`` and everything in it."""
        self._rewrite(pkg, loader, seen=set())

    def _rewrite(self, obj: griffe.Object, loader: griffe.GriffeLoader, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(lambda match: _reference(match, obj, loader), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member, loader, seen)


def _reference(match: re.Match[str], obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    short, name = match.group(1), match.group(2)
    title = html.escape(name.rsplit(".", 1)[-1] if short else name)
    path = _canonical(name, obj, loader)
    if path is None:
        return f"`{name.rsplit('.', 1)[-1] if short else name}`"
    return f'<autoref identifier="{html.escape(path)}" optional><code>{title}</code></autoref>'


def _canonical(name: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
    """The canonical path of ``name`` as seen from ``obj``'s docstring, or ``None`` outside the loaded packages."""
    candidates = [name]
    scope = obj if obj.is_class or obj.is_module else obj.parent
    if scope is not None:
        try:
            candidates.insert(0, scope.resolve(name))
        except Exception:  # a name griffe cannot resolve stays a candidate as written
            pass
    for candidate in candidates:
        try:
            return loader.modules_collection[candidate].canonical_path
        except Exception:  # not loaded, or an alias that does not resolve: try the next
            continue
    return None
