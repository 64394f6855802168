"""The semantic zoo: small random-weight models the analyzer was not written against, with
the workload each one is, run through both documented entry points.

Transformers models come from transformers' own auto mappings (genie.semantic.hf_models
builds each from its config at a tiny size); the expected workload of each is the mapping it
came from -- ``ZOO_TASKS`` below says which mapping means which workload -- never what the
analyzer says. Recommenders and plain models are written in semantic_models.py. A model that
cannot be built tiny, or whose forward fails on CPU with the generic inputs, is skipped with
the reason; so is one whose forward fails on remote_accelerator (the runtime's business, not
the analyzer's), and the skips are counted.

Entry points:
  ``graph``: the model moved to remote_accelerator, one forward, then
             ``SemanticAnalyzer().analyze_graph(genie.get_graph())`` -- no model, no module
             hooks: the op stream alone.
  ``model``: ``SemanticAnalyzer().analyze(model, *args, **kwargs)`` on the CPU model.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import semantic_models
import torch

import genie
from genie.semantic import SemanticAnalyzer
from genie.semantic import hf_models as hf

REMOTE = "remote_accelerator:0"

#: (auto mapping, expected workload, at most this many models, model types tried first)
ZOO_TASKS = (
    (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "llm",
        19,
        # the list, then a state-space LM (no attention at all)
        ("llama", "mistral", "qwen2", "phi", "falcon", "gpt_neox", "opt", "bloom", "gpt2", "mamba"),
    ),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "llm", 8, ("bert", "roberta")),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "llm", 6, ("t5", "bart")),
    (
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "vision",
        14,
        ("vit", "deit", "convnext", "resnet"),
    ),
    ("MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", "vision", 4, ("detr", "yolos")),
    ("MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES", "multimodal", 6, ("clip", "siglip")),
    (
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "multimodal",
        4,
        ("llava", "paligemma", "idefics3", "qwen2_vl", "blip-2"),
    ),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio", 3, ()),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "audio", 3, ()),
    # none of the workloads the analyzer names: the honest answer is UNKNOWN
    ("MODEL_FOR_TIME_SERIES_CLASSIFICATION_MAPPING_NAMES", "unknown", 2, ()),
    ("MODEL_FOR_TIME_SERIES_REGRESSION_MAPPING_NAMES", "unknown", 2, ()),
)


@dataclass
class ZooEntry:
    name: str
    expected: str
    source: str  # the auto mapping, or "written here"
    build: Callable[[], tuple[torch.nn.Module, tuple, dict]]
    inputs: str = ""  # hf_models input kind


@dataclass
class ZooResult:
    name: str
    expected: str
    source: str
    got: dict[str, str] = field(default_factory=dict)  # entry point -> workload
    confidence: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # entry point -> analyzer exception
    skipped: str | None = None  # no entry point could run the model
    failed: dict[str, str] = field(default_factory=dict)  # entry point -> runtime failure
    ms: dict[str, float] = field(default_factory=dict)
    # entry point -> the forward flushed part way (a data-dependent op needed a value): the
    # pending graph holds only the ops after the last flush, not the model
    cut: dict[str, int] = field(default_factory=dict)
    roles: dict[str, dict[str, int]] = field(default_factory=dict)  # entry point -> role counts
    residency: dict[str, dict[str, int]] = field(default_factory=dict)  # of the graph inputs
    node_residency: dict[str, dict[str, int]] = field(default_factory=dict)
    phases: dict[str, list[str]] = field(default_factory=dict)  # entry point -> phases seen
    fusion_points: dict[str, int] = field(default_factory=dict)
    made_cache: bool = False
    encoder_decoder: bool = False  # the model's config says it is an encoder-decoder
    attention: bool = False  # the model has attention modules (ground truth for role checks)  # the model's output carries a KV cache (past_key_values)

    def right(self, entry: str) -> bool:
        return self.got.get(entry) == self.expected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidates(mapping: str, cap: int, required: tuple[str, ...]) -> list[tuple[str, str]]:
    """The mapping's (model type, class) pairs: the required ones, then the rest spread
    evenly (every k-th, so the sample is not the alphabet's head), twice the cap because
    some will not build tiny."""
    m = hf.mapping(mapping)
    first = [(t, m[t]) for t in required if t in m]
    rest = [(t, c) for t, c in m.items() if t not in required]
    room = max(cap - len(first), 0)
    step = max(len(rest) // max(room * 2, 1), 1)
    return first + rest[::step]


def _entry_if_it_runs(
    model_type: str, cls: str, kind: str, expected: str, mapping: str
) -> ZooEntry | Exception:
    """The entry for `cls` once a tiny one is built and runs a forward on CPU; the exception
    when it cannot be."""
    try:
        model, args, kwargs = hf.build_hf(model_type, cls, kind)
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the caller skips it and says why
        return exc
    return ZooEntry(
        cls,
        expected,
        mapping.removesuffix("_MAPPING_NAMES"),
        lambda t=model_type, c=cls, k=kind: hf.build_hf(t, c, k),
        kind,
    )


def zoo_entries() -> tuple[list[ZooEntry], list[tuple[str, str]]]:
    """(entries, skipped as (name, reason)): every HF candidate is built and run once on CPU
    here, up to each task's cap; then the models written here."""
    _quiet()
    entries: list[ZooEntry] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for mapping, expected, cap, required in ZOO_TASKS:
        kind = hf.TASK_INPUTS[mapping]
        taken = 0
        for model_type, cls in _candidates(mapping, cap, required):
            if taken >= cap:
                break
            if cls in seen:
                continue
            seen.add(cls)
            entry = _entry_if_it_runs(model_type, cls, kind, expected, mapping)
            if isinstance(entry, Exception):  # a model that cannot be built tiny
                skipped.append((cls, _reason(entry)))
                continue
            taken += 1
            entries.append(entry)
    for name, expected, build in semantic_models.recsys_and_plain():
        entries.append(ZooEntry(name, expected, "written here", build))
    return entries, skipped


#: held-out check (bench_semantic.py --heldout): mappings and ends of mappings the zoo does
#: not draw on -- (mapping, expected workload, generic inputs, at most this many)
HELD_OUT = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "llm", "text", 12),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "llm", "text", 6),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "llm", "text", 6),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "llm", "text", 14),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "vision", "image", 10),
    ("MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", "vision", "image", 5),
    ("MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", "vision", "image", 4),
    ("MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES", "vision", "image", 4),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "multimodal", "image_text", 6),
    ("MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES", "multimodal", "image_text", 6),
    ("MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES", "audio", "audio", 4),
    ("MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES", "audio", "audio", 4),
)


def held_out_entries(exclude: set[str]) -> list[ZooEntry]:
    """Models the zoo does not hold, taken from the far end of each HELD_OUT mapping: a
    check that the rules generalise, not a set to tune them on."""
    _quiet()
    entries: list[ZooEntry] = []
    for mapping, expected, kind, cap in HELD_OUT:
        taken = 0
        for model_type, cls in reversed(list(hf.mapping(mapping).items())):
            if taken >= cap:
                break
            if cls in exclude or any(e.name == cls for e in entries):
                continue
            entry = _entry_if_it_runs(model_type, cls, kind, expected, mapping)
            if isinstance(entry, Exception):  # not buildable tiny: not part of the check
                continue
            taken += 1
            entries.append(entry)
    return entries


def _reason(exc: BaseException) -> str:
    """The exception's type and first non-empty line of its message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _remote(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(REMOTE)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_remote(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _remote(v) for k, v in obj.items()}
    return obj


def run_entry(
    entry: ZooEntry, analyzers: dict[str, SemanticAnalyzer], entry_points=("graph", "model")
) -> ZooResult:
    """Classify one zoo model through each entry point. Analyzer exceptions are recorded
    (they are defects); a forward that fails on remote_accelerator skips the model."""
    res = ZooResult(entry.name, entry.expected, entry.source)
    built = entry.build()[0]
    config = getattr(built, "config", None)
    res.encoder_decoder = getattr(config, "is_encoder_decoder", False) is True
    res.attention = any("Attention" in type(m).__name__ for m in built.modules())
    for ep in entry_points:
        model, args, kwargs = entry.build()
        genie.synchronize()
        flushes = genie.stats()["flushes"]
        try:
            if ep == "graph":
                model = model.to(REMOTE)
                with torch.no_grad():
                    model(*_remote(args), **_remote(kwargs))
                graph = genie.get_graph()
                t0 = time.perf_counter()
                try:
                    profile = analyzers[ep].analyze_graph(graph)
                except Exception:  # noqa: BLE001
                    res.errors[ep] = traceback.format_exc(limit=-3)
                    continue
            else:
                t0 = time.perf_counter()
                try:
                    profile, out = analyzers[ep].analyze(
                        model, *args, return_outputs=True, **kwargs
                    )
                    res.made_cache = getattr(out, "past_key_values", None) is not None
                except Exception as exc:  # noqa: BLE001
                    if _in_analyzer(exc):
                        res.errors[ep] = traceback.format_exc(limit=-3)
                        continue
                    raise
            res.ms[ep] = round((time.perf_counter() - t0) * 1e3, 2)
            if genie.stats()["flushes"] > flushes:
                res.cut[ep] = genie.stats()["flushes"] - flushes
            res.got[ep] = str(profile.workload_type.value)
            res.confidence[ep] = round(float(profile.confidence), 3)
            res.roles[ep] = dict(profile.metadata["roles"])
            res.phases[ep] = sorted(profile.phases)
            res.fusion_points[ep] = len(profile.metadata["fusion_points"])
            res.residency[ep] = dict(Counter(profile.residency.values()))
            res.node_residency[ep] = dict(
                Counter(n.meta.get("data_residency") for n in profile.graph.nodes)
            )
        except Exception as exc:  # noqa: BLE001 - the forward itself failed on the device
            res.failed[ep] = f"forward on {REMOTE} failed ({ep}): {type(exc).__name__}: " + (
                str(exc).splitlines()[0][:160] if str(exc) else ""
            )
            if len(res.failed) == len(entry_points):
                res.skipped = res.failed[ep]
        finally:
            try:
                genie.synchronize()
            except Exception:  # noqa: BLE001 - a pending graph the executor cannot run
                pass
    return res


def generate_phases(entry: ZooEntry, new_tokens: int = 3, **generate_kwargs) -> dict[str, Any]:
    """Greedy generate() of a causal LM on remote_accelerator under
    ``SemanticAnalyzer.observe``: the call phase of each forward, the flushes inside each
    call (a data-dependent op cut it), whether the last call read a resident KV cache, or
    the runtime error that stopped it."""
    model, _, kwargs = entry.build()
    ids = kwargs["input_ids"].to(REMOTE)
    model = model.to(REMOTE)
    analyzer = SemanticAnalyzer()
    out: dict[str, Any] = {}
    try:
        with analyzer.observe(model) as calls, torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **generate_kwargs,
            )
    except Exception as exc:  # noqa: BLE001 - the runtime's business: report it
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return out
    finally:
        genie.synchronize()
    out["phases"] = calls.phases
    out["flushes_in_call"] = [p.metadata["flushes_in_call"] for p in calls.profiles]
    out["kv_resident_last"] = bool(calls.profiles and calls.profiles[-1].kv_cache["present"])
    out["analyzer_errors"] = list(calls.errors)
    return out


def _in_analyzer(exc: BaseException) -> bool:
    """Whether the exception was raised by genie.semantic (the analysis or a module hook):
    the deepest frame outside torch itself is there, not in the model's code or the runtime."""
    for f in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/torch/" not in f.filename:
            return "genie/semantic" in f.filename
    return False


def judged(results: list[ZooResult], ep: str) -> list[ZooResult]:
    """The results an entry point is judged on: every model that ran through it. Those whose forward
    was cut by a flush (``cut``) are judged too: the analyzer must then say what it can, or
    UNKNOWN, from the tail it sees."""
    return [r for r in results if ep not in r.failed]


def summary(results: list[ZooResult], entry_points=("graph", "model")) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": len(results),
        "ran": sum(r.skipped is None for r in results),
        "skipped": [(r.name, r.skipped) for r in results if r.skipped],
        "failed_in_runtime": [(r.name, r.failed) for r in results if r.failed and not r.skipped],
    }
    for ep in entry_points:
        ran = judged(results, ep)
        right = sum(r.right(ep) for r in ran)
        out[ep] = {
            "judged": len(ran),
            "cut_by_flush": [r.name for r in results if ep in r.cut],
            "right": right,
            "share": round(right / len(ran), 4) if ran else 0.0,
            "exceptions": sum(ep in r.errors for r in ran),
            "unknown": sum(r.got.get(ep) == "unknown" and r.expected != "unknown" for r in ran),
            "wrong": [
                (r.name, r.expected, r.got.get(ep))
                for r in ran
                if not r.right(ep) and ep not in r.errors
            ],
        }
    return out


def table(results: list[ZooResult], entry_points=("graph", "model")) -> str:
    lines = [
        f"{'architecture':44s} {'expected':10s} "
        + " ".join(f"{ep + ' got':>12s} {'conf':>5s}" for ep in entry_points)
    ]
    for r in results:
        if r.skipped:
            lines.append(f"{r.name:44s} {r.expected:10s} skipped: {r.skipped[:80]}")
            continue
        cells = []
        for ep in entry_points:
            got = "ERROR" if ep in r.errors else "runtime" if ep in r.failed else r.got.get(ep, "-")
            mark = "~" if ep in r.cut else "" if r.right(ep) or ep in r.failed else "*"
            cells.append(f"{got + mark:>12s} {r.confidence.get(ep, 0.0):5.2f}")
        lines.append(f"{r.name:44s} {r.expected:10s} " + " ".join(cells))
    return "\n".join(lines)
