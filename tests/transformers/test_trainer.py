"""ckptio-transformers with a real ``transformers.Trainer`` on a tiny Llama (CPU, nothing downloaded).

The subject is ``tests/transformers/_train.py``, a standard Trainer script with three lines changed.
Losses are compared bit for bit with an uninterrupted run (``logging_steps=1``): the resumed run
must see the same weights, optimizer and scheduler state, data order and random numbers
(the model has dropout, so a missed RNG restore shows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch

pytest.importorskip("ckptio_transformers")
from . import _train  # imports ckptio_transformers

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_train.py")


def losses(log_history: list[dict[str, Any]]) -> list[tuple[int, float, float, float]]:
    rows = [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in log_history if "loss" in e]
    assert rows
    return rows


@pytest.fixture(autouse=True)
def deterministic_single_thread() -> Iterator[None]:
    """One thread (as the subprocesses, OMP_NUM_THREADS=1) so in-process runs reproduce theirs
    bit for bit; ``full_determinism`` flips global switches, put back afterwards."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    env = {
        k: os.environ.get(k)
        for k in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")
    }
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StopAt(_train.TrainerCallback):
    """Ends training cleanly after ``step`` (an interruption without a kill, for in-process runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
        "CKPTIO_PROGRESS": "0",
        **extra,
    }


@pytest.mark.slow
def test_killed_run_resumes_from_s3_bit_exact(tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/runs/llama"
    env = _child_env(s3_server.env())
    log = open(tmp_path / "killed.log", "wb")
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--url", url, "--output-dir", str(tmp_path / "out"),
         "--out", str(tmp_path / "killed.json"), "--pause-after", "6"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # the uninterrupted run, here, while the child starts
        reference = _train.run(str(tmp_path / "reference"), str(tmp_path / "ref-out"))
        assert reference["steps"] == [3, 6, 9, 10]

        with ckptio.CheckpointManager(url, storage_options=s3_server.storage_options()) as watcher:
            deadline = time.monotonic() + 240
            while 6 not in watcher.steps():
                assert child.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "step 6 was never committed"
                time.sleep(0.2)
            os.kill(child.pid, signal.SIGKILL)  # step 6 is committed: crash now
            assert child.wait(30) == -signal.SIGKILL
            assert watcher.steps() == [3, 6]
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
        log.close()
    assert not (tmp_path / "killed.json").exists()

    # a second process resumes (taking the run over from the dead one) and finishes
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", url, "--output-dir", str(tmp_path / "out"),
         "--out", str(tmp_path / "resumed.json"), "--resume", "true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert losses(resumed["log_history"]) == losses(reference["log_history"])  # bit for bit
    assert resumed["digest"] == reference["digest"]
    assert resumed["steps"] == [3, 6, 9, 10]
    # the steps are on S3, each with HF's trainer_state.json covered by the manifest
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "runs/llama/step_00000010/trainer_state.json" in keys
    m = ckptio.manifest(f"{url}/step_00000010", storage_options=s3_server.storage_options())
    assert {"trainer_state.json", "config.json"} <= set(m.files)
    assert m.metadata["transformers"]["entries"] == ["model", "optimizer", "rng", "trainer_state"]


def test_resume_true_from_an_empty_url_is_an_error(tmp_path: Path, s3_env: Any, s3_bucket: str) -> None:
    from ckptio_transformers import CkptioTrainer

    trainer = CkptioTrainer(
        model=_train.tiny_model(),
        args=_train.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=2, use_cpu=True, report_to="none"
        ),
        train_dataset=_train.TokenDataset(),
        ckptio_url=f"s3://{s3_bucket}/empty-run",
    )
    with pytest.raises(ckptio.CheckpointNotFoundError, match=r"no checkpoint at s3://.*/empty-run"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ckptio.CheckpointNotFoundError, match="there is no checkpoint there"):
        trainer.train(resume_from_checkpoint=f"s3://{s3_bucket}/elsewhere")
    with pytest.raises(ckptio.CheckpointNotFoundError, match=r"no checkpoint for step 3 \(checkpoint-3\)"):
        trainer.train(resume_from_checkpoint="checkpoint-3")
    assert trainer.state.global_step == 0  # nothing was trained: no silent fresh start
    assert trainer.checkpoint_manager.steps() == []


def test_peft_lora_resumes_bit_exact_from_an_explicit_url(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("ckptio_peft")
    first = tmp_path / "first"
    reference = _train.run(str(first), str(tmp_path / "out"), peft=True, max_steps=8, save_steps=2)
    assert reference["steps"] == [2, 4, 6, 8]
    step4 = first / "step_00000004"
    # the adapter only, in PEFT's own format, next to the native entries
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= set(
        os.listdir(step4)
    )
    m = ckptio.manifest(str(step4))
    assert "peft" in m.addons and m.metadata["transformers"]["peft"] is True
    assert m.total_bytes < 200_000  # the base model (~100k parameters) is not in it

    # a new run resumes from that step (a URL outside its own root) and saves into its own root
    resumed = _train.run(
        str(tmp_path / "second"),
        str(tmp_path / "out"),
        peft=True,
        max_steps=8,
        save_steps=2,
        resume=str(step4),
    )
    assert losses(resumed["log_history"]) == losses(reference["log_history"])
    assert resumed["digest"] == reference["digest"]
    assert resumed["steps"] == [6, 8]


def test_resume_by_hf_checkpoint_name_after_a_clean_stop(tmp_path: Path) -> None:
    reference = _train.run(str(tmp_path / "ref"), str(tmp_path / "out"))
    url = str(tmp_path / "run")
    stopped = _train.run(url, str(tmp_path / "out"), callbacks=[StopAt(7)])
    assert stopped["steps"] == [3, 6]
    resumed = _train.run(url, str(tmp_path / "out"), resume="checkpoint-3")  # HF's name for step 3
    assert losses(resumed["log_history"]) == losses(reference["log_history"])
    assert resumed["digest"] == reference["digest"]


def test_save_total_limit_is_retention(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    out = _train.run(
        url, str(tmp_path / "out"), max_steps=5, save_steps=1, save_total_limit=2, ckptio_async_save=True
    )
    assert out["steps"] == [4, 5]
    assert sorted(p for p in os.listdir(url) if p.startswith("step_")) == ["step_00000004", "step_00000005"]


def test_best_checkpoint_is_kept_and_loaded_at_end(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    scores = iter([5.0, 9.0, 1.0, 3.0, 2.0])  # the best (max) is the evaluation at step 2

    def compute_metrics(_: Any) -> dict[str, float]:
        return {"score": next(scores)}

    url = str(tmp_path / "run")
    out = _train.run(
        url,
        str(tmp_path / "out"),
        max_steps=5,
        save_steps=1,
        save_total_limit=2,
        extra_args={
            "eval_strategy": "steps",
            "eval_steps": 1,
            "load_best_model_at_end": True,
            "metric_for_best_model": "score",
            "greater_is_better": True,
        },
        eval_dataset=_train.TokenDataset(4, seed=7),
        compute_metrics=compute_metrics,
    )
    best = str(tmp_path / "run" / "step_00000002")
    assert out["best_model_checkpoint"] == best
    assert out["steps"] == [2, 5]  # HF's rule: the 2 newest, but never the best
    assert ckptio.manifest(best).metrics["eval_score"] == 9.0
    # load_best_model_at_end: the trainer ends with step 2's weights
    model = _train.tiny_model()
    assert isinstance(model, LlamaForCausalLM)
    ckptio.load({"model": ckptio.ModelState(model)}, best, strict=False)
    assert out["digest"] == _train.weights_digest(model)


def test_enable_wraps_an_existing_trainer_and_resumes_a_stock_trainer_checkpoint(tmp_path: Path) -> None:
    import ckptio_transformers
    from transformers import Trainer

    reference = _train.run(str(tmp_path / "ref"), str(tmp_path / "ref-out"))

    def stock(max_stop: int | None, out: str) -> Trainer:
        torch.manual_seed(0)
        args = _train.TrainingArguments(
            output_dir=out, max_steps=10, per_device_train_batch_size=4, learning_rate=5e-3, warmup_steps=2,
            logging_steps=1, save_steps=3, seed=42, full_determinism=True, use_cpu=True, report_to="none",
            disable_tqdm=True,
        )  # fmt: skip
        return Trainer(
            model=_train.tiny_model(),
            args=args,
            train_dataset=_train.TokenDataset(),
            callbacks=[StopAt(max_stop)] if max_stop else None,
        )

    out = str(tmp_path / "hf-out")
    stock(4, out).train()  # the stock Trainer writes checkpoint-3 and checkpoint-4 itself
    trainer = ckptio_transformers.enable(stock(None, out), str(tmp_path / "run"))
    assert isinstance(trainer, Trainer) and type(trainer).__name__ == "CkptioTrainer"
    trainer.train(
        resume_from_checkpoint=os.path.join(out, "checkpoint-3")
    )  # the stock format, read the stock way
    assert losses(trainer.state.log_history) == losses(reference["log_history"])
    assert trainer.checkpoint_manager.steps() == [6, 9, 10]


def test_transformers_version_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptio_transformers import (
        SUPPORTED_TRANSFORMERS,
        TransformersVersionError,
        check_transformers_version,
    )

    check_transformers_version()  # the installed one is supported
    for bad in ("4.57.1", "6.0.0", "not-a-version"):
        with pytest.raises(TransformersVersionError, match=f"supports transformers{SUPPORTED_TRANSFORMERS}"):
            check_transformers_version(bad)

    class Renamed:  # a release whose private method changed shape
        def _save_checkpoint(self, model, trial, extra): ...  # type: ignore[no-untyped-def]

    with pytest.raises(TransformersVersionError, match="Trainer._save_checkpoint"):
        check_transformers_version("5.24.0", Renamed)

    import transformers
    from ckptio_transformers import CkptioTrainer

    monkeypatch.setattr(transformers, "__version__", "6.1.0")
    with pytest.raises(TransformersVersionError, match=r">=5.0,<6"):
        CkptioTrainer(model=_train.tiny_model(), ckptio_url="unused")
    monkeypatch.setenv("CKPTIO_TRANSFORMERS_SKIP_VERSION_CHECK", "1")
    check_transformers_version("6.1.0")


def test_the_plugin_registers_the_integration() -> None:
    from ckptio_transformers import plugin

    seen: list[tuple[str, str]] = []
    plugin.register_integrations(lambda name, target: seen.append((name, target)))
    assert seen == [("transformers", "ckptio_transformers:CkptioTrainer")]
    assert any(p.name == "transformers" and p.error is None for p in ckptio.list_plugins())


def test_docs_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runnable block of docs/transformers.md (tests/docs runs it in a fresh interpreter too)."""
    from tests.docs.test_readme_and_examples import readme_blocks

    blocks = readme_blocks("run", REPO / "docs" / "transformers.md")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/transformers.md", "exec"), {"__name__": "__main__"})
    assert "[4, 6]" in capsys.readouterr().out
