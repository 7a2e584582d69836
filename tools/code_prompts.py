#!/usr/bin/env python3
"""Write code-generation prompts, one per line, from the documented functions and classes
of a Python source tree (the standard library by default): training prompts for
`ggspec train eagle|medusa --prompts`, where the target's own answers are the training data.

    python tools/code_prompts.py prompts.txt
    python tools/code_prompts.py prompts.txt --source /path/to/project --limit 2000

Each prompt asks for the function (its name and signature) that its docstring's first
sentence describes, e.g. "Write a Python function `dedent(text)` that removes any common
leading whitespace from every line in `text`." Private names and tests are skipped.
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
from pathlib import Path


def first_sentence(doc: str) -> str:
    """The docstring's first sentence on one line, or "" when it is not a plain sentence."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = para.split(". ")[0].rstrip(".")
    if not 12 <= len(sentence) <= 200 or not sentence[0].isalpha() or ">>>" in sentence:
        return ""
    return sentence[0].lower() + sentence[1:]


def prompts_of(source: str) -> list[str]:
    """Prompts for the public, documented top-level functions and classes of a module."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        what = first_sentence(ast.get_docstring(node) or "")
        if not what:
            continue
        if isinstance(node, ast.FunctionDef):
            out.append(f"Write a Python function `{node.name}({ast.unparse(node.args)})` "
                       f"that does the following: {what}.")
        else:
            out.append(f"Write a Python class `{node.name}`: {what}.")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="prompt file to write")
    p.add_argument("--source", default=sysconfig.get_paths()["stdlib"],
                   help="directory of Python sources")
    p.add_argument("--limit", type=int, default=0, help="most prompts (0: all)")
    p.add_argument("--seed", type=int, default=0, help="order of the prompts")
    a = p.parse_args(argv)
    files = sorted(f for f in Path(a.source).rglob("*.py")
                   if not {"test", "tests", "idlelib", "site-packages"} & set(f.parts))
    prompts = sorted({q for f in files for q in prompts_of(f.read_text(errors="replace"))})
    random.Random(a.seed).shuffle(prompts)
    if a.limit:
        prompts = prompts[:a.limit]
    Path(a.output).write_text("".join(q + "\n" for q in prompts))
    print(f"wrote {len(prompts)} prompts from {len(files)} files to {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
