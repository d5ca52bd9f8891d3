"""One line out of jsonargparse's nested error report: the option, the value, what is allowed.

jsonargparse explains a rejected value as a tree, one indentation level per type it tried::

    Parser key "trainer.callbacks":
      Does not validate against any of the Union subtypes
      Errors:
        - Problem with given class_path 'overparam.callbacks.HessianSpectrum':
            Parser key "top_k":
              Errors:
                - Expected a <class 'int'>
                - Expected a <class 'NoneType'>
              Given value: x
        - Problem with given class_path 'lightning.Callback':
            Option 'top_k' is not accepted
        - Expected a <class 'NoneType'>

The branch that matters is the one of the class the user named (here ``HessianSpectrum``), not
the alternatives jsonargparse also tried (the ``Callback`` base, ``None``), so ``condense``
reads the tree, follows that branch to its innermost key and reports
``--trainer.callbacks.top_k: HessianSpectrum expects int or null, got 'x'``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Optional

from overparam.registry import suggest

LINKED = ("input_shape", "num_outputs", "num_train")
TOP_LEVEL = ("model", "data", "trainer", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path", "summary", "progress")
# Base classes jsonargparse tries besides the class the user named.
BASES = ("lightning.Callback", "lightning.pytorch.callbacks.callback.Callback", "overparam.task.Task", "overparam.data.OverparamDataModule")


@dataclass
class Node:
    """One line of the report and the more indented lines under it."""

    text: str
    children: list["Node"] = field(default_factory=list)

    def lines(self) -> list[str]:
        """This line and every line under it, in order."""
        return [self.text] + [line for child in self.children for line in child.lines()]


def parse_tree(message: str) -> list[Node]:
    """The report as a forest, by indentation (list bullets ``- `` dropped)."""
    roots: list[Node] = []
    stack: list[tuple[int, Node]] = []
    for raw in message.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        node = Node(raw.strip().removeprefix("- ").strip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        (stack[-1][1].children if stack else roots).append(node)
        stack.append((indent, node))
    return roots


def condense(message: str) -> str:
    """One line naming the option, the value and what is allowed (the first 400 characters
    of the flattened report when its shape is unknown)."""
    roots = parse_tree(message)
    for node in roots:
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', node.text)
        if key:
            rest = [Node(key.group(2))] if key.group(2) else []
            line = _explain(key.group(1), rest + node.children, owner=None)
            if line:
                return line
    not_accepted = re.search(r"does not accept option '([^']+)'", message)
    if not_accepted:
        return unknown_key(not_accepted.group(1))
    return _flat_fallback(message)


def _explain(option: str, nodes: list[Node], owner: Optional[str]) -> Optional[str]:
    """The error under ``Parser key "option"``, following the named class's branch."""
    problems = []
    for node in _walk(nodes):
        problem = re.match(r"Problem with given class_path '([\w.]+)':\s*(.*)", node.text)
        if problem:
            rest = [Node(problem.group(2))] if problem.group(2) else []
            problems.append((problem.group(1), rest + node.children))
    # The class the user named first; the bases jsonargparse also tried only when alone.
    problems.sort(key=lambda p: p[0] in BASES)
    for class_path, children in problems:
        line = _explain_class(option, class_path, children)
        if line:
            return line
    text = " ".join(line for n in nodes for line in n.lines())
    bad_class = re.search(r"Expected a path but ([\w.]+) either not accessible", text) or re.search(r"Import path ([\w.]+) does not", text)
    if bad_class:
        kind = {"model": "tasks", "data": "datamodules"}.get(option.split(".")[0], "callbacks")
        name = bad_class.group(1)
        return f"--{option}: unknown class {name!r}; {suggest(name.rsplit('.', 1)[-1], kind)}"
    not_accepted = re.search(r"does not accept option '([^']+)'", text)
    if not_accepted:
        return unknown_key(not_accepted.group(1))
    given = _given_value(nodes)
    expected = _expected_types(nodes)
    if given is not None and expected:
        who = f"{_short(owner)} expects" if owner else "expected"
        return f"--{option}: {who} {expected}, got {given!r}"
    return None


def _explain_class(option: str, class_path: str, nodes: list[Node]) -> Optional[str]:
    """Inside ``Problem with given class_path``: an unknown option, or a nested key's error."""
    for node in nodes:
        refused = re.match(r"Option '([^']+)' is not accepted", node.text)
        if refused:
            name = refused.group(1)
            return f"--{option}.{name}: no such option of {_short(class_path)}; {allowed_options(class_path, name)}"
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', node.text)
        if key:
            rest = [Node(key.group(2))] if key.group(2) else []
            return _explain(f"{option}.{key.group(1)}", rest + node.children, owner=class_path)
    return None


def _walk(nodes: list[Node]) -> list[Node]:
    """Nodes at this level and inside ``Errors:`` lists, not inside nested class branches."""
    out = []
    for node in nodes:
        out.append(node)
        if node.text == "Errors:":
            out += _walk(node.children)
    return out


def _given_value(nodes: list[Node]) -> Optional[str]:
    for node in nodes:
        given = re.match(r"Given value: (.*)$", node.text)
        if given:
            return given.group(1)
    return None


def _expected_types(nodes: list[Node]) -> str:
    """``int or null`` from the ``Subtypes: [...]`` line, else from the ``Expected a`` lines."""
    names: list[str] = []
    for node in _walk(nodes):
        subtypes = re.match(r"Subtypes: \[(.*)\]$", node.text)
        if subtypes:
            names = [_type_name(t) for t in re.findall(r"<class '[\w.]+'>|[\w.]+\[[^\]]*\]|[\w.]+", subtypes.group(1))]
            break
        expected = re.match(r"Expected an? (<class '[\w.]+'>|\S+)", node.text)
        if expected:
            names.append(_type_name(expected.group(1)))
    return " or ".join(dict.fromkeys(names))


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``, ``NoneType`` -> ``null``, ``typing.Sequence[int]`` -> ``list of int``."""
    name = re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("typing.", "").replace("collections.abc.", "")
    if name == "NoneType":
        return "null"
    sequence = re.match(r"(?:Sequence|list|List|tuple|Tuple)\[([\w.]+)", name)
    if sequence:
        return f"list of {sequence.group(1)}"
    return "list" if name == "Sequence" else name.rsplit(".", 1)[-1]


def _short(class_path: Optional[str]) -> str:
    return (class_path or "").rsplit(".", 1)[-1]


def _flat_fallback(message: str) -> str:
    """The report on one line; ``Parser key "k":`` becomes ``--k:``, a ``Literal`` its choices."""
    text = " ".join(line.strip(" -") for line in message.strip().splitlines() if line.strip(" -"))
    text = re.sub(r'^Parser key "([^"]+)":', r"--\1:", text)
    choices = re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", text)
    if choices:
        allowed = ", ".join(c.strip(" '\"") for c in choices.group(1).split(","))
        text = f"{text[: text.index('Expected')].strip()} expected one of {allowed}; got {choices.group(2)!r}"
    return text[:400]


def unknown_key(key: str) -> str:
    """A config key that does not exist: suggest the closest Trainer argument or section."""
    import lightning.pytorch as pl

    group, _, name = key.rpartition(".")
    if group == "trainer":
        names = [n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"]
    elif not group:
        names = list(TOP_LEVEL)
    else:
        return f"--{key}: no such option"
    close = difflib.get_close_matches(name, names, n=2)
    hint = f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(names)}"
    return f"--{key}: no such option; {hint}"


def allowed_options(class_path: str, wrong: str) -> str:
    """``did you mean X?`` or the accepted init arguments of a class (with its bases)."""
    try:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return "see --print_config"
    names = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names += [n for n in inspect.signature(klass.__init__).parameters if n not in ("self", "args", "kwargs")]
    names = list(dict.fromkeys(n for n in names if n not in LINKED))
    close = difflib.get_close_matches(wrong, names, n=2)
    return f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(names) or 'no options'}"
