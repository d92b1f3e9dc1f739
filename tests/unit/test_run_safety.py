"""A run never mixes with, overwrites or silently rebuilds what an earlier run left (issue 17):
a fresh run refuses a checkpoint dir that holds checkpoints; a resumed RL run needs its reference
model's checkpoint intact (checked before the model is built); a save that fails removes its
partial files and names the checkpoint that is still the newest; a synchronous save leaves no
server process behind (nothing to orphan on SIGKILL); megatron-core's own integrity check is
asked for where it exists; image reads that fail during a run are counted in the metrics.

One short in-process run (one RL step, reference model on) makes the checkpoint the tests share."""

import errno
import inspect
import json
import logging
import multiprocessing
import shutil
from pathlib import Path

import pytest

from megatron_papo.compat import mcore_compat, mcore_versions
from megatron_papo.config import load_config
from megatron_papo.training import checkpointing
from megatron_papo.training.checkpointing import CheckpointError, save_checkpoint
from megatron_papo.training.parts import build_parts
from megatron_papo.training.trainer import resume_point, train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp: Path, *over: str):
    args = ["train.steps=1", "train.sft_warmup_steps=0", "train.update_prompts=2", "train.micro_batch_size=4",
            "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4", "model.num_layers=1",
            "data.limit=16", "evaluation.interval=-1", f"checkpoint.dir={tmp / 'ckpt'}",
            f"logging.dir={tmp / 'run'}", "logging.tensorboard=false", "logging.progress_bar=false",
            "loss.ref_kl_coef=0.01", *over]
    return load_config(str(ROOT / "examples/tiny_papo_g.yaml"), args)


@pytest.fixture(scope="module")
def one_step(pg, tmp_path_factory):
    """(tmp dir, parts, result) of a finished one-RL-step run with a reference model."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = _cfg(tmp)
    parts = build_parts(cfg, pg)
    result = train(cfg, pg, parts)
    assert (tmp / "ckpt" / "reference" / "latest").is_file() and result.checkpoint is not None
    return tmp, parts, result


def test_a_fresh_run_into_a_used_checkpoint_dir_moves_the_same_run_aside_and_refuses_another(pg, one_step):
    """An earlier run of the same maths (a rerun, or the same run under another layout) is moved to
    <dir>.prev-<n> whole; one whose config differs in a field that changes the maths is refused
    with the field named (a fresh run there used to prune the new checkpoints against the old
    steps, and `evaluate` read the old `latest`)."""
    tmp, _, result = one_step
    with pytest.raises(CheckpointError, match=r"holds another run's checkpoints \(step_00000001, "
                                              r"reference\), whose config differs .*loss.gamma: 0.02 -> 0.5"):
        resume_point(_cfg(tmp, "loss.gamma=0.5"), pg)
    assert resume_point(_cfg(tmp, "checkpoint.resume=true"), pg) == result.checkpoint  # the run's own: fine
    copy = tmp / "copy"
    shutil.copytree(tmp / "ckpt", copy)
    assert resume_point(_cfg(tmp, f"checkpoint.dir={copy}", "parallel.collective_timeout_s=60"), pg) is None
    assert not copy.exists() and (tmp / "copy.prev-1" / "step_00000001" / "manifest.json").is_file()
    assert resume_point(_cfg(tmp, f"checkpoint.dir={tmp / 'fresh'}"), pg) is None


def _moved(path: Path):
    """Move ``path`` aside for the block's duration (a context manager)."""
    class Moved:
        def __enter__(self):
            shutil.move(path, path.with_name(path.name + ".away"))

        def __exit__(self, *exc):
            shutil.move(path.with_name(path.name + ".away"), path)
    return Moved()


def test_resume_in_rl_needs_the_reference_checkpoint_intact(pg, one_step):
    """The reference is the policy at the first RL step: a missing or damaged one cannot be
    rebuilt, so resume stops before the model is built (it used to rebuild it from the resumed
    policy without a word: ref_kl 0.0 instead of the true divergence)."""
    tmp, _, _ = one_step
    resume = _cfg(tmp, "checkpoint.resume=true", "train.steps=2")
    ref = tmp / "ckpt" / "reference"
    with _moved(ref), pytest.raises(CheckpointError, match="reference model's checkpoint is missing"):
        resume_point(resume, pg)
    victim = max((p for p in ref.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    try:
        with pytest.raises(CheckpointError, match=f"reference model's checkpoint {ref}/step_00000000 is "
                                                  f"damaged \\({victim}: sha256 differs"):
            resume_point(resume, pg)
    finally:
        victim.write_bytes(data)
    assert resume_point(_cfg(tmp, "checkpoint.resume=true", "loss.ref_kl_coef=0"), pg) is not None  # no ref


def test_a_checkpoint_of_another_model_is_named_not_a_traceback(pg, one_step):
    """torch's CheckpointException derives from BaseException: it went past every handler and
    printed a per-rank traceback; now it is a CheckpointError (one line at the CLI)."""
    tmp, _, result = one_step
    other = build_parts(_cfg(tmp, "model.hidden_size=48", "loss.ref_kl_coef=0"), pg)
    with pytest.raises(CheckpointError, match=f"checkpoint {result.checkpoint} does not fit this model: "
                                              r"Global shape mismatch .* expected \(\(48, 64\)\)"):
        checkpointing.load_checkpoint(result.checkpoint, other.ddp_chunks, None, pg, load_optimizer=False,
                                      load_rng=False)


def test_a_failed_save_removes_its_partial_files_and_keeps_latest(pg, one_step, tmp_path, monkeypatch):
    _, parts, _ = one_step
    root = tmp_path / "ck"
    first = save_checkpoint(root, 1, parts.ddp_chunks, parts.optimizer, {"step": 1}, pg, keep_last=2)

    def disk_full(state, directory, **kwargs):
        (Path(directory) / "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mcore_compat, "dist_ckpt_save", disk_full)
    with pytest.raises(CheckpointError, match=f"could not write checkpoint step_00000002 under {root} "
                                              r"\(\[Errno 28\] No space left on device\); its partial files "
                                              f"were removed, the newest checkpoint is still {first}"):
        save_checkpoint(root, 2, parts.ddp_chunks, parts.optimizer, {"step": 2}, pg, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert (root / "latest").read_text().strip() == "step_00000001"


def test_a_synchronous_save_starts_no_server_process(pg, one_step, tmp_path, monkeypatch):
    """megatron-core's torch_dist writer would start a spawn-context Manager at the first save of a
    process (its results queue) and keep it for the process's life; a trainer killed with SIGKILL
    left it re-parented to init for good. Forced back to "no queue yet", a save must start none."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _, parts, _ = one_step
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    before = {p.pid for p in multiprocessing.active_children()}
    save_checkpoint(tmp_path / "ck", 1, parts.ddp_chunks, parts.optimizer, {"step": 1}, pg, keep_last=1)
    assert {p.pid for p in multiprocessing.active_children()} - before == set()
    assert filesystem_async._results_queue is None  # restored: an async save elsewhere gets its own
    assert checkpointing.verify_checkpoint(tmp_path / "ck" / "step_00000001", pg) is None


def test_megatron_cores_integrity_check_is_asked_for_where_it_exists(monkeypatch):
    from megatron.core import dist_checkpointing

    calls = []

    def load_019(sharded_state_dict, checkpoint_dir, strict=None, validate_access_integrity=True,
                 verify_integrity=False):
        calls.append(verify_integrity)

    def load_016(sharded_state_dict, checkpoint_dir, strict=None, validate_access_integrity=True):
        calls.append("no such argument")

    for fake in (load_019, load_016):
        monkeypatch.setattr(dist_checkpointing, "load", fake)
        mcore_versions.dist_ckpt_load({}, "/nowhere")
    assert calls == [True, "no such argument"]
    assert "verify_integrity" in inspect.signature(load_019).parameters


def test_image_reads_that_fail_during_a_run_are_counted(pg, one_step, tmp_path, caplog):
    """A JSONL run whose images are deleted after the data were checked: each failed read is
    replaced by the next good row, counted in data/read_failures_total of every logged step, and
    named in one line at the end."""
    from PIL import Image

    _, _, result = one_step
    assert json.loads(result.metrics_path.read_text().splitlines()[-1])["data/read_failures_total"] == 0
    rows = []
    for i in range(8):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "problem": "what color is the shape?",
                                "answer": "red"}))
    (tmp_path / "rows.jsonl").write_text("\n".join(rows))
    cfg = _cfg(tmp_path, f"data.train={tmp_path / 'rows.jsonl'}", "data.shuffle=false", "loss.ref_kl_coef=0",
               "train.sft_warmup_steps=1", "train.sft_batch_size=2")
    parts = build_parts(cfg, pg)
    for i in range(4):
        (tmp_path / f"{i}.png").unlink()
    with caplog.at_level(logging.WARNING, logger="megatron_papo"):
        out = train(cfg, pg, parts)
    last = json.loads(out.metrics_path.read_text().splitlines()[-1])
    assert last["data/read_failures_total"] >= 2  # the step's two prompts each met a removed image
    assert "image read(s) failed during the run" in caplog.text
    rows = [json.loads(line) for line in out.metrics_path.read_text().splitlines()]
    sft = [r for r in rows if r.get("phase_sft")]  # the warm-start step reports the count as well
    assert sft and all("data/read_failures_total" in r for r in sft)
    assert sft[-1]["data/read_failures_total"] <= last["data/read_failures_total"]
