"""`golf submit` and `golf stats`: records folders, `submission.json`, significance and compliance.

Notable:
- One seed per call: bundle → run the bundle exactly as a reviewer would (`python train_gpt.py`,
  or `torchrun --standalone --nproc_per_node=N train_gpt.py`, with `SEED` in the environment and
  every other config env var removed, so the embedded config is the whole story) in a fresh work
  folder → tee the output to `train_seed<N>.log` behind a header (command, code sha256, resolved
  config, versions) → put the log into the records folder without ever replacing one.
- Nothing touches the records folder until the run has succeeded, and every seed must come from
  byte-identical `train_gpt.py`: a different bundle is refused.
- The folder is regenerated from its logs alone (each log's `golf_result` and `train_loss` lines):
  `submission.json` (schema in docs/submission-schema.md, checked by `validate_submission`),
  `loss_curve.png` (drawn with zlib + struct, no matplotlib) and `README.md`, of which only the
  part between the golf markers is rewritten.
- Stats: nats/token = BPB × ln 2 × bytes/token with each run's own bytes/token; a one-sample t-test
  that the gain over the SOTA exceeds 0.005 nats (p < 0.01 is a record), a Welch test against
  another folder's seeds, Cohen's d; the Student-t CDF comes from the regularized incomplete beta
  function (continued fraction), no scipy.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import struct
import subprocess
import sys
import zlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Callable

from golf.bundle import READABLE_NAME, WRAPPER_NAME, bundle, write_file_atomic
from golf.config import Config, GolfError, lora_window

SIZE_CAP_BYTES = 16_000_000  # the rule, not the config's size_cap_bytes (which a run could raise)
TIME_CAP_S = 600.0
RECORD_MARGIN_NATS = 0.005
RECORD_P_VALUE = 0.01
TTT_MODES = ("none", "sgd", "lora")  # all of golf's TTT modes score each chunk before training on it
SUBMISSION_SCHEMA = "golf-submission/1"
README_BEGIN = "<!-- golf:begin (generated from the logs by golf submit; edits outside are kept) -->"
README_END = "<!-- golf:end -->"
SEED_LOG_RE = re.compile(r"^train_seed(\d+)\.log$")
TRAIN_LOSS_RE = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+)")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
CURVE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127))
CURVE_COLOR_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray")


class SubmissionError(GolfError):
    """A records folder, log or submission.json that is missing, inconsistent or would be clobbered."""


# ----------------------------------------------------------------------------- logs


@dataclasses.dataclass
class SeedRun:
    seed: int
    log: Path
    result: dict  # the golf_result JSON
    losses: list[tuple[int, float]]  # (step, train_loss) from the official step lines
    header: dict[str, str]  # "# key: value" lines golf submit put before the run's output


_RESULT_KEYS = ("seed", "final", "bytes_total", "bytes_code", "bytes_model", "bytes_per_token",
                "train_time_s", "eval_time_s", "code_sha256", "config", "ttt_mode", "calibration_source")


def parse_seed_log(path: str | Path) -> SeedRun:
    """A `train_seed<N>.log`: its last golf_result line, its train-loss curve and its header."""
    path = Path(path)
    match = SEED_LOG_RE.match(path.name)
    if not match:
        raise SubmissionError(f"{path}: a seed log must be named train_seed<N>.log")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise SubmissionError(f"{path}: cannot read ({exc.strerror})") from None
    result, losses, header = None, [], {}
    in_header = True  # the "# key: value" block golf submit writes before the run's output
    for line in lines:
        in_header = in_header and line.startswith("# ")
        if in_header and ": " in line:
            key, _, value = line[2:].partition(": ")
            header[key] = value
        elif line.startswith("golf_result "):
            try:
                result = json.loads(line[len("golf_result "):])
            except json.JSONDecodeError as exc:
                raise SubmissionError(f"{path}: golf_result line is not JSON ({exc.msg})") from None
        elif (m := TRAIN_LOSS_RE.match(line)) and math.isfinite(loss := float(m.group(2))):
            losses.append((int(m.group(1)), loss))
    if result is None:
        raise SubmissionError(f"{path}: no golf_result line (the run did not finish)")
    missing = [k for k in _RESULT_KEYS if k not in result]
    if missing or not isinstance(result["final"], dict) or "val_bpb" not in result["final"]:
        raise SubmissionError(f"{path}: golf_result lacks {', '.join(missing) or 'final.val_bpb'}")
    if result["seed"] != int(match.group(1)):
        raise SubmissionError(f"{path}: the run's seed is {result['seed']}, "
                              f"not the {match.group(1)} in its name")
    return SeedRun(int(match.group(1)), path, result, losses, header)


def load_record_runs(folder: str | Path) -> list[SeedRun]:
    """Every train_seed<N>.log of a records folder, by seed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SubmissionError(f"{folder}: no such records folder")
    runs = [parse_seed_log(p) for p in folder.iterdir() if SEED_LOG_RE.match(p.name)]
    if not runs:
        raise SubmissionError(f"{folder}: no train_seed<N>.log files")
    return sorted(runs, key=lambda r: r.seed)


# ----------------------------------------------------------------------------- statistics


def _sub_betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _sub_betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny, f = 1e-300, 1.0
    c, d = f, 0.0
    for j in range(1, 400):
        m = j // 2
        if j % 2:  # d_{2m+1}
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coef / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) / (a * f)


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional, as in Welch)."""
    if math.isnan(t) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _sub_betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def _sub_mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _sub_t_ratio(diff: float, se: float) -> float:
    if se > 0:
        return diff / se
    return math.copysign(math.inf, diff) if diff else 0.0


def one_sample_t(values: list[float], mu0: float = 0.0) -> dict:
    """One-sided test that mean(values) > mu0: t, df, p, Cohen's d."""
    n = len(values)
    mean, sd = _sub_mean_std(values)
    if n < 2:
        return {"t": None, "df": None, "p": None, "cohens_d": None}
    t = _sub_t_ratio(mean - mu0, sd / math.sqrt(n))
    return {"t": t, "df": n - 1, "p": 1.0 - student_t_cdf(t, n - 1),
            "cohens_d": _sub_t_ratio(mean - mu0, sd)}


def welch_t(a: list[float], b: list[float], margin: float = 0.0) -> dict:
    """One-sided Welch test that mean(a) - mean(b) > margin: t, df, p, Cohen's d (pooled sd)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return {"t": None, "df": None, "p": None, "cohens_d": None}
    (ma, sa), (mb, sb) = _sub_mean_std(a), _sub_mean_std(b)
    va, vb = sa * sa / na, sb * sb / nb
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1)) if va + vb > 0 else na + nb - 2
    t = _sub_t_ratio(ma - mb - margin, math.sqrt(va + vb))
    pooled = math.sqrt(((na - 1) * sa * sa + (nb - 1) * sb * sb) / (na + nb - 2))
    return {"t": t, "df": df, "p": 1.0 - student_t_cdf(t, df), "cohens_d": _sub_t_ratio(ma - mb, pooled)}


def nats_per_token(run: SeedRun, bpb: float | None = None) -> float:
    """BPB → nats per token with the run's own measured bytes per token."""
    bpb = run.result["final"]["val_bpb"] if bpb is None else bpb
    return bpb * math.log(2) * run.result["bytes_per_token"]


def _sub_config_without_seed(config: dict) -> dict:
    # The seed differs by design; data locations are not part of what was trained.
    config = json.loads(json.dumps(config))
    config.get("train", {}).pop("seed", None)
    for key in ("data_path", "tokenizer_path"):
        config.get("data", {}).pop(key, None)
    return config


def compliance_report(runs: list[SeedRun], folder: Path | None = None) -> dict:
    """The rule checks a records folder must pass, each {name, ok, detail}; ok = all pass."""
    res = [r.result for r in runs]
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    hashes = sorted({r["code_sha256"] for r in res})
    check("same code", len(hashes) == 1 and bool(hashes[0]),
          f"code sha256 {hashes[0][:16]}… on every seed" if len(hashes) == 1
          else f"{len(hashes)} different code hashes")
    script = folder / WRAPPER_NAME if folder is not None else None
    if script is not None and script.exists():
        sha = hashlib.sha256(script.read_bytes()).hexdigest()
        check("runs used this train_gpt.py", hashes == [sha],
              f"{WRAPPER_NAME} sha256 {sha[:16]}…" + ("" if hashes == [sha] else " differs from the runs'"))
    configs = [_sub_config_without_seed(r["config"]) for r in res]
    check("same config", all(c == configs[0] for c in configs),
          "identical apart from the seed" if all(c == configs[0] for c in configs)
          else "seeds ran different configs")
    worst_train = max(r["train_time_s"] for r in res)
    check("training <= 600 s incl. GPTQ calibration", worst_train <= TIME_CAP_S, f"max {worst_train:.1f} s")
    worst_eval = max(r["eval_time_s"] for r in res)
    check("evaluation <= 600 s incl. TTT", worst_eval <= TIME_CAP_S, f"max {worst_eval:.1f} s")
    worst_size = max(r["bytes_total"] for r in res)
    check(f"size <= {SIZE_CAP_BYTES:,} bytes", worst_size <= SIZE_CAP_BYTES, f"max {worst_size:,} bytes")
    modes = sorted({str(r["ttt_mode"]) for r in res})
    check("TTT is score-first", all(m in TTT_MODES for m in modes), f"ttt_mode {', '.join(modes)}")
    sources = sorted({str(r["calibration_source"]) for r in res})
    check("GPTQ calibrated on training data", sources == ["train"],
          f"calibration_source {', '.join(sources)}")
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


def record_stats(folder: str | Path, sota: float | None = None, against: str | Path | None = None) -> dict:
    """Mean/std over seeds, the SOTA t-test and/or the Welch test against another folder, compliance."""
    folder = Path(folder)
    runs = load_record_runs(folder)
    nats = [nats_per_token(r) for r in runs]
    bpb_mean, bpb_std = _sub_mean_std([r.result["final"]["val_bpb"] for r in runs])
    nats_mean, nats_std = _sub_mean_std(nats)
    stats = {
        "folder": str(folder), "n": len(runs), "seeds": [r.seed for r in runs],
        "runs": [{"seed": r.seed, "val_bpb": r.result["final"]["val_bpb"],
                  "val_loss": r.result["final"]["val_loss"], "bytes_per_token": r.result["bytes_per_token"],
                  "nats_per_token": n, "bytes_total": r.result["bytes_total"],
                  "train_time_s": r.result["train_time_s"], "eval_time_s": r.result["eval_time_s"]}
                 for r, n in zip(runs, nats, strict=True)],
        "val_bpb_mean": bpb_mean, "val_bpb_std": bpb_std,
        "val_loss_mean": sum(r.result["final"]["val_loss"] for r in runs) / len(runs),
        "nats_mean": nats_mean, "nats_std": nats_std, "vs_sota": None, "vs_other": None,
        "compliance": compliance_report(runs, folder),
    }
    if sota is not None:
        gains = [nats_per_token(r, sota) - n for r, n in zip(runs, nats, strict=True)]
        test = one_sample_t(gains, RECORD_MARGIN_NATS)
        stats["vs_sota"] = {"sota_bpb": sota, "margin_nats": RECORD_MARGIN_NATS,
                            "gain_nats_mean": sum(gains) / len(gains), **test,
                            "significant": test["p"] is not None and test["p"] < RECORD_P_VALUE}
    if against is not None:
        other = load_record_runs(against)
        other_nats = [nats_per_token(r) for r in other]
        test = welch_t(other_nats, nats, RECORD_MARGIN_NATS)
        other_mean = _sub_mean_std(other_nats)[0]
        stats["vs_other"] = {"folder": str(against), "n": len(other), "other_nats_mean": other_mean,
                             "margin_nats": RECORD_MARGIN_NATS, "gain_nats_mean": other_mean - nats_mean,
                             **test,
                             "significant": test["p"] is not None and test["p"] < RECORD_P_VALUE}
    return stats


def format_stats(stats: dict) -> str:
    """The human-readable `golf stats` report."""
    lines = [f"{stats['folder']}: {stats['n']} seeds ({', '.join(map(str, stats['seeds']))})",
             f"  val_bpb {stats['val_bpb_mean']:.6f} ± {stats['val_bpb_std']:.6f}   "
             f"nats/token {stats['nats_mean']:.6f} ± {stats['nats_std']:.6f}"]
    for run in stats["runs"]:
        lines.append(f"  seed {run['seed']}: val_bpb {run['val_bpb']:.6f}  "
                     f"nats/token {run['nats_per_token']:.6f}  {run['bytes_total']:,} B  "
                     f"train {run['train_time_s']:.1f} s  eval {run['eval_time_s']:.1f} s")
    for key, title in (("vs_sota", "vs SOTA {sota_bpb} BPB"), ("vs_other", "vs {folder} ({n} seeds)")):
        test = stats[key]
        if test is None:
            continue
        lines.append(f"  {title.format(**test)}: gain {test['gain_nats_mean']:+.5f} nats/token")
        if test["p"] is None:
            lines.append("    significance needs >= 2 seeds on each side")
        else:
            verdict = "a record" if test["significant"] else "not significant"
            lines.append(f"    gain > {test['margin_nats']} nats: t={test['t']:.3f} df={test['df']:.2f} "
                         f"p={test['p']:.3g} d={test['cohens_d']:.2f} → {verdict} at p < {RECORD_P_VALUE}")
    lines.append("  compliance: " + ("ok" if stats["compliance"]["ok"] else "FAILED"))
    for c in stats["compliance"]["checks"]:
        lines.append(f"    [{'x' if c['ok'] else ' '}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- submission.json


def _sub_number(value: object, finite_positive: bool = True) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 if finite_positive else value >= 0))


def _sub_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_submission(sub: object, source: str = "submission.json") -> dict:
    """Check a submission dict against docs/submission-schema.md; returns it or raises SubmissionError."""
    def bad(field: str, what: str) -> None:
        raise SubmissionError(f"{source}: field {field!r} {what}")

    if not isinstance(sub, dict):
        raise SubmissionError(f"{source}: must be a JSON object")
    if sub.get("schema") != SUBMISSION_SCHEMA:
        bad("schema", f"must be {SUBMISSION_SCHEMA!r}")
    for key in ("name", "author", "github_id", "blurb", "track", "preset", "hardware"):
        if not isinstance(sub.get(key), str):
            bad(key, "must be a string")
    if not NAME_RE.match(sub["name"]):
        bad("name", "must be letters, digits and _.+- (it names the folder)")
    if not sub["track"]:
        bad("track", "must not be empty")
    try:
        datetime.date.fromisoformat(sub.get("date") if isinstance(sub.get("date"), str) else "")
    except ValueError:
        bad("date", "must be a YYYY-MM-DD date")
    if not (isinstance(sub.get("code_sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", sub["code_sha256"])):
        bad("code_sha256", "must be 64 lowercase hex digits")
    for key in ("val_bpb", "val_loss"):
        if not _sub_number(sub.get(key)):
            bad(key, "must be a finite number > 0")
    if not _sub_number(sub.get("val_bpb_std"), finite_positive=False):
        bad("val_bpb_std", "must be a finite number >= 0")
    for key in ("bytes_total", "bytes_code", "bytes_model"):
        if not _sub_count(sub.get(key)):
            bad(key, "must be an integer > 0")
    seeds = sub.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        bad("seeds", "must be a non-empty list")
    for i, entry in enumerate(seeds):
        where = f"seeds[{i}]"
        if not isinstance(entry, dict):
            bad(where, "must be an object")
        if not (isinstance(entry.get("seed"), int) and not isinstance(entry.get("seed"), bool)):
            bad(f"{where}.seed", "must be an integer")
        for key in ("val_bpb", "val_loss"):
            if not _sub_number(entry.get(key)):
                bad(f"{where}.{key}", "must be a finite number > 0")
        for key in ("train_time_s", "eval_time_s"):
            if not _sub_number(entry.get(key), finite_positive=False):
                bad(f"{where}.{key}", "must be a finite number >= 0")
        for key in ("bytes_total", "bytes_model"):
            if not _sub_count(entry.get(key)):
                bad(f"{where}.{key}", "must be an integer > 0")
        if not (_sub_count(entry.get("steps")) or entry.get("steps") == 0):
            bad(f"{where}.steps", "must be an integer >= 0")
    if len({e["seed"] for e in seeds}) != len(seeds):
        bad("seeds", "lists a seed twice")
    for key in ("val_bpb", "val_loss"):
        mean = sum(e[key] for e in seeds) / len(seeds)
        if not math.isclose(sub[key], mean, rel_tol=1e-9, abs_tol=1e-12):
            bad(key, f"is {sub[key]} but the mean over seeds is {mean}")
    for key in ("bytes_total", "bytes_model"):
        if sub[key] != max(e[key] for e in seeds):
            bad(key, f"is {sub[key]} but the largest seed's is {max(e[key] for e in seeds)}")
    return sub


def build_submission(runs: list[SeedRun], meta: dict) -> dict:
    """submission.json for `runs`; `meta`: name, author, github_id, blurb, date, track (+ extras, kept)."""
    res = [r.result for r in runs]
    seeds = [{"seed": r.seed, "val_bpb": r.result["final"]["val_bpb"],
              "val_loss": r.result["final"]["val_loss"],
              "bytes_total": r.result["bytes_total"], "bytes_model": r.result["bytes_model"],
              "train_time_s": r.result["train_time_s"], "eval_time_s": r.result["eval_time_s"],
              "steps": r.result.get("steps", 0)} for r in runs]
    bpb_mean, bpb_std = _sub_mean_std([s["val_bpb"] for s in seeds])
    first = res[0]
    sub = {key: meta.get(key, "") for key in ("name", "author", "github_id", "blurb", "date", "track")}
    sub = {"schema": SUBMISSION_SCHEMA, **sub}
    sub.update({
        "val_bpb": bpb_mean, "val_bpb_std": bpb_std,
        "val_loss": sum(s["val_loss"] for s in seeds) / len(seeds),
        "bytes_total": max(s["bytes_total"] for s in seeds),
        "bytes_code": max(r["bytes_code"] for r in res),
        "bytes_model": max(s["bytes_model"] for s in seeds),
        "code_sha256": first["code_sha256"], "preset": str(first.get("preset", "")),
        "hardware": f"{first.get('world_size', 1)}x {first.get('device', 'unknown')}",
        "seeds": seeds,
    })
    sub.update({k: v for k, v in meta.items() if k not in sub})  # the submitter's own extra keys
    return validate_submission(sub)


# ----------------------------------------------------------------------------- loss-curve PNG

# 3x5 bitmap glyphs for axis labels: five rows of three pixels each.
_GLYPHS = {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111",
    "3": "111 001 111 001 111", "4": "101 101 111 001 001", "5": "111 100 111 001 111",
    "6": "111 100 111 101 111", "7": "111 001 001 001 001", "8": "111 101 111 101 111",
    "9": "111 101 111 001 111", ".": "000 000 000 000 010", "-": "000 000 111 000 000",
}


class _Canvas:
    """An RGB raster with lines, rectangles and 3x5 text; encodes itself as PNG."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color: tuple[int, int, int], size: int = 1) -> None:
        for yy in range(y, y + size):
            for xx in range(x, x + size):
                if 0 <= xx < self.width and 0 <= yy < self.height:
                    i = (yy * self.width + xx) * 3
                    self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], size: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)  # Bresenham, all octants
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color, size)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int], scale: int = 2) -> None:
        for ch in s:
            rows = _GLYPHS.get(ch, "000 000 000 000 000").split()
            for ry, row in enumerate(rows):
                for rx, bit in enumerate(row):
                    if bit == "1":
                        self.dot(x + rx * scale, y + ry * scale, color, scale)
            x += 4 * scale

    def png(self) -> bytes:
        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        stride = self.width * 3
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))
        ihdr = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def _sub_ticks(lo: float, hi: float, count: int = 5) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] and the decimals their labels need."""
    raw = (hi - lo) / count if hi > lo else 1.0
    exponent = math.floor(math.log10(raw))
    step = next(m for m in (1, 2, 5, 10) if m * 10 ** exponent >= raw) * 10 ** exponent
    first = math.ceil(lo / step) * step
    ticks = [first + i * step for i in range(count + 2) if first + i * step <= hi + 1e-9]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def loss_curve_png(curves: dict[int, list[tuple[int, float]]], width: int = 720, height: int = 420) -> bytes:
    """Train loss against step, one colored polyline per seed (CURVE_COLORS order), with labeled axes."""
    points = [p for curve in curves.values() for p in curve]
    canvas = _Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    axis, grid, label = (0, 0, 0), (225, 225, 225), (60, 60, 60)
    x_hi = max((s for s, _ in points), default=1) or 1
    y_lo, y_hi = (min((v for _, v in points), default=0.0), max((v for _, v in points), default=1.0))
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(step: float, loss: float) -> tuple[int, int]:
        return (round(left + (right - left) * step / x_hi),
                round(bottom - (bottom - top) * (loss - y_lo) / (y_hi - y_lo)))

    ticks, decimals = _sub_ticks(y_lo, y_hi)
    for tick in ticks:
        y = px(0, tick)[1]
        canvas.line(left, y, right, y, grid)
        text = f"{tick:.{decimals}f}"
        canvas.text(left - 8 - 8 * len(text), y - 5, text, label)
    for tick in _sub_ticks(0, x_hi)[0]:
        x = px(tick, y_lo)[0]
        canvas.line(x, top, x, bottom, grid)
        text = f"{tick:.0f}"
        canvas.text(x - 4 * len(text), bottom + 10, text, label)
    canvas.line(left, top, left, bottom, axis)
    canvas.line(left, bottom, right, bottom, axis)
    for i, (seed, curve) in enumerate(sorted(curves.items())):
        color = CURVE_COLORS[i % len(CURVE_COLORS)]
        pts = [px(s, v) for s, v in curve]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            canvas.line(x0, y0, x1, y1, color, size=2)
        if len(pts) == 1:
            canvas.dot(pts[0][0] - 1, pts[0][1] - 1, color, size=3)
        legend_y = top + 8 + 16 * i  # legend: a colored bar and the seed, top right
        canvas.line(right - 110, legend_y + 4, right - 90, legend_y + 4, color, size=3)
        canvas.text(right - 80, legend_y, str(seed), label)
    return canvas.png()


# ----------------------------------------------------------------------------- README


def describe_techniques(cfg: Config) -> list[str]:
    """The config's technique stack as short README bullets."""
    m, t, q, e, ttt = cfg.model, cfg.train, cfg.quant, cfg.eval, cfg.ttt
    act = {"relu2": "ReLU²", "leaky_relu2": "LeakyReLU(0.5)²"}.get(m.mlp_act, m.mlp_act)
    head_dim = m.model_dim // m.num_heads
    out = [f"{m.num_layers} layers × d={m.model_dim}, {m.num_heads} query / {m.num_kv_heads} KV heads, "
           f"MLP {m.mlp_mult:g}× {act}, vocab {m.vocab_size}"
           + (f", tied embeddings (init std {m.tied_embed_init_std:g})" if m.tie_embeddings
              else ", untied head")
           + (f", logit softcap {m.logit_softcap:g}" if m.logit_softcap else "")]
    attn = [f"RoPE on {m.rope_dims} of {head_dim} head dims" if m.rope_dims else "RoPE on all head dims"]
    if m.qk_norm:
        attn.append(f"QK RMS-norm with q gain init {m.qk_gain_init:g}")
    if m.xsa:
        attn.append("XSA (own-value component removed)")
    if m.attn_out_gate:
        attn.append("attention output gate")
    out.append("attention: " + ", ".join(attn))
    extras = []
    if m.ln_scale:
        extras.append("LN scale 1/sqrt(layer+1)")
    if m.resid_mix:
        extras.append("residual mix with x0")
    if m.unet_skips:
        extras.append("U-Net skips")
    if m.num_loops > 1:
        extras.append(f"depth recurrence: layers {m.loop_start}–{m.loop_end} × {m.num_loops} "
                      f"from {m.loop_enable_frac:.0%} of the wallclock")
    if m.parallel_from >= 0:
        extras.append(f"parallel residuals from layer {m.parallel_from}"
                      + (" (two lanes)" if m.parallel_lanes == 2 else ""))
    if m.bigram_buckets:
        extras.append(f"BigramHash {m.bigram_buckets}×{m.bigram_dim}")
    if m.smear_gate:
        extras.append("SmearGate")
    if extras:
        out.append("blocks: " + ", ".join(extras))
    muon = [f"{t.muon_coeffs} Newton–Schulz ×{t.muon_backend_steps}"]
    if t.muon_row_norm:
        muon.append("MuonEq-R")
    if t.muon_wd:
        muon.append(f"wd {t.muon_wd:g}")
    out.append(f"Muon ({', '.join(muon)}) lr {t.matrix_lr:g}, momentum {t.muon_momentum_warmup_start:g}→"
               f"{t.muon_momentum:g}; AdamW embeddings lr {t.tied_embed_lr:g}, scalars lr {t.scalar_lr:g}"
               + (f", wd {t.adam_wd:g}" if t.adam_wd else ""))
    sched = [f"{t.train_batch_tokens:,} tokens/step at seq {t.train_seq_len}",
             f"linear warmdown over the last {t.warmdown_frac:.0%} of the wallclock to {t.lr_floor:g}"]
    if t.grad_clip_norm:
        sched.append(f"grad clip {t.grad_clip_norm:g}")
    if t.ema_decay:
        sched.append(f"EMA {t.ema_decay:g} exported")
    if t.qat_start_frac:
        sched.append(f"late QAT from {t.qat_start_frac:.0%} of the wallclock (the quantized weights' SDClip "
                     f"grid at class k × {t.qat_k_scale:g}, straight-through)")
    out.append("schedule: " + ", ".join(sched))
    quant = (f"GPTQ (act-order {'on' if q.gptq_act_order else 'off'}, {q.gptq_calib_batches}×"
             f"{q.gptq_calib_seqs} calibration sequences from the training shards)"
             if q.gptq else "round-to-nearest")
    out.append(f"{quant} + SDClip: int{q.attn_bits} attention (k {q.clip_k_attn:g}), int{q.mlp_bits} MLP "
               f"(k {q.clip_k_mlp:g}), int{q.embed_bits} embeddings (k {q.clip_k_embed:g}); tensors <= "
               f"{q.passthrough_max_numel:,} values as fp16"
               + (f"; per-{'tensor' if q.clip_alloc == 'fisher' else 'row'} k from the Fisher of {q.fisher_seqs} "
                  f"training windows, within ×/÷{q.fisher_k_range:g} of those"
                  if q.clip_alloc != "class" else "")
               + (f"; a step factor per column from GPTQ's column weights (alpha {q.gptq_col_alpha:g})"
                  if q.gptq and q.gptq_col_alpha else "")
               + ("; one factor on every k fitted to the cap" if q.fit_mode == "scale" else "")
               + (f"; LQER rank {q.lqer_rank} on {q.lqer_tensors} tensors at int{q.lqer_bits}"
                  if q.lqer_rank else "")
               + f"; codec {q.codec}")
    if ttt.ttt_mode == "lora":  # the LoRA chunks are the scoring windows
        out.append(f"eval: each document on its own, in {ttt.lora_chunk_tokens}-token chunks that each see "
                   f"up to {lora_window(ttt, e):,} tokens of it")
    else:
        out.append(f"eval: sliding window {e.eval_seq_len} stride {e.eval_stride}" if e.eval_stride
                   else f"eval: non-overlapping {e.eval_seq_len}-token windows")
    if ttt.ttt_mode == "sgd":
        out.append(f"score-first chunked TTT: {ttt.ttt_chunk_tokens:,}-token chunks, SGD lr {ttt.ttt_lr:g} "
                   f"momentum {ttt.ttt_momentum:g}, {ttt.ttt_epochs} epoch(s) per chunk, "
                   f"grad clip {ttt.ttt_grad_clip:g}")
    elif ttt.ttt_mode == "lora":
        out.append(f"score-first document LoRA TTT: rank {ttt.lora_rank}, lr {ttt.lora_lr:g}, "
                   f"{ttt.lora_chunk_tokens}-token chunks"
                   + (f", {ttt.lora_phases} phased global SGD pauses" if ttt.lora_phases else ""))
    else:
        out.append("no test-time training")
    if ttt.ttt_mode != "none" and ttt.ttt_deadline_s:
        out[-1] += f"; adapting stops {ttt.ttt_deadline_s:g} s into the evaluation"
    return out


def _sub_cell(score: dict | None) -> str:
    return f"{score['val_bpb']:.5f}" if score else "–"


def readme_block(runs: list[SeedRun], sub: dict, compliance: dict) -> str:
    """The generated README part (between the golf markers)."""
    res = {r.seed: r.result for r in runs}
    cfg = Config.from_dict(runs[0].result["config"])
    n = len(runs)
    lines = [README_BEGIN, "",
             f"**val_bpb {sub['val_bpb']:.5f} ± {sub['val_bpb_std']:.5f}** (mean ± std over {n} seed"
             f"{'s' if n != 1 else ''}) · {sub['bytes_total']:,} bytes (largest seed) · golf preset "
             f"`{sub['preset']}` · {sub['hardware']}", "",
             "## Results", "",
             "| seed | val_bpb | val_loss | steps | train s | eval s | total bytes | curve |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, s in enumerate(sub["seeds"]):
        lines.append(f"| {s['seed']} | {s['val_bpb']:.8f} | {s['val_loss']:.8f} | {s['steps']} | "
                     f"{s['train_time_s']:.1f} | {s['eval_time_s']:.1f} | {s['bytes_total']:,} | "
                     f"{CURVE_COLOR_NAMES[i % len(CURVE_COLOR_NAMES)]} |")
    lines.append(f"| **mean** | **{sub['val_bpb']:.8f}** | {sub['val_loss']:.8f} | | | | | |")
    lines += ["", "BPB at each stage (the score is the last one run):", "",
              "| seed | pre-quant | quantized | + sliding window | + TTT |", "|---:|---:|---:|---:|---:|"]
    for seed, r in res.items():
        lines.append(f"| {seed} | {_sub_cell(r.get('prequant'))} | {_sub_cell(r.get('quant'))} | "
                     f"{_sub_cell(r.get('sliding'))} | {_sub_cell(r.get('ttt'))} |")
    lines += ["", "![train loss by step, one line per seed](loss_curve.png)", "", "## Techniques", ""]
    lines += [f"- {item}" for item in describe_techniques(cfg)]
    lines += ["", "## Size ledger", "",
              f"| seed | code (`{WRAPPER_NAME}`) | model (artifact) | total | "
              f"headroom to {SIZE_CAP_BYTES:,} |",
              "|---:|---:|---:|---:|---:|"]
    for seed, r in res.items():
        lines.append(f"| {seed} | {r['bytes_code']:,} | {r['bytes_model']:,} | {r['bytes_total']:,} | "
                     f"{SIZE_CAP_BYTES - r['bytes_total']:,} |")
    lines += ["", f"The counted code is `{WRAPPER_NAME}`, a self-extracting lzma + base85 wrapper; "
              f"`{READABLE_NAME}` is exactly what it decodes to (not counted, for reading).", "",
              "## Timing ledger", "",
              "| seed | train incl. GPTQ (cap 600 s) | of which GPTQ calibration "
              "| eval incl. TTT (cap 600 s) |",
              "|---:|---:|---:|---:|"]
    for seed, r in res.items():
        gptq = r.get("gptq_time_s")
        lines.append(f"| {seed} | {r['train_time_s']:.1f} s | {'–' if gptq is None else f'{gptq:.1f} s'} | "
                     f"{r['eval_time_s']:.1f} s |")
    lines += ["", "## Compliance", ""]
    lines += [f"- [{'x' if c['ok'] else ' '}] {c['name']}: {c['detail']}" for c in compliance["checks"]]
    nproc = max(r.get("world_size", 1) for r in res.values())
    launcher = "python" if nproc == 1 else f"torchrun --standalone --nproc_per_node={nproc}"
    lines += ["", "## Reproduce", "", f"Copy `{WRAPPER_NAME}` to the repository root (where the data and "
              "tokenizer the config names live) and run, one seed at a time:", "", "```bash"]
    lines += [f"SEED={seed} {launcher} {WRAPPER_NAME}" for seed in res]
    lines += ["```", "", "Each `train_seed<N>.log` starts with the exact command, code sha256, "
              "resolved config and package versions. With the golf toolkit, "
              "`golf stats <this folder> --sota <BPB>` recomputes the significance test from the logs.",
              "", README_END]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- records folder


def write_record(folder: str | Path, name: str | None = None, author: str | None = None,
                 github_id: str | None = None, blurb: str | None = None, date: str | None = None,
                 track: str | None = None) -> dict:
    """(Re)generate submission.json, loss_curve.png and README.md of a records folder from its logs.

    Metadata not given is kept from an existing submission.json (or derived from the folder name).
    """
    folder = Path(folder)
    runs = load_record_runs(folder)
    sub_path, readme_path = folder / "submission.json", folder / "README.md"
    old: dict = {}
    if sub_path.exists():
        try:
            old = json.loads(sub_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SubmissionError(f"{sub_path}: not readable JSON ({exc}); fix or remove it") from None
        if not isinstance(old, dict):
            raise SubmissionError(f"{sub_path}: must be a JSON object")
    folder_date, _, folder_name = folder.name.partition("_")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", folder_date):
        folder_date, folder_name = "", folder.name
    cfg = Config.from_dict(runs[0].result["config"])
    meta = dict(old)
    meta.update({
        "name": name or old.get("name") or folder_name,
        "github_id": github_id if github_id is not None else old.get("github_id", ""),
        "date": date or old.get("date") or folder_date or datetime.date.today().isoformat(),
        "track": track or old.get("track") or (folder.parent.name.removeprefix("track_")
                                               if folder.parent.name.startswith("track_") else "10min_16mb"),
        "blurb": blurb or old.get("blurb") or f"golf preset {cfg.preset}: {describe_techniques(cfg)[0]}",
    })
    meta["author"] = author or old.get("author") or meta["github_id"]
    sub = build_submission(runs, meta)
    compliance = compliance_report(runs, folder)
    block = readme_block(runs, sub, compliance)
    if readme_path.exists():
        text = readme_path.read_text()
        start, end = text.find(README_BEGIN), text.find(README_END)
        if start < 0 or end < start:
            raise SubmissionError(f"{readme_path} has no golf markers; "
                                  "refusing to rewrite a hand-written README")
        text = text[:start] + block + text[end + len(README_END):].lstrip("\n")
    else:
        text = f"# {sub['name']}\n\n{sub['blurb']}\n\n{block}"
    write_file_atomic(folder / "loss_curve.png", loss_curve_png({r.seed: r.losses for r in runs}))
    write_file_atomic(sub_path, (json.dumps(sub, indent=2, ensure_ascii=False) + "\n").encode())
    write_file_atomic(readme_path, text.encode())
    return sub


def _sub_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("golf", "torch", "numpy", "sentencepiece", "brotli", "zstandard", "triton", "flash-attn"):
        try:
            versions[name] = dist_version(name)
        except PackageNotFoundError:
            continue
    return versions


def records_folder(records_dir: str | Path, name: str, date: str | None = None) -> Path:
    """`<records_dir>/<date>_<name>`, or the existing folder for `name` (a later seed on another day)."""
    if not NAME_RE.match(name):
        raise SubmissionError(f"name {name!r} must be letters, digits and _.+- (it names the folder)")
    root = Path(records_dir)
    found = sorted(p for p in root.glob(f"*_{name}") if p.is_dir()
                   and re.fullmatch(r"\d{4}-\d{2}-\d{2}_" + re.escape(name), p.name)) if root.is_dir() else []
    if len(found) > 1:
        raise SubmissionError(f"several records folders are named {name}: {', '.join(p.name for p in found)}")
    return found[0] if found else root / f"{date or datetime.date.today().isoformat()}_{name}"


def _sub_fresh_dir(base: Path, stem: str) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        path = base / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise SubmissionError(f"{base}: no free work folder name for {stem}")


def _sub_child_env(cfg: Config, seed: int, out_dir: Path) -> dict[str, str]:
    # A stray NUM_LAYERS=... in the shell would silently change the run; only SEED may vary.
    fields = {f.name.upper() for section in cfg.sections().values() for f in dataclasses.fields(section)}
    fields |= {"GOLF_PRESET", "GOLF_OUT_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in fields}
    env.update(SEED=str(seed), GOLF_OUT_DIR=str(out_dir), PYTHONUNBUFFERED="1")
    return env


def submit_run(cfg: Config, seed: int, name: str | None = None, nproc: int = 1,
               records_dir: str | Path = "records/track_10min_16mb", work_dir: str | Path = "runs/submit",
               github_id: str | None = None, author: str | None = None, blurb: str | None = None,
               command: str | None = None, date: str | None = None,
               echo: Callable[[str], None] = print) -> dict:
    """Bundle `cfg`, run it for `seed`, and add the seed to its records folder (see the module docstring).

    Returns {"folder", "log", "submission", "bundle"}.
    """
    if nproc < 1:
        raise SubmissionError(f"--nproc {nproc} must be >= 1")
    name = name or f"golf_{cfg.preset}"
    folder = records_folder(records_dir, name, date)
    log_name = f"train_seed{seed}.log"
    if (folder / log_name).exists():
        raise SubmissionError(f"{folder / log_name} already exists; refusing to overwrite seed {seed}'s log")
    work = _sub_fresh_dir(Path(work_dir) / folder.name, f"seed{seed}")
    info = bundle(cfg, work)
    wrapper = info.script.read_bytes()
    existing = folder / WRAPPER_NAME
    if existing.exists() and existing.read_bytes() != wrapper:
        raise SubmissionError(f"{existing} differs from this bundle (code or config changed); all seeds must "
                              "come from the same train_gpt.py: use a new --name")

    script = str(info.script)
    cmd = [sys.executable, script]
    if nproc > 1:  # torchrun, as the module of this interpreter
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    shown = "python" if nproc == 1 else f"torchrun --standalone --nproc_per_node={nproc}"
    resolved = Config.from_dict(cfg.to_dict())
    resolved.train.seed = seed
    header = [
        "# golf submit header (the run's own output follows)",
        f"# golf_command: {command or 'golf submit'}",
        f"# command: SEED={seed} GOLF_OUT_DIR={shlex.quote(str(work))} {shown} {shlex.quote(script)}",
        f"# date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"# code_sha256: {info.code_sha256}",
        f"# code_bytes: {info.code_bytes}",
        f"# versions: {json.dumps(_sub_versions())}",
        f"# config: {json.dumps(resolved.to_dict())}",
    ]
    log_path = work / log_name
    echo(f"submit: seed {seed} → {folder}  (running {shown} {script})")
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("\n".join(header) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=_sub_child_env(cfg, seed, work))
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                echo(line.rstrip("\n"))
        finally:
            if proc.poll() is None and sys.exc_info()[0] is not None:
                proc.kill()  # interrupted: do not leave a training run behind
            rc = proc.wait()
    if rc != 0:
        raise SubmissionError(f"seed {seed} run exited with status {rc}; log kept at {log_path}; "
                              f"{folder} was not changed")
    run = parse_seed_log(log_path)
    if run.result["code_sha256"] != info.code_sha256:
        raise SubmissionError(f"{log_path}: the run hashed code {run.result['code_sha256'][:16]}…, "
                              f"not {WRAPPER_NAME} ({info.code_sha256[:16]}…)")

    folder.mkdir(parents=True, exist_ok=True)
    for path, data in ((existing, wrapper), (folder / READABLE_NAME, info.readable.read_bytes())):
        if not path.exists():
            write_file_atomic(path, data)
        elif path.read_bytes() != data:
            raise SubmissionError(f"{path} differs from this bundle; all seeds must come from the same code")
    write_file_atomic(folder / log_name, log_path.read_bytes(), replace=False)
    sub = write_record(folder, name=name, author=author, github_id=github_id, blurb=blurb, date=date)
    return {"folder": folder, "log": folder / log_name, "submission": sub, "bundle": info}
