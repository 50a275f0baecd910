"""The numerical core, below every layer: it knows tensors, not normalizers or models.

Public names (import them from their modules): ``reference.normalize``,
``reference.kalman_update``, ``reference.guarded_gain``, ``reference.running_variance``,
``reference.ema_over_groups``, ``reference.relu_moments``, ``reference.affine_moments``; ``fused.group_normalize``, ``fused.group_moments``,
``fused.Running`` and ``fused.update_running`` (a layer's running statistics);
``relu.relu_affine_moments``; ``borders.conv_moments``, ``borders.relu_conv_moments``,
``borders.pool_moments``; ``native.module``, ``native.status``, ``native.disabled``;
``reference.full_precision`` (no autocast rounding of statistics), ``reference.to_device``
(host values to a device without a sync), ``fused.eval_form_backward``.

- ``reference``: the pure formulas (group moments, normalize, kalman_update, EMA over groups,
  Gaussian moments through ReLU and affine maps). They define every value.
- ``fused``: the same math as hand-written autograd nodes (``group_normalize``,
  ``group_moments``), tested against ``reference``.
- ``relu``: ReLU then a linear or convolution layer on Gaussian moments, one node
  (``relu_affine_moments``), tested against ``reference``.
- ``borders``: exact per-channel moments through convolutions and average pooling with
  zero padding and borders (output positions grouped by border pattern), and ReLU then a
  convolution as one autograd node; `reference.conv_moments_by_maps` is their reference.
- ``native``: the C++ CPU kernels of those nodes (``csrc/fused_cpu.cpp``); built by
  ``python -m bknbench.kernels.native``, used when present, the PyTorch nodes otherwise.

To add a kernel: its formula in ``reference.py``, its node in ``fused.py`` (or a file of its
own here), and a test that holds the node to the formula, values and gradients.
"""
