#!/usr/bin/env python
"""Render, save and submit a GenLIP training job on a SLURM cluster.

Takes a project config plus the cluster layout (nodes, GPUs per node, time, partition, ...), checks the
config against that world size, renders ``examples/slurm/pretrain_genlip.sbatch`` with the chosen ``#SBATCH``
lines and knobs written into it, saves the rendered script, the resolved config and a record of the
submission beside the run's outputs (``<output_dir>/slurm/submit-<time>/``), submits it with ``sbatch`` and
prints the job id on stdout (everything else goes to stderr):

    jid=$(python tools/submit_slurm.py --config examples/configs/stage1-So16.yaml \\
              --nodes 16 --gpus-per-node 8 --time 2-00:00:00 --partition gpu \\
              --output-dir /shared/runs/so16 --set train.lr=1e-4)

``--dry-run`` prints the rendered script and what would be written, and submits/writes nothing.
The job resumes from ``<output_dir>/checkpoints/latest`` whenever it (re)starts, so submitting the same
command again after a failure continues the run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "slurm" / "pretrain_genlip.sbatch"
LAUNCHERS = ("srun", "torchrun", "deepspeed")
OVERRIDDEN_BY_ENV = {f"SBATCH_{k}" for k in (
    "GPUS_PER_NODE", "TIMELIMIT", "PARTITION", "ACCOUNT", "QOS", "CONSTRAINT", "RESERVATION", "JOB_NAME",
    "OUTPUT", "SIGNAL", "REQUEUE", "NO_REQUEUE", "OPEN_MODE", "MEM_PER_NODE", "EXCLUSIVE")}
SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$|^\d+-\d+$|^(UNLIMITED|INFINITE)$", re.I)

DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = """
examples:
  # 2 nodes x 8 GPUs, 24 h, checkpoint 5 min before the limit, requeue + resume automatically
  python tools/submit_slurm.py --config examples/configs/stage1-So16.yaml --nodes 2 --gpus-per-node 8 \\
      --time 24:00:00 --partition gpu --output-dir /shared/runs/so16
  # look at the script first
  python tools/submit_slurm.py --config examples/configs/tiny.yaml --nodes 2 --gpus-per-node 0 --dry-run
  # CPU-only nodes (no GPU request), one rank per node
  python tools/submit_slurm.py --config examples/configs/tiny.yaml --nodes 2 --gpus-per-node 0 \\
      --procs-per-node 1 --time 00:30:00
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="submit_slurm", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("run")
    g.add_argument("--config", required=True, help="project config (examples/configs/*.yaml)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to the trainer, e.g. --set train.train_steps=20000 (repeatable)")
    g.add_argument("--output-dir",
                   help="train.output_dir: checkpoints, logs, and slurm/ with this submission's files "
                        "(default: the config's train.output_dir); must be on a filesystem every node sees")
    g.add_argument("--launcher", choices=LAUNCHERS, default="srun",
                   help="srun: one trainer task per GPU started by srun (default); torchrun: one torchrun per "
                        "node, static rendezvous; deepspeed: one deepspeed launcher per node with --no_ssh "
                        "--node_rank and a hostfile from `scontrol show hostnames`")
    g.add_argument("--python", default=None,
                   help="Python interpreter on the compute nodes (default: the one running this tool, "
                        "which must then exist on every node: a venv/conda path on a shared filesystem)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable exported in the job script, e.g. --env NCCL_SOCKET_IFNAME=ib0 "
                        "(repeatable)")
    g = ap.add_argument_group("resources (become #SBATCH lines)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node (default 8); 0 = CPU-only job: no GPU request at all")
    g.add_argument("--procs-per-node", type=int, default=None,
                   help="trainer ranks per node (default: --gpus-per-node, or 1 when it is 0)")
    g.add_argument("--cpus-per-proc", type=int, default=None,
                   help="CPUs per rank (default: the node's CPUs / ranks per node with --exclusive; "
                        "1 without it)")
    g.add_argument("--mem", default="0", help="memory per node, sbatch syntax (default 0 = all of it)")
    g.add_argument("--time", default="24:00:00", help="time limit, sbatch syntax (default %(default)s)")
    g.add_argument("--partition", help="partition")
    g.add_argument("--account", help="account")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--constraint", help="node features, e.g. h100")
    g.add_argument("--reservation", help="reservation")
    g.add_argument("--job-name", default=None, help="job name (default: genlip-<config name>)")
    g.add_argument("--no-exclusive", dest="exclusive", action="store_false",
                   help="share nodes: request --ntasks-per-node/--cpus-per-task instead of --exclusive")
    g = ap.add_argument_group("time limit, preemption, requeue")
    g.add_argument("--signal-seconds", type=int, default=300,
                   help="send USR1 to every rank this many seconds before the time limit; the trainer saves a "
                        "checkpoint and the job requeues itself (default %(default)s; 0 = no warning signal)")
    g.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="do not requeue: no --requeue, and the script does not requeue itself after USR1")
    g.add_argument("--max-requeues", type=int, default=20,
                   help="the script stops requeueing itself after this many restarts (default %(default)s)")
    g = ap.add_argument_group("submission")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option written as an #SBATCH line, e.g. --sbatch-arg=--mail-type=END "
                        "(repeatable)")
    g.add_argument("--template", default=str(TEMPLATE), help="job script template (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the rendered script and the files it would write; submit and write nothing")
    g.add_argument("--no-check", dest="check", action="store_false",
                   help="skip loading/validating the config against the world size before submitting")
    args = ap.parse_args(argv)
    if args.nodes < 1:
        ap.error("--nodes must be >= 1")
    if args.gpus_per_node < 0:
        ap.error("--gpus-per-node must be >= 0")
    if args.procs_per_node is None:
        args.procs_per_node = args.gpus_per_node or 1
    if args.procs_per_node < 1:
        ap.error("--procs-per-node must be >= 1")
    if args.time and not SLURM_TIME.match(args.time):
        ap.error(f"--time {args.time!r} is not a SLURM time (MM, HH:MM:SS, D-HH[:MM[:SS]])")
    for kv in args.env:
        if "=" not in kv or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", kv.split("=", 1)[0]):
            ap.error(f"--env {kv!r} must look like NAME=VALUE")
    for kv in args.overrides:
        if "=" not in kv:
            ap.error(f"--set {kv!r} must look like section.key=value")
    if args.python is None:
        args.python = sys.executable
    return args


def resolve(args) -> tuple[dict, Path, str]:
    """(resolved config as a dict, absolute output dir, config name); validates the layout unless --no-check."""
    sys.path.insert(0, str(ROOT))
    from megatron_genlip.config import ConfigError, load_config, resolve_layout

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    name = Path(args.config).stem
    try:
        cfg = load_config(args.config, overrides)
        if args.check:
            resolve_layout(cfg, args.nodes * args.procs_per_node)
    except ConfigError as e:
        raise SystemExit(f"submit_slurm: configuration error for {args.nodes} x {args.procs_per_node} ranks: {e}")
    out = Path(cfg.train.output_dir)
    if not out.is_absolute():
        out = ROOT / out  # the job runs in the repository root
    return cfg.to_dict(), out, name


def directives(args, job_name: str, log_dir: Path) -> list[str]:
    d = [f"--job-name={job_name}", f"--nodes={args.nodes}"]
    if args.gpus_per_node > 0:
        d.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.exclusive:
        d.append("--exclusive")
    elif args.launcher == "srun":
        d += [f"--ntasks-per-node={args.procs_per_node}", f"--cpus-per-task={args.cpus_per_proc or 1}"]
    else:
        d += ["--ntasks-per-node=1", f"--cpus-per-task={args.procs_per_node * (args.cpus_per_proc or 1)}"]
    if args.mem is not None and args.mem != "":
        d.append(f"--mem={args.mem}")
    if args.time:
        d.append(f"--time={args.time}")
    for flag in ("partition", "account", "qos", "constraint", "reservation"):
        if getattr(args, flag):
            d.append(f"--{flag}={getattr(args, flag)}")
    if args.signal_seconds > 0:
        d.append(f"--signal=USR1@{args.signal_seconds}")
    d.append("--requeue" if args.requeue else "--no-requeue")
    d += ["--open-mode=append", f"--output={log_dir}/%x-%j.out"]
    d += args.sbatch_arg
    return d


def render(args, template: str, job_name: str, out_dir: Path, saved_dir: Path) -> str:
    """The template with its #SBATCH block replaced and the knobs written in as exports."""
    lines = template.splitlines()
    idx = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not idx:
        raise SystemExit(f"submit_slurm: no #SBATCH lines in {args.template}")
    first, last = idx[0], idx[-1]
    env = {
        "GENLIP_ROOT": str(ROOT),
        "CONFIG": str(Path(args.config).resolve()),
        "OUTPUT_DIR": str(out_dir),
        "LAUNCHER": args.launcher,
        "PYTHON": args.python,
        "NPROC_PER_NODE": str(args.procs_per_node),
        "MAX_REQUEUES": str(args.max_requeues if args.requeue else 0),
    }
    if args.cpus_per_proc:
        env["CPUS_PER_PROC"] = str(args.cpus_per_proc)
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    block = [f"#SBATCH {d}" for d in directives(args, job_name, out_dir / "slurm")]
    stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    block += ["", f"# ---- rendered by tools/submit_slurm.py at {stamp}; saved in {saved_dir} ----",
              "# the knobs below are fixed for this run (the template reads them from the environment)"]
    block += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if args.overrides:
        block.append("# trainer arguments (appended after any given on the sbatch command line)")
        block.append("set -- " + " ".join(shlex.quote(a) for o in args.overrides for a in ("--set", o)) + ' "$@"')
    block.append("# ---- end of rendered settings ----")
    return "\n".join(lines[:first] + block + lines[last + 1:]) + "\n"


def git_commit() -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    return p.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    resolved, out_dir, name = resolve(args)
    job_name = args.job_name or f"genlip-{name}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    saved = out_dir / "slurm" / f"submit-{stamp}"
    script = render(args, Path(args.template).read_text(), job_name, out_dir, saved)
    sbatch_cmd = ["sbatch", "--parsable", str(saved / "job.sbatch")]
    if args.dry_run:
        sys.stdout.write(script)
        print(f"\n# dry run: would write {saved}/job.sbatch, config.yaml, submit.json and run "
              f"(in {ROOT}): {shlex.join(sbatch_cmd)}", file=sys.stderr)
        return 0
    if shutil.which("sbatch") is None:
        raise SystemExit("submit_slurm: sbatch not found; run this on a SLURM login node (or use --dry-run)")
    import yaml

    saved.mkdir(parents=True, exist_ok=True)
    (saved / "job.sbatch").write_text(script)
    (saved / "config.yaml").write_text(
        f"# resolved config of {args.config} with {args.overrides} (output_dir {out_dir})\n"
        + yaml.safe_dump(resolved, sort_keys=False))
    record = {"argv": sys.argv[1:] if argv is None else list(argv), "config": str(Path(args.config).resolve()),
              "overrides": args.overrides, "output_dir": str(out_dir), "nodes": args.nodes,
              "gpus_per_node": args.gpus_per_node, "procs_per_node": args.procs_per_node,
              "launcher": args.launcher, "git_commit": git_commit(), "submitted_at": stamp,
              "sbatch": sbatch_cmd}
    # SBATCH_* variables would beat the rendered #SBATCH lines; the saved script must be what runs
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDDEN_BY_ENV}
    proc = subprocess.run(sbatch_cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        record["error"] = proc.stderr.strip()
        (saved / "submit.json").write_text(json.dumps(record, indent=1) + "\n")
        raise SystemExit(f"submit_slurm: sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    record["job_id"] = job_id
    (saved / "submit.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"submitted job {job_id} ({job_name}: {args.nodes} nodes x {args.procs_per_node} ranks, launcher "
          f"{args.launcher})\n  script, config, record: {saved}\n  log: {out_dir}/slurm/{job_name}-{job_id}.out\n"
          f"  outputs: {out_dir}", file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
