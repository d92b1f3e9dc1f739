"""The user's mistakes end as one line, ``error: <message>``, and exit status 2, through the real
entry points (megatron_papo/errors.py); the line is printed once per job and node."""

import importlib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_papo import errors
from megatron_papo.compat import mcore_compat
from megatron_papo.config import ConfigError
from megatron_papo.data.rows import DataError
from megatron_papo.distributed import destroy_distributed
from megatron_papo.errors import UserError, report_user_error

ROOT = Path(__file__).parents[2]
TINY = ["--config", "examples/tiny_papo_g.yaml", "data.limit=16", "train.steps=1", "evaluation.interval=-1",
        "logging.tensorboard=false", "logging.progress_bar=false"]


def _subprocess(module: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    """The entry point as its own process (``python -m module``): exit status and streams as the
    user sees them. Costs ~10 s of start-up (torch, megatron-core) per call, so only a few tests
    use it; the rest call the same ``main`` in-process (:func:`cli`)."""
    return subprocess.run([sys.executable, "-m", module, *args, f"logging.dir={tmp / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@dataclass
class Ran:
    """What an in-process call of an entry point's ``main`` returned and printed."""

    returncode: int
    stdout: str
    stderr: str
    """stderr, then the log records (the entry points log to stderr)."""


@pytest.fixture
def cli(capsys, caplog):
    """Call an entry point's ``main(argv)`` in this process, as ``python -m module`` would
    (``sys.exit(main())``): its return value is the exit status. Process groups it leaves (a
    user error after start-up) are torn down after each call, CPU patches after the test."""
    patched_before = bool(mcore_compat.applied_patches())

    def run(module: str, *args: str, tmp: Path) -> Ran:
        capsys.readouterr()
        caplog.clear()
        main = (importlib.import_module(module) if module.startswith("megatron_papo") else _tool(module)).main
        with caplog.at_level(logging.INFO):
            try:
                code = main([*args, f"logging.dir={tmp / 'run'}"] if module.startswith("megatron_papo")
                            else list(args))
            finally:
                destroy_distributed()
        out = capsys.readouterr()
        return Ran(code, out.out, out.err + caplog.text)

    yield run
    if not patched_before:
        mcore_compat.revert_cpu_patches()


def _tool(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "tools"))


def _one_error_line(proc: subprocess.CompletedProcess | Ran, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_the_project_errors_are_user_errors():
    from megatron_papo.compat.optional_deps import MissingDependencyError
    from megatron_papo.models.hf_qwen2_5_vl import HFCheckpointError
    from megatron_papo.models.qwen2_5_vl import UnsupportedArchitectureError
    from megatron_papo.plotting import MetricsFileError
    from megatron_papo.training.checkpointing import CheckpointError

    for cls in (ConfigError, DataError, CheckpointError, HFCheckpointError, UnsupportedArchitectureError,
                MissingDependencyError, MetricsFileError):
        assert issubclass(cls, UserError), cls


def test_a_bad_config_value(tmp_path):  # as a process: the real exit status and streams
    _one_error_line(_subprocess("megatron_papo.train", *TINY, "train.sft_lr=-1e-4", tmp=tmp_path),
                    "train.sft_lr: expected a finite value in (0.0, 1.0]")


def test_a_data_file_that_does_not_exist_after_startup(tmp_path):  # as a process, after start-up
    missing = tmp_path / "nowhere.jsonl"
    _one_error_line(_subprocess("megatron_papo.train", *TINY, f"data.train={missing}", tmp=tmp_path),
                    str(missing))


def test_a_jsonl_without_the_question_column(cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    row = json.dumps({"image": "x.png", "question": "q", "answer": "a"})
    path.write_text("\n".join([row] * 3))
    _one_error_line(cli("megatron_papo.train", *TINY, f"data.train={path}", tmp=tmp_path),
                    str(path), "problem")


def test_evaluate_a_checkpoint_that_does_not_exist(cli, tmp_path):
    _one_error_line(cli("megatron_papo.evaluate", *TINY, "--checkpoint", str(tmp_path / "no_ckpt"),
                         tmp=tmp_path), "no_ckpt")


def test_convert_a_config_json_that_is_not_json(cli, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    _one_error_line(cli("convert_hf_to_megatron", "--hf", str(hf), "--out", str(tmp_path / "out"),
                        tmp=tmp_path), f"{hf / 'config.json'}: not valid JSON")


def test_the_line_is_printed_once_per_job_and_node(monkeypatch, capsys, tmp_path):
    """Two ranks of one torchrun job (same launcher pid and run id): the first reports, the
    second is silent; both exit 2. A single process always reports."""
    monkeypatch.setattr(errors.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert report_user_error(ConfigError("x: bad")) == 2
    assert report_user_error(ConfigError("x: bad")) == 2
    assert capsys.readouterr().err == "error: x: bad\n"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # another job reports again
    report_user_error(ConfigError("y: bad"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    report_user_error("z: bad")
    report_user_error("z: bad")
    assert capsys.readouterr().err == "error: y: bad\nerror: z: bad\nerror: z: bad\n"


def test_the_comparison_tool_reports_a_wrong_flag_value_in_one_line(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compare_algorithms
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert compare_algorithms.main(["--algos", "nope"]) == 2
    assert capsys.readouterr().err == "error: --algos: no examples/tiny_nope.yaml\n"


def test_other_exceptions_keep_their_traceback():
    @errors.exit_on_user_error
    def main() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main()


def _train(cli, tmp: Path, *extra: str) -> Ran:
    return cli("megatron_papo.train", *TINY, "train.sft_warmup_steps=0", "rollout.prompts_per_step=2",
                "train.update_prompts=2", "rollout.n=2", "rollout.max_new_tokens=4",
                "train.micro_batch_size=4", "model.num_layers=1", f"checkpoint.dir={tmp / 'ckpt'}", *extra,
                tmp=tmp)


def test_resume_says_where_it_starts_and_refuses_a_missing_checkpoint_or_a_changed_objective(cli, tmp_path):
    """--resume into a dir without a checkpoint stops (a mistyped dir must not start over);
    --resume-or-start starts fresh and says so; a later --resume says where it continues, and
    stops when a field that changes the maths differs, unless --resume-allow-changes."""
    _one_error_line(_train(cli, tmp_path, "--resume"), f"--resume: no checkpoint under {tmp_path / 'ckpt'}",
                    "--resume-or-start")
    assert not (tmp_path / "run" / "config.yaml").exists()  # a refused run writes nothing
    first = _train(cli, tmp_path, "--resume-or-start")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"starting fresh (no checkpoint under {tmp_path / 'ckpt'})" in first.stderr
    more = _train(cli, tmp_path, "--resume", "train.steps=2")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from " in more.stderr and "resumed at step 1" in more.stderr
    _one_error_line(_train(cli, tmp_path, "--resume", "train.steps=3", "loss.gamma=0.5"),
                    "loss.gamma: 0.02 -> 0.5", "--resume-allow-changes")
    allowed = _train(cli, tmp_path, "--resume-allow-changes", "train.steps=3", "loss.gamma=0.5")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resuming with a changed field (--resume-allow-changes): loss.gamma: 0.02 -> 0.5" in allowed.stderr


def test_evaluate_without_a_checkpoint_refuses_unless_random_init(cli, tmp_path):
    _one_error_line(cli("megatron_papo.evaluate", *TINY, "evaluation.num_prompts=2", "evaluation.k=1",
                         tmp=tmp_path), "nothing to evaluate", "--random-init")
    ok = cli("megatron_papo.evaluate", *TINY, "evaluation.num_prompts=2", "evaluation.k=1", "--random-init",
              tmp=tmp_path)
    assert ok.returncode == 0 and "eval/accuracy" in ok.stdout, ok.stderr[-2000:]


def test_a_missing_eval_file_stops_the_run_before_its_first_step(cli, tmp_path):
    missing = tmp_path / "eval.jsonl"
    proc = cli("megatron_papo.train", *TINY, "evaluation.interval=0", f"data.eval={missing}", tmp=tmp_path)
    _one_error_line(proc, str(missing))
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text()  # stopped before any step


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_never_read_and_resume_falls_back_to_an_intact_one(cli, tmp_path):
    """One flipped bit in the newest checkpoint's largest file: --resume names it and continues
    from the previous checkpoint (keep_last kept it); with every checkpoint damaged (a flipped
    bit, a truncated file) it stops with one line; evaluate refuses a damaged checkpoint."""
    ckpt = tmp_path / "ckpt"
    keep = ("checkpoint.save_interval=1", "checkpoint.keep_last=2")
    first = _train(cli, tmp_path, "train.steps=2", *keep)
    assert first.returncode == 0, first.stderr[-3000:]
    step1, step2 = ckpt / "step_00000001", ckpt / "step_00000002"
    assert (step2 / "manifest.json").is_file()
    biggest = max((p for p in step2.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _flip_a_byte(biggest)
    again = _train(cli, tmp_path, "--resume", "train.steps=2", *keep)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint {step2} is damaged ({biggest}: sha256 differs from the manifest)" in again.stderr
    assert f"resuming from {step1}" in again.stderr and "resumed at step 1" in again.stderr
    # the rerun step 2 replaced the damaged one: now damage both
    _flip_a_byte(max((p for p in step2.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size))
    victim = next(step1.rglob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-7])
    _one_error_line(_train(cli, tmp_path, "--resume", "train.steps=3"), f"no intact checkpoint under {ckpt}",
                    f"{victim}: ")
    _one_error_line(cli("megatron_papo.evaluate", *TINY, "model.num_layers=1", "--checkpoint", str(step1),
                         tmp=tmp_path), f"checkpoint {step1} is damaged")
