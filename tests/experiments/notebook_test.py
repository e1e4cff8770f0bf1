"""The Colab notebook, executed headless on the CPU with its `ci` parameters (papermill)."""

import pathlib

import nbformat
import papermill

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "notebooks" / "fmx_colab.ipynb"


def test_the_committed_notebook_is_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)  # no stale outputs
  assert code[0].metadata.get("tags") == ["parameters"]


def test_the_notebook_runs_every_stage_on_the_cpu(tmp_path):
  out = tmp_path / "out.ipynb"
  papermill.execute_notebook(str(NOTEBOOK), str(out), cwd=str(tmp_path), progress_bar=False,
                             parameters={"SCALE": "ci", "WORKDIR": str(tmp_path / "runs")})
  nb = nbformat.read(out, as_version=4)
  text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "HSTU attention: xla" in text
  assert "| ne/s0/click |" in text  # the FM's table
  assert "{'fm_version': 'v1', 'rows':" in text  # the logging tier
  assert "| s0/comment |" in text and "unseen by the FM" in text  # the expert on an unseen task
  assert "expert vs alone, ΔNE %" in text and "| s0/click |" in text  # HyperCast
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == 2
  for name in ("fm", "expert/s0", "logging", "hypercast"):
    assert (tmp_path / "runs" / name / "results.json").exists() or name == "expert/s0"
  assert (tmp_path / "runs" / "expert" / "results.json").exists()
