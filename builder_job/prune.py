"""Structured channel pruning with torch-pruning's DepGraph.

Removing whole channels (not zeroing weights) is what makes dense compute smaller on every
backend: the exported ONNX simply has narrower convolutions. DepGraph finds every layer
coupled to a pruned channel (BatchNorm, the next conv's input, residual partners) so the
pruned model stays valid.

Only eager `nn.Module`s can be pruned: a TorchScript module or a torch.export graph has
no module structure DepGraph can rewrite, so those raise PRUNING_UNSUPPORTED.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from builder_job.errors import BuildError
from optimodel.build import BuildReason

METHODS = ("l1", "l2", "taylor")


@dataclass
class PruneResult:
    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


def _count(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def _output_layers(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    """The Conv/Linear layers whose outputs are the model's outputs (the classifier head).

    Their output channels are the model's contract (class count, embedding width), so they
    must never be pruned. The last prunable layer to run is taken as the head; any layer
    whose output tensor is returned directly is added too (multi-output models).
    """
    order: list[nn.Module] = []
    produced: dict[int, nn.Module] = {}

    def hook(module, _inputs, output):
        order.append(module)
        if isinstance(output, torch.Tensor):
            produced[id(output)] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            outputs = model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    heads = [order[-1]] if order else []
    flat = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    for out in flat:
        if isinstance(out, torch.Tensor) and id(out) in produced and produced[id(out)] not in heads:
            heads.append(produced[id(out)])
    return heads


def _self_supervised_loss(model: nn.Module, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(*data)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.ndim == 2 and out.shape[1] > 1:
        return nn.functional.cross_entropy(out, out.detach().argmax(1))
    return out.float().pow(2).mean()


def prune_model(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    ratio: float,
    method: str = "l2",
    round_to: int = 8,
    data: tuple[torch.Tensor, ...] | None = None,
) -> PruneResult:
    """Remove `ratio` of the channels of every prunable layer, ranked by group magnitude.

    `method` is "l1" or "l2" (GroupMagnitudeImportance with p=1 or 2: a channel's importance
    is the norm of every weight coupled to it across the dependency group). "taylor" is
    torch-pruning's TaylorImportance (|weight x gradient|, first-order estimate of the loss change
    when a channel goes) with gradients of a loss on `data`, a batch of real inputs: there are no
    labels, so the loss is the cross-entropy of the model against its own predictions (the mean
    square of its outputs when they are not class scores).

    Channel counts are rounded to multiples of `round_to` (8 = what fp16/int8 tensor cores
    and VNNI kernels want). The caller's model is left untouched (it is still needed as the
    distillation teacher); the pruned copy is returned in eval mode.
    """
    import torch_pruning as tp

    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED,
                         f"cannot prune a {type(model).__name__}: pruning needs an eager PyTorch module "
                         "(format 'pytorch' with an entrypoint)")
    if not 0.0 < ratio < 1.0:
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED, f"pruning ratio must be in (0, 1), got {ratio}")
    if method == "taylor" and data is None:
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED,
                         "pruning method 'taylor' needs gradients on real inputs: set "
                         "optimization.pruning.distillation.datasetUri or optimization.calibration.datasetUri")
    if method not in METHODS:
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED, f"unknown pruning method {method!r}; use one of {METHODS}")

    pruned = copy.deepcopy(model).eval()
    if not any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in pruned.modules()):
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED, "the model has no Conv or Linear layers to prune")
    try:
        macs_before, params_before = _count(pruned, example_inputs)
        heads = _output_layers(pruned, example_inputs)
        if method == "taylor":
            importance = tp.importance.TaylorImportance()
        else:
            importance = tp.importance.GroupMagnitudeImportance(p=1 if method == "l1" else 2)
        pruner = tp.pruner.MetaPruner(
            pruned,
            example_inputs,
            importance=importance,
            pruning_ratio=ratio,
            ignored_layers=heads,
            round_to=round_to,
        )
        if method == "taylor":
            _self_supervised_loss(pruned, data).backward()
        pruner.step()
        pruned.zero_grad(set_to_none=True)
        pruned.eval()
        macs_after, params_after = _count(pruned, example_inputs)
        with torch.no_grad():
            pruned(*example_inputs)  # the rewritten graph must still run
    except BuildError:
        raise
    except Exception as exc:  # torch-pruning raises bare errors on graphs it cannot trace
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED, f"torch-pruning failed: {type(exc).__name__}: {exc}") from exc
    if macs_after >= macs_before:
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED,
                         f"pruning at ratio {ratio} removed no compute ({macs_before} MACs before and after)")
    return PruneResult(pruned, macs_before, macs_after, params_before, params_after)
