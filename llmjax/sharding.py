"""Device mesh and logical-axis sharding rules (MaxText's idea, at jax-llm-examples' size).

Every parameter gets logical axis names from its path (`logical_axes`); one table (`RULES`) maps
logical names to mesh axes. The mesh has a `data` axis (pure data parallelism: parameters
replicated), an `fsdp` axis (fully sharded: parameters and optimizer state split along their
`embed` dimension, gathered for each use by XLA) and an `expert` axis (expert parallelism: a MoE
layer's experts split across devices; XLA's partitioner moves the tokens to their experts); the
batch is split over all three. Change the layout in
the table or the config (`train.mesh`), not in model code.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert")  # (train.mesh's keys, in messages)
# The mesh's axes in device order, and the batch's split over them (the expert axis also splits the
# batch outside the experts). fsdp is the minor one: with it before expert, the embedding lookup's
# output (split along embed over fsdp, as the table) could not be moved to the batch's split over
# (fsdp, expert) but by gathering it whole on every device (XLA's "Involuntary full
# rematerialization" warning, twice per step with train.mesh fsdp and expert both above 1).
BATCH_AXES = ("data", "expert", "fsdp")

# logical axis -> mesh axis (or None: replicated)
RULES = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": None,
    "mlp": None,
    "heads": None,
    "latent": None,
    "layers": None,
    "norm": None,
    "expert": "expert",  # expert parallelism: each device holds n_experts / mesh.expert experts
}

# kernel (d_in, d_out) of each projection, by module name
KERNEL_AXES = {
    "q_proj": ("embed", "heads"),
    "qkv_proj": ("embed", "heads"),
    "o_proj": ("heads", "embed"),
    "fc": ("embed", "mlp"),
    "proj": ("mlp", "embed"),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
    "q_down": ("embed", "latent"),
    "q_up": ("latent", "heads"),
    "kv_down": ("embed", "latent"),
    "kv_up": ("latent", "heads"),
    "router": ("embed", None),
}

# The logical axes a mesh axis that does not divide its own dimension may move to (spec_for): an
# MLP's hidden dimension, the vocabulary, unnamed ones (the position table's rows). Not "heads" or
# "latent": the models reshape those per head and slice them (MLA: a query head's nope | rope parts,
# kv_down's latent | rope), and an axis moved there split the activations across those slices, which
# XLA then gathered whole on every device to cut ("Involuntary full rematerialization"; d_model=60 MLA
# on fsdp=8: 2.5x the step time on CPU). Nor a scanned stack's "layers".
FALLBACK_AXES = ("mlp", "vocab", None)

# other parameters by leaf name (MoE experts: stacked over the expert axis)
LEAF_AXES = {
    "w_in": ("expert", "embed", "mlp"),
    "w_out": ("expert", "mlp", "embed"),
    "b_in": ("expert", None),
    "b_out": ("expert", None),
}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh of train.mesh's data, fsdp and expert sizes over `devices` (default: every device of
    every process), its axes in BATCH_AXES order. One size may be -1: it takes what the others
    leave. A missing axis has size 1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg[a]) if a in mesh_cfg else 1 for a in MESH_AXES]
    bad = [f"{a}={s}" for a, s in zip(MESH_AXES, sizes) if s != -1 and s < 1]
    if bad:
        raise ConfigError(f"train.mesh: {', '.join(bad)}; each axis is -1 (the rest of the devices) or at least 1")
    if sizes.count(-1) > 1:
        both = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
        raise ConfigError(f"train.mesh: {', '.join(f'{a}=-1' for a in both)}: at most one axis may be -1 (the rest of the devices)"
                          + (" and data is -1 by default" if "data" in both else "")
                          + f"; give {'the other' if len(both) == 2 else 'all but one'} a size, e.g. --config.train.mesh.{both[0]}=1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            fixed = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes) if s != -1 and a in mesh_cfg)
            raise ConfigError(f"train.mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices: the axes given "
                              f"({fixed}) hold {known} devices apiece; give them sizes whose product divides {len(devices)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"train.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, there are {len(devices)}; "
                          "the mesh takes every device: make one axis -1 (the rest of them), e.g. --config.train.mesh.data=-1")
    size = dict(zip(MESH_AXES, sizes))
    return Mesh(np.array(devices).reshape([size[a] for a in BATCH_AXES]), BATCH_AXES)


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at `path` (keys of the pure-dict tree)."""
    names = [str(k) for k in path]
    leaf = names[-1]
    i = names.index("layers") if "layers" in names else None
    stacked = i is not None and i + 1 < len(names) and not names[i + 1].isdigit()  # scanned layout
    lead = ("layers",) if stacked else ()
    body = ndim - len(lead)
    if leaf in LEAF_AXES:
        axes = LEAF_AXES[leaf]
    elif leaf == "embedding":
        axes = ("vocab", "embed") if names[0] == "embed" else (None, "embed")
    elif leaf == "kernel" and len(names) >= 2 and names[-2] in KERNEL_AXES:
        axes = KERNEL_AXES[names[-2]]
    elif leaf == "kernel" and body == 2:
        axes = ("embed", "mlp")
    else:  # biases, norm scales
        axes = ("norm",) * body
    if len(axes) != body:
        raise ValueError(f"parameter {'/'.join(names)} has {ndim} dims; its logical axes {axes} do not fit")
    return lead + tuple(axes)


def _size(mesh: Mesh, axis) -> int:
    return math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))) if axis else 1


def spec_for(path, shape, mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec of a parameter. A mesh axis that does not divide the dimension the rules give
    it moves to the largest other dimension it divides that no axis splits, of a logical axis in
    FALLBACK_AXES: fsdp=8 splits d_model=60's MLP kernels along their hidden dimension. With no such
    dimension the parameter is replicated over that axis (`replicated_by_size` names it)."""
    names = logical_axes(path, len(shape))
    out, moved = [], []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if name else None
        fits = axis and dim % _size(mesh, axis) == 0
        out.append(axis if fits else None)
        if axis and not fits and _size(mesh, axis) > 1:
            moved.append(axis)
    for axis in moved:
        free = [i for i, (name, dim) in enumerate(zip(names, shape))
                if out[i] is None and name in FALLBACK_AXES and not (name and rules.get(name)) and dim % _size(mesh, axis) == 0]
        if free:
            out[max(free, key=lambda i: shape[i])] = axis
    return P(*out)


def replicated_by_size(params, mesh: Mesh, rules=RULES) -> str | None:
    """One line naming the parameters that a mesh axis of more than one device should split but
    cannot (the axis divides neither the dimension the rules give it nor another: `spec_for`
    replicates them), with their share of the parameters, which every device of that axis then
    holds whole; None where there are none."""
    missed, total, count = [], 0, 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = _path_keys(path)
        n = math.prod(x.shape)
        total += n
        spec = tuple(spec_for(keys, x.shape, mesh, rules))
        for name, dim, got in zip(logical_axes(keys, len(x.shape)), x.shape, spec):
            axis = rules.get(name) if name else None
            axes = axis if isinstance(axis, tuple) else (axis,) if axis else ()
            if _size(mesh, axis) > 1 and got is None and axis not in spec:
                missed.append((n, f"{'/'.join(map(str, keys))} {tuple(x.shape)} ({'x'.join(f'{a}={mesh.shape[a]}' for a in axes)} "
                                  f"does not divide {dim} or a dimension it may move to)"))
                count += n
                break
    if not missed:
        return None
    missed.sort(key=lambda m: -m[0])
    names = "; ".join(m[1] for m in missed[:3]) + (f"; and {len(missed) - 3} more" if len(missed) > 3 else "")
    return (f"train.mesh: {count / max(total, 1):.1%} of the parameters ({len(missed)} array(s)) are replicated, not split, over "
            f"a mesh axis that does not divide their dimension: {names}")


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a pure-dict parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec_for(_path_keys(p), x.shape, mesh)), params)


def state_shardings(tree, params_shardings, mesh: Mesh):
    """Shardings for a tree that embeds parameter-shaped subtrees (an optimizer state): a leaf whose
    path ends with a parameter's path gets that parameter's sharding; anything else is replicated."""
    by_path = {}
    jax.tree_util.tree_map_with_path(lambda p, s: by_path.__setitem__(_path_keys(p), s), params_shardings)
    replicated = NamedSharding(mesh, P())

    def pick(path, x):
        keys = _path_keys(path)
        for i in range(len(keys)):
            s = by_path.get(keys[i:])
            if s is not None and len(s.spec) <= len(x.shape):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))
