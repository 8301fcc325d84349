"""The last step of scripts/gpu_check.sh: read the stages' raw outputs from its work folder and write
the results folder a person reads (at most 8 files):

  summary.md     stage table, test counts and failures, sanitizer verdicts, every benchmark table
  junit.xml      the per-file JUnit XML reports merged into one
  sanitizer.log  the compute-sanitizer outputs, one section per tool
  bench.json     {family: the bench JSON}; bench.md: the bench markdown files concatenated
  (gpu_check.log is written by the shell script itself)

Standard library only: it must run when everything else broke.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import xml.etree.ElementTree as ET

MAX_FAILURES_LISTED = 40
LOG_CAP = 4_000_000  # bytes per section copied into sanitizer.log


def read(path: str, default: str = "") -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def stages(work: str) -> list[dict]:
    rows = []
    for line in read(os.path.join(work, "stages.tsv")).splitlines():
        parts = line.split("\t") + [""] * 6
        rows.append(dict(zip(("name", "status", "rc", "seconds", "limit", "note"), parts[:6])))
    return rows


# ---------------------------------------------------------------------------------------------
# tests

_OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_STARTED = re.compile(r"^(\S+::\S+) ?$")


def _from_log(text: str) -> dict:
    """Counts from a pytest -v log whose run was cut off (no JUnit XML), and the test it was in."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures, last_started, done = [], None, set()
    for line in text.splitlines():
        m = _OUTCOME.match(line)
        if m:
            node, out = m.groups()
            done.add(node)
            key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(out, "skipped")
            counts[key] += 1
            if key in ("failed", "errors"):
                failures.append((node, out.lower()))
            continue
        m = _STARTED.match(line.strip())
        if m:
            last_started = m.group(1)
    hung = last_started if last_started and last_started not in done else None
    return dict(counts=counts, failures=failures, hung=hung)


def collect_tests(work: str) -> dict:
    total = dict(tests=0, passed=0, failed=0, errors=0, skipped=0)
    failures, files, merged = [], [], ET.Element("testsuites")
    for log in sorted(glob.glob(os.path.join(work, "tests", "*.log"))):
        name = os.path.basename(log)[:-4]
        xml = os.path.join(work, "junit", name + ".xml")
        rc = read(os.path.join(work, "tests", name + ".rc")).strip() or "killed"
        entry = dict(file=name.replace("+", "/"), rc=rc, source="junit", hung=None)
        tree = None
        if os.path.exists(xml):
            try:
                tree = ET.parse(xml)
            except ET.ParseError:
                tree = None
        if tree is not None:
            c = dict(passed=0, failed=0, errors=0, skipped=0)
            for suite in tree.getroot().iter("testsuite"):
                merged.append(suite)
                for tc in suite.iter("testcase"):
                    node = f"{tc.get('classname', '')}::{tc.get('name', '')}"
                    bad = tc.find("failure")
                    kind = "failed"
                    if bad is None:
                        bad, kind = tc.find("error"), "errors"
                    if bad is not None:
                        c[kind] += 1
                        msg = " ".join((bad.get("message") or bad.text or "").split())[:300]
                        failures.append((node, kind, msg))
                    elif tc.find("skipped") is not None:
                        c["skipped"] += 1
                    else:
                        c["passed"] += 1
        else:  # cut off or crashed before pytest wrote its report: count what the log shows
            r = _from_log(read(log))
            c, entry["source"], entry["hung"] = r["counts"], "log (no JUnit XML: cut off or crashed)", r["hung"]
            failures += [(n, k, "") for n, k in r["failures"]]
            if r["hung"]:
                failures.append((r["hung"], "hung", "running when the stage was cut off"))
        entry.update(c)
        files.append(entry)
        for k in c:
            total[k] += c[k]
    total["tests"] = sum(total[k] for k in ("passed", "failed", "errors", "skipped"))
    return dict(total=total, failures=failures, files=files, merged=merged)


# ---------------------------------------------------------------------------------------------
# sanitizer

_UNAVAILABLE = re.compile(r"Device not supported|error 999|Unable to (?:find|load|initialize)|"
                          r"not supported on this|Target application terminated before first instrumented API",
                          re.I)


def sanitizer_verdicts(work: str, stage_status: str = "") -> list[dict]:
    out = []
    note = read(os.path.join(work, "sanitizer.note")).strip()
    for tool in ("memcheck", "racecheck", "synccheck"):
        text = read(os.path.join(work, "sanitizer", tool + ".log"))
        rc = read(os.path.join(work, "sanitizer", tool + ".rc")).strip()
        summaries = re.findall(r"ERROR SUMMARY:\s*(\d+) error", text)
        # racecheck's own line counts hazards (warnings included) beside its errors
        hazards = re.findall(r"RACECHECK SUMMARY:\s*(\d+) hazard", text)
        passed = re.findall(r"^PASS (\S+)", text, re.M)
        failed = re.findall(r"^FAIL (\S+?):? ", text, re.M)
        started = re.findall(r"^START (\S+)", text, re.M)
        if note and not text:
            verdict = f"unavailable ({note})"
        elif not text and not rc:
            verdict = {"timeout": "not run: the sanitizer stage was cut off before it",
                       "skipped": "not run: stage skipped"}.get(stage_status, "not run")
        elif "no GPU" in text and not started:
            verdict = "not run (no GPU)"
        elif rc in ("124", "137"):
            last = started[-1] if started else None
            verdict = f"timed out{' in case ' + last if last else ''} ({len(passed)} cases passed before)"
        elif not summaries and _UNAVAILABLE.search(text):
            line = _UNAVAILABLE.search(text).group(0)
            verdict = f"sanitizer unavailable on this machine ({line}), not a kernel failure"
        elif not summaries:
            verdict = f"no ERROR SUMMARY (exit {rc or '?'}): see sanitizer.log"
        else:
            n = int(summaries[-1])
            verdict = "clean: 0 errors" if n == 0 else f"{n} ERRORS"
            if hazards and int(hazards[-1]):
                verdict += f" ({hazards[-1]} racecheck hazards reported)"
        if failed:
            verdict += f"; cases failed: {', '.join(failed)}"
        elif passed:
            verdict += f"; {len(passed)} cases passed"
        out.append(dict(tool=tool, verdict=verdict, text=text))
    return out


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", default="?")
    ap.add_argument("--elapsed", default="?")
    a = ap.parse_args(argv)
    work, out = a.work, a.out
    os.makedirs(out, exist_ok=True)
    probe = {}
    try:
        probe = json.loads(read(os.path.join(work, "probe.json"), "{}"))
    except ValueError:
        pass
    rows = stages(work)
    by_name = {r["name"]: r for r in rows}

    md = ["# fastar GPU check", ""]
    if not probe.get("gpu"):
        md += ["**no GPU**: torch sees no CUDA device here, so the GPU stages did not run"
               + (" (FASTAR_GPU_CHECK_FORCE=1: they ran anyway, as a dry run)" if
                  by_name.get("tests", {}).get("status") not in (None, "skipped") else "") + ".", ""]
    md += [f"Machine: {probe.get('gpu_name', 'no GPU')}"
           + (f" (sm_{probe.get('arch', '?').replace('.', '')}, {probe.get('sms')} SMs)" if probe.get("gpu") else "")
           + f", {probe.get('cores', '?')} cores; Python {probe.get('python', '?')}, torch {probe.get('torch', '?')}"
           + f" (CUDA {probe.get('torch_cuda')}); nvcc: {probe.get('nvcc_version') or probe.get('nvcc') or 'not found'};"
           + f" compute-sanitizer: {probe.get('compute_sanitizer') or 'not found'}",
           f"Total {a.elapsed} s of a {a.budget} s budget.", ""]
    if probe.get("torch_error"):
        md += [f"torch did not import: {probe['torch_error']}", ""]

    md += ["## Stages", "", "| stage | status | seconds | limit | note |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {r['limit']} | {r['note'].replace('|', '/')} |")
    md.append("")

    # tests
    t = collect_tests(work)
    if t["files"]:
        ET.ElementTree(t["merged"]).write(os.path.join(out, "junit.xml"), encoding="utf-8", xml_declaration=True)
    tot = t["total"]
    md += ["## Tests", ""]
    if t["files"]:
        md += [f"**{tot['passed']} passed, {tot['failed']} failed, {tot['errors']} errors, {tot['skipped']} skipped** "
               f"({tot['tests']} tests; JUnit XML in junit.xml)", "",
               "| file | passed | failed | errors | skipped | pytest exit | from |", "|---|---|---|---|---|---|---|"]
        for f in t["files"]:
            md.append(f"| {f['file']} | {f['passed']} | {f['failed']} | {f['errors']} | {f['skipped']} | {f['rc']} "
                      f"| {f['source']}{' (hung in ' + f['hung'] + ')' if f['hung'] else ''} |")
        md.append("")
        if t["failures"]:
            md += ["Failures (the first in a file may have poisoned the CUDA context for the rest of it):", ""]
            for node, kind, msg in t["failures"][:MAX_FAILURES_LISTED]:
                md.append(f"- {kind}: `{node}`{': ' + msg if msg else ''}")
            if len(t["failures"]) > MAX_FAILURES_LISTED:
                md.append(f"- ... and {len(t['failures']) - MAX_FAILURES_LISTED} more (junit.xml)")
            md.append("")
    else:
        md += [f"not run ({by_name.get('tests', {}).get('note') or by_name.get('tests', {}).get('status', 'no stage')})",
               ""]

    # sanitizer
    sv = sanitizer_verdicts(work, by_name.get("sanitizer", {}).get("status", ""))
    md += ["## compute-sanitizer (scripts/gpu_sanitizer_cases.py)", ""]
    for v in sv:
        md.append(f"- {v['tool']}: {v['verdict']}")
    errs = [line for v in sv for line in v["text"].splitlines() if line.startswith("=========") and
            re.search(r"(Invalid|Race|Barrier|error|hazard|Uninitialized)", line, re.I)
            and "ERROR SUMMARY" not in line]
    if errs:
        md += ["", "First sanitizer reports:", "", "```"] + errs[:20] + ["```"]
    md.append("")
    if any(v["text"] for v in sv):
        with open(os.path.join(out, "sanitizer.log"), "w") as f:
            for v in sv:
                f.write(f"#### {v['tool']}: {v['verdict']}\n{v['text'][-LOG_CAP:]}\n")

    # benchmarks
    md += ["## Benchmarks (python -m fastar bench FAMILY --device cuda --quick)", ""]
    status = read(os.path.join(work, "bench", "status")).split("\n")
    status = [s for s in status if s.strip()]
    if status:
        md += ["Families: " + "; ".join(status), ""]
    tables, blob = [], {}
    for j in sorted(glob.glob(os.path.join(work, "bench", "*.json"))):
        try:
            blob[os.path.basename(j)[:-5]] = json.loads(read(j))
        except ValueError:
            pass
    for m in sorted(glob.glob(os.path.join(work, "bench", "*.md"))):
        tables.append(read(m).strip())
    if blob:
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(blob, f, indent=1)
    if tables:
        with open(os.path.join(out, "bench.md"), "w") as f:
            f.write("\n\n".join(tables) + "\n")
        md += ["\n\n".join(tables), ""]
    elif not status:
        md += [f"not run ({by_name.get('bench', {}).get('note') or by_name.get('bench', {}).get('status', 'no stage')})",
               ""]
    else:
        md += ["no benchmark table was written (see gpu_check.log)", ""]

    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
