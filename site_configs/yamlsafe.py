"""YAML as the files people edit by hand need it: no alias bombs, no duplicate keys.

PyYAML's ``safe_load`` builds a shared object for every alias, so a 400-byte file of nested
aliases ("billion laughs") loads at once and then hangs whoever walks the result (``${VAR}``
expansion, schema checks, JSON encoding). :func:`load` measures the document with its aliases
expanded before building anything and refuses one that would hold more than ``max_nodes``
nodes; anchors and merge keys (``<<: *defaults``) within that bound keep working. A key given
twice in one mapping is an error too (``safe_load`` keeps the last one silently).
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: nodes a document may hold with its aliases expanded (a site config has a few hundred)
MAX_NODES = 100_000


class YamlRefused(yaml.YAMLError):
    """A document that is valid YAML but not acceptable here (too large expanded, duplicate
    key). ``problem`` and ``problem_mark`` as PyYAML's own errors have them."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def expanded_size(node: Node, limit: int) -> int:
    """Nodes in ``node`` with every alias expanded, counting stops past ``limit``. Aliases are
    the same node object in PyYAML's graph, so each distinct node is measured once."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(n: Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in on_path:                # a recursive alias: infinite when expanded
            raise YamlRefused("recursive alias", n.start_mark)
        on_path.add(key)
        total = 1
        if isinstance(n, SequenceNode):
            children = n.value
        elif isinstance(n, MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        on_path.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(node)


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys and documents too big with aliases expanded."""

    max_nodes = MAX_NODES

    def construct_document(self, node: Node) -> Any:
        if expanded_size(node, self.max_nodes) > self.max_nodes:
            raise YamlRefused(f"more than {self.max_nodes} values once its aliases are expanded "
                              "(an alias bomb?)", node.start_mark)
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue              # '<<': merged keys may be overridden, as YAML says
                if isinstance(key_node, ScalarNode):
                    key = self.construct_object(key_node, deep=True)
                    try:
                        if key in seen:
                            raise YamlRefused(f"duplicate key {str(key)[:80]!r} (first at line "
                                              f"{seen[key].line + 1})", key_node.start_mark)
                        seen[key] = key_node.start_mark
                    except TypeError:     # an unhashable key: PyYAML's own error follows
                        pass
        return super().construct_mapping(node, deep=deep)


def load(text: str | bytes, max_nodes: int = MAX_NODES) -> Any:
    """One YAML document, safely: refuses alias bombs, recursive aliases and duplicate keys
    (:class:`YamlRefused`, a ``yaml.YAMLError``)."""
    loader = StrictLoader(text)
    loader.max_nodes = max_nodes
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
