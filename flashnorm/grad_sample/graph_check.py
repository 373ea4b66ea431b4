"""Autograd-graph check: every trainable parameter reaches the loss only through its own layer's forward.

A parameter read elsewhere (``F.linear(h, layer.weight)``) sends gradient along a path no gradient tap
measures: its norm would be under-counted in two passes and its gradient dropped in one. The check counts,
in the step's autograd graph, the edges into each parameter's gradient accumulator: over the whole graph,
and inside each layer (from the layer's output node down to its input's node, not crossing other taps).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.nn as nn


def count_parameter_edges(
    start, owned: Dict[int, nn.Parameter], stop: Sequence = (), skip: Optional[Callable] = None
) -> Dict[nn.Parameter, int]:
    """Edges into each parameter of ``owned`` (by ``id``) reachable from graph node ``start``.

    The walk does not continue past nodes in ``stop`` nor into nodes for which ``skip(node)`` is true.
    A parameter's accumulator is recognised by its ``variable`` (not by the identity of Python wrappers of
    graph nodes, which torch versions do not all keep stable); nodes are kept alive in ``seen`` so that their
    ids stay unique during the walk.
    """
    counts: Dict[nn.Parameter, int] = {}
    seen, stack = {}, [start] if start is not None else []
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            param = owned.get(id(getattr(nxt, "variable", None)))
            if param is not None:
                counts[param] = counts.get(param, 0) + 1
            if id(nxt) in seen or any(nxt is s for s in stop) or (skip is not None and skip(nxt)):
                continue
            seen[id(nxt)] = nxt
            stack.append(nxt)
    return counts


def parameters_used_outside(
    root, layers: Iterable[Tuple[str, List[nn.Parameter], Optional[tuple]]], is_tap: Callable
) -> List[str]:
    """Names of the layers one of whose parameters reaches ``root`` outside that layer's forward.

    Args:
        root: the loss's ``grad_fn``.
        layers: (name, parameters, (output node, input node) or None) per hooked layer.
        is_tap: whether a graph node is a gradient tap (the walk inside a layer stops at other layers).
    """
    layers = list(layers)
    owned = {id(p): p for _, params, _ in layers for p in params}
    total = count_parameter_edges(root, owned)
    inside: Dict[nn.Parameter, int] = {}
    for _, _, ends in layers:
        if ends is None:
            continue
        output_node, input_node = ends
        for p, n in count_parameter_edges(output_node, owned, stop=(input_node,), skip=is_tap).items():
            inside[p] = inside.get(p, 0) + n
    owner = {id(p): name for name, params, _ in layers for p in params}
    return sorted({owner[id(p)] for p, n in total.items() if n > inside.get(p, 0)})
