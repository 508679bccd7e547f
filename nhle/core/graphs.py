"""Classifiers that exist only as a traced graph (torch.export), split into backbone and head.

    from nhle.core.graphs import split_at_head, export_graph, program_bytes, graph_from_bytes
    backbone, head = split_at_head(graph_module, num_classes=10)   # head: a real nn.Linear
    model = MaskedClassifier(backbone, head, in_channels=1, mean=0.0, std=1.0, arch="graph")
    blob = program_bytes(model.backbone, example)                  # what a checkpoint stores
    backbone = graph_from_bytes(blob)

MLflow 3 logs a PyTorch model as a torch.export program by default (`data/model.pt2`); it loads
as a GraphModule whose submodules are plain containers: forward hooks never fire on them and its
train()/eval() raise. Its parameters still take gradients, which is all NHLE needs. The graph's
last `aten.linear` whose output width is the class count must be what the graph returns; the
graph is cut there, that op's weight and bias become an nn.Linear, and its input is the features.

Batch norm and dropout are fixed to inference (what a model that is served computes), so
train() and eval() change nothing in such a graph: it can be fine-tuned, not trained from scratch.

A program exported with a batch of ONE (what MLflow's pt2 format does with a one-image
input_example) is specialised to batch 1: its guards refuse any other batch and its view /
reshape / expand nodes hard-code the 1. `any_batch` makes it an ordinary dynamic-batch graph (it
puts the input's batch size where those nodes have the 1, re-traces it with a dynamic batch and
checks that a batch gives each image's own output), or refuses with a ValueError.
"""

from __future__ import annotations

import copy
import io

import torch
import torch.nn as nn

LINEAR = torch.ops.aten.linear.default
# Ops whose argument 1 is a shape whose leading entry is the batch size (a constant once specialised).
SHAPED = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
}
# op -> index of its `training` argument; True there would use batch statistics or drop units.
TRAINING_ARGUMENT = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
}


def is_graph(module: nn.Module) -> bool:
    return isinstance(module, torch.fx.GraphModule)


def inference_graph(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph in inference form, with the plain nn.Module train()/eval() (torch.export's
    module() replaces them by methods that raise)."""
    for name in ("train", "eval"):
        if name in vars(graph):
            delattr(graph, name)
    changed = False
    for node in graph.graph.nodes:
        index = TRAINING_ARGUMENT.get(node.target)
        if node.op == "call_function" and index is not None and len(node.args) > index and node.args[index]:
            node.args = (*node.args[:index], False, *node.args[index + 1 :])
            changed = True
    if changed:
        graph.recompile()
    return graph


def export_graph(module: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """`module` traced by torch.export in eval mode with a dynamic batch dimension."""
    was_training = module.training
    module.eval()
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as err:
        raise ValueError(
            f"torch.export could not trace the model with a dynamic batch size at input shape "
            f"{tuple(example.shape[1:])}: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from err
    finally:
        module.train(was_training)
    return inference_graph(program.module())


def program_bytes(graph: nn.Module, example: torch.Tensor) -> bytes:
    """The graph (with its current weights) as a torch.export archive."""
    program = torch.export.export(graph, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def graph_from_bytes(blob: bytes) -> torch.fx.GraphModule:
    return inference_graph(torch.export.load(io.BytesIO(blob)).module())


def input_shape(graph: torch.fx.GraphModule) -> tuple[int, ...] | None:
    """(C, H, W) of the graph's image input as traced, when the trace recorded it."""
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if value is not None and value.ndim == 4:
                return tuple(int(d) for d in value.shape[1:])
            return None
    return None


def traced_batch(graph: torch.fx.GraphModule) -> int | None:
    """The batch size the graph's input was specialised to, or None when it is dynamic (or unknown)."""
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if value is None or not getattr(value, "ndim", 0):
                return None
            size = value.shape[0]
            return int(size) if isinstance(size, int) else None
    return None


def _without_batch_one(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a batch-1 graph with its guards removed and the input's batch size where its
    shape arguments hard-code the 1: in view/reshape of a tensor computed from the input, and in
    any expand (a size-1 leading dimension expanded to the batch, e.g. a class token)."""
    graph = inference_graph(copy.deepcopy(graph))
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.graph.erase_node(node)
    if "_guards_fn" in graph._modules:
        delattr(graph, "_guards_fn")
    for key, hook in list(graph._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del graph._forward_pre_hooks[key]
    x = next(node for node in graph.graph.nodes if node.op == "placeholder")
    from_input, batch = {x}, None
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if any(n in from_input for n in node.all_input_nodes):
            from_input.add(node)
        if node.target not in SHAPED or len(node.args) < 2:
            continue
        source, shape, value = node.args[0], node.args[1], node.meta.get("val")
        if not (
            isinstance(shape, (list, tuple))
            and shape
            and isinstance(shape[0], int)
            and shape[0] == 1
            and value is not None
            and value.ndim
            and value.shape[0] == 1
        ):
            continue
        if source not in from_input and node.target != torch.ops.aten.expand.default:
            continue  # e.g. a buffer viewed as (1, C, 1, 1) to broadcast: not the batch
        if batch is None:
            with graph.graph.inserting_after(x):
                batch = graph.graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
        node.args = (source, [batch, *shape[1:]], *node.args[2:])
    graph.graph.lint()
    graph.recompile()
    return graph


def any_batch(graph: torch.fx.GraphModule, images: int = 5) -> torch.fx.GraphModule:
    """A graph traced for a batch of one, as an ordinary graph with a dynamic batch dimension (what
    export_graph gives); `graph` is not changed. Checked: a batch of `images` random images gives
    each image's output from the original graph. ValueError when it cannot be made so."""
    batch, shape = traced_batch(graph), input_shape(graph)
    if batch != 1 or shape is None:
        raise ValueError(
            f"the graph's input is not a batch of one image of a known shape (batch {batch}, image {shape})"
        )
    x = torch.rand(images, *shape, generator=torch.Generator().manual_seed(0))
    try:
        converted = export_graph(_without_batch_one(graph), x[:2])
        with torch.no_grad():
            expected = torch.cat([graph(x[i : i + 1]) for i in range(images)])
            got = converted(x)
    except Exception as err:  # noqa: BLE001 - tracing and running raise many kinds
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise ValueError(
            f"a batch of {images} gave output {getattr(got, 'shape', type(got).__name__)}, not {tuple(expected.shape)}"
        )
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
        raise ValueError(
            f"a batch of {images} images does not give each image's own output (max difference "
            f"{float((got - expected).abs().max()):.3g}): the graph mixes images in a batch"
        )
    return converted


def _owner(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    *path, name = target.split(".")
    for part in path:
        root = getattr(root, part)
    return root, name


def _tensor(root: nn.Module, node) -> torch.Tensor | None:
    if node is None:
        return None
    if getattr(node, "op", None) != "get_attr":
        raise ValueError(f"the last linear layer's weights are computed in the graph ({node}), not stored")
    return getattr(*_owner(root, node.target))


def split_at_head(
    graph: torch.fx.GraphModule, num_classes: int, head: str | None = None
) -> tuple[torch.fx.GraphModule, nn.Linear]:
    """(backbone graph returning the features, the head as an nn.Linear); `graph` is not changed.

    The head is the last aten.linear whose weight has `num_classes` rows (or whose weight is
    `<head>.weight` when a head is named); the graph must return its output unchanged."""
    graph = inference_graph(copy.deepcopy(graph))
    linears = [n for n in graph.graph.nodes if n.op == "call_function" and n.target == LINEAR]
    if not linears:
        raise ValueError(
            "the traced model has no linear layer (aten.linear): nhle needs a classifier whose last layer is linear"
        )
    widths = [tuple(_tensor(graph, n.args[1]).shape) for n in linears]
    if head:
        chosen = [n for n in linears if getattr(n.args[1], "target", None) == f"{head}.weight"]
        if not chosen:
            raise ValueError(
                f"the traced model has no linear layer {head!r}; its linear weights: "
                f"{[getattr(n.args[1], 'target', '?') for n in linears]}"
            )
    else:
        chosen = [n for n, shape in zip(linears, widths) if shape[0] == num_classes]
        if not chosen:
            raise ValueError(
                f"the model's linear layers have {sorted({s[0] for s in widths})} outputs but the data has "
                f"{num_classes} classes: no linear layer gives one output per class"
            )
    node = chosen[-1]
    output = next(n for n in graph.graph.nodes if n.op == "output")
    returned = output.args[0]
    returned = returned[0] if isinstance(returned, (tuple, list)) and len(returned) == 1 else returned
    if returned is not node:
        raise ValueError(
            f"the model returns {returned}, computed after its last linear layer {node}: nhle needs the "
            "logits straight from the final linear layer (log the model without a softmax or other "
            "layers after it)"
        )
    weight_node, bias_node = node.args[1], (node.args[2] if len(node.args) > 2 else None)
    weight, bias = _tensor(graph, weight_node), _tensor(graph, bias_node)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    features = node.args[0]
    output.args = ((features,),) if isinstance(output.args[0], (tuple, list)) else (features,)
    graph.graph.eliminate_dead_code()
    still_read = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for target in {n.target for n in (weight_node, bias_node) if n is not None} - still_read:
        delattr(*_owner(graph, target))  # the head's tensors now live in the nn.Linear only
    graph.graph.lint()
    graph.recompile()
    return graph, linear
