"""Study YAML with positions, so every error names a file, a line and a field.

ruamel.yaml's round-trip loader keeps the line/column of every key and item.
It constructs only data, never Python objects: a tag such as ``!!python/object/apply``
is kept as a tag on a plain value, and :func:`load` refuses every tag it does not
know (so nothing an author tags is ever silently dropped or executed). An alias
expands to a reference, not a copy; :func:`load` refuses a document whose aliases
expand to more than :data:`MAX_VALUES` values (a "billion laughs" bomb) and one
nested too deeply to parse. Validation errors carry a path
(``("base", "model", "moe", "experts")``); :func:`locate` maps it back to the YAML
node that holds the offending value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError

PathKey = str | int

# Values a study may hold once its aliases are expanded: far more than any hand-written study,
# far fewer than an alias bomb (9 aliases of 9 aliases, 9 levels deep: 387 million strings).
MAX_VALUES = 100_000
_CORE_TAG = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a study file, phrased for the person who wrote it."""

    file: str
    line: int  # 1-based; 0 when unknown
    column: int  # 1-based; 0 when unknown
    field: str  # dotted path in the YAML, "" for the whole document
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class StudyError(Exception):
    """The study file cannot be run; ``problems`` says why, each with a position."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Source:
    """A loaded study file: its plain data and the position-carrying tree it came from."""

    path: Path
    tree: Any

    @property
    def data(self) -> Any:
        return to_plain(self.tree)

    def problem(self, path: Sequence[PathKey], reason: str) -> Problem:
        line, column = locate(self.tree, path)
        return Problem(str(self.path), line, column, dotted(path), reason)


def load(path: Path) -> Source:
    """Parse ``path``; syntax errors, duplicate keys and a non-mapping document are StudyErrors."""
    try:
        text = path.read_text()
    except OSError as error:
        raise StudyError([Problem(str(path), 0, 0, "", f"cannot read the study file ({error.strerror})")])
    yaml = YAML(typ="rt")
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        reason = str(error.problem or error.context or "invalid YAML").split("\n")[0]
        if error.context and error.context_mark and error.problem_mark:
            # "while parsing a flow sequence" started where the author's mistake usually is.
            reason += f" ({error.context} started at line {error.context_mark.line + 1})"
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise StudyError([Problem(str(path), line, column, "", f"YAML syntax error: {reason}")])
    except YAMLError as error:
        raise StudyError([Problem(str(path), 0, 0, "", f"YAML error: {error}")])
    except RecursionError:
        raise StudyError([Problem(str(path), 0, 0, "", "YAML error: nested too deeply to read")]) from None
    if not isinstance(tree, CommentedMap):
        kind = "empty" if tree is None else f"a {type(tree).__name__}"
        raise StudyError([Problem(str(path), 1, 1, "", f"a study must be a mapping of fields, got {kind}")])
    source = Source(path, tree)
    problem = _plain_data_problem(source)
    if problem is not None:
        raise StudyError([problem])
    return source


def to_plain(node: Any) -> Any:
    """ruamel's commented containers → dict/list (keeps ruamel's scalar subclasses' values)."""
    if isinstance(node, CommentedMap):
        return {str(key): to_plain(value) for key, value in node.items()}
    if isinstance(node, CommentedSeq):
        return [to_plain(item) for item in node]
    if isinstance(node, TaggedScalar) and _tag(node) == "!!str":
        return str(node.value)  # `!!str 5`: the only tag a scalar may carry (load refuses the others)
    if isinstance(node, bool | int | float | str) or node is None:
        # ScalarFloat/ScalarInt/etc. subclass the builtins; unwrap them so strict
        # validation and JSON see plain types.
        for plain in (bool, int, float, str):
            if isinstance(node, plain):
                return plain(node)
    return node


def locate(tree: Any, path: Sequence[PathKey]) -> tuple[int, int]:
    """1-based (line, column) of the deepest node of ``path`` present in ``tree``."""
    # Start at the document's first key: a missing top-level field points there.
    line, column = (tree.lc.line + 1, tree.lc.col + 1) if hasattr(tree, "lc") else (1, 1)
    node = tree
    for key in path:
        if isinstance(node, CommentedMap) and key in node:
            line, column = node.lc.value(key) if _is_scalar(node[key]) else node.lc.key(key)
            line, column = line + 1, column + 1
            node = node[key]
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            line, column = node.lc.item(key)
            line, column = line + 1, column + 1
            node = node[key]
        else:
            break
    return line, column


def dotted(path: Sequence[PathKey]) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _is_scalar(node: Any) -> bool:
    return not isinstance(node, CommentedMap | CommentedSeq)


def _plain_data_problem(source: Source) -> Problem | None:
    """The first value that is not plain data (a tag we do not know), or the point where the
    aliases have expanded to more than MAX_VALUES values; None when the document is plain data.

    Walks the tree in document order as :func:`to_plain` will, counting every value an alias
    repeats, and stops at the limit: the walk itself never expands a bomb.
    """
    count = 0
    stack: list[tuple[Any, tuple[PathKey, ...]]] = [(source.tree, ())]
    while stack:
        node, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            reason = (
                f"the document holds more than {MAX_VALUES:,} values once its aliases are expanded "
                "(an alias bomb?); write the study out without aliases of aliases"
            )
            return source.problem(path[:1], reason)
        tag = _tag(node)
        if tag is not None and not (tag == "!!str" and isinstance(node, TaggedScalar)):
            reason = f"YAML tag {tag} is not allowed: a study holds plain mappings, lists, strings, numbers"
            return source.problem(path, reason)
        if isinstance(node, CommentedMap):
            stack += reversed([(value, (*path, str(key))) for key, value in node.items()])
        elif isinstance(node, CommentedSeq):
            stack += reversed([(item, (*path, index)) for index, item in enumerate(node)])
    return None


def _tag(node: Any) -> str | None:
    """The explicit tag of a value, ``!!``-shortened (``!!python/name:os.system``), else None."""
    tag = getattr(getattr(node, "tag", None), "value", None)
    if not tag:
        return None
    return "!!" + tag.removeprefix(_CORE_TAG) if tag.startswith(_CORE_TAG) else tag
