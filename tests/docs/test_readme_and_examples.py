"""The README's snippets and the examples run as written.

README code blocks whose first line is ``# test: run`` are executed in a fresh interpreter in an
empty directory; ``# test: s3`` blocks run against the moto S3 server with ``my-bucket`` replaced
by a fresh bucket and the AWS variables exported. The FSDP example runs under torchrun with 2
ranks against the same server, twice (the second run resumes); the PEFT example runs once
``ckptio-peft`` is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
_BLOCK = re.compile(r"```python\n(# test: (\w+)\n.*?)```", re.S)


def readme_blocks(kind: str, path: Path = README) -> list[str]:
    return [code for code, k in _BLOCK.findall(path.read_text()) if k == kind]


DOCS = sorted((REPO / "docs").glob("*.md"))


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    full = {**os.environ, "CKPTIO_PROGRESS": "0", "PYTHONWARNINGS": "ignore", **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_readme_has_the_two_commands_first() -> None:
    text = README.read_text()
    first_block = text.index("```")
    assert "make demo" in text[first_block : first_block + 300]
    assert "make test" in text[first_block : first_block + 300]
    assert readme_blocks("run") and readme_blocks("s3")


@pytest.mark.slow
def test_readme_snippets_run(tmp_path: Path) -> None:
    blocks = readme_blocks("run")
    script = "\n\n".join(f"# --- README block {i}\n{code}" for i, code in enumerate(blocks))
    (tmp_path / "snippets.py").write_text(script)
    out = _run([sys.executable, "snippets.py"], tmp_path)
    assert "[20, 30]" in out  # the manager block's retention result, as the README says
    assert (tmp_path / "ckpt" / "one" / "manifest.json").exists()


@pytest.mark.slow
def test_docs_snippets_run(tmp_path: Path) -> None:
    """``# test: run`` blocks in docs/*.md (the backend and addon guides' complete examples)."""
    ran = 0
    for doc in DOCS:
        for i, code in enumerate(readme_blocks("run", doc)):
            script = tmp_path / f"{doc.stem}_{i}.py"
            script.write_text(code)
            _run([sys.executable, script.name], tmp_path)
            ran += 1
    assert ran >= 2


def test_docs_links_resolve() -> None:
    for doc in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
    names = {d.name for d in DOCS}
    assert {"cli.md", "configuration.md", "formats.md", "commit-protocol.md"} <= names
    assert {"writing-a-backend.md", "writing-an-addon.md"} <= names


def test_cli_doc_lists_every_subcommand_and_exit_code() -> None:
    from ckptio import cli

    text = (REPO / "docs" / "cli.md").read_text()
    for name in ("plugins", "ls", "inspect", "verify", "cp", "consolidate", "rm", "demo"):
        assert f"ckptio {name}" in text
    for code in cli.EXIT_CODES:
        assert f"| {code} |" in text


@pytest.mark.servers
def test_readme_s3_snippet(tmp_path: Path, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ckptio_fsspec")
    code = "\n".join(readme_blocks("s3")).replace("my-bucket", s3_bucket)
    (tmp_path / "s3.py").write_text(code)
    _run([sys.executable, "s3.py"], tmp_path, env=s3_server.env())
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert "runs/one/manifest.json" in keys


def _cli_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """``ckptio ARGS --json`` in this process (the console script is covered by tests/cli)."""
    from ckptio import cli

    capsys.readouterr()
    code = cli.main([*args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


@pytest.mark.servers
@pytest.mark.multirank
@pytest.mark.slow
def test_fsdp_example_under_torchrun_on_s3(  # type: ignore[no-untyped-def]
    tmp_path: Path, s3_server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ckptio_fsspec")
    url = f"s3://{s3_bucket}/runs/fsdp"
    env = {**s3_server.env(), "S3_ENDPOINT_URL": s3_server.endpoint_url, "OMP_NUM_THREADS": "1"}
    script = str(REPO / "examples" / "torchrun_fsdp_s3" / "train.py")

    def torchrun(steps: int) -> str:
        return _run(
            [
                str(BIN / "torchrun"),
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(_free_port()),
                script,
                "--url",
                url,
                "--steps",
                str(steps),
                "--save-every",
                "4",
                "--width",
                "32",
            ],
            tmp_path,
            env=env,
            timeout=400,
        )

    out = torchrun(8)
    assert "done: steps [4, 8]" in out
    out = torchrun(12)  # resumes from step 8
    assert "resumed from step 8" in out and "done: steps [8, 12]" in out
    # the series is complete on S3 and passes verification through the CLI
    opts = ["--storage-options", json.dumps(s3_server.storage_options())]
    ls = _cli_json(["ls", url, *opts], capsys)
    assert ls["latest"] == 12 and all(s["world_size"] == 2 for s in ls["steps"])
    assert _cli_json(["verify", url, *opts], capsys)["ok"]
    # and a 2-rank sharded step becomes one full local checkpoint
    full = tmp_path / "full"
    cp = _cli_json(["cp", url, str(full), "--full", *opts], capsys)
    assert cp["mode"] == "convert"
    import ckptio

    assert ckptio.manifest(str(full)).world_size == 1 and ckptio.manifest(str(full)).step == 12


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_peft_example(tmp_path: Path) -> None:
    pytest.importorskip("ckptio_peft")
    pytest.importorskip("peft")
    script = str(REPO / "examples" / "peft_finetune" / "finetune.py")
    out = _run(
        [sys.executable, script, "--url", str(tmp_path / "ckpts"), "--steps", "4", "--save-every", "2"],
        tmp_path,
    )
    assert "adapter_model.safetensors" in out and "adapter_config.json" in out
    assert "reproduces the fine-tuned model: True" in out
    # and the run resumes
    out = _run(
        [sys.executable, script, "--url", str(tmp_path / "ckpts"), "--steps", "6", "--save-every", "2"],
        tmp_path,
    )
    assert "resumed at step 4" in out
