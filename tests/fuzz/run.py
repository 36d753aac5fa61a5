"""Fuzz driver: ``python -m tests.fuzz.run TARGET [--seconds N]`` (from the repository root).

The parent process runs the fuzzer (atheris, libFuzzer underneath) in a child process, and
starts it again after a crash until the time is spent, so that one run reports every distinct
finding. Each finding (an exception the target does not allow, a native crash, a timeout or
running out of memory) is saved under WORK/findings or WORK/crashes; the exit status is 1
when there was any. ``--replay [FILE ...]`` runs files (by default the seeds and the
regression files) through the target without the fuzzer, e.g. to reproduce a finding.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ARTIFACTS = ("crash-", "oom-", "timeout-", "leak-", "slow-unit-")


DEFAULT_MAX_LEN = 4096


def target_module(name: str) -> ModuleType:
    """``tests/fuzz/target_NAME.py``: NAME, INSTRUMENT, SEEDS, REGRESSIONS, prepare(), and
    optionally MAX_LEN (the longest input, default ``DEFAULT_MAX_LEN`` bytes)."""
    return importlib.import_module(f"{__package__}.target_{name}")


def signature(exc: BaseException) -> str:
    """Exception type + the innermost frame of our code or nibabel: one name per bug."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/ubc/" in f.filename or "/nibabel/" in f.filename] or \
        traceback.extract_tb(exc.__traceback__)[-1:]
    where = f"{Path(frames[-1].filename).stem}-{frames[-1].lineno}" if frames else "unknown"
    return f"{type(exc).__name__}-{where}"


def guarded(one_input: Callable[[bytes], None], findings: Path) -> Callable[[bytes], None]:
    """``one_input`` that records each distinct unexpected exception (input bytes and
    traceback) once, then lets fuzzing go on."""
    seen: set[str] = set()

    def run(data: bytes) -> None:
        try:
            one_input(data)
        except Exception as exc:
            name = signature(exc)
            if name not in seen:
                seen.add(name)
                findings.mkdir(parents=True, exist_ok=True)
                (findings / f"{name}.bin").write_bytes(data)
                (findings / f"{name}.txt").write_text("".join(traceback.format_exception(exc)))
                print(f"\n#FINDING {name} ({len(data)} bytes): {exc!s:.200}", flush=True)

    return run


def _is_patched(code: types.CodeType) -> bool:
    return any(name.startswith("_trace_") for name in code.co_names)


def instrument_loaded(packages: tuple[str, ...]) -> int:
    """Instrument, in place, the functions and methods of imported modules of ``packages``
    that atheris's import hook left alone: it cannot patch modules found by a custom finder,
    such as the editable install's redirect (it warns, and ubc then gets no coverage)."""
    import atheris

    count = 0
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] not in packages or module is None:
            continue
        values = list(vars(module).values())
        values += [v for c in values if isinstance(c, type) and c.__module__ == name
                   for v in vars(c).values()]
        for value in values:
            func = getattr(value, "__func__", getattr(value, "fget", value))
            if (isinstance(func, types.FunctionType) and func.__module__ == name
                    and not _is_patched(func.__code__)):
                atheris.instrument_func(func)
                count += 1
    return count


def child(args: argparse.Namespace) -> None:
    """Fuzz in this process until libFuzzer exits it (time spent or a native crash)."""
    import atheris

    limit = args.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # huge allocations fail, not the box
    target = target_module(args.target)
    with atheris.instrument_imports(include=list(target.INSTRUMENT)):
        one_input = target.prepare()
    print(f"INFO: instrumented {instrument_loaded(target.INSTRUMENT)} more functions", flush=True)
    work = Path(args.work)
    corpora = [str(p) for p in (work / "corpus", target.SEEDS, target.REGRESSIONS) if p.is_dir()]
    argv = [sys.argv[0], f"-max_total_time={args.seconds}", f"-timeout={args.timeout}",
            f"-rss_limit_mb={args.memory_mb}", f"-max_len={args.max_len}",
            f"-artifact_prefix={work / 'crashes'}/", "-print_final_stats=1", *args.libfuzzer,
            *corpora]
    atheris.Setup(argv, guarded(one_input, work / "findings"))
    atheris.Fuzz()


def fuzz(args: argparse.Namespace) -> int:
    """Run ``child`` until ``args.seconds`` are spent; print and save the summary."""
    work = Path(args.work or tempfile.mkdtemp(prefix=f"ubc-fuzz-{args.target}-"))
    for sub in ("corpus", "crashes", "findings"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    start, runs, executions = time.monotonic(), 0, 0
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    while (left := args.seconds - (time.monotonic() - start)) > 5 or runs == 0:
        command = [sys.executable, "-m", f"{__package__}.run", args.target, "--child",
                   "--work", str(work), "--seconds", str(max(int(left), 1)),
                   "--timeout", str(args.timeout), "--memory-mb", str(args.memory_mb),
                   "--max-len", str(args.max_len), *[f"--libfuzzer={a}" for a in args.libfuzzer]]
        log = work / f"fuzzer-{runs}.log"  # libFuzzer's progress lines, stats at the end
        with log.open("w") as stream:
            run = subprocess.run(command, env=env, stderr=stream)
        text = log.read_text(errors="replace")
        sys.stderr.write(text[-3000:])
        runs += 1
        found = re.findall(r"stat::number_of_executed_units: (\d+)", text)
        executions += int(found[-1]) if found else 0
        if run.returncode == 0:
            break
    return report(args.target, work, time.monotonic() - start, runs, executions)


def report(target: str, work: Path, seconds: float, runs: int, executions: int) -> int:
    findings = sorted(p.name for p in (work / "findings").glob("*.bin"))
    crashes = sorted(p.name for p in (work / "crashes").iterdir() if p.name.startswith(ARTIFACTS))
    summary = {"target": target, "seconds": round(seconds, 1), "executions": executions,
               "fuzzer_starts": runs, "corpus_units": len(list((work / "corpus").iterdir())),
               "findings": findings, "crashes": crashes, "work": str(work)}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 1 if findings or crashes else 0


def replay(target: str, files: list[Path] | None = None) -> dict[str, str]:
    """Run files through the target without the fuzzer: {file name: error} for each file
    that raised what the target does not allow (empty: all fine)."""
    module = target_module(target)
    one_input = module.prepare()
    if not files:
        files = sorted(p for d in (module.SEEDS, module.REGRESSIONS) if d.is_dir()
                       for p in d.rglob("*") if p.is_file() and p.suffix != ".md")
    failures = {}
    for path in files:
        try:
            one_input(path.read_bytes())
        except Exception as exc:
            failures[str(path)] = f"{signature(exc)}: {exc}"
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="a tests/fuzz/target_NAME.py name, e.g. nifti")
    parser.add_argument("--seconds", type=int, default=60, help="total fuzzing time")
    parser.add_argument("--work", help="corpus, findings and crashes (default: a temp dir)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--memory-mb", type=int, default=4096,
                        help="address-space and RSS limit of the fuzzing process")
    parser.add_argument("--max-len", type=int, help="longest input in bytes (default: the "
                        f"target's MAX_LEN, else {DEFAULT_MAX_LEN}; upload: 1 MiB)")
    parser.add_argument("--libfuzzer", action="append", default=[],
                        help="extra libFuzzer flag, e.g. --libfuzzer=-seed=1 (repeatable)")
    parser.add_argument("--replay", nargs="*", type=Path, metavar="FILE",
                        help="run FILEs (default: seeds + regressions) without the fuzzer")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_len is None:
        args.max_len = getattr(target_module(args.target), "MAX_LEN", DEFAULT_MAX_LEN)
    if args.child:
        child(args)
        return 0
    if args.replay is not None:
        failures = replay(args.target, args.replay)
        for name, error in failures.items():
            print(f"{name}: {error}")
        return 1 if failures else 0
    return fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
