"""The layering rules of docs/ARCHITECTURE.md, read from the source: no import cycle among the
package's modules (lazy imports included) and no function longer than 60 lines."""
import ast
import pathlib

_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'vit_jax'
MAX_FUNCTION_LINES = 60


def _modules() -> dict:
  """Dotted module name -> parsed source, for every module of the package."""
  modules = {}
  for path in _PACKAGE.rglob('*.py'):
    parts = path.relative_to(_PACKAGE.parent).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    modules[name] = ast.parse(path.read_text(), str(path))
  return modules


def _imports(tree: ast.Module, modules: dict) -> set:
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('vit_jax'):
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        imported.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      imported |= {a.name for a in node.names if a.name.startswith('vit_jax')}
  return imported & modules.keys()


def _cycle(graph: dict):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for other in sorted(graph[module] - {module}):
      if state.get(other) == 'open':
        return path[path.index(other):] + [other]
      if other not in state and (found := visit(other, path + [other])):
        return found
    state[module] = 'done'
    return None

  for module in sorted(graph):
    if module not in state and (found := visit(module, [module])):
      return found
  return None


def test_no_import_cycle():
  modules = _modules()
  graph = {name: _imports(tree, modules) for name, tree in modules.items()}
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():  # Else the test above could not fail.
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_function_over_60_lines():
  long = [f'{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines'
          for name, tree in _modules().items() for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, long
