"""`medsa serve` command line: options, refusals, and a real start on a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from medsa.cli import main


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in (
        "--backbone",
        "--checkpoint",
        "--adapter",
        "--root",
        "--host",
        "--port",
        "--device",
        "--precision",
    ):
        assert opt in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "0.0.0.0"], "--allow-remote"),
        (["--root", "/definitely/not/here"], "not a folder"),
        (["--port", "70000"], "--port"),
        (["--backbone", "vit_tiny", "--device", "cuda:0"], "cuda"),
        (["--backbone", "vit_tiny", "--device", "bogus"], "--device"),
        (["--backbone", "nope"], "unknown model"),
        (["--backbone", "vit_tiny", "--checkpoint", "/no/such.pth"], "such.pth"),
    ],
)
def test_user_errors_exit_1_without_traceback(tmp_path, capsys, argv, message):
    import torch

    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = main(["serve", "--root", str(tmp_path), "--output", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err


def test_precision_bf16_casts_the_model_or_refuses(monkeypatch):
    """--precision bf16 gives a bfloat16 model where bf16 is native, a clear refusal elsewhere."""
    import torch

    from medsa.engine import perf
    from medsa.errors import ConfigError
    from medsa.serve.cli import build_model

    fp32 = build_model("vit_tiny", None, None, "cpu")
    assert next(fp32.parameters()).dtype == torch.float32
    monkeypatch.setattr(perf, "supports_bf16", lambda device: True)
    bf16 = build_model("vit_tiny", None, None, "cpu", "bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    monkeypatch.setattr(perf, "supports_bf16", lambda device: False)
    with pytest.raises(ConfigError, match="no native bfloat16"):
        build_model("vit_tiny", None, None, "cpu", "bf16")


@pytest.mark.slow
def test_serve_starts_and_answers(tmp_path):
    import httpx

    (tmp_path / "data").mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "medsa.cli", "serve", "--backbone", "vit_tiny", "--port", "0",
           "--root", str(tmp_path / "data"), "--output", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        info = httpx.get(url + "/api/info", timeout=10).json()
        assert info["model"] == "vit_tiny"
        assert httpx.get(url + "/", timeout=10).status_code == 200
        assert (tmp_path / "out").is_dir()
    finally:
        proc.terminate()
        proc.wait(20)
