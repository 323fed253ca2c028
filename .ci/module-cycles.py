#!/usr/bin/env python3
"""Import circles among the host's modules, read from the code.

Each top-level module of host/src (a file or a folder) depends on every
module it names as `crate::<module>` outside comments and tests. Prints each
circle (a strongly connected group of two or more modules) and exits 1 if
there is any; `-v` also prints every module's dependencies. HOST_SRC points
it at another checkout's host/src.
"""
import os
import re
import sys

ROOT = os.environ.get("HOST_SRC") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "host", "src")


def dependencies():
    deps = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            top = os.path.relpath(path, ROOT).split(os.sep)[0].removesuffix(".rs")
            if top in ("main", "lib"):
                continue
            text = open(path, encoding="utf-8").read()
            text = "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))
            text = text.split("#[cfg(test)]")[0]
            names = set(re.findall(r"crate::([a-z_0-9]+)", text))
            for group in re.findall(r"use crate::\{([^;]*)\};", text, re.S):
                names.update(part.strip().split("::")[0].strip("{ ") for part in group.split(",") if part.strip())
            names.discard(top)
            deps.setdefault(top, set()).update(names)
    return {m: {d for d in ds if d in deps} for m, ds in deps.items()}


def circles(deps):
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(deps[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    deps = dependencies()
    if "-v" in sys.argv:
        for m in sorted(deps):
            print(f"{m} -> {', '.join(sorted(deps[m])) or '-'}")
    found = circles(deps)
    for group in found:
        print("import circle:", " <-> ".join(group))
    if not found:
        print(f"no import circles among {len(deps)} modules")
    sys.exit(1 if found else 0)
