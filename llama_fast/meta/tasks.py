"""How a batch of tasks is called: chunks of tasks per vmapped call, one plain call for a single
task, and the split of a model's tensors into adapted parameters and the rest."""

import math
import numbers

import torch


# task_chunk="auto" on the CPU: tasks per vmap call such that one chunk's largest capture
# activation (support rows x the widest K-FAC layer output) stays within this many bytes.
# Measured (2-core EPYC, best of interleaved runs, Conv-4 5-way 1-shot, 1 MB per task), step
# time in ms for chunks of 1 / 4 or 8 / all tasks: T=4 MAML 350 / - / 501, LLAMA 645 / - / 794;
# T=32 MAML 2807 / 3865 / 4697, LLAMA 5550 / 5777 / 7649. Under vmap the CPU pays for the
# batch: convolutions become grouped ones (Conv-4's first, one input channel per group, is
# slow in oneDNN), BatchNorm folds tasks into channels through copies, and tensors past glibc's
# 32 MB mmap threshold are page-faulted in afresh on every allocation. The sinusoid MLP's
# 1.6 KB tasks stay in one call: there a chunk costs more in Python overhead than it saves.
# A chunk of one task is since called without vmap at all (call_tasks), which removes the
# batching rules' copies as well: T=4 MAML 349 -> 279 ms, LLAMA 611 -> 503 ms (medians of 8).
AUTO_CHUNK_BYTES = 1 << 20


def resolve_task_chunk(task_chunk, tasks, device, rows, layer_shapes, element_size):
    """Tasks per vmap call (None: all in one). `task_chunk`: None, "auto" or an int >= 1."""
    if task_chunk is None:
        return None
    if isinstance(task_chunk, str):
        if task_chunk != "auto":
            raise ValueError(f"task_chunk must be None, 'auto' or an int >= 1, got {task_chunk!r}")
        if device.type != "cpu":   # a GPU wants the whole batch in one launch
            return None
        widest = max(math.prod(shape) for shape in layer_shapes)
        task_chunk = max(1, AUTO_CHUNK_BYTES // max(1, rows * widest * element_size))
    elif isinstance(task_chunk, bool) or not isinstance(task_chunk, numbers.Integral) or task_chunk < 1:
        raise ValueError(f"task_chunk must be None, 'auto' or an int >= 1, got {task_chunk!r}")
    return None if task_chunk >= tasks else int(task_chunk)


def split_params(model, spec, params=None):
    """(theta_fast, rest): the adapted parameters and everything else functional_call needs
    (BatchNorm parameters and buffers); `params` overrides the model's tensors by name."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    if params is not None:
        unknown = set(params) - set(tensors)
        if unknown:
            raise ValueError(f"params has names the model does not: {sorted(unknown)}")
        tensors.update(params)
    fast = {k: tensors.pop(k) for k in spec.fast}
    return fast, tensors


def task_spans(tasks, chunk):
    """The [start, stop) task ranges of the vmapped calls: all T in one, or `chunk` per call."""
    step = chunk or tasks
    return [(start, min(start + step, tasks)) for start in range(0, tasks, step)]


def call_tasks(one_task, in_dims, inputs, span):
    """one_task's outputs for the tasks in `span`, each with a leading task dim: vmapped, or,
    for a single task (the CPU's default chunk for Conv-4), one plain call. Under vmap a batch
    of one still pays for the batching rules: BatchNorm folds the task dim into its channels
    through copies, and a convolution's bias and grouped weights are rearranged, on every
    forward and backward pass. Inputs and outputs are tensors, or tuples, lists and dicts of
    them (an input may be None)."""
    start, stop = span
    if stop - start == 1:
        part = [x if dim is None else _take(x, start) for x, dim in zip(inputs, in_dims)]
        return _add_task_dim(one_task(*part))
    part = [x if dim is None else _take(x, slice(start, stop)) for x, dim in zip(inputs, in_dims)]
    return torch.func.vmap(one_task, in_dims=in_dims)(*part)


def _take(x, index):
    """x[index] of a tensor, or of every tensor in a dict; None stays None."""
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return None if x is None else x[index]


def _add_task_dim(out):
    """A leading task dim of size 1 on every tensor of a (nested) tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out.unsqueeze(0)
    if isinstance(out, dict):
        return {k: _add_task_dim(v) for k, v in out.items()}
    return type(out)(_add_task_dim(v) for v in out)
