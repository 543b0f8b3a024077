"""Keys written twice in a YAML document: PyYAML keeps the last one silently, so a pipelines file
with `train:` twice in one pipeline would run with half of what its author wrote."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class DuplicateKey:
    """A key found again in the same mapping; lines count from 1, as editors show them."""

    path: str
    key: str
    first_line: int
    line: int

    def __str__(self) -> str:
        return (
            f"{self.path}: key {self.key!r} written twice, on lines {self.first_line} and {self.line} "
            "(the second would silently replace the first); keep one"
        )


def duplicate_keys(text: str) -> list[DuplicateKey]:
    """Every key of `text` that repeats a key of the same mapping, in document order.

    Raises:
        yaml.YAMLError: the text is not YAML.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    found: list[DuplicateKey] = []
    if root is not None:
        _walk(root, "", found, set())
    return found


def _walk(node: yaml.Node, path: str, found: list[DuplicateKey], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: the anchored node was walked where it was defined
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{path}[{index}]", found, seen)
    elif isinstance(node, yaml.MappingNode):
        _check_mapping(node, path, found, seen)


def _check_mapping(node: yaml.MappingNode, path: str, found: list[DuplicateKey], seen: set[int]) -> None:
    first_lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == MERGE_TAG:  # `<<: *defaults`: keys written beside it override it on purpose
            continue
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
        line = key_node.start_mark.line + 1
        child_path = f"{path}.{key}" if path else key
        if key in first_lines:
            found.append(DuplicateKey(child_path, key, first_lines[key], line))
        else:
            first_lines[key] = line
        _walk(value_node, child_path, found, seen)
