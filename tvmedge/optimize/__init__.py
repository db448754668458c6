"""Model compression rewrites on the Relax graph, each checked against the original model.

One module per concern:

* ``data``      - calibration and evaluation sets (built-in, ``.npz``, a folder of images);
* ``check``     - run a model on this host, compare outputs, score accuracy / mIoU;
* ``observers`` - activation statistics -> quantization parameters (min/max, percentile, KL);
* ``quantize``  - int8 post-training quantization (real int8 ops, int32 accumulation);
* ``lowrank``   - truncated-SVD / Tucker-2 factorization of dense, matmul and conv layers;
* ``compact``   - compact-filter rewrites (K×1·1×K, depthwise+pointwise) fitted by least squares;
* ``cli``       - ``tvmedge optimize`` and the same flags on ``tvmedge compile``.

Every rewrite has the same shape: ``rewrite(model, ...) -> (new_model, report)`` where
``model`` is a :class:`tvmedge.frontend.ImportedModel` and ``report`` a plain dict
(``{"rewrite": name, "layers": [...], "skipped": [{"layer", "reason"}], ...}``).
"""
