"""Imports run one way: serving -> hypercast -> train -> runtime -> models -> (data, kernels).
Configs are plain values, and the expert trainer gets FM knowledge only as data."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"kernels": 0, "fmx.data": 0, "fmx.models": 1, "fmx.runtime": 2, "fmx.train": 3,
          "fmx.hypercast": 4, "fmx.serving": 5, "fmx.jobs": 6, "fmx.main": 6}
ANYWHERE = ("fmx.files", "fmx.configs")  # file primitives and plain-value configs


def layer(module: str):
  for prefix, rank in LAYERS.items():
    if module == prefix or module.startswith(prefix + "."):
      return rank
  return None


def imports():
  """(importer, imported) for every fmx/kernels module, function-level imports included."""
  for path in sorted([*ROOT.glob("fmx/**/*.py"), *ROOT.glob("kernels/**/*.py")]):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for name in names:
        if name.split(".")[0] in ("fmx", "kernels"):
          yield module, name


def test_imports_run_one_way():
  wrong = [(a, b) for a, b in imports()
           if not b.startswith(ANYWHERE) and layer(b) is not None and layer(a) is not None
           and layer(b) > layer(a)]
  assert not wrong


def test_configs_are_plain_values():
  """A config imports other configs only: no data, model or TensorFlow Datasets code."""
  assert not [(a, b) for a, b in imports()
              if a.startswith("fmx.configs") and not b.startswith("fmx.configs")]


def test_expert_trainer_never_runs_the_fm():
  assert not [b for a, b in imports() if a == "fmx.train.expert"
              and b.startswith(("fmx.runtime", "fmx.hypercast", "fmx.train.fm"))]


def test_streaming_experts_never_run_the_fm():
  """The streaming experts' FM knowledge is store rows and snapshot tables: no FM runtime, no
  FM trainer, no logging tier anywhere in what they import (transitively, within fmx)."""
  graph = {}
  for a, b in imports():
    graph.setdefault(a, set()).add(b)
  seen, todo = set(), ["fmx.hypercast.expert_stream"]
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo += [b for b in graph.get(m, ()) if b in graph]
  assert not [m for m in seen if m.startswith(
      ("fmx.runtime.fm", "fmx.runtime.mfalcon", "fmx.models.foundation", "fmx.train.fm",
       "fmx.hypercast.logging", "fmx.hypercast.fm_stream"))]
