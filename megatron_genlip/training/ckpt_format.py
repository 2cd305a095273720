"""The on-disk format of megatron-genlip checkpoints, in one place: tags, ``latest``, the manifest, file names.

The trainer (``training/checkpoint.py``), the Hugging Face converter (``hf/convert.py``) and the resharder
(``training/reshard.py``) read and write checkpoints only through this module, so they agree on what a
complete, trustworthy checkpoint is. It needs no torch: it works on files.

A checkpoint directory::

    iter_0000100/                 one checkpoint ("tag"): DeepSpeed's files, rng_rank*.pt, markers, and
        genlip_manifest.json      every other file of the tag with its size and sha256, written LAST
    iter_0000200.partial/         a save in progress: renamed to iter_0000200 once its manifest is written,
                                  so a save cut short never looks like a checkpoint (and is removed by the next save)
    latest                        "iter_0000100": a hint, written atomically after the rename

Trust rules (:func:`check_tag`, :func:`choose`):

* a tag whose manifest lists files that are all present with the listed size (and, by default, checksum) is
  **verified**; a listed file that is missing, shorter, longer or different makes it **corrupt**;
  ``rng_rank*.pt`` files are optional: a problem with one is a warning (that rank's random streams restart),
  never a reason to distrust the weights and optimizer state;
* a tag without a manifest was saved before checkpoints carried one (**legacy**), or is the unfinished save of
  such an old version. It is trusted only when ``latest`` names it or a later tag, because the old format wrote
  ``latest`` only after a save had finished; otherwise it is **unverifiable**;
* ``latest`` is only a hint: the newest verified tag wins, whatever ``latest`` says (a crash between the
  rename and ``latest`` leaves a newer complete checkpoint that ``latest`` does not name yet).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_genlip.data.files import TEMP_MARK, fsync_dir, replace_atomically

TAG_RE = re.compile(r"^iter_(\d{7,})$")
LATEST = "latest"  # DeepSpeed's own pointer name: engine.load_checkpoint and its tools read it as well
MANIFEST = "genlip_manifest.json"
MANIFEST_VERSION = 1
UNIVERSAL_MARKER = "genlip_universal.json"  # tag of a resharded (DeepSpeed universal) checkpoint
WEIGHTS_ONLY_MARKER = "genlip_weights_only.json"  # tag written by tools/convert_checkpoint.py --from-hf
WEIGHTS_ONLY_FILE = "model.safetensors"  # the full weights of a weights-only tag
# the file with DeepSpeed's global state and our client state: ZeRO-0/1/2 (with or without PP), ZeRO-3
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
OPTIM_STATES_GLOB = "*_optim_states.pt"  # ZeRO optimizer partitions, one per data-parallel x model-parallel rank
RNG_RE = re.compile(r"^rng_rank\d{5,}\.pt$")
PARTIAL_SUFFIX = ".partial"  # a tag directory being written
HASH_CHUNK = 8 << 20


class CheckpointFormatError(RuntimeError):
    """A checkpoint that cannot be trusted or read; the message names the directory or file."""


# --------------------------------------------------------------------------------------------------
# names


def tag_for(step: int) -> str:
    return f"iter_{step:07d}"


def partial_name(tag: str) -> str:
    return tag + PARTIAL_SUFFIX


def list_partials(directory: str | Path) -> list[str]:
    """Tag directories of saves that never finished (or are being written right now)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.name.endswith(PARTIAL_SUFFIX) and TAG_RE.match(p.name[:-len(PARTIAL_SUFFIX)]))


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def model_states_name(mp_rank: int) -> str:
    """DeepSpeed's per-model-parallel-rank file (PP=1): module weights, global state, client state."""
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def pipeline_layer_glob(tp_rank: int) -> str:
    """DeepSpeed's per-layer module files of a pipeline checkpoint, for one tensor-parallel rank."""
    return f"layer_*-model_{tp_rank:02d}-model_states.pt"


def rng_name(rank: int) -> str:
    """The trainer's per-rank RNG states (Python, NumPy, torch, CUDA)."""
    return f"rng_rank{rank:05d}.pt"


def is_optional(relpath: str) -> bool:
    """Files whose loss only costs bitwise reproducibility, not the run (the per-rank RNG states)."""
    return bool(RNG_RE.match(Path(relpath).name))


def list_tags(directory: str | Path) -> list[str]:
    """The ``iter_*`` tags in a checkpoint directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if TAG_RE.match(p.name) and p.is_dir()]
    return sorted(tags, key=step_of)


# --------------------------------------------------------------------------------------------------
# latest


@dataclass
class LatestHint:
    """What ``latest`` says: a tag name, or why it says nothing usable (``problem``)."""

    tag: str | None
    problem: str | None = None


def read_latest(directory: str | Path) -> LatestHint:
    """Read ``latest`` without trusting it: binary, empty or malformed content and tags that do not exist
    give ``tag=None`` and a problem that names the file (never an exception)."""
    path = Path(directory) / LATEST
    if not path.is_file():
        return LatestHint(None, f"{path} does not exist" if path.parent.is_dir() else None)
    try:
        raw = path.read_bytes()[:256]
        text = raw.decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return LatestHint(None, f"{path} is unreadable or holds binary data")
    if not text:
        return LatestHint(None, f"{path} is empty")
    if not TAG_RE.match(text):
        return LatestHint(None, f"{path} holds {text[:40]!r}, not a checkpoint tag (iter_NNNNNNN)")
    if not (path.parent / text).is_dir():
        return LatestHint(None, f"{path} names {text}, which does not exist")
    return LatestHint(text)


def write_latest(directory: str | Path, tag: str) -> None:
    replace_atomically(Path(directory) / LATEST, tag)


# --------------------------------------------------------------------------------------------------
# manifest


def list_files(tag_dir: str | Path) -> list[str]:
    """Every file below a tag directory (relative paths, sorted), except the manifest and temporary files."""
    tag_dir = Path(tag_dir)
    out = []
    for root, _dirs, files in os.walk(tag_dir):
        for name in files:
            if name == MANIFEST or name.startswith(MANIFEST + TEMP_MARK):
                continue
            out.append(str((Path(root) / name).relative_to(tag_dir)))
    return sorted(out)


def hash_file(path: str | Path, fsync: bool = False) -> dict:
    """``{"size", "sha256"}`` of a file, read in chunks (constant memory at any size). ``fsync``: also make
    sure the file's data is on disk before a manifest vouches for it (a crash must not leave a manifest that
    lists data still in the page cache)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def write_manifest(tag_dir: str | Path, files: dict[str, dict], tag: str | None = None, **info) -> None:
    """The manifest of a finished tag (atomically). ``files``: relative path -> :func:`hash_file` entry; ``tag``:
    the tag's name when it is written in its ``.partial`` directory."""
    tag_dir = Path(tag_dir)
    manifest = {"format": "megatron-genlip checkpoint manifest", "version": MANIFEST_VERSION, "tag": tag or tag_dir.name,
                "algorithm": "sha256", "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": socket.gethostname(), **info, "files": dict(sorted(files.items()))}
    replace_atomically(tag_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def manifest_files(tag_dir: str | Path, fsync: bool = True) -> dict[str, dict]:
    """Hash every file of a tag in this process (the tools; the trainer splits the work over its ranks)."""
    return {rel: hash_file(Path(tag_dir) / rel, fsync) for rel in list_files(tag_dir)}


def publish(directory: str | Path, tag: str, files: dict[str, dict] | None = None, log=None, **info) -> Path:
    """Finish a save written into ``tag``'s ``.partial`` directory: its manifest (``files``, or every file hashed
    here), the rename that makes the checkpoint exist (replacing a tag directory of that name, one that did not
    verify), then ``latest``."""
    directory = Path(directory)
    work, final = directory / partial_name(tag), directory / tag
    write_manifest(work, manifest_files(work) if files is None else files, tag=tag, **info)
    if final.exists():
        if log:
            log(f"replacing {final}, which did not verify")
        shutil.rmtree(final)
    work.rename(final)
    fsync_dir(directory)
    write_latest(directory, tag)
    return final


def read_manifest(tag_dir: str | Path) -> dict | None:
    """The manifest of a tag, None if it has none; CheckpointFormatError if it is unreadable."""
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("malformed file entries")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return manifest


def check_file(tag_dir: str | Path, rel: str, entry: dict, checksums: bool) -> str | None:
    """Why one listed file does not match its manifest entry (None: it matches)."""
    path = Path(tag_dir) / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{rel} is missing"
    except OSError as e:
        return f"{rel} cannot be read ({e.strerror})"
    if size != entry["size"]:
        return f"{rel} has {size} bytes, the manifest lists {entry['size']} (truncated or overwritten)"
    if checksums:
        try:
            actual = hash_file(path)["sha256"]
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror})"
        if actual != entry["sha256"]:
            return f"{rel} has sha256 {actual[:12]}..., the manifest lists {entry['sha256'][:12]}... (corrupted)"
    return None


def check_files(tag_dir: str | Path, files: dict[str, dict], checksums: bool) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a set of manifest entries: problems with optional files are warnings."""
    problems, warnings = [], []
    for rel, entry in sorted(files.items()):
        why = check_file(tag_dir, rel, entry, checksums)
        if why:
            (warnings if is_optional(rel) else problems).append(why)
    return problems, warnings


# --------------------------------------------------------------------------------------------------
# which checkpoint to trust

# checks a tag's listed files: (tag_dir, files, checksums) -> (problems, warnings); the trainer passes one that
# splits the files over its ranks
FileChecker = Callable[[Path, dict, bool], tuple[list, list]]


@dataclass
class Verdict:
    """How far a tag can be trusted: status "verified", "legacy" (no manifest, trusted through ``latest``),
    "unverifiable" (no manifest, not trusted) or "corrupt"."""

    tag: str
    status: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: dict | None = None

    @property
    def usable(self) -> bool:
        return self.status in ("verified", "legacy")

    def reason(self) -> str:
        if self.status == "unverifiable":
            return (f"no {MANIFEST} and {LATEST} does not name it or a later tag: a save of an older version that "
                    f"did not finish, or an old checkpoint whose {LATEST} is gone (rewrite {LATEST} to trust it)")
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return "; ".join(self.problems[:3]) + more


def check_tag(directory: str | Path, tag: str, checksums: bool = True, hint: LatestHint | None = None,
              checker: FileChecker = check_files) -> Verdict:
    """The :class:`Verdict` of one tag (see the module docstring for the rules)."""
    tag_dir = Path(directory) / tag
    if not tag_dir.is_dir():
        return Verdict(tag, "corrupt", [f"{tag_dir} does not exist"])
    try:
        manifest = read_manifest(tag_dir)
    except CheckpointFormatError as e:
        return Verdict(tag, "corrupt", [str(e)])
    if manifest is None:
        hint = read_latest(directory) if hint is None else hint
        if hint.tag is None or step_of(tag) is None or step_of(tag) > step_of(hint.tag):
            return Verdict(tag, "unverifiable")
        if not any((tag_dir / n).is_file() for n in (*MODEL_STATES_FILES, WEIGHTS_ONLY_MARKER)):
            return Verdict(tag, "corrupt", [f"{tag_dir} holds none of {', '.join(MODEL_STATES_FILES)}"])
        return Verdict(tag, "legacy", warnings=[f"{tag_dir} has no {MANIFEST} (saved before checkpoints carried "
                                                "one): loading it without verification"])
    problems, warnings = checker(tag_dir, manifest["files"], checksums)
    return Verdict(tag, "corrupt" if problems else "verified", problems, warnings, manifest)


@dataclass
class Choice:
    """The checkpoint of a directory to resume from (``verdict`` None: none can be trusted), the tags that
    exist, and notes that say why newer tags were passed over and what ``latest`` said."""

    directory: Path
    verdict: Verdict | None
    tags: list[str]
    notes: list[str]

    @property
    def tag(self) -> str | None:
        return self.verdict.tag if self.verdict else None

    def explain(self) -> str:
        return "\n  - ".join([""] + self.notes) if self.notes else ""


def choose(directory: str | Path, checksums: bool = True, checker: FileChecker = check_files) -> Choice:
    """The newest tag of ``directory`` that can be trusted, trying tags newest first."""
    directory = Path(directory)
    tags = list_tags(directory)
    hint = read_latest(directory)
    notes = [hint.problem] if hint.problem and (tags or (directory / LATEST).exists()) else []
    for tag in reversed(tags):
        verdict = check_tag(directory, tag, checksums, hint, checker)
        if verdict.usable:
            if hint.tag and hint.tag != tag:
                notes.append(f"{directory / LATEST} names {hint.tag}, but {tag} is the newest checkpoint that "
                             "verifies")
            return Choice(directory, verdict, tags, notes)
        notes.append(f"{tag} cannot be used: {verdict.reason()}")
    return Choice(directory, None, tags, notes)


def resolve(directory: str | Path, iteration: int | None = None, checksums: bool = True,
            log: Callable[[str], None] = print) -> Verdict:
    """The tag a tool reads: ``iteration``'s (which must be usable) or the newest usable one (saying why newer
    ones were passed over). CheckpointFormatError names the problem and the tags that do verify."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointFormatError(f"checkpoint directory {directory} does not exist")
    if iteration is None:
        choice = choose(directory, checksums)
        for note in choice.notes:
            log(f"note: {note}")
        if choice.verdict is None:
            raise CheckpointFormatError(f"no checkpoint in {directory} can be used"
                                        + (choice.explain() if choice.tags else " (it holds no iter_* checkpoint)"))
        verdict = choice.verdict
    else:
        tag = tag_for(iteration)
        if not (directory / tag).is_dir():
            raise CheckpointFormatError(f"checkpoint {directory / tag} does not exist (checkpoints in {directory}: "
                                        f"{', '.join(list_tags(directory)) or 'none'})")
        verdict = check_tag(directory, tag, checksums)
        if not verdict.usable:
            good = choose(directory, checksums).tag
            raise CheckpointFormatError(f"checkpoint {directory / tag} cannot be used: {verdict.reason()}"
                                        + (f"; the newest one that verifies is {good}" if good else ""))
    for warning in verdict.warnings:
        log(f"warning: {warning}")
    return verdict


def model_states_path(tag_dir: str | Path) -> Path:
    """The tag's file with DeepSpeed's global state and the client state (rank 0's; all ranks save the same)."""
    tag_dir = Path(tag_dir)
    for name in MODEL_STATES_FILES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointFormatError(f"checkpoint {tag_dir} has neither {' nor '.join(MODEL_STATES_FILES)}: not a "
                                "complete DeepSpeed checkpoint")


def holds_run_checkpoints(directory: str | Path) -> list[str]:
    """The tags of ``directory`` that a training run wrote (everything but weights-only imports)."""
    directory = Path(directory)
    return [t for t in list_tags(directory) if not (directory / t / WEIGHTS_ONLY_MARKER).is_file()]
