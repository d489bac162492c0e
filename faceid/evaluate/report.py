"""The folder-evaluation report: statistics, JSON layout (with its schema) and the printed table.

The layout is a superset of the seed script's: `total_pairs`, `valid_pairs`,
`overall_mean/std/min/max` and `by_step` (`{step: {count, mean, std, min, max}}`, string
keys; epoch-triggered samples get keys "e<epoch>", samples without a step "none"). `std` is
the population standard deviation (numpy's default), as in the seed.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import Any

import numpy as np

from ...common.version import __version__
from ...musubi_formats.names import step_sort_key
from ..similarity import Bands

TOOL_NAME = "face-consistency evaluate"
SCORE_FIELDS = {"control": "score_control", "reference": "score_reference"}


def tool_version() -> str:
    return __version__


def summarize(scores: Iterable[float], threshold: float | None = None) -> dict[str, Any]:
    values = np.asarray(list(scores), dtype=np.float64)
    if values.size == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    summary: dict[str, Any] = {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    if threshold is not None:
        summary["at_or_above_threshold"] = int((values >= threshold).sum())
    return summary


def _grouped(pairs: list[dict[str, Any]], field: str, key: str, threshold: float | None) -> dict[str, Any]:
    groups: dict[str, list[float]] = {}
    for pair in pairs:
        if pair[field] is not None and pair[key] is not None:
            groups.setdefault(str(pair[key]), []).append(pair[field])
    order = step_sort_key if key == "step_key" else int
    return {k: summarize(groups[k], threshold) for k in sorted(groups, key=order)}


def _statistics(pairs: list[dict[str, Any]], field: str, threshold: float | None) -> dict[str, Any]:
    overall = summarize((p[field] for p in pairs if p[field] is not None), threshold)
    by_prompt_step: dict[str, dict[str, Any]] = {}
    for prompt in sorted({p["prompt_index"] for p in pairs if p["prompt_index"] is not None}):
        subset = [p for p in pairs if p["prompt_index"] == prompt]
        by_prompt_step[str(prompt)] = _grouped(subset, field, "step_key", threshold)
    stats = {
        "valid_pairs": overall["count"],
        "overall_mean": overall["mean"],
        "overall_std": overall["std"],
        "overall_min": overall["min"],
        "overall_max": overall["max"],
        "by_step": _grouped(pairs, field, "step_key", threshold),
        "by_prompt": _grouped(pairs, field, "prompt_index", threshold),
        "by_prompt_step": by_prompt_step,
    }
    if threshold is not None:
        stats["at_or_above_threshold"] = overall.get("at_or_above_threshold", 0)
    return stats


def build_report(
    pairs: list[dict[str, Any]],
    unpaired: list[dict[str, str]],
    meta: dict[str, Any],
    *,
    primary: str,
    bands: Bands,
    threshold: float | None,
) -> dict[str, Any]:
    """Assemble the report from scored pairs (see `evaluate.FolderEvaluation._score`)."""
    field = SCORE_FIELDS[primary]
    for pair in pairs:
        pair["score"] = pair[field]
        pair["band"] = bands.label(pair["score"]) if pair["score"] is not None else None
        if pair["score"] is None and pair["reason"] is None:
            pair["reason"] = f"no {primary} score" + (
                f" ({pair['control_notes']})" if pair.get("control_notes") else ""
            )
        pair["status"] = "ok" if pair["score"] is not None else "failed"
    failures = [{"file": p["image"], "kind": "pair", "reason": p["reason"]} for p in pairs if p["status"] == "failed"]
    failures += unpaired
    stats = _statistics(pairs, field, threshold)
    report: dict[str, Any] = {
        "tool": TOOL_NAME,
        "tool_version": tool_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metric": primary,
        "total_pairs": len(pairs),
        **stats,
        "threshold": threshold,
        "bands": bands.to_dict(),
        "model": meta["model"],
        "embedding_size": meta["model"]["embedding_size"],
        "provider": meta["model"]["provider"],
        "det_size": meta["model"]["det_size"],
        "det_thresh": meta["model"]["det_thresh"],
        "inputs": meta["inputs"],
        "cache": meta["cache"],
        "failure_count": len(failures),
        "failures": failures,
        "pairs": pairs,
    }
    if primary == "reference" and any(p["score_control"] is not None for p in pairs):
        report["secondary"] = {"metric": "control", **_statistics(pairs, "score_control", threshold)}
    if meta.get("judge") is not None:
        report["judge"] = _judge_section(pairs, primary, meta["judge"])
    report["copy_paste"] = _copy_paste_section(pairs, meta["copy_paste"])
    report["unchanged"] = _unchanged_section(pairs, meta["unchanged"])
    return report


def _judge_section(pairs: list[dict[str, Any]], primary: str, judge: dict[str, Any]) -> dict[str, Any]:
    """The held-out judge's figures for the primary metric: similarity (its documented scale) per step,
    its distances, same-person count, and the items where its own detector found no face."""
    for pair in pairs:
        judged = pair["judge"].get(primary)
        pair["judge_score"] = judged["similarity"] if judged else None
        pair["judge_distance"] = judged["distance"] if judged else None
    distances = [p["judge_distance"] for p in pairs if p["judge_distance"] is not None]
    failures = [
        {"file": p["image"], "kind": "judge", "reason": p["judge"]["reason"] or f"no {primary} verdict"}
        for p in pairs
        if p["judge_score"] is None
    ]
    return {
        "metric": primary,
        "model": judge,
        **_statistics(pairs, "judge_score", judge["similarity_threshold"]),
        "distance": summarize(distances),
        "same_person": sum(1 for d in distances if d < judge["distance_threshold"]),
        "failure_count": len(failures),
        "failures": failures,
    }


def _copy_paste_section(pairs: list[dict[str, Any]], gauge: dict[str, Any]) -> dict[str, Any]:
    flagged = [p["image"] for p in pairs if p.get("copy_paste")]
    return {
        **gauge,
        "above_reference_agreement": sum(1 for p in pairs if p.get("above_reference_agreement")),
        "flagged_count": len(flagged),
        "flagged": flagged,
    }


def _unchanged_section(pairs: list[dict[str, Any]], measure: dict[str, Any]) -> dict[str, Any]:
    """Samples whose face region is (near-)unchanged from their control, counted per step: they score
    about 1.0 against the control without any edit, so their band says nothing."""
    samples = [p for p in pairs if p.get("unchanged")]
    by_step: dict[str, int] = {}
    for pair in samples:
        by_step[pair["step_key"]] = by_step.get(pair["step_key"], 0) + 1
    return {
        **measure,
        "count": len(samples),
        "by_step": {k: by_step[k] for k in sorted(by_step, key=step_sort_key)},
        "samples": [p["image"] for p in samples],
    }


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(report: dict[str, Any]) -> str:
    """Per step: n, mean ± std, min, max, band of the mean; then totals and failures."""
    bands = Bands(**report["bands"])
    lines = [
        f"Face identity similarity to the {report['metric']} "
        f"({report['model']['pack']}, {report['embedding_size']}-d, {report['provider']})",
        f"{'step':>10} {'n':>5} {'mean ± std':>16} {'min':>7} {'max':>7}  band",
    ]
    unchanged = report["unchanged"]
    for key, stats in report["by_step"].items():
        copies = unchanged["by_step"].get(key, 0)
        lines.append(
            f"{key:>10} {stats['count']:>5} {_number(stats['mean']):>8} ± {_number(stats['std']):<5} "
            f"{_number(stats['min']):>7} {_number(stats['max']):>7}  {bands.label(stats['mean'])}"
            + (f"  ({copies} UNCHANGED)" if copies else "")
        )
    if report["valid_pairs"]:
        lines.append(
            f"{'all':>10} {report['valid_pairs']:>5} {_number(report['overall_mean']):>8} ± "
            f"{_number(report['overall_std']):<5} {_number(report['overall_min']):>7} "
            f"{_number(report['overall_max']):>7}  {bands.label(report['overall_mean'])}"
        )
    lines.append(
        f"{report['valid_pairs']} of {report['total_pairs']} pairs scored; {report['failure_count']} failure(s)"
    )
    if report["threshold"] is not None:
        lines.append(f"{report.get('at_or_above_threshold', 0)} at or above threshold {report['threshold']}")
    if "judge" in report:
        lines += _judge_table(report["judge"])
    lines += _copy_paste_lines(report["copy_paste"])
    lines += _unchanged_lines(unchanged)
    for failure in report["failures"][:20]:
        lines.append(f"  {failure['kind']}: {failure['file']}: {failure['reason']}")
    if report["failure_count"] > 20:
        lines.append(f"  ... and {report['failure_count'] - 20} more (see the JSON report)")
    return "\n".join(lines)


def _judge_table(judge: dict[str, Any]) -> list[str]:
    model = judge["model"]
    lines = [
        f"Held-out judge {model['judge']} ({model['detector']}): similarity {model['similarity_scale']}",
        f"{'step':>10} {'n':>5} {'mean ± std':>16} {'min':>7} {'max':>7}",
    ]
    rows = list(judge["by_step"].items())
    if judge["valid_pairs"]:
        rows.append(
            (
                "all",
                {
                    "count": judge["valid_pairs"],
                    "mean": judge["overall_mean"],
                    "std": judge["overall_std"],
                    "min": judge["overall_min"],
                    "max": judge["overall_max"],
                },
            )
        )
    for key, stats in rows:
        lines.append(
            f"{key:>10} {stats['count']:>5} {_number(stats['mean']):>8} ± {_number(stats['std']):<5} "
            f"{_number(stats['min']):>7} {_number(stats['max']):>7}"
        )
    lines.append(
        f"judge: {judge['same_person']} of {judge['valid_pairs']} same person (distance < "
        f"{model['distance_threshold']}), mean distance {_number(judge['distance']['mean'])}; "
        f"{judge['failure_count']} without a judge verdict"
    )
    lines += [f"  judge: {f['file']}: {f['reason']}" for f in judge["failures"][:20]]
    return lines


def _copy_paste_lines(gauge: dict[str, Any]) -> list[str]:
    agreement = gauge["reference_agreement"]
    if agreement is None:
        return []
    lines = [
        f"reference photos' own agreement: {agreement['mean']:.3f} (min {agreement['min']:.3f}, "
        f"{agreement['pairs']} pair(s)); {gauge['above_reference_agreement']} sample(s) score above it "
        "against their control"
    ]
    judged = gauge["judge_reference_agreement"]
    if judged is not None:
        lines[0] += f"; judge's agreement {judged['mean']:.3f}"
    if gauge["flagged_count"]:
        lines.append(
            f"COPY-PASTE? {gauge['flagged_count']} sample(s) above the references' agreement with a face change "
            f"below {gauge['change_threshold']:.2f}: " + ", ".join(gauge["flagged"][:5])
        )
    return lines


def _unchanged_lines(unchanged: dict[str, Any]) -> list[str]:
    if not unchanged["count"]:
        return []
    return [
        f"UNCHANGED: {unchanged['count']} sample(s) with a face region unchanged from their control (face change "
        f"below {unchanged['change_threshold']:.2f}): they score about 1.0 without any edit, so their band says "
        "nothing; a LoRA that returns its input looks like this. "
        + ", ".join(unchanged["samples"][:5])
        + (f" and {unchanged['count'] - 5} more" if unchanged["count"] > 5 else "")
    ]


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STATS = {
    "type": "object",
    "required": ["count", "mean", "std", "min", "max"],
    "properties": {
        "count": {"type": "integer", "minimum": 0},
        "mean": _NUMBER_OR_NULL,
        "std": _NUMBER_OR_NULL,
        "min": _NUMBER_OR_NULL,
        "max": _NUMBER_OR_NULL,
        "at_or_above_threshold": {"type": "integer", "minimum": 0},
    },
}
_STATS_MAP = {"type": "object", "additionalProperties": _STATS}
_FAILURE = {
    "type": "object",
    "required": ["file", "kind", "reason"],
    "properties": {
        "file": {"type": "string"},
        "kind": {"enum": ["pair", "sample", "control", "judge"]},
        "reason": {"type": "string"},
    },
}
_PAIR = {
    "type": "object",
    "required": [
        "image",
        "step",
        "epoch",
        "step_key",
        "prompt_index",
        "seed",
        "layout",
        "controls",
        "score",
        "score_control",
        "score_reference",
        "band",
        "face",
        "status",
        "reason",
    ],
    "properties": {
        "image": {"type": "string"},
        "step": {"type": ["integer", "null"]},
        "epoch": {"type": ["integer", "null"]},
        "step_key": {"type": "string"},
        "prompt_index": {"type": ["integer", "null"]},
        "seed": {"type": ["integer", "null"]},
        "layout": {"enum": ["musubi", "seed_guide", "dir_pair", "unknown"]},
        "controls": {"type": "array", "items": {"type": "string"}},
        "score": _NUMBER_OR_NULL,
        "score_control": _NUMBER_OR_NULL,
        "score_reference": _NUMBER_OR_NULL,
        "band": {"enum": ["excellent", "good", "moderate", "poor", None]},
        "face": {
            "type": ["object", "null"],
            "required": ["bbox", "det_score", "faces_found"],
            "properties": {
                "bbox": {"type": "array", "items": {"type": "number"}},
                "det_score": {"type": "number"},
                "faces_found": {"type": "integer", "minimum": 1},
            },
        },
        "status": {"enum": ["ok", "failed"]},
        "reason": {"type": ["string", "null"]},
        "control_notes": {"type": "string"},
        "judge": {
            "type": "object",
            "required": ["face", "control", "reference", "reason"],
            "properties": {
                "face": {"type": ["object", "null"]},
                "control": {"type": ["object", "null"]},
                "reference": {"type": ["object", "null"]},
                "reason": {"type": ["string", "null"]},
            },
        },
        "judge_score": _NUMBER_OR_NULL,
        "judge_distance": _NUMBER_OR_NULL,
        "above_reference_agreement": {"type": "boolean"},
        "face_change": {"type": "number"},
        "unchanged": {"type": "boolean"},
        "copy_paste": {"type": "boolean"},
    },
}
_STATISTICS_PROPERTIES = {
    "valid_pairs": {"type": "integer", "minimum": 0},
    "overall_mean": _NUMBER_OR_NULL,
    "overall_std": _NUMBER_OR_NULL,
    "overall_min": _NUMBER_OR_NULL,
    "overall_max": _NUMBER_OR_NULL,
    "by_step": _STATS_MAP,
    "by_prompt": _STATS_MAP,
    "by_prompt_step": {"type": "object", "additionalProperties": _STATS_MAP},
    "at_or_above_threshold": {"type": "integer", "minimum": 0},
}

# JSON Schema (draft 2020-12 subset: type, required, properties, additionalProperties,
# items, enum, minimum) of the report file.
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "face-consistency evaluate report",
    "type": "object",
    "required": [
        "tool",
        "tool_version",
        "created",
        "metric",
        "total_pairs",
        "valid_pairs",
        "overall_mean",
        "overall_std",
        "overall_min",
        "overall_max",
        "by_step",
        "by_prompt",
        "by_prompt_step",
        "threshold",
        "bands",
        "model",
        "embedding_size",
        "provider",
        "det_size",
        "det_thresh",
        "inputs",
        "cache",
        "failure_count",
        "failures",
        "pairs",
        "copy_paste",
        "unchanged",
    ],
    "properties": {
        "tool": {"type": "string"},
        "tool_version": {"type": "string"},
        "created": {"type": "string"},
        "metric": {"enum": ["control", "reference"]},
        "total_pairs": {"type": "integer", "minimum": 0},
        **_STATISTICS_PROPERTIES,
        "threshold": _NUMBER_OR_NULL,
        "bands": {
            "type": "object",
            "required": ["excellent", "good", "moderate"],
            "additionalProperties": {"type": "number"},
        },
        "model": {
            "type": "object",
            "required": ["pack", "pack_dir", "provider", "det_size", "det_thresh", "embedding_size"],
            "properties": {
                "pack": {"type": "string"},
                "pack_dir": {"type": "string"},
                "provider": {"type": "string"},
                "provider_note": {"type": ["string", "null"]},
                "det_size": {"type": ["string", "integer"]},
                "det_thresh": {"type": "number"},
                "embedding_size": {"type": "integer", "minimum": 1},
                "fast": {"type": "boolean"},
            },
        },
        "embedding_size": {"type": "integer", "minimum": 1},
        "provider": {"type": "string"},
        "det_size": {"type": ["string", "integer"]},
        "det_thresh": {"type": "number"},
        "inputs": {
            "type": "object",
            "required": ["sample_dir", "sample_prompts", "control_dir", "generated_dir", "reference"],
            "properties": {
                "sample_dir": {"type": ["string", "null"]},
                "sample_prompts": {"type": ["string", "null"]},
                "control_dir": {"type": ["string", "null"]},
                "generated_dir": {"type": ["string", "null"]},
                "reference": {"type": "array", "items": {"type": "string"}},
                "reference_count": {"type": "integer", "minimum": 0},
            },
        },
        "cache": {
            "type": "object",
            "required": ["file", "entries", "discarded"],
            "properties": {
                "file": {"type": ["string", "null"]},
                "entries": {"type": "integer", "minimum": 0},
                "discarded": {"type": ["string", "null"]},
            },
        },
        "failure_count": {"type": "integer", "minimum": 0},
        "failures": {"type": "array", "items": _FAILURE},
        "pairs": {"type": "array", "items": _PAIR},
        "judge": {
            "type": "object",
            "required": [
                "metric",
                "model",
                "distance",
                "same_person",
                "failure_count",
                "failures",
                *sorted(_STATISTICS_PROPERTIES.keys() - {"at_or_above_threshold"}),
            ],
            "properties": {
                "metric": {"enum": ["control", "reference"]},
                "model": {
                    "type": "object",
                    "required": ["judge", "detector", "distance_threshold", "similarity_scale"],
                },
                **_STATISTICS_PROPERTIES,
                "distance": _STATS,
                "same_person": {"type": "integer", "minimum": 0},
                "failure_count": {"type": "integer", "minimum": 0},
                "failures": {"type": "array", "items": _FAILURE},
            },
        },
        "copy_paste": {
            "type": "object",
            "required": [
                "reference_agreement",
                "judge_reference_agreement",
                "change_threshold",
                "above_reference_agreement",
                "flagged_count",
                "flagged",
            ],
            "properties": {
                "reference_agreement": {"type": ["object", "null"]},
                "judge_reference_agreement": {"type": ["object", "null"]},
                "change_threshold": {"type": "number"},
                "above_reference_agreement": {"type": "integer", "minimum": 0},
                "flagged_count": {"type": "integer", "minimum": 0},
                "flagged": {"type": "array", "items": {"type": "string"}},
            },
        },
        "unchanged": {
            "type": "object",
            "required": ["change_threshold", "score_floor", "count", "by_step", "samples"],
            "properties": {
                "change_threshold": {"type": "number"},
                "score_floor": {"type": "number"},
                "count": {"type": "integer", "minimum": 0},
                "by_step": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}},
                "samples": {"type": "array", "items": {"type": "string"}},
            },
        },
        "secondary": {
            "type": "object",
            "required": ["metric", *sorted(_STATISTICS_PROPERTIES.keys() - {"at_or_above_threshold"})],
            "properties": {"metric": {"enum": ["control"]}, **_STATISTICS_PROPERTIES},
        },
    },
}
