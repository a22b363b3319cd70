"""Sensitivity probes that run only the part of the model a plan changes.

A probe measures the output error of one group's trial plan (lumping/redundancy.py). A
plan edits the group's members (producers, carriers, consumers) and nothing upstream of
them, so the probe runs the region from the first member to the outputs, fed with the
original model's values where the region reads from outside (cached by one run of the
original over the probe batches). On a ResNet-50 the regions average half the model, and
each probe's rewrite and session shrink with them. The cached values are bounded by
CACHE_BYTES; over it, probes run the whole model as before.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from . import progress, rewrite
from .background import check_cancelled
from .channels.structures import ChannelGroup, GroupSet
from .errors import InternalError
from .graph import Graph, measured_outputs
from .lumping.plan import Plan
from .runtime import first_line, run, session, try_run
from .subgraph import _ElemTypes, cut, with_outputs

log = logging.getLogger(__name__)

CACHE_BYTES = 1 << 29  # cached region inputs of all probe batches


@dataclass
class Region:
    """The nodes a group's plan can change and everything after them."""

    reads: list[str]  # tensors the region reads from outside (graph inputs included)
    outputs: list[str]  # measured outputs it computes (graph.measured_outputs)


def region(graph: Graph, group: ChannelGroup) -> Region:
    """Forward closure of the group's member nodes, in graph order."""
    members = {m.node for m in group.members}
    made: set[str] = set()
    reads: dict[str, None] = {}
    for node in graph.nodes:
        inputs = graph.inputs_of(node)
        if node.name in members or any(t in made for t in inputs):
            reads.update((t, None) for t in inputs
                         if t and t not in made and t not in graph.initializers)
            made.update(o for o in node.output if o)
    outputs = [name for name in measured_outputs(graph.model) if name in made]
    return Region(_with_shape_makers(graph, [t for t in reads if t not in made]), outputs)


def _with_shape_makers(graph: Graph, reads: list[str]) -> list[str]:
    """`reads` with computed int64 values (Reshape targets) replaced by what computes them,
    back to Shape / Size: a plan may rewrite a literal in the Concat of a target, which a
    cached original value would bypass (GPT-2's views: the probe's Reshape failed)."""
    types, out, pending = _ElemTypes(graph.model), dict.fromkeys(reads), list(reads)
    while pending:
        t = pending.pop()
        node = graph.producer.get(t)
        if node is None or node.op_type in ("Shape", "Size") or \
                types[t] != onnx.TensorProto.INT64:
            continue
        del out[t]
        for i in graph.inputs_of(node):
            if i and i not in out and i not in graph.initializers:
                out[i] = None
                pending.append(i)
    return list(out)


class OutputErrorProbe:
    """plans -> relative squared output error of the model slimmed by them."""

    @progress.phase("sensitivity probe set-up")
    def __init__(self, model: onnx.ModelProto, graph: Graph, groups: GroupSet,
                 batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.model, self.graph, self.groups = model, graph, groups
        self.batches = list(batches)
        self.regions = {g.id: region(graph, g) for g in groups.active()}
        self.names = measured_outputs(model)  # float tensors: not a ZipMap's maps
        if not set(self.names) <= {o.name for o in model.graph.output}:
            self.model = with_outputs(model, self.names)  # a copy only when needed
        self.values = self._reference()
        self.seen: dict[bytes, float] = {}  # plan digest -> error (`__call__`)
        self.energy = sum(float(np.sum(np.square(v[n], dtype=np.float64)))
                          for v in self.values for n in self.names) or 1.0

    def _reference(self) -> list[dict[str, np.ndarray]]:
        """Outputs and region inputs of the original, per batch (inputs dropped when they
        would take more than CACHE_BYTES: then probes run the whole model)."""
        extra = sorted({t for r in self.regions.values() for t in r.reads} - set(self.names))
        sess = session(with_outputs(self.model, extra))
        names = [o.name for o in sess.get_outputs()]
        values, size = [], 0
        for feeds in self.batches:
            outs = dict(zip(names, run(sess, feeds), strict=True))
            size += sum(v.nbytes for k, v in outs.items() if k in extra)
            if size > CACHE_BYTES and self.regions:
                log.info("probe cache over %d bytes: probes run the whole model", CACHE_BYTES)
                self.regions = {}
            values.append({**feeds, **outs})
        if not self.regions:
            values = [{k: v[k] for k in (*f, *self.names)} for f, v in
                      zip(self.batches, values, strict=True)]
        return values

    def __call__(self, plans: Plan) -> float:
        """The error of `plans`, measured once: a search plans again at every step and
        probes each group at half its channels each time (redundancy.plan), the same plan
        with the same statistics."""
        key = plan_digest(plans)
        if key not in self.seen:
            self.seen[key] = self._measure(plans)
        return self.seen[key]

    def _measure(self, plans: Plan) -> float:
        reg = self.regions.get(next(iter(plans))) if len(plans) == 1 else None
        if reg is None:
            sliced, outputs = self.model, self.names
            slim = rewrite.apply(sliced, self.graph, self.groups, plans, finalize=False)
        else:
            sliced, outputs = cut(self.graph, reg.outputs, set(reg.reads)), reg.outputs
            slim = rewrite.apply(sliced, Graph(sliced), self.groups, plans, finalize=False,
                                 analysis=self.graph)
        sess = trial_session(slim, plans)
        inputs = [i.name for i in sess.get_inputs()]
        err = 0.0
        for values in self.values:
            got = dict(zip([o.name for o in sess.get_outputs()],
                           trial_run(sess, {n: values[n] for n in inputs}, plans), strict=True))
            err += sum(float(np.sum(np.square(values[n].astype(np.float64) - got[n])))
                       for n in outputs)
        return err / self.energy


def plan_digest(plans: Plan) -> bytes:
    """A digest of everything a plan writes: kept channels and every relation's values."""
    digest = hashlib.blake2b(digest_size=16)
    for gid in sorted(plans):
        plan = plans[gid]
        digest.update(f"{gid}:{plan.size}:{plan.method}".encode())
        digest.update(np.ascontiguousarray(plan.keep, dtype=np.int64).tobytes())
        for kind in (plan.mix, plan.features):
            for name in sorted(kind):
                digest.update(name.encode())
                for array in kind[name]:
                    digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        digest.update(b"|")
    return digest.digest()


def trial_session(model: onnx.ModelProto, plans: Plan):
    """A session of a probe's trial model, on one thread: two probes run at once beside the
    forward selection (redundancy._curves), and more threads only contend for the cores
    (ResNet-50, 32 images: planning 15.1 -> 14.0 s wall, 25.1 -> 22.7 s CPU). The original
    ran on these inputs already, so onnxruntime refusing the trial is our rewrite's fault:
    an InternalError (exit 3), never the user's data (exit 2)."""
    try:
        return session(model, threads=1)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise InternalError(f"sensitivity probe: onnxruntime cannot load the trial model of "
                            f"group(s) {sorted(plans)}: {first_line(exc)}") from None


def trial_run(sess, feeds: Mapping[str, np.ndarray], plans: Plan) -> list[np.ndarray]:
    """`sess` on `feeds`; a failure is an InternalError (see `trial_session`). A probe on a
    worker thread stops here once its caller was interrupted."""
    check_cancelled()
    outs, failed = try_run(sess, feeds)
    if failed is not None:
        raise InternalError(f"sensitivity probe: onnxruntime fails to run the trial model of "
                            f"group(s) {sorted(plans)}: {failed}")
    return outs
