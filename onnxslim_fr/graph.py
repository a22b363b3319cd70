"""A read-only index over a ModelProto: producers, consumers, constants and shapes.

onnx-graphsurgeon would give the same view, but copies every weight on import and export;
slimming edits a handful of initializers in place, so a thin index over the proto is enough.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from . import weights
from .errors import BadModelError, InternalError
from .folding import fold
from .shape_values import resolved_reshapes
from .view_targets import unshare_reshape_targets

log = logging.getLogger(__name__)


class Graph:
    """Producer / consumer maps, constant lookup and inferred shapes of one model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in _inputs_including_subgraphs(node):
                self.consumers[name].append(node)
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = {o.name for o in g.output}
        self._shapes, self._symbols = _collect_shapes(g)
        self._types = {vi.name: vi.type.tensor_type.elem_type
                       for vi in [*g.input, *g.value_info, *g.output]}
        self._arrays: dict[str, np.ndarray] = {}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or None for a computed tensor. Large weights are
        read-only maps of the store's files (weights.py): the index shares them with every
        model that refers to them instead of holding its own copy."""
        if name not in self.initializers:
            return None
        if name not in self._arrays:
            self._arrays[name] = weights.array(self.initializers[name])
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """Inferred shape with None for dynamic dimensions; None when the rank is unknown."""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        return self._shapes.get(name)

    def symbolic_shape(self, name: str) -> tuple[int | str, ...] | None:
        """Inferred shape with dynamic dimensions as their symbols (``'batch'``); two
        dimensions with the same symbol are equal at run time, an unnamed one is unique."""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        return self._symbols.get(name)

    def learn_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Record a shape measured at run time where inference could not tell it."""
        self._shapes[name] = tuple(int(d) for d in shape)
        self._symbols[name] = self._shapes[name]

    def elem_type(self, name: str) -> int:
        """ONNX element type of a tensor, 0 when unknown."""
        if name in self.initializers:
            return self.initializers[name].data_type
        return self._types.get(name, 0)

    def inputs_of(self, node: onnx.NodeProto) -> list[str]:
        """Every tensor `node` reads, including outer names read by its subgraphs."""
        return [n for n in _inputs_including_subgraphs(node) if n]

    def users(self, name: str) -> int:
        """How many node inputs read `name` (an initializer shared by two nodes counts 2)."""
        return len(self.consumers.get(name, ()))


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16)


def measured_outputs(model: onnx.ModelProto) -> list[str]:
    """The float tensors an output error is measured on, one per graph output that has
    one: a float tensor output itself; for a ZipMap's sequence of maps (scikit-learn
    classifiers), the probability tensor it reads; labels and other integer outputs only
    when no output is a float tensor."""
    makers = {o: n for n in model.graph.node for o in n.output}
    floats, tensors = [], []
    for out in model.graph.output:
        tt = out.type.tensor_type if out.type.HasField("tensor_type") else None
        maker = makers.get(out.name)
        if tt is not None and tt.elem_type in _FLOATS:
            floats.append(out.name)
        elif tt is not None:
            tensors.append(out.name)
        elif maker is not None and maker.op_type == "ZipMap":
            floats.append(maker.input[0])
    return list(dict.fromkeys(floats or tensors))


def _inputs_including_subgraphs(node: onnx.NodeProto) -> Iterator[str]:
    """Direct inputs, plus outer-scope names read implicitly by If/Loop/Scan bodies."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                local.update(inner.output)
            for inner in sub.node:
                yield from (i for i in _inputs_including_subgraphs(inner) if i not in local)


def _collect_shapes(g: onnx.GraphProto) -> tuple[dict[str, tuple[int | None, ...]],
                                                  dict[str, tuple[int | str, ...]]]:
    """Numeric shapes (None for a dynamic dimension) and symbolic ones (its symbol)."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    symbols: dict[str, tuple[int | str, ...]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                for d in t.shape.dim)
        symbols[vi.name] = tuple(
            d.dim_value if d.HasField("dim_value") else
            d.dim_param if d.HasField("dim_param") else f"?{vi.name}:{axis}"
            for axis, d in enumerate(t.shape.dim))
    return shapes, symbols


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make weights visible and shapes known: constant computations are folded (weights in
    Constant nodes or behind Transpose / Cast / Reshape become initializers), every node
    gets a unique name, shapes are inferred with data propagation (computed Reshape targets
    get symbolic output shapes). Returns the normalized model (`model` may be edited)."""
    folded = fold(model)
    if folded is not model:
        try:
            _infer_into(name_nodes(folded))
            model = folded
        except BadModelError as exc:  # the folder's output is not one we can read: skip it
            log.warning("constant folding skipped: %s", exc)
    g = model.graph
    outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    kept = []
    for node in g.node:
        default = node.domain in ("", "ai.onnx") and node.output[0] not in outputs
        if default and node.op_type == "Constant":
            g.initializer.append(_constant_tensor(node))
        elif default and node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            g.initializer.append(copy)
        else:
            kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    unshare_reshape_targets(model)
    name_nodes(model)
    _drop_initializer_inputs(model)
    return weights.intern(infer_shapes(model))  # the folder's new weights join the store


SKELETON_LIMIT = weights.SMALL_ELEMENTS  # initializers this small keep their values


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the values of its large initializers, which become typed graph
    inputs. Shape inference and the checker read types and shapes, not weights (shape
    tensors are small and keep their values); serializing the skeleton instead of the model
    spares two or three transient copies of every weight."""
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g, src = out.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    listed = {i.name for i in src.input}
    for init in src.initializer:
        if int(np.prod(init.dims)) <= SKELETON_LIMIT:
            g.initializer.append(init)
        elif init.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                              list(init.dims)))
    return out


def check(model: onnx.ModelProto, failure: str) -> None:
    """The full checker (on the skeleton) for a model we produced: a rejection is our bug,
    reported as `failure` with the checker's reason."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"{failure}: {exc}") from None


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict shape inference (on the skeleton); a model it rejects is not one we can reason
    about. Reshape outputs it leaves unknown are filled from their evaluated targets
    (shape_values.py) and inference runs again, so the ops after them see shapes too. The
    inferred shapes are written into `model`, which is returned."""
    declare_weight_inputs(model)
    _infer_into(model)
    if _ml_shapes(model):
        _infer_into(model)
    # each round can only resolve Reshapes whose input shapes the previous one told
    for _ in range(1 + sum(n.op_type in ("Reshape", "Slice") for n in model.graph.node)):
        resolved = resolved_reshapes(Graph(model))
        if not resolved:
            break
        model.graph.value_info.extend(resolved)
        _infer_into(model)
    return model


#: Ops whose output has their input's shape that onnx infers nothing for: a scikit-learn
#: pipeline's Scaler left every layer after it without shapes (no groups), and onnx 1.23
#: gives GroupNormalization-21 no output type (the model was refused, not frozen).
_SAME_SHAPE = {("ai.onnx.ml", "Scaler"), ("ai.onnx.ml", "Normalizer"),
               ("ai.onnx.ml", "Binarizer"), ("ai.onnx.ml", "Imputer"),
               ("", "GroupNormalization"), ("ai.onnx", "GroupNormalization")}


def _ml_shapes(model: onnx.ModelProto) -> bool:
    """Declare the outputs of _SAME_SHAPE nodes with their input's type and shape; True
    when one was added (inference then runs again from there)."""
    g = model.graph
    typed = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
    added = False
    for node in g.node:
        if (node.domain, node.op_type) not in _SAME_SHAPE:
            continue
        src, out = typed.get(node.input[0]), typed.get(node.output[0])
        if src is None or not src.type.tensor_type.HasField("shape") or \
                (out is not None and out.type.tensor_type.HasField("shape")):
            continue
        info = onnx.ValueInfoProto(name=node.output[0])
        info.type.CopyFrom(src.type)
        if node.domain == "ai.onnx.ml":  # float output whatever the input (int Imputer)
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        if out is not None and out in g.output:
            out.type.CopyFrom(info.type)
        else:
            g.value_info.append(info)
        added = True
    return added


def _infer_into(model: onnx.ModelProto) -> None:
    rounds = sum((n.domain, n.op_type) in _SAME_SHAPE for n in model.graph.node)
    for left in range(rounds, -1, -1):
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=True,
                                                         data_prop=True)
            break
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
            if left and _lenient_same_shapes(model):  # an op onnx leaves untyped: declare it
                continue
            first = str(exc).strip().splitlines()[0]
            raise BadModelError(f"shape inference failed: {first}") from None
        except (RuntimeError, ValueError) as exc:  # onnx's C++ inference can fail oddly
            raise BadModelError(f"shape inference failed: {type(exc).__name__}: {exc}") from None
    g = model.graph
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)
    for out, typed in zip(g.output, inferred.graph.output, strict=True):
        out.type.CopyFrom(typed.type)


def _lenient_same_shapes(model: onnx.ModelProto) -> bool:
    """Shapes as far as lenient inference gets, then the _SAME_SHAPE outputs it stopped at
    declared; True when one was (strict inference can then go past it)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    except Exception:  # the strict error is the one worth reporting
        return False
    known = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
    return _ml_shapes(model)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto:
    attr = node.attribute[0]
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
    elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
        value = onnx.helper.get_attribute_value(attr)
        dtype = np.float32 if "float" in attr.name else np.int64
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype))
    else:
        raise BadModelError(f"Constant node {node.name!r} uses unsupported attribute {attr.name}")
    tensor.name = node.output[0]
    return tensor


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed or repeated node a unique name, in place; tensor names stay, so the
    function and the outputs are unchanged. Node names key roles and rewrites, and
    onnxruntime refuses a model whose node names repeat."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)
    return model


def declare_weight_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph inputs that name an initializer (IR < 4 lists every weight there) declare the
    weight's current type and shape: a rewrite that slices a weight leaves the old
    declaration behind, which inference and onnxruntime would reject. In place."""
    inits = {t.name: t for t in model.graph.initializer}
    for vi in model.graph.input:
        t = inits.get(vi.name)
        if t is not None and [d.dim_value for d in vi.type.tensor_type.shape.dim] != \
                list(t.dims):
            vi.type.CopyFrom(onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return model


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old exporters list initializers as graph inputs too; they are weights, not inputs.
    IR < 4 requires that listing, so those models keep it."""
    if model.ir_version < 4:
        return
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [i for i in g.input if i.name not in inits]
    if len(keep) != len(g.input):
        del g.input[:]
        g.input.extend(keep)
