"""Timing side by side: every method of a case in one process, in turns.

Each method's output is checked against the reference before it is timed;
the time is the median of the timed runs after a warm-up, the methods of a
case taking turns so that a busy machine slows them alike. Peak memory is
measured in a fresh process per method and case (`benchmarks.child`), and a
case with a method or model that needs DeepXDE's compat.v1 backend (which
turns off TensorFlow 2 behavior for the whole process) runs in a process of
its own.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import logging
import numpy as np

from benchmarks import cases as cases_lib
from benchmarks import methods as methods_lib

PAUSE = 0.05  # Seconds between timed runs, for the previous one's threads.
FAST_RUN = 0.02  # Seconds: methods faster than this get `fast_repeats` runs.
RTOL = 1e-3  # Relative to the largest entry of the reference.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD_TAG = "BENCHMARK_CHILD "


@dataclasses.dataclass(frozen=True)
class Timing:
  """How a case is timed (one object through every layer).

  Attributes:
    repeats: timed runs per method.
    warmup: untimed runs first.
    max_seconds: budget of one method's timed runs (at least one run).
    fast_repeats: timed runs of a method whose first timed run took under
      `FAST_RUN` seconds (short runs vary more), if more than `repeats`;
      `None`: `repeats`.
  """

  repeats: int = 5
  warmup: int = 1
  max_seconds: float = float("inf")
  fast_repeats: int = None


def check(value, reference):
  """`None` if `value` matches `reference`, else what is wrong."""
  value = np.asarray(value)
  if value.shape != reference.shape:
    return f"shape {value.shape}, expected {reference.shape}"
  scale = float(np.max(np.abs(reference), initial=0.0)) or 1.0
  err = float(np.max(np.abs(value - reference), initial=0.0))
  if not np.isfinite(err) or err > RTOL * scale:
    return (
      f"max |difference| {err:.3g} > {RTOL:g} x max |reference| {scale:.3g}"
    )
  return None


def _failure(error):
  return f"{type(error).__name__}: {(str(error) or '?').splitlines()[0]}"


def _build_and_check(case, name, reference, isolated):
  """Builds method `name` and checks it; returns `(record, runner, value)`.

  `runner` is `None` unless the method passed; `value` is its output.
  """
  method = methods_lib.get(name)
  record = {"method": name, "status": "ok", "error": None, "note": None}
  if case.quantity not in method.quantities:
    record.update(status="skipped", error=f"does not compute {case.quantity}")
    return record, None, None
  if isolated and method.eager:
    record.update(
      status="skipped",
      error="needs eager execution, which DeepXDE's compat.v1 backend turns "
      "off in the process that times dde.grad",
    )
    return record, None, None
  runner = value = None
  try:
    runner = method.build(case)
    value = np.asarray(runner.value())
  except methods_lib.SkipMethod as error:
    record.update(status="skipped", error=str(error))
  except Exception as error:  # pylint: disable=broad-except
    record.update(status="failed", error=_failure(error))
  else:
    record["note"] = getattr(runner, "note", None)
    if not method.floor and reference is not None:
      problem = check(value, reference)
      if value.shape == reference.shape:
        record["max_abs_diff"] = float(np.max(np.abs(value - reference)))
      if problem:
        record.update(status="wrong", error=problem)
    if record["status"] == "ok":
      return record, runner, value
  if runner is not None:
    runner.close()
  return record, None, value


def _time_in_turns(runners, timing):
  """`{name: [seconds]}`: warm-up, then rounds of one run per method."""
  times = {name: [] for name in runners}
  budget = {}
  for name, runner in runners.items():
    start = time.perf_counter()
    for _ in range(timing.warmup):
      runner.run()
    per_run = (time.perf_counter() - start) / timing.warmup
    budget[name] = max(
      1, int(min(timing.repeats, timing.max_seconds / max(per_run, 1e-9)))
    )
  names = list(runners)
  round_ = 0
  while any(round_ < b for b in budget.values()):
    # Each round starts with another method: whichever runs right after
    # another (JAX's and TensorFlow's thread pools spin for a while after a
    # call) is slowed, and no method should always be the one.
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      if round_ < budget[name]:
        time.sleep(PAUSE)
        start = time.perf_counter()
        runners[name].run()
        times[name].append(time.perf_counter() - start)
    if round_ == 0 and timing.fast_repeats is not None:
      # Decided on a timed run: the warm-up's first run may still allocate.
      for name, t in times.items():
        if t and t[0] < FAST_RUN:
          budget[name] = max(budget[name], timing.fast_repeats)
    round_ += 1
  return times


def run_case_here(case, names, timing, isolated=False):
  """Checks and times methods `names` on `case` in this process.

  tf1hess's default (`methods.REFERENCE`, built first if not among `names`)
  is checked against the model's analytic quantity where there is one; every
  other method against the default's output. The methods that pass are
  timed in turns (`_time_in_turns`).

  Args:
    case: a `cases_lib.Case`.
    names: method names.
    timing: a `Timing`.
    isolated: `True` in the process where DeepXDE turned off TF2 behavior
      (methods that need eager execution are skipped).

  Returns:
    One dict per method of `names`: `method`, `status` ('ok', 'wrong',
    'failed' or 'skipped'), `error`, `note`, `max_abs_diff`, and for the
    timed ones `seconds` (median), `times`, `ratio` (to the default).

  Raises:
    RuntimeError: the default fails, or differs from the analytic value.
  """
  records, runners = [], {}
  reference = case.reference()
  order = [methods_lib.REFERENCE]
  order += [n for n in names if n != methods_lib.REFERENCE]
  for name in order:
    record, runner, value = _build_and_check(case, name, reference, isolated)
    if name == methods_lib.REFERENCE:
      if record["status"] != "ok":
        raise RuntimeError(
          f"tf1hess's default on {case.name}: {record['status']}: "
          f"{record['error']}"
        )
      reference = value
    if runner is not None:
      runners[name] = runner
    if name in names:
      records.append(record)
    logging.info(
      "%s %s: %s %s", case.name, name, record["status"], record["error"] or ""
    )
  times = _time_in_turns(runners, timing)
  for runner in runners.values():
    runner.close()
  base = np.median(times[methods_lib.REFERENCE])
  for record in records:
    t = times.get(record["method"])
    if t:
      record.update(times=t, seconds=float(np.median(t)))
      record["ratio"] = float(record["seconds"] / base)
      logging.info(
        "%s %s: %.4f s (%d runs)",
        case.name,
        record["method"],
        record["seconds"],
        len(t),
      )
  return records


def _spec(case):
  return {
    "model": case.model.name,
    "shape": case.shape,
    "quantity": case.quantity,
    "settings": dataclasses.asdict(case.settings),
  }


def case_from_spec(spec):
  return cases_lib.Case(
    spec["model"],
    spec["shape"],
    spec["quantity"],
    cases_lib.Settings(**spec["settings"]),
  )


def run_child(command, spec, env=None):
  """Runs `python -m benchmarks.child <command> <spec>`; returns its JSON.

  Raises:
    RuntimeError: the child printed no result (its last stderr line says why).
  """
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join(
    p for p in (ROOT, env.get("PYTHONPATH")) if p
  )
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.child", command, json.dumps(spec)],
    capture_output=True,
    text=True,
    check=False,
    timeout=3600,
    env=env,
    cwd=ROOT,
  )
  for line in result.stdout.splitlines():
    if line.startswith(_CHILD_TAG):
      return json.loads(line[len(_CHILD_TAG) :])
  reason = result.stderr.strip().splitlines()[-1:] or [result.returncode]
  raise RuntimeError(f"benchmarks.child {command} failed: {reason[0]}")


def print_child_result(value):
  """What `run_child` reads: one tagged line of JSON on stdout."""
  print(_CHILD_TAG + json.dumps(value), flush=True)


def run_case(case, names, timing):
  """`run_case_here`, in a process with DeepXDE if the case needs one."""
  isolated = any(methods_lib.get(n).isolated for n in names)
  if not (isolated or case.model.deepxde):
    return run_case_here(case, names, timing)
  logging.info("%s: in a process with DeepXDE's compat.v1 backend", case.name)
  spec = _spec(case) | {
    "names": list(names),
    "timing": dataclasses.asdict(timing),
  }
  try:
    return run_child("case", spec)
  except (RuntimeError, subprocess.TimeoutExpired) as error:
    # The other cases still run; this one is reported as failed.
    logging.warning("%s: %s", case.name, error)
    return [
      {"method": n, "status": "failed", "error": _failure(error), "note": None}
      for n in names
    ]


def _status_kb(field):
  with open("/proc/self/status", encoding="ascii") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(case, name):
  """Peak memory (MiB) of one run of method `name` on `case`, after warm-up.

  Linux keeps the peak resident set of a process (VmHWM); writing 5 to
  /proc/self/clear_refs resets it to the current one. The probe builds the
  method and warms it up without allocating for the full batch (allocators
  keep freed memory for reuse, which would hide a second run's needs):
  TensorFlow runs once on the first sample only; JAX, which compiles per
  shape, compiles ahead of time. Freed memory goes back to the system
  (`malloc_trim`, and `measure_memory` starts the probe with a fixed mmap
  threshold so that large freed buffers are unmapped). Then the peak is
  reset, the method runs on the full batch, and the probe reports the peak
  minus the resident set before that run: the memory the computation itself
  takes, its output included.
  """
  import ctypes  # pylint: disable=import-outside-toplevel

  runner = methods_lib.get(name).build(case)
  runner.warm_up_small()
  ctypes.CDLL(None).malloc_trim(0)
  with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
    refs.write("5")
  before = _status_kb("VmRSS")
  runner.run()
  peak = _status_kb("VmHWM")
  return (peak - before) / 1024.0


def measure_memory(case, name):
  """Runs `memory_probe` in a fresh process; returns MiB or `None`."""
  # A fixed threshold turns off glibc's adaptive one, which would keep large
  # freed buffers resident and hide them from the next run's peak.
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
  try:
    return run_child("memory", _spec(case) | {"name": name}, env)["peak_mib"]
  except RuntimeError as error:
    logging.warning("Memory probe of %s %s: %s", case.name, name, error)
    return None


def run_all(
  cases, names, timing, measure=False, chunk_cases=None, where_they_apply=False
):
  """`run_case` over cases; returns one flat list of records.

  Args:
    cases: `cases_lib.Case`s.
    names: method names, or `None` for each case's default methods.
    where_they_apply: time `names` only on the cases where they would be
      timed by default (their quantities, their models, if available).
    timing: a `Timing`.
    measure: also measure each timed method's peak memory.
    chunk_cases: `{(model, shape): [C, ...]}`: cases that also time
      `tf1hess_pfor_chunk<C>`.

  Returns:
    The records of `run_case`, each with `model`, `shape`, `quantity`, `n`,
    `k` (and `peak_mib` when measured).
  """
  chunk_cases = chunk_cases or {}
  results = []
  for index, case in enumerate(cases):
    logging.info("Case %d/%d: %s", index + 1, len(cases), case.name)
    chosen = names
    if names is None or where_they_apply:
      chosen = methods_lib.default_methods(
        case.model.name, case.quantity, names
      )
    chosen = list(chosen) + [
      f"tf1hess_pfor_chunk{c}"
      for c in chunk_cases.get((case.model.name, case.shape), ())
      if f"tf1hess_pfor_chunk{c}" not in chosen
    ]
    for record in run_case(case, chosen, timing):
      record.update(
        model=case.model.name,
        shape=case.shape,
        quantity=case.quantity,
        n=case.n,
        k=case.k,
      )
      if measure and record["status"] == "ok":
        record["peak_mib"] = measure_memory(case, record["method"])
      results.append(record)
  return results
