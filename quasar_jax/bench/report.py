"""Benchmark outputs: the machine description, ``results.json`` / ``results.md`` / ``plot.png`` /
``outputs.jsonl``. :func:`machine_info` is also what ``scripts/bench_step.py`` and
``scripts/bench_loop.py`` record. matplotlib is imported only when the plot is drawn."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
from pathlib import Path

import jax

from quasar_jax.cli.outputs import staged_dir


# ----------------------------------------------------------------------------- machine
def _proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file (None when unreadable)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """Host, accelerator and library versions of this process (the ``machine`` of every result)."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        info["cores_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores_available"] = os.cpu_count()
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    if mem_kib:
        info["memory_gib"] = round(int(mem_kib.split()[0]) / 2**20, 1)
    devices = jax.devices()
    info.update(jax=jax.__version__, backend=jax.default_backend(), device=devices[0].device_kind,
                devices=[f"{d.platform}:{d.device_kind}" for d in devices],
                gpu=next((d.device_kind for d in devices if d.platform != "cpu"), None))
    for dist in ("jaxlib", "flax", "torch", "transformers"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - optional
            pass
    if importlib.util.find_spec("torch") is not None:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    info["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    return info


def loadavg() -> float | None:
    """1-minute load average of the host (None where the OS does not report one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------- markdown
def _fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}f}"
    return str(x)


def _header(m: dict, c: dict) -> list[str]:
    return [
        "# quasar_jax benchmark", "",
        f"Machine: {m.get('cpu')} ({m.get('cores_available')} cores available of "
        f"{m.get('cpu_count')}, {m.get('memory_gib', '?')} GiB), jax {m.get('jax')} backend "
        f"`{m.get('backend')}`" + (f" on {m['gpu']}" if m.get("gpu") else "")
        + f", torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads); 1-min load "
        f"average {m.get('loadavg_1m_before', '?')} before, {m.get('loadavg_1m_after', '?')} after.", "",
        f"Model `{c['model']}` ({c['dtype']}), {c['num_questions']} prompts "
        f"({', '.join(f'{k}: {v}' for k, v in c['categories'].items())}), "
        f"max_new_tokens {c['max_new_tokens']}, K={c['num_draft']}, n-gram "
        f"{c['ngram_min']}..{c['ngram_max']}, batch {c['batch_size']}, temperature "
        f"{c['temperature']}, repeats {c['repeats']} (median), stop ids {c['stop_ids']}, "
        f"cache {c['cache_len']} slots, prompt bucket {c.get('prompt_bucket_used', '?')}"
        + (f", prompts cut to their last {c['max_prompt_tokens']} tokens" if c.get("max_prompt_tokens") else "")
        + ".", ""]


def results_markdown(results: dict) -> str:
    c, modes, fid = results["config"], results["modes"], results["fidelity"]
    lines = _header(results["machine"], c)
    lines += ["## Overall", "",
              "| mode | tau | tokens/s | speedup vs ar-fp | exact match (ref) | exact match vs ar-fp "
              "| new tokens | steps | timed wall s | repeat range s | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in modes.items():
        o = res["overall"]
        label = name + (" (ref)" if o.get("auto_added") else "")
        lines.append(
            f"| {label} | {_fmt(o['tau'])} | {_fmt(o['tokens_per_s'], 1)} | {_fmt(o['speedup_vs_ar_fp'])} "
            f"| {_fmt(o['exact_match'])} ({o['reference']}) | {_fmt(o['exact_match_vs_ar_fp'])} "
            f"| {o['new_tokens']} | {_fmt(o['verify_steps'])} | {_fmt(o['wall_s'], 3)} "
            f"| {_fmt(o.get('wall_s_min_repeat'), 2)}-{_fmt(o.get('wall_s_max_repeat'), 2)} "
            f"| {_fmt(o['compile_s'], 1)} |")
    cats = list(c["categories"])
    for key, title, digits in (("tau", "tau (tokens per verify step) per category", 2),
                               ("speedup_vs_ar_fp", "Speedup vs ar-fp per category", 2),
                               ("tokens_per_s", "Tokens/s per category", 1),
                               ("exact_match", "Exact match vs reference per category", 2)):
        lines += ["", f"## {title}", "", "| mode | " + " | ".join(cats) + " | overall |",
                  "|---" * (len(cats) + 2) + "|"]
        for name, res in modes.items():
            vals = [_fmt(res["categories"][k][key], digits) for k in cats]
            lines.append(f"| {name} | " + " | ".join(vals) + f" | {_fmt(res['overall'][key], digits)} |")
    costs = results.get("step_cost") or {}
    if costs:
        lines += ["", "## Draft cost per step (r = draft / verify)", "",
                  "Each mode's draft and verify forward compiled alone, batch and cache of the run, "
                  "median; r = draft / verify(1 token) (speed-up = tau / (1 + r) where a verify is flat "
                  "in its tokens), r_step = draft / verify(T tokens), r_bytes = weights read.", "",
                  "| mode | T | draft ms | verify(1) ms | verify(T) ms | r | r_step | r_bytes | draft MB | verify MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, sc in costs.items():
            t = sc["verified_tokens"]
            lines.append(f"| {name} | {t} | {_fmt(sc['draft_ms'], 3)} | {_fmt(sc['verify_ms']['1'], 3)} "
                         f"| {_fmt(sc['verify_ms'][str(t)], 3)} | {_fmt(sc['r'], 3)} | {_fmt(sc['r_step'], 3)} "
                         f"| {_fmt(sc['r_bytes'], 3)} | {_fmt(sc['draft_bytes'] / 1e6, 2)} "
                         f"| {_fmt(sc['verify_bytes'] / 1e6, 2)} |")
    if fid:
        lines += ["", "## Float vs int8 fidelity (teacher-forced along ar-fp outputs)", "",
                  "| activation mode | top-1 agreement | mean KL(p_fp \\|\\| p_q) nats | mean common "
                  "greedy prefix (tokens) | mean ar-fp tokens | positions |", "|---|---|---|---|---|---|"]
        for q, f in fid.items():
            lines.append(f"| {q} (AR run: {f['ar_mode']}) | {_fmt(f['top1_agreement'], 4)} "
                         f"| {_fmt(f['mean_kl'], 5)} | {_fmt(f['mean_common_prefix'], 1)} "
                         f"| {_fmt(f['mean_ar_fp_tokens'], 1)} | {f['positions']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot
def plot_results(results: dict, path: Path) -> None:
    """Bars of tau and speedup vs ar-fp per category (and overall), one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = results["modes"]
    groups = list(results["config"]["categories"]) + ["overall"]
    width_in = min(24.0, max(8.0, 2.0 + 0.12 * len(groups) * max(1, len(modes))))
    fig, axes = plt.subplots(2, 1, figsize=(width_in, 8), sharex=True)
    width = 0.8 / max(1, len(modes))
    for ax, key, title in ((axes[0], "tau", "tau (tokens per verify step)"),
                           (axes[1], "speedup_vs_ar_fp", "speedup vs ar-fp (tokens/s ratio)")):
        for j, (name, res) in enumerate(modes.items()):
            vals = [(res["overall"] if g == "overall" else res["categories"][g])[key] for g in groups]
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(groups))]
            pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
            if pts:
                ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[1].set_xticks(range(len(groups)))
    axes[1].set_xticklabels(groups, rotation=30, ha="right")
    c = results["config"]
    fig.suptitle(f"{Path(str(c['model'])).name}: K={c['num_draft']}, max_new_tokens={c['max_new_tokens']}, "
                 f"{results['machine'].get('backend')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- files
def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean_json(o):
    """``o`` with NaN / inf floats replaced by None (they are not JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    return o


def write_outputs(bundle: dict, out: Path) -> dict:
    """Write the four output files of ``run_benchmark``'s bundle, all or nothing (a staged
    directory renamed into place); returns the cleaned results."""
    with staged_dir(out) as stage:
        return _write_files(bundle, stage)


def _write_files(bundle: dict, out_dir: Path) -> dict:
    results = clean_json(bundle["results"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    plot_results(results, out_dir / "plot.png")
    tok = bundle["tokenizer"]
    with open(out_dir / "outputs.jsonl", "w") as f:
        for i, q in enumerate(bundle["questions"]):
            row = {"question_id": q.question_id, "category": q.category, "source": q.source,
                   "prompt_tokens": len(bundle["prompt_ids"][i]),
                   "outputs": {m: o[i] for m, o in bundle["outputs"].items()},
                   "text": {m: tok.decode(o[i], skip_special_tokens=False)
                            for m, o in bundle["outputs"].items()}}
            f.write(json.dumps(row, default=_json_default) + "\n")
    return results
