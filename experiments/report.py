"""Writing a study's results: JSON (everything), a Markdown table and a loss-curve plot."""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import numpy as np


def write_study(out: str, stem: str, results: list[dict], args, *, label: str, intro: str,
                columns: Sequence[tuple[str, Callable[[dict], str]]], title: str) -> str:
    """Write ``<out>/<stem>.{json,md,png}``; returns the Markdown table.

    ``label`` is the result key naming each run; ``columns`` are ``(header,
    format(result))`` pairs after it; every result carries its ``losses``.
    """
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "results": results}, f, indent=1)
    env = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    headers = [label] + [h for h, _ in columns] + ["final loss (mean of last 20)"]
    lines = [f"{intro}; {env}.", "", "| " + " | ".join(headers) + " |",
             "|---|" + "---:|" * (len(headers) - 1)]
    for r in results:
        cells = [str(r[label])] + [fmt(r) for _, fmt in columns] + [
            f"{np.mean(r['losses'][-20:]):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        losses = np.asarray(r["losses"])
        k = min(10, len(losses))
        ax.plot(np.arange(len(losses) - k + 1) + k - 1,
                np.convolve(losses, np.ones(k) / k, mode="valid"),
                label=f"{r[label]} ({r['accuracy']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average of 10)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{stem}.png"), dpi=110)
    plt.close(fig)
    return table
