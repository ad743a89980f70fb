"""The import graph of a package: its floors, its circles and the arrows that run back up between
its subpackages. `python .ci/layers.py jobs` prints them; tests/test_layers.py holds jobs/ to
0 circles, 0 arrows back up and at most 8 floors.

Every import of a project module counts, wherever it is written (a function's body, an `if
TYPE_CHECKING:` block): a lazy import is still a dependency. A floor is the length of the longest
chain of imports below a module (a module importing nothing of the package is on floor 1); the
package's floors count its rooms (a subpackage is one room, as is each module beside them), the
way a reader meets the package, and the modules' floors are printed beside them.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layers:
    floors: dict[str, int]  # module -> floor (modules in a circle share one)
    room_floors: dict[str, int]  # the same over rooms: each subpackage, and each module directly in the package
    arrows: list[tuple[str, str]]
    circles: list[list[str]]  # modules importing each other, directly or through others
    arrows_up: list[tuple[str, str]]  # imports between subpackages that import each other


def module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that the parsed module imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def circles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def floors_of(graph: dict[str, set[str]], circles: list[list[str]]) -> dict[str, int]:
    """Each node's floor: 1 + the highest floor it imports (a circle's members are one node)."""
    group = {member: tuple(circle) for circle in circles for member in circle}
    floors: dict[str, int] = {}

    def floor(node: str) -> int:
        if node not in floors:
            members = group.get(node, (node,))
            for member in members:
                floors[member] = 0  # being measured: an import back into the circle adds nothing
            below = {target for member in members for target in graph[member]} - set(members)
            value = 1 + max((floor(target) for target in below), default=0)
            for member in members:
                floors[member] = value
        return floors[node]

    for node in sorted(graph):
        floor(node)
    return floors


def layers(package: str, root: Path = ROOT) -> Layers:
    paths = sorted((root / package.replace(".", "/")).rglob("*.py"))
    known = {module_of(path, root) for path in paths}
    graph = {module_of(path, root): imported(ast.parse(path.read_text()), module_of(path, root), path.name == "__init__.py", known)
             for path in paths}
    circles = circles_of(graph)
    floors = floors_of(graph, circles)
    depth = package.count(".") + 2  # the subpackage (or top-level module) each module belongs to
    room = {node: ".".join(node.split(".")[:depth]) for node in graph}
    rooms = {r: set() for r in room.values()}
    for node, targets in graph.items():
        rooms[room[node]] |= {room[t] for t in targets if room[t] != room[node]}
    room_circles = circles_of(rooms)
    tangled = {r for circle in room_circles for r in circle}
    arrows = [(node, target) for node in sorted(graph) for target in sorted(graph[node])]
    arrows_up = [(a, b) for a, b in arrows if room[a] in tangled and room[b] in tangled and room[a] != room[b]]
    return Layers(floors, floors_of(rooms, room_circles), arrows, circles, arrows_up)


def main(package: str) -> int:
    found = layers(package)
    for floor in sorted(set(found.room_floors.values()), reverse=True):
        print(f"floor {floor}")
        for room in sorted(r for r, f in found.room_floors.items() if f == floor):
            inside = sorted(m for m in found.floors if m.startswith(room + ".") and room != package)
            modules = ", ".join(f"{m.removeprefix(room + '.')} {found.floors[m]}" for m in inside)
            print(f"  {room}" + (f"  (modules and their floors: {modules})" if inside else f"  {found.floors[room]}"))
    print(f"{len(found.floors)} modules in {len(found.room_floors)} rooms, {len(found.arrows)} arrows, "
          f"{max(found.room_floors.values())} floors ({max(found.floors.values())} counting modules), "
          f"{len(found.circles)} circles, {len(found.arrows_up)} arrows back up")
    for circle in found.circles:
        print("circle: " + " <-> ".join(circle))
    for source, target in found.arrows_up:
        print(f"arrow back up: {source} -> {target}")
    return 1 if found.circles or found.arrows_up else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "jobs"))
