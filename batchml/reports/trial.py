"""``batchml try`` output: plain text for a terminal, Markdown for a pull-request comment.

Both are drawn from :func:`batchml.pipeline.trial.to_dict`, the JSON form, so the three formats never
disagree on a figure.
"""

from __future__ import annotations

from collections.abc import Callable


def _num(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _names(names: list[str], code: Callable[[str], str] = str) -> str:
    return ", ".join(code(n) for n in names) if names else "none"


def verdict(data: dict) -> str:
    """One line: what the gate would do, and why."""
    if data["outcome"] == "no_champion":
        return "the candidate would become the first champion (no champion yet)"
    champion = data["champion"]["version"]
    if data["would_promote"]:
        return f"the gate would PROMOTE the candidate over champion v{champion}"
    return f"the gate would KEEP champion v{champion}: {data['reason']}"


def _title(data: dict) -> str:
    return f"batchml try {data['job']} ({data['config']}, as of {data['as_of'].replace('T', ' ')} UTC)"


def _champion_name(data: dict) -> str:
    return "champion" if data["champion"] is None else f"champion v{data['champion']['version']}"


def _metric_rows(data: dict) -> list[list[str]]:
    boot = data["bootstrap"]
    rows = []
    for m in data["metrics"]:
        interval = ""
        if boot is not None and m["name"] == data["metric"]:
            interval = f" [{_num(boot['low'], sign=True)}, {_num(boot['high'], sign=True)}]"
        rows.append([m["name"] + (" (primary)" if m["name"] == data["metric"] else ""), _num(m["champion"]),
                     _num(m["candidate"]), _num(m["improvement"], sign=True) + interval])
    return rows


def _rows_line(data: dict) -> str:
    r, c = data["rows"], data["candidate"]
    return (f"{r['train']:,} training rows (fit {r['fit']:,}, early-stopping validation {r['validation']:,}), events "
            f"{c['train_start'][:10]} .. {c['train_end'][:10]}; holdout {r['holdout']:,} rows"
            + (f" ({r['holdout_positives']:,} positive)" if r["holdout_positives"] is not None else ""))


def _speed_line(data: dict) -> str:
    ratio = data["speed"]["latency_ratio"]
    trees = f"{data['candidate']['trees']} trees"
    if data["champion"] is not None:
        trees += f" vs {data['champion']['trees']}"
    if ratio is None:
        return f"candidate {trees}"
    return f"candidate scoring takes {ratio:.2f}x the champion's time (max {data['speed']['max_latency_ratio']:g}x); {trees}"


def _golden_line(check: dict | None, who: str) -> str:
    if check is None:
        return f"{who}: none"
    if not check["passed"]:
        return f"{who}: FAILED: {check['error']}"
    return f"{who}: {check['rows']} rows re-scored, largest difference {check['max_difference']:.1e}"


def _drift_summary(data: dict) -> str:
    d = data["drift"]
    if data["champion"] is None:
        return "no champion reference to compare with"
    return (f"{d['drifted_features']}/{d['features']} features drifted between the champion's training rows and the "
            f"candidate's{' (dataset drift)' if d['dataset_drift'] else ''}")


def _drifted(data: dict) -> list[dict]:
    """The rows worth showing: drifted features, the prediction row and any errors."""
    return [r for r in data["drift"]["rows"] if r["kind"] in ("feature", "prediction") and (r["drifted"] or r["kind"] == "prediction")
            or r["error"]]


def _stat(row: dict) -> str:
    if row["error"]:
        return f"error: {row['error']}"
    return f"{row['method']} {_num(row['statistic'])} (threshold {row['threshold']:.3g})"


def to_text(data: dict) -> str:
    """Plain text for a terminal or a CI log."""
    lines = [_title(data), f"verdict: {verdict(data)} (exit {data['exit_code']})", ""]
    header = ["metric", _champion_name(data), f"candidate (v{data['candidate']['version']})", "difference [bootstrap interval]"]
    table = [header, *_metric_rows(data)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    if data["conditions"]:
        lines += ["", "gate:"]
        lines += [f"  {'pass' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}" for c in data["conditions"]]
    lines += ["", f"speed: {_speed_line(data)}",
              f"features: added {_names(data['features']['added'])}; removed {_names(data['features']['removed'])}",
              f"rows: {_rows_line(data)}",
              "golden set: " + "; ".join([_golden_line(data["golden_set"]["champion"], _champion_name(data)),
                                          _golden_line(data["golden_set"]["candidate"], "candidate")]),
              f"drift: {_drift_summary(data)}"]
    lines += [f"  {r['feature']}: {_stat(r)}{' DRIFT' if r['drifted'] else ''}" for r in _drifted(data)]
    lines.append(f"took {data['seconds']:.1f} s; wrote nothing")
    return "\n".join(lines)


def _code(name: str) -> str:
    return f"`{name}`"


def _md_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(row) + " |" for row in rows)]


def to_markdown(data: dict) -> str:
    """A pull-request comment: verdict first, then the figures behind it."""
    mark = "✅" if data["would_promote"] else "❌"
    lines = [f"### {mark} `batchml try {data['job']}`: {verdict(data)}", "",
             f"Config `{data['config']}`, as of {data['as_of'].replace('T', ' ')} UTC, exit {data['exit_code']}.", ""]
    lines += _md_table(["metric", _champion_name(data), f"candidate (v{data['candidate']['version']})",
                        "difference [bootstrap interval]"], _metric_rows(data), ["---", "---:", "---:", "---:"])
    if data["conditions"]:
        lines += ["", *_md_table(["gate condition", "result", "figures"],
                                 [[_code(c["name"]), "✅ pass" if c["passed"] else "❌ **fail**", c["detail"]] for c in data["conditions"]],
                                 ["---", "---", "---"])]
    golden = data["golden_set"]
    lines += ["",
              f"- **Speed**: {_speed_line(data)}",
              f"- **Features**: added {_names(data['features']['added'], _code)}; removed {_names(data['features']['removed'], _code)}",
              f"- **Rows**: {_rows_line(data)}",
              f"- **Golden set**: {_golden_line(golden['champion'], _champion_name(data))}; {_golden_line(golden['candidate'], 'candidate')}",
              f"- **Drift**: {_drift_summary(data)}"]
    shown = _drifted(data)
    if shown:
        lines += ["", "<details><summary>drift rows</summary>", "",
                  *_md_table(["feature", "statistic", "drifted"], [[_code(r["feature"]), _stat(r), "yes" if r["drifted"] else "no"]
                                                                   for r in shown], ["---", "---", "---"]),
                  "", "</details>"]
    lines += ["", f"<sub>batchml try wrote nothing; it took {data['seconds']:.1f} s.</sub>"]
    return "\n".join(lines)
