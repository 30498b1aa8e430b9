"""The benchmarks' one way to print a result: a Markdown table under a heading (pastes into
the README as it is). Imported as a sibling module: the benchmarks run as scripts."""

from __future__ import annotations


def table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    cells = [headers, *[[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n## {title}\n")
    for k, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
