"""`python -m fmx.main --config=fmx/configs/serve_ml1m.py` end to end: off loopback it refuses
to start without a bearer token, and on a port in use (one line, exit 2); with one it serves, answers 401 without
the token, and stops cleanly on SIGTERM, writing results.json."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx

from servable import rank_body

ROOT = pathlib.Path(__file__).resolve().parents[2]


def serve(workdir, hypercast, env, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "fmx.main", "--config=fmx/configs/serve_ml1m.py:synthetic,runlocal",
       f"--workdir={workdir}", f"--config.serve.hypercast={hypercast}", "--config.serve.port=0",
       "--config.input.synthetic.num_users=300", "--config.serve.host=0.0.0.0",
       "--config.serve.batch_buckets=(1,)", "--config.serve.history_buckets=(50,)",
       *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_refuses_a_public_bind_without_a_token(tmp_path, served_workdir):
  env = {k: v for k, v in os.environ.items() if k != "FMX_SERVE_TOKEN"}
  p = serve(tmp_path, served_workdir[0], env)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith("fmx: error")]
  assert len(lines) == 1 and "not loopback" in lines[0] and "token" in lines[0], err[-2000:]


def test_refuses_a_port_in_use(tmp_path, served_workdir):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    p = serve(tmp_path, served_workdir[0], dict(os.environ), "--config.serve.host=127.0.0.1",
              f"--config.serve.port={port}")
    _, err = p.communicate(timeout=300)
  assert p.returncode == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith("fmx: error")]
  assert len(lines) == 1 and "in use" in lines[0] and "port" in lines[0], err[-2000:]


def test_serve_command_with_a_token(tmp_path, served_workdir):
  root, _, data, _, _ = served_workdir
  env = {**os.environ, "FMX_SERVE_TOKEN": "s3cret-token"}
  p = serve(tmp_path, root, env)
  try:
    address = tmp_path / "address.json"
    deadline = time.time() + 300
    while not address.exists():
      assert p.poll() is None and time.time() < deadline, p.stderr.read()[-2000:] if p.poll() is not None else "no address.json"
      time.sleep(0.2)
    port = json.loads(address.read_text())["url"].rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}"
    body = rank_body(data, n_hist=10, n_cand=8)
    rank = f"{url}/v1/surfaces/s1/rank"
    assert httpx.post(rank, json=body, timeout=30).status_code == 401
    wrong = httpx.post(rank, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    auth = {"Authorization": "Bearer s3cret-token"}
    ok = httpx.post(rank, json=body, headers=auth, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["candidates"]) == 8
    metrics = httpx.get(f"{url}/metrics", headers=auth, timeout=30).text
    fm_version = httpx.get(f"{url}/readyz", timeout=30).json()["fm_version"]  # service_test
    assert f'fmx_loaded_version{{component="fm"}} {fm_version}.0' in metrics  # may publish v2
    assert 'fmx_rejected_total{reason="unauthorized"} 3.0' in metrics
  finally:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
  assert p.returncode == 0, err[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["requests/200"] == 1 and results["fm_version"] == fm_version
  assert not (tmp_path / "address.json").exists()
