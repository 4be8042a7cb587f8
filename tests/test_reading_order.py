"""The course's reading order: no notebook imports a module that a later notebook exports (issue 13, item 7).

Notebooks are read in the order of their file names' numbers (`10` < `10a` < `11`). Each `detr_explained.X` module
belongs to the notebook whose `#| default_exp X` writes it. A code cell of notebook N that imports X (`import
detr_explained.X`, `from detr_explained.X import`, `from detr_explained import X`, or, in an exported cell, `from .X
import`) is a forward reference when X's notebook comes after N: the reader would meet a name before its derivation.
"""
import ast
import json
import re
from pathlib import Path

NBS = Path(__file__).resolve().parents[1] / 'nbs'
_NUMBER = re.compile(r'(\d+)([a-z]?)_')


def course_order(folder: Path = NBS) -> list[Path]:
    "The numbered notebooks of `folder`, in reading order."
    nbs = [p for p in folder.glob('*.ipynb') if _NUMBER.match(p.name)]
    return sorted(nbs, key=lambda p: (int(_NUMBER.match(p.name)[1]), _NUMBER.match(p.name)[2], p.name))


def code_cells(nb: Path) -> list[tuple[int, str]]:
    "(index, source) of every code cell."
    cells = json.loads(nb.read_text())['cells']
    return [(i, ''.join(c['source'])) for i, c in enumerate(cells) if c['cell_type'] == 'code']


def exported_modules(nbs: list[Path]) -> dict[str, Path]:
    "Module name -> the notebook whose `#| default_exp` exports it."
    out = {}
    for nb in nbs:
        for _, src in code_cells(nb):
            m = re.search(r'^#\|\s*default_exp\s+([\w.]+)', src, re.M)
            if m: out[m[1]] = nb
    return out


def _parseable(src: str) -> str:
    "The cell without IPython's magics and shell escapes (lines starting with % or !), so `ast` can read it."
    return '\n'.join('' if line.lstrip().startswith(('%', '!')) else line for line in src.splitlines())


def imported_modules(src: str) -> set[str]:
    "The detr_explained modules a cell imports, anywhere in it (module level or inside a function)."
    try: tree = ast.parse(_parseable(src))
    except SyntaxError:
        raise AssertionError(f'cannot parse a code cell:\n{src[:300]}') from None
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('detr_explained.')}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 0 and mod == 'detr_explained': out |= {a.name for a in node.names}
            elif node.level == 0 and mod.startswith('detr_explained.'): out.add(mod.split('.')[1])
            elif node.level == 1 and mod: out.add(mod.split('.')[0])           # an exported cell's `from .X import`
            elif node.level == 1: out |= {a.name for a in node.names}          # `from . import X`
    return out


def forward_imports(folder: Path = NBS) -> list[str]:
    "One line per (notebook, cell, module) where a notebook imports a module exported by a later notebook."
    nbs = course_order(folder)
    rank, owner = {nb: i for i, nb in enumerate(nbs)}, exported_modules(nbs)
    found = []
    for nb in nbs:
        for i, src in code_cells(nb):
            for mod in sorted(imported_modules(src)):
                if mod in owner and rank[owner[mod]] > rank[nb]:
                    found.append(f'{nb.name} cell {i} imports detr_explained.{mod}, exported by the later {owner[mod].name}')
    return found


def test_no_notebook_imports_a_later_notebook():
    found = forward_imports()
    assert not found, 'forward imports in the course (reorder, or move the cell after the module\'s notebook):\n' + '\n'.join(found)


def test_every_module_has_one_notebook():
    "Each library module is exported by exactly one notebook (else the order above would be ambiguous)."
    seen = {}
    for nb in course_order():
        for _, src in code_cells(nb):
            for m in re.findall(r'^#\|\s*default_exp\s+([\w.]+)', src, re.M):
                assert m not in seen, f'detr_explained.{m} is exported by both {seen[m].name} and {nb.name}'
                seen[m] = nb
    pkg = NBS.parent / 'detr_explained'
    modules = {p.stem for p in pkg.glob('*.py') if not p.stem.startswith('_')}
    assert modules <= set(seen), f'modules with no notebook: {sorted(modules - set(seen))}'


def test_the_check_finds_a_forward_import(tmp_path):
    "The check itself: a notebook importing a later notebook's module is reported with notebook, cell and module."
    def write(name, *cells):
        nb = {'cells': [{'cell_type': 'code', 'source': [c], 'metadata': {}, 'outputs': [], 'execution_count': None}
                        for c in cells], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
        (tmp_path / name).write_text(json.dumps(nb))
    write('01_a.ipynb', '#| default_exp a', '#| export\nfrom .b import f')
    write('02_b.ipynb', '#| default_exp b', 'from detr_explained import a\nimport detr_explained.c')
    write('02a_c.ipynb', '#| default_exp c', 'def g():\n    from detr_explained.b import f\n%time g()')
    assert forward_imports(tmp_path) == [
        '01_a.ipynb cell 1 imports detr_explained.b, exported by the later 02_b.ipynb',
        '02_b.ipynb cell 1 imports detr_explained.c, exported by the later 02a_c.ipynb']
    assert [p.name for p in course_order(tmp_path)] == ['01_a.ipynb', '02_b.ipynb', '02a_c.ipynb']


def test_the_course_map_follows_the_reading_order():
    "00_index's course map names the notebooks in the order the check above reads them."
    cells = json.loads((NBS / '00_index.ipynb').read_text())['cells']
    text = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    table = text.split('## Course map', 1)[1].split('\n\n##', 1)[0]
    listed = [n for row in table.splitlines() if row.startswith('| `')
              for n in re.findall(r'`(\d+[a-z]?_\w+)`', row.split('|')[1])]
    rank = {p.stem: i for i, p in enumerate(course_order())}
    missing = [n for n in listed if n not in rank]
    assert not missing, f'the course map names notebooks that do not exist: {missing}'
    ranks = [rank[n] for n in listed]
    out_of_order = [f'{a} before {b}' for (a, ra), (b, rb) in zip(zip(listed, ranks), zip(listed[1:], ranks[1:])) if rb < ra]
    assert not out_of_order, 'the course map is not in reading order: ' + '; '.join(out_of_order)
