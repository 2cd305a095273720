"""SLURM submission against a real SLURM controller: munged + slurmctld + two slurmd "nodes" on this machine
(tests/slurm_local.py). The project's own job script, examples/slurm/pretrain_genlip.sbatch, is submitted
unchanged with ``sbatch``; only environment variables adapt it to CPU-only emulated nodes.

Skipped only when the SLURM/munge programs are not installed (CI installs them: .ci/install_slurm.sh).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_genlip.training.ports import PORT_RANGE
from slurm_local import SlurmError, missing_binaries, slurm_cluster  # noqa: F401  (slurm_cluster: the fixture)
from trainer_harness import ROOT, TINY, build_test_dataset, env as trainer_env, train_log

pytestmark = pytest.mark.slow  # a real SLURM controller and jobs (minutes in all)

SBATCH = ROOT / "examples" / "slurm" / "pretrain_genlip.sbatch"
STEPS = 20
JOB_TIMEOUT = 300  # seconds, per job (both runs of a requeued job included)
OVERRIDES = [f"train.train_steps={STEPS}", "train.warmup_steps=2", "train.log_interval=1",
             "train.save_interval=100000", "train.eval_interval=100000", "train.eval_rows=1",
             "train.eval_captions=2", "train.tensorboard=false", "data.num_workers=1", "train.precision=fp32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """200 train / 20 held-out synthetic samples, indexed (as tests/test_trainer.py builds them)."""
    return build_test_dataset(tmp_path_factory.mktemp("slurm-data"), 200, 20)


def job_env(cluster, data: dict, run_dir: Path, **knobs) -> dict:
    """Everything the CPU job needs, as environment variables only (the sbatch file stays as it is)."""
    sets = [f"data.train_data={data['train']}", f"data.valid_data={data['val']}", *OVERRIDES]
    e = cluster.env(trainer_env())  # OMP_NUM_THREADS=1, PYTHONUNBUFFERED=1
    e.update({
        "SBATCH_GPUS_PER_NODE": "0",             # CPU-only emulated nodes: no GPU request
        "SBATCH_TIMELIMIT": "15:00",
        "SBATCH_OUTPUT": str(run_dir / "%x-%j.out"),
        "SBATCH_JOB_NAME": "genlip-ci",
        "PYTHON": sys.executable,
        "CONFIG": str(TINY),
        "OUTPUT_DIR": str(run_dir / "out"),
        "TRAIN_ARGS": " ".join(f"--set {s}" for s in sets),
    })
    e.update(knobs)
    return e


def submit(cluster, data, run_dir: Path, **knobs) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch([str(SBATCH)], env=job_env(cluster, data, run_dir, **knobs), cwd=ROOT)


def job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / f"genlip-ci-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def diagnose(cluster, run_dir: Path, job_id: int) -> str:
    return f"--- job output ---\n{job_log(run_dir, job_id)[-6000:]}\n--- cluster logs ---\n{cluster.logs(15)}"


def wait_done(cluster, run_dir: Path, job_id: int) -> dict:
    try:
        return cluster.wait_job(job_id, JOB_TIMEOUT)
    except SlurmError as e:
        raise AssertionError(f"{e}\n{diagnose(cluster, run_dir, job_id)}") from None


def losses(out_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in train_log(out_dir).items()}


def wait_for_step(cluster, run_dir: Path, job_id: int, step: int, timeout: float = 180) -> None:
    """Until the running job has logged ``step`` (the trainer's signal handlers are installed by then)."""
    log = run_dir / "out" / "logs" / "train.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and max(losses(run_dir / "out"), default=0) >= step:
            return
        if cluster.job(job_id).get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"):
            break
        time.sleep(0.2)
    cluster.run(["scancel", str(job_id)], check=False)
    raise AssertionError(f"job {job_id} did not reach step {step}\n{diagnose(cluster, run_dir, job_id)}")


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, data, tmp_path_factory):  # noqa: F811
    """One 2-node x 1-rank job through sbatch, run to the end: (job info, run dir, per-step losses)."""
    run_dir = tmp_path_factory.mktemp("slurm-straight")
    jid = submit(slurm_cluster, data, run_dir)
    info = wait_done(slurm_cluster, run_dir, jid)
    info["_log"] = job_log(run_dir, jid)
    info["_diag"] = diagnose(slurm_cluster, run_dir, jid)
    return info, run_dir, losses(run_dir / "out") if (run_dir / "out" / "logs" / "train.jsonl").exists() else {}


def test_two_node_job_completes_with_checkpoint_and_log(uninterrupted):
    info, run_dir, log = uninterrupted
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info["_diag"]
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    out = info["_log"]
    assert "2 nodes x 1 ranks" in out and "launcher srun" in out, out[-3000:]
    port = int(re.search(r"rendezvous [^ :]+:(\d+)", out).group(1))
    low, high = PORT_RANGE  # below the kernel's ephemeral range: job 17399's port 37399 was taken there (CI)
    walked = (port - low - int(info["JobId"])) % (high - low)  # 0 unless 20000 + id % 12000 was taken
    assert low <= port < high and walked < 100, (port, info["JobId"])
    assert "'world_size': 2" in out and "'data_parallel': 2" in out, out[-3000:]  # one rank on each node
    assert "started from scratch" in out and "training finished" in out, out[-3000:]
    assert sorted(log) == list(range(1, STEPS + 1)) and log[STEPS] < log[1], log
    ckpt = run_dir / "out" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    assert len(list((ckpt / f"iter_{STEPS:07d}").glob("rng_rank*.pt"))) == 2
    assert (run_dir / "out" / "slurm" / f"job-{info['JobId']}.sbatch").read_text() == SBATCH.read_text()


@pytest.mark.parametrize("how", ["scontrol-requeue", "usr1-before-time-limit"])
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, data, uninterrupted, tmp_path,  # noqa: F811
                                                                how):
    """scontrol-requeue: SLURM TERMs every process and requeues the job (what preemption does).
    usr1-before-time-limit: `scancel --signal=USR1` delivers exactly what `#SBATCH --signal=USR1@T` sends
    before the time limit (USR1 to the job steps, not the batch shell): the ranks checkpoint and exit 0, and
    the job script requeues the job itself. Either way the second run resumes from the checkpoint and the
    combined per-step fp32 losses equal those of the uninterrupted job exactly."""
    ref_info, _, reference = uninterrupted
    assert ref_info["JobState"] == "COMPLETED", ref_info["_diag"]
    jid = submit(slurm_cluster, data, tmp_path)
    wait_for_step(slurm_cluster, tmp_path, jid, 2)
    if how == "scontrol-requeue":
        slurm_cluster.run(["scontrol", "requeue", str(jid)])
    else:
        slurm_cluster.run(["scancel", "--signal=USR1", str(jid)])
    info = wait_done(slurm_cluster, tmp_path, jid)
    diag = diagnose(slurm_cluster, tmp_path, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", diag
    assert int(info["Restarts"]) == 1, diag
    out = job_log(tmp_path, jid)
    stops = re.findall(r"stop signal received: checkpoint saved at step (\d+)", out)
    resumes = re.findall(r"resumed from \S+ \(the output directory\) at step (\d+)", out)
    assert len(stops) == 1 and resumes == stops and 0 < int(stops[0]) < STEPS, diag
    assert "(restart 1)" in out, diag
    if how == "usr1-before-time-limit":
        assert "requeueing job" in out, diag
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    combined = losses(tmp_path / "out")
    assert sorted(combined) == sorted(reference), (combined, reference)
    for s in reference:  # bitwise: the same float, not merely close
        assert combined[s] == reference[s], (s, combined[s], reference[s])


def test_submit_helper_dry_run_renders_without_submitting(tmp_path):
    """No SLURM needed: the rendered script carries the requested layout and knobs; nothing is written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "tools/submit_slurm.py", "--config", str(TINY), "--nodes", "4",
                           "--gpus-per-node", "8", "--time", "2-00:00:00", "--partition", "gpu",
                           "--launcher", "deepspeed", "--output-dir", str(out), "--set", "train.global_batch_size=64",
                           "--env", "NCCL_SOCKET_IFNAME=ib0", "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR1@300", "#SBATCH --requeue",
                 f"#SBATCH --output={out}/slurm/%x-%j.out", "export LAUNCHER=deepspeed", "export NPROC_PER_NODE=8",
                 f"export OUTPUT_DIR={out}", "export NCCL_SOCKET_IFNAME=ib0",
                 "set -- --set train.global_batch_size=64 \"$@\""):
        assert line in script, line
    assert script.count("#SBATCH --nodes") == 1 and "scontrol requeue" in script
    assert not out.exists()
    bad = subprocess.run([sys.executable, "tools/submit_slurm.py", "--config", str(TINY), "--nodes", "3",
                          "--gpus-per-node", "0", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "global_batch_size" in bad.stderr  # checked against the world size


def test_submit_helper_saves_and_submits(slurm_cluster, data, tmp_path):  # noqa: F811
    """tools/submit_slurm.py renders the job, saves script + resolved config + record beside the outputs,
    submits it through sbatch and prints the job id; the job completes on the 2 emulated nodes."""
    out = tmp_path / "run"
    sets = [f"data.train_data={data['train']}", f"data.valid_data={data['val']}", "train.train_steps=4",
            *[o for o in OVERRIDES if not o.startswith("train.train_steps")]]
    cmd = [sys.executable, "tools/submit_slurm.py", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0",
           "--time", "15:00", "--output-dir", str(out)]
    for s_ in sets:
        cmd += ["--set", s_]
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm_cluster.env(trainer_env()), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    jid = int(proc.stdout.strip())
    log_path = out / "slurm" / f"genlip-tiny-{jid}.out"
    try:
        info = slurm_cluster.wait_job(jid, JOB_TIMEOUT)
    except SlurmError as e:
        raise AssertionError(f"{e}\n{log_path.read_text() if log_path.exists() else ''}") from None
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", log[-4000:]
    (saved,) = (out / "slurm").glob("submit-*")
    assert (saved / "job.sbatch").read_text() == (out / "slurm" / f"job-{jid}.sbatch").read_text()
    import yaml

    resolved = yaml.safe_load((saved / "config.yaml").read_text())
    assert resolved["train"]["train_steps"] == 4 and resolved["train"]["output_dir"] == str(out)
    assert json.loads((saved / "submit.json").read_text())["job_id"] == str(jid)
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert sorted(train_log(out)) == [1, 2, 3, 4]


def test_preprocessing_array_job_then_finalize_equals_one_process_build(slurm_cluster, tmp_path):  # noqa: F811
    """examples/slurm/preprocess_data.sbatch as a 2-task array job (each task builds every other shard), then a
    FINALIZE=1 job that depends on it: the dataset holds exactly the samples, in the same order, with the same
    fingerprint and bytes, as a one-process build of the same shards."""
    from data_harness import read_files
    from megatron_genlip.config import load_config
    from megatron_genlip.data.builder import build_indexed_dataset
    from megatron_genlip.data.synthetic import write_shards

    shards = write_shards(str(tmp_path / "shards"), "train", 100, 20, seed=6, image_size=48)  # 5 shards
    reference = str(tmp_path / "reference")
    build_indexed_dataset(shards, reference, load_config(TINY), progress=False)
    prefix = str(tmp_path / "array")
    e = slurm_cluster.env(trainer_env(), SBATCH_GPUS_PER_NODE="0", SBATCH_TIMELIMIT="10:00", PYTHON=sys.executable,
                          CONFIG=str(TINY), INPUT=" ".join(shards), OUTPUT_PREFIX=prefix, WORKERS="1",
                          SBATCH_OUTPUT=str(tmp_path / "%x-%A_%a.out"))
    script = str(ROOT / "examples" / "slurm" / "preprocess_data.sbatch")
    array = slurm_cluster.sbatch(["--array=0-1", script], env=e, cwd=ROOT)
    final = slurm_cluster.sbatch([f"--dependency=afterok:{array}", script], env=dict(e, FINALIZE="1"), cwd=ROOT)
    logs = lambda: "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in tmp_path.glob("*.out"))
    try:
        info = slurm_cluster.wait_job(final, JOB_TIMEOUT)
    except SlurmError as err:
        raise AssertionError(f"{err}\n{logs()}\n{slurm_cluster.logs(15)}") from None
    assert info["JobState"] == "COMPLETED", logs()
    tasks = {i: (tmp_path / f"genlip-preprocess-{array}_{i}.out").read_text() for i in (0, 1)}
    assert "task 0 of 2" in tasks[0] and "built 3 of its 3 parts" in tasks[0], tasks[0]
    assert "task 1 of 2" in tasks[1] and "built 2 of its 2 parts" in tasks[1], tasks[1]
    assert read_files(prefix) == read_files(reference)


@pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM is not installed (missing "
                    f"{', '.join(missing_binaries())}); run .ci/install_slurm.sh")
def test_harness_stops_every_daemon_and_job_by_pid(tmp_path):
    """A second, 1-node cluster stopped while a job step runs: every daemon it started and every process of
    that job are gone afterwards (the module's cluster is stopped the same way by its fixture). Its root is a
    long path, as under pytest-xdist (.../popen-gw1/...): the Unix sockets must still fit in 107 bytes."""
    from slurm_local import SlurmLocal, _alive

    cluster = SlurmLocal(tmp_path / ("long-" * 8) / "c", nodes=1)
    try:
        cluster.start()
        jid = cluster.sbatch(["--wrap", "srun sleep 300", f"--output={tmp_path}/sleep-%j.out"])
        cluster.wait_job(jid, 60, until=lambda i: i.get("JobState") == "RUNNING")
        deadline = time.time() + 30
        while time.time() < deadline and not any("sleep" in Path(f"/proc/{p}/cmdline").read_bytes().decode(
                errors="replace") for p, _ in cluster._job_processes() if Path(f"/proc/{p}").exists()):
            time.sleep(0.2)
        job_procs = cluster._job_processes()
        assert job_procs, "the job step's processes were not found"
        daemons = {k: (proc.pid, start) for k, (proc, start) in cluster.procs.items()}
    finally:
        cluster.stop()
    assert cluster.alive_daemons() == []
    assert not [k for k, (pid, start) in daemons.items() if _alive(pid, start)]
    assert not [pid for pid, start in job_procs if _alive(pid, start)]
    assert cluster._job_processes() == []
