"""Fold BatchNormalization into the Conv / ConvTranspose / Gemm that feeds it.

In inference, ``BN(y) = gamma * (y - mean) / std + beta`` with ``std = sqrt(var + eps)``; for
``y = W x + b`` this is again affine in ``x``:

    W_fused = W * gamma / std          (scaled along the output-channel axis)
    b_fused = (b - mean) * gamma / std + beta

so the BN node disappears and the factorization passes see the weight the model really applies.
onnxscript ships exactly these rewrite rules; this pass only selects them.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

_RULES = [
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
]


def fold_batchnorm(model: ir.Model) -> ir.Model:
    """Return ``model`` with every foldable BatchNormalization folded into its producer.

    The fused node keeps the producer's name (the rewriter names it anew), so that plans and
    ``--only`` / ``--skip`` patterns written against the model's own names still find it."""
    producers = {node.outputs[0].name: producer.name
                 for node in model.graph if node.op_type == "BatchNormalization"
                 and (producer := node.inputs[0].producer()) is not None and producer.name}
    model = rewriter.rewrite(model, pattern_rewrite_rules=_RULES)
    for node in model.graph:
        if node.op_type != "BatchNormalization" and node.outputs \
                and node.outputs[0].name in producers:
            node.name = producers[node.outputs[0].name]
    return model
