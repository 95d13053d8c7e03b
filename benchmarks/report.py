"""The report (BENCHMARKS.md from `report_template.md`), plot and JSON."""

from importlib import metadata
import json
import os
import platform
import re
import string

from absl import logging
import numpy as np
import tensorflow as tf

from benchmarks import cases
from benchmarks import goals as goals_lib
from benchmarks import harness
from benchmarks import methods as methods_lib
from benchmarks import models
from tf1hess import _files

TEMPLATE = os.path.join(os.path.dirname(__file__), "report_template.md")


def machine_notes():
  """What the numbers were measured on."""
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
      match = re.search(r"model name\s*:\s*(.*)", info.read())
    cpu = match.group(1).strip() if match else cpu
  except OSError:
    pass
  versions = f"TensorFlow {tf.__version__}, numpy {np.__version__}"
  for module in ("jax", "folx", "deepxde"):
    try:
      versions += f", {module} {metadata.version(module)}"
    except metadata.PackageNotFoundError:
      versions += f", {module} not installed"
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "memory_gib": round(
      os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
    ),
    "python": platform.python_version(),
    "versions": versions,
    "load_average": os.getloadavg(),
    "bfc_allocator": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", ""),
  }


def duration(seconds):
  """`0.0123` -> `"12.3 ms"`; `None` -> `"n/a"`."""
  if seconds is None:
    return "n/a"
  if seconds < 1.0:
    return f"{seconds * 1e3:.3g} ms"
  return f"{seconds:.3g} s"


def _cell(record):
  if record is None:
    return ""
  if record["status"] != "ok":
    return record["status"]
  text = duration(record["seconds"])
  if record.get("ratio") is not None:
    text += f" ({record['ratio']:.2f}x)"
  if record.get("peak_mib") is not None:
    text += f", {record['peak_mib']:.0f} MiB"
  return text


def _cases(results):
  """`(model, quantity)` in order of appearance, each with its shapes."""
  out = {}
  for r in results:
    shapes = out.setdefault((r["model"], r["quantity"]), [])
    if r["shape"] not in shapes:
      shapes.append(r["shape"])
  return {key: sorted(s, key=cases.parse_shape) for key, s in out.items()}


def _goal_rows(results):
  names = {r["model"] for r in results}
  groups = {name: models.get(name).group for name in names}
  return goals_lib.evaluate(results, groups, methods_lib.REFERENCE)


def _goal_summary(rows):
  """One line per goal: how many of its cases meet it, and the speed-ups."""
  if not rows:
    return "No goal applies to the cases of this run."
  lines = [
    "| goal | met | speed-ups (other / tf1hess) |",
    "|---|---|---|",
  ]
  for goal in dict.fromkeys(g["goal"] for g in rows):
    mine = [g for g in rows if g["goal"] == goal]
    speedups = sorted(g["speedup"] for g in mine if g["speedup"] is not None)
    met = sum(g["met"] is True for g in mine)
    spread = "n/a"
    if speedups:
      spread = f"{speedups[0]:.2f}"
      if len(speedups) > 1:
        spread += f" to {speedups[-1]:.2f}"
    lines.append(f"| {goal} | {met} of {len(mine)} | {spread} |")
  return "\n".join(lines)


def _goals_table(rows):
  if not rows:
    return "No goal applies to the cases of this run."
  lines = [
    "| goal | case | tf1hess | other | speed-up | met | TF1 floor |",
    "|---|---|---|---|---|---|---|",
  ]
  for g in rows:
    met = {True: "yes", False: "**no**", None: "n/a"}[g["met"]]
    speedup = "n/a" if g["speedup"] is None else f"{g['speedup']:.2f}"
    lines.append(
      f"| {g['goal']} | {g['case']} | {duration(g['tf1hess'])} | "
      f"{duration(g['other'])} | {speedup} | {met} | {duration(g['floor'])} |"
    )
  return "\n".join(lines)


def _result_tables(results):
  parts = []
  for (model, quantity), shapes in _cases(results).items():
    rows = [
      r for r in results if r["model"] == model and r["quantity"] == quantity
    ]
    lines = [
      f"### {model}, {quantity}: {models.get(model).description}",
      "",
      "| method | " + " | ".join(s.replace("x", " x ") for s in shapes) + " |",
      "|---" * (len(shapes) + 1) + "|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
      by_shape = {r["shape"]: r for r in rows if r["method"] == method}
      cells = [_cell(by_shape.get(shape)) for shape in shapes]
      label = methods_lib.get(method).label_for(quantity)
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def _chunk_table(results):
  chunked = list(
    dict.fromkeys(
      (r["model"], r["shape"], r["quantity"])
      for r in results
      if r["method"].startswith("tf1hess_pfor_chunk")
    )
  )
  if not chunked:
    return "None in this run (`--chunk_cases`)."
  lines = [
    "| case | output (MiB) | method | time | peak memory (MiB) |",
    "|---|---|---|---|---|",
  ]
  for model, shape, quantity in chunked:
    n, k = cases.parse_shape(shape)
    for r in results:
      if (r["model"], r["shape"], r["quantity"]) != (model, shape, quantity):
        continue
      if r["status"] != "ok" or not (
        r["method"].startswith("tf1hess")
        or r["method"] in ("batch_jacobian_pfor", "jax_jit_vmap_hessian")
      ):
        continue
      peak = r.get("peak_mib")
      peak = "n/a" if peak is None else f"{peak:.0f}"
      lines.append(
        f"| {model} {shape} | {n * k * k * 4 / 2**20:.0f} | "
        f"{methods_lib.get(r['method']).label_for(quantity)} | "
        f"{duration(r['seconds'])} | {peak} |"
      )
  return "\n".join(lines)


def _problems(results):
  problems = {}
  for r in results:
    if r["status"] != "ok" or r.get("note"):
      text = r["error"] if r["status"] != "ok" else r["note"]
      label = methods_lib.get(r["method"]).label_for(r["quantity"])
      key = (label, r["status"], text)
      problems.setdefault(key, []).append(
        f"{r['model']} {r['shape']} {r['quantity']}"
      )
  if not problems:
    return "None."
  lines = []
  for (method, status, text), where in problems.items():
    status = "" if status == "ok" else f"{status}: "
    text = text.rstrip(".")
    lines.append(f"- {method}: {status}{text}. Cases: {', '.join(where)}.")
  return "\n".join(lines)


def _load(values):
  return ", ".join(f"{v:.1f}" for v in values)


def markdown(results, notes, command, template=TEMPLATE):
  """The report: `template` (a `string.Template`) filled in."""
  with open(template, encoding="utf-8") as f:
    text = string.Template(f.read())
  names = list(dict.fromkeys(r["model"] for r in results))
  rows = _goal_rows(results)
  quantities = list(dict.fromkeys(r["quantity"] for r in results))
  shapes = {"hessian": "`(N, K, K)`", "diagonal": "`(N, K)`"}
  return text.substitute(
    quantities=", ".join(f"{q} {shapes.get(q, '`(N,)`')}" for q in quantities),
    command=command,
    models="\n".join(
      f"- `{name}`: {models.get(name).description}." for name in names
    ),
    cpu=notes["cpu"],
    cores=notes["cores"],
    memory_gib=notes["memory_gib"],
    python=notes["python"],
    versions=notes["versions"],
    load_start=_load(notes["load_average"]),
    load_end=_load(notes.get("load_end", notes["load_average"])),
    bfc=notes.get("bfc_allocator") or "false",
    rtol=f"{harness.RTOL:g}",
    fast_ms=f"{harness.FAST_RUN * 1e3:g}",
    pause=f"{harness.PAUSE:g}",
    goal_summary=_goal_summary(rows),
    goals=_goals_table(rows),
    tables=_result_tables(results),
    chunks=_chunk_table(results),
    problems=_problems(results),
  )


def plot(results, path):
  """One panel per model and quantity: seconds per shape, a line a method."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = _cases(results)
  fig, axes = plt.subplots(
    1, len(panels), figsize=(6 * len(panels), 5), squeeze=False
  )
  for ax, ((model, quantity), shapes) in zip(axes[0], panels.items()):
    rows = [
      r for r in results if r["model"] == model and r["quantity"] == quantity
    ]
    for name in dict.fromkeys(r["method"] for r in rows):
      points = [
        (shapes.index(r["shape"]), r["seconds"])
        for r in rows
        if r["method"] == name and r.get("seconds")
      ]
      if not points:
        continue
      method = methods_lib.get(name)
      xs, ys = zip(*sorted(points))
      if method.floor:
        style = ":"
      else:
        style = "-o" if name.startswith("tf1hess") else "--x"
      width = 2.5 if name == methods_lib.REFERENCE else 1.2
      ax.plot(xs, ys, style, label=method.label_for(quantity), linewidth=width)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([s.replace("x", "\u00d7") for s in shapes])
    ax.set_yscale("log")
    ax.set_xlabel("N \u00d7 K")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{model}, {quantity}")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)


def write_outputs(results, notes, command, md=None, png=None, js=None):
  """Writes the raw results, the report and the plot (each optional).

  The raw results first: they survive a failure of the report or the plot.
  """
  if js:
    with _files.atomic_output(js) as tmp:
      with open(tmp, "w", encoding="utf-8") as out:
        data = {"command": command, "machine": notes, "results": results}
        json.dump(data, out, indent=1)
    logging.info("Wrote %s", js)
  if md:
    with _files.atomic_output(md) as tmp:
      with open(tmp, "w", encoding="utf-8") as out:
        out.write(markdown(results, notes, command))
    logging.info("Wrote %s", md)
  if png:
    with _files.atomic_output(png, suffix=".png") as tmp:
      plot(results, tmp)
    logging.info("Wrote %s", png)
