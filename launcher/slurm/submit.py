"""Rendering and submitting videofeat's sbatch scripts, and asking the cluster what it runs.

The scripts in ``slurm/`` are thin templates with ``{{name}}`` fields; this module fills them
(every field must be given, and nothing else), submits the text with ``sbatch --parsable`` on
stdin (so a run directory on object storage works too), and reads ``scontrol show config`` and
``squeue``. No SLURM option ever enters a run's fingerprint: these options only say where and
how long work runs, never what it computes. Imports neither torch nor timm.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

log = logging.getLogger("videofeat.slurm")

TEMPLATE_FIELD = re.compile(r"\{\{(\w+)\}\}")
# Preemption and time-limit warnings use USR2: USR1 is taken by some libraries (NCCL among them).
PREEMPT_SIGNAL = "USR2"
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's own default


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; the message names the command and its output."""


def template_dir() -> Path:
    """``slurm/`` beside the package root (installed as package data of ``videofeat``)."""
    import videofeat

    return Path(videofeat.__file__).resolve().parent / "slurm"


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``slurm/<template>``: every ``{{field}}`` must have a value and every value a field."""
    path = template_dir() / template
    text = path.read_text()
    wanted = set(TEMPLATE_FIELD.findall(text))
    missing = sorted(wanted - set(values))
    unused = sorted(set(values) - wanted)
    if missing or unused:
        raise ValueError(f"{path}: fields without a value: {missing or 'none'}; values without a field: "
                         f"{unused or 'none'}")
    return TEMPLATE_FIELD.sub(lambda m: str(values[m.group(1)]), text)


def quote(value: Any) -> str:
    return shlex.quote(str(value))


def directive_block(lines: Sequence[str]) -> str:
    """``#SBATCH`` lines for options, or a comment saying there are none (templates stay valid)."""
    return "\n".join(f"#SBATCH {line}" for line in lines) if lines else "# (no further sbatch options)"


_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), lambda m: int(m[1]) * 60),
    (re.compile(r"^(\d+):(\d+)$"), lambda m: int(m[1]) * 60 + int(m[2])),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), lambda m: int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])),
    (re.compile(r"^(\d+)-(\d+)$"), lambda m: int(m[1]) * 86400 + int(m[2]) * 3600),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), lambda m: int(m[1]) * 86400 + int(m[2]) * 3600 + int(m[3]) * 60),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"),
     lambda m: int(m[1]) * 86400 + int(m[2]) * 3600 + int(m[3]) * 60 + int(m[4])),
)


def parse_time_limit(text: str, flag: str = "--time") -> int:
    """Seconds in a SLURM time limit (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``)."""
    for pattern, seconds in _TIME_FORMS:
        match = pattern.match(str(text).strip())
        if match:
            value = seconds(match)
            if value <= 0:
                break
            return value
    raise ValueError(f"{flag} {text!r} is not a SLURM time limit; use e.g. 30 (minutes), 04:00:00 or 1-12:00:00")


@dataclass(frozen=True)
class SbatchOptions:
    """Where and how long jobs run; the same for every array of a launch and its reruns."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    gpus_per_task: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    constraint: Optional[str] = None
    extra: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.time is not None:
            parse_time_limit(self.time)
        for name in ("gpus_per_task", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(self.mem)):
            raise ValueError(f"--mem {self.mem!r} must be a number with an optional K/M/G/T suffix, e.g. 32G")
        object.__setattr__(self, "extra", tuple(self.extra))
        for arg in self.extra:
            if not str(arg).startswith("-"):
                raise ValueError(f"--sbatch-arg {arg!r} must be an sbatch option such as --exclusive or "
                                 "--reservation=NAME (give one option per --sbatch-arg)")

    @property
    def time_seconds(self) -> Optional[int]:
        return None if self.time is None else parse_time_limit(self.time)

    def directives(self, resources: bool = True) -> list[str]:
        """Option lines; ``resources=False`` (the reducer) keeps only where it may run."""
        lines = [f"--{name}={getattr(self, name)}" for name in ("partition", "account", "qos")
                 if getattr(self, name) is not None]
        if resources:
            if self.time is not None:
                lines.append(f"--time={self.time}")
            for name in ("gpus_per_task", "cpus_per_task", "mem", "constraint"):
                if getattr(self, name) is not None:
                    lines.append(f"--{name.replace('_', '-')}={getattr(self, name)}")
            lines.extend(self.extra)
        return lines

    def to_dict(self) -> dict:
        body = asdict(self)
        body["extra"] = list(self.extra)
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SbatchOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "extra" else v) for k, v in data.items() if k in known})

    def overridden(self, **changes: Any) -> "SbatchOptions":
        """A copy with the given non-None values replacing these (a rerun's new ``--time``)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None and v != ()})


@dataclass(frozen=True)
class ArrayChunk:
    """One submitted array: its task i runs plan index ``offset + i``."""

    offset: int
    count: int


def split_arrays(num_tasks: int, max_array_size: int) -> list[ArrayChunk]:
    """Cut a plan into arrays whose indices stay below the cluster's MaxArraySize."""
    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    if max_array_size < 1:
        raise ValueError(f"MaxArraySize must be >= 1, got {max_array_size}")
    return [ArrayChunk(offset, min(max_array_size, num_tasks - offset))
            for offset in range(0, num_tasks, max_array_size)]


def array_spec(count: int, throttle: Optional[int] = None) -> str:
    """``0-(count-1)`` with an optional ``%throttle`` (at most that many tasks run at once)."""
    if count < 1:
        raise ValueError(f"an array needs at least one task, got {count}")
    spec = f"0-{count - 1}" if count > 1 else "0"
    return f"{spec}%{throttle}" if throttle else spec


def parse_job_id(stdout: str) -> str:
    """The job id printed by ``sbatch --parsable`` (``123`` or ``123;cluster``)."""
    text = stdout.strip().splitlines()[-1].strip() if stdout.strip() else ""
    job_id = text.split(";", 1)[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch --parsable printed {stdout!r}, not a job id")
    return job_id


def _run(argv: Sequence[str], stdin: Optional[str] = None, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: SLURM's client commands must be on PATH "
                         "(for a local test cluster: bash scripts/slurm_cluster.sh start)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer in {timeout:.0f} s: is slurmctld up?") from None
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def submit(script_text: str, extra_args: Sequence[str] = (), cwd: Optional[str] = None) -> str:
    """Submit a script's text with ``sbatch --parsable``; returns the job id."""
    argv = ["sbatch", "--parsable", *extra_args]
    try:
        done = subprocess.run(argv, input=script_text, capture_output=True, text=True, timeout=120, cwd=cwd)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: SLURM's client commands must be on PATH "
                         "(for a local test cluster: bash scripts/slurm_cluster.sh start)") from None
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job (exit {done.returncode}): {done.stderr.strip()}")
    return parse_job_id(done.stdout)


def parse_config(text: str) -> dict[str, str]:
    """``scontrol show config`` output as ``{key: value}``."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def cluster_config() -> dict[str, str]:
    return parse_config(_run(["scontrol", "show", "config"]))


def max_array_size(config: Optional[Mapping[str, str]] = None) -> int:
    """Array indices must stay below this (SLURM's default is 1001)."""
    config = cluster_config() if config is None else config
    value = config.get("MaxArraySize", str(DEFAULT_MAX_ARRAY_SIZE))
    try:
        return int(value.split()[0])
    except ValueError:
        raise SlurmError(f"scontrol show config gave MaxArraySize={value!r}, not a number") from None


@dataclass(frozen=True)
class QueuedJob:
    """One line of ``squeue``: a job, an array task, or the pending rest of an array."""

    job_id: str
    array_job_id: str
    array_task: str
    state: str
    reason: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                           "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                           "RESV_DEL_HOLD", "SPECIAL_EXIT"})


def parse_squeue(text: str) -> list[QueuedJob]:
    jobs = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            jobs.append(QueuedJob(*parts))
    return jobs


def queue(job_ids: Sequence[str] = ()) -> list[QueuedJob]:
    """What ``squeue`` knows (finished jobs only for MinJobAge seconds), optionally of some job ids."""
    text = _run(["squeue", "-h", "-t", "all", "-o", "%A|%F|%K|%T|%r"])
    jobs = parse_squeue(text)
    if job_ids:
        wanted = {str(j) for j in job_ids}
        jobs = [j for j in jobs if j.job_id in wanted or j.array_job_id in wanted]
    return jobs


def cancel(job_ids: Sequence[str], signal: Optional[str] = None) -> None:
    if job_ids:
        _run(["scancel", *([f"--signal={signal}"] if signal else []), *map(str, job_ids)])


def slurm_available() -> tuple[bool, str]:
    """Whether a cluster answers here; the reason when it does not."""
    import shutil

    for tool in ("sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed"
    try:
        out = _run(["scontrol", "ping"], timeout=15)
    except SlurmError as error:
        return False, str(error)
    if "UP" not in out:
        return False, f"slurmctld is not up ({out.strip()})"
    return True, ""
