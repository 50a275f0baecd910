"""Run the BKN authors' TensorFlow code and write reference files for tests/models/test_authors.py.

    python tools/authors_reference.py PATH/TO/Kalman-Normalization [--out tests/models/authors]

PATH is a checkout of github.com/wanggrun/Kalman-Normalization (commit 77fb650). Needs a
TensorFlow 2 and tensorpack 0.11 from PyPI (`pip install tensorflow-cpu tf-keras tensorpack numpy`),
in their own environment: nothing here imports bknbench or torch.

What runs: their `KalmanNorm/kalman_norm.py` (the layer) and the `Model` of their
`KalmanNorm/cifar-kn-microbatch.py` (the network, n = 1 block per stage: 7 KN layers),
loaded from their files, under `tf.compat.v1` graph mode. The load-time edits, each
checked to apply exactly once, change imports and Python-2 / GPU-only lines, nothing of the
math (`EDITS`). Three names are replaced after loading, to observe and to feed, not to
compute: `split_num` (the number of groups of the case), `KN` (a wrapper that records
each layer's outputs) and `tf.random_normal` (a placeholder fed with numpy's standard
normal draws, so bknbench can be given the same draws).

Each case: inputs, weights and draws from `case_arrays` (numpy, seeded; the test makes the
same), 3 training steps (forward in training mode, gradients of the cross-entropy, the
layers' EMA updates, plain SGD on the weights in numpy), then an eval forward of another
batch. Written per case (float32): per step the logits, the loss, each KN layer's
(mean, variance) output per group (the posterior; the stem's as fused_batch_norm returns
it), each layer's output mean and mean square per sample and channel, the gradient at
`GRAD_SAMPLES` fixed entries of each parameter and its norm; after the steps every
layer's running mean and variance, and the eval logits.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import numpy as np

# (map size, forward batch N, micro-batch size): 8x8 and 16x16, micro-batch 1 and 2, one and
# four groups, 32x32 with 16 groups, and 4x4 at micro-batch 1 (1x1 maps in the last stage)
CASES = {
    "m8_n2_b1": (8, 2, 1),
    "m8_n2_b2": (8, 2, 2),
    "m16_n8_b2": (16, 8, 2),
    "m16_n4_b1": (16, 4, 1),
    "m32_n32_b2": (32, 32, 2),
    "m4_n2_b1": (4, 2, 1),
}
STEPS = 3
LR = 0.02  # plain SGD on the cross-entropy, per step
GRAD_SAMPLES = 64  # gradient entries kept per parameter
WIDTHS = (16, 32, 64)
CLASSES = 10

# their name -> bknbench's (models/resnet.py, n = 1: blocks 0, 1, 2)
LAYERS = {"kn0": "stem_norm", "res1.0/kn1": "blocks.0.norm2", "res2.0/kn": "blocks.1.norm1",
          "res2.0/kn1": "blocks.1.norm2", "res3.0/kn": "blocks.2.norm1",
          "res3.0/kn1": "blocks.2.norm2", "knlast": "final_norm"}
CONVS = {"conv0": "stem_conv"}
for _s in (1, 2, 3):
    CONVS[f"res{_s}.0/conv1_kn/conv1"] = f"blocks.{_s - 1}.conv1"
    CONVS[f"res{_s}.0/conv2_kn/conv2"] = f"blocks.{_s - 1}.conv2"

# load-time edits: (file, old, new); imports, Python 2 and a GPU assertion only
EDITS = [
    ("kalman_norm.py", "import tensorflow as tf\n",
     "import tensorflow.compat.v1 as tf\n"),
    ("kalman_norm.py", "from tensorflow.contrib.framework import add_model_variable\n",
     "add_model_variable = lambda v: tf.add_to_collection(tf.GraphKeys.MODEL_VARIABLES, v)\n"),
    ("kalman_norm.py", "from tensorpack.tfutils.common import get_tf_version_number\n",
     "get_tf_version_number = lambda: 2.0\n"),
    ("cifar-kn-microbatch.py", "import tensorflow as tf\n",
     "import tensorflow.compat.v1 as tf\n"),
    ("cifar-kn-microbatch.py", "print v.get_shape().as_list()", "pass"),
    ("cifar-kn-microbatch.py", "assert tf.test.is_gpu_available()", "pass"),
]


# ---------------------------------------------------------------- inputs (numpy only)
def param_shapes() -> dict[str, tuple[int, ...]]:
    """bknbench parameter name -> shape (torch layout), ResNet with n = 1, 3 input channels."""
    shapes = {"stem_conv.weight": (16, 3, 3, 3)}
    c_in = WIDTHS[0]
    for b, c in enumerate(WIDTHS):
        if b:
            shapes[f"blocks.{b}.norm1.weight"] = shapes[f"blocks.{b}.norm1.bias"] = (c_in,)
        shapes[f"blocks.{b}.conv1.weight"] = (c, c_in, 3, 3)
        shapes[f"blocks.{b}.conv2.weight"] = (c, c, 3, 3)
        shapes[f"blocks.{b}.norm2.weight"] = shapes[f"blocks.{b}.norm2.bias"] = (c,)
        c_in = c
    for norm, c in (("stem_norm", 16), ("final_norm", 64)):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (c,)
    shapes["fc.weight"], shapes["fc.bias"] = (CLASSES, 64), (CLASSES,)
    return dict(sorted(shapes.items()))


def case_arrays(name: str) -> dict:
    """Inputs, labels, weights (torch layout), the noise of every transition draw per step
    (in draw order, each (1, H, W, C * G) as the authors draw it), and the gradient entries
    kept. Deterministic in the case name."""
    size, n, _ = CASES[name]
    rng = np.random.default_rng([20, size, n, CASES[name][2]])
    f32 = np.float32
    out = {"x": rng.standard_normal((STEPS, n, 3, size, size)).astype(f32),
           "labels": rng.integers(0, CLASSES, (STEPS, n)),
           "x_eval": rng.standard_normal((n, 3, size, size)).astype(f32),
           "params": {}, "grad_index": {}}
    for key, shape in param_shapes().items():
        if key.endswith("conv1.weight") or key.endswith("conv2.weight") or key == "stem_conv.weight":
            w = rng.standard_normal(shape) * np.sqrt(2.0 / (shape[0] * 9))  # He, fan_out
        elif key.endswith(".weight") and len(shape) == 1:
            w = 1.0 + 0.2 * rng.standard_normal(shape)  # gamma
        else:
            w = 0.2 * rng.standard_normal(shape)  # beta, fc
        out["params"][key] = w.astype(f32)
        size_ = int(np.prod(shape))
        out["grad_index"][key] = np.sort(rng.choice(size_, min(GRAD_SAMPLES, size_),
                                                    replace=False))
    out["noise_seed"] = [21, size, n, CASES[name][2]]
    return out


def noise_draws(arrays: dict, shapes: list[tuple[int, ...]]) -> list[list[np.ndarray]]:
    """Per step, one standard-normal array per transition draw of the given shapes."""
    rng = np.random.default_rng(arrays["noise_seed"])
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(STEPS)]


# ---------------------------------------------------------------- their code
def load_authors(root: Path):
    """Their kalman_norm module and cifar-kn-microbatch module, with `EDITS` applied."""
    mods = {}
    for file, modname in (("kalman_norm.py", "kalman_norm"),
                          ("cifar-kn-microbatch.py", "cifar_kn_microbatch")):
        text = (root / "KalmanNorm" / file).read_text()
        for f, old, new in EDITS:
            if f == file:
                if text.count(old) != 1:
                    sys.exit(f"edit not applicable to {file}: {old!r}")
                text = text.replace(old, new)
        mod = types.ModuleType(modname)
        mod.__file__ = str(root / "KalmanNorm" / file)
        sys.modules[modname] = mod
        exec(compile(text, mod.__file__, "exec"), mod.__dict__)
        mods[modname] = mod
    return mods["kalman_norm"], mods["cifar_kn_microbatch"]


def run_case(root: Path, name: str) -> dict:
    import tensorflow.compat.v1 as tf
    from tensorpack.tfutils.tower import TowerContext

    tf.disable_v2_behavior()
    tf.reset_default_graph()
    _, model_mod = load_authors(root)
    size, n, micro = CASES[name]
    groups = n // micro
    model_mod.split_num = groups
    records, draws = [], []
    real_kn = model_mod.KN

    def kn(layer, *args, **kw):
        out = real_kn(layer, *args, **kw)
        records.append((tf.get_variable_scope().name, layer, out))
        return out

    def random_normal(shape, mean=0.0, stddev=1.0, dtype=tf.float32):
        ph = tf.placeholder(dtype, shape)
        draws.append(ph)
        return ph * stddev + mean if (mean, stddev) != (0, 1.0) else ph

    model_mod.KN = kn
    model_mod.tf = types.SimpleNamespace(**{k: getattr(tf, k) for k in dir(tf)
                                            if not k.startswith("__")})
    model_mod.tf.random_normal = random_normal

    image = tf.placeholder(tf.float32, [n, size, size, 3])
    label = tf.placeholder(tf.int32, [n])
    model = model_mod.Model(n=1)
    with TowerContext("", is_training=True):
        model.build_graph(image, label)
    graph = tf.get_default_graph()
    logits = graph.get_tensor_by_name("linear/output:0")
    loss = graph.get_tensor_by_name("cross_entropy_loss:0")
    train_layers = [(f"{scope}/{layer}".strip("/"), out) for scope, layer, out in records]
    n_draws = len(draws)
    with TowerContext("", is_training=False), tf.variable_scope(tf.get_variable_scope(),
                                                                   reuse=True):
        eval_logits = build_logits(model, image, label, graph)
    params = {v.op.name: v for v in tf.global_variables()}
    names = {v.op.name for v in tf.trainable_variables()}
    trainable = {torch_name(k): v for k, v in params.items() if k in names}
    grads = dict(zip(trainable, tf.gradients(loss, list(trainable.values()))))
    updates = tf.get_collection(tf.GraphKeys.UPDATE_OPS)

    arrays = case_arrays(name)
    shapes = [tuple(d.shape.as_list()) for d in draws[:n_draws]]
    noise = noise_draws(arrays, shapes)
    out = {"draw_shapes": np.array(shapes)}
    sess = tf.Session()
    sess.run(tf.global_variables_initializer())
    weights = {k: w.copy() for k, w in arrays["params"].items()}
    for step in range(STEPS):
        for key, var in trainable.items():
            var.load(to_tf(weights[key]), sess)
        feed = {image: arrays["x"][step].transpose(0, 2, 3, 1) * 128.0,  # they divide by 128
                label: arrays["labels"][step]}
        feed.update(zip(draws[:n_draws], noise[step]))
        fetched = sess.run({"logits": logits, "loss": loss, "grads": grads,
                            "layers": [o for _, o in train_layers], "updates": updates}, feed)
        out[f"step{step}/logits"], out[f"step{step}/loss"] = fetched["logits"], fetched["loss"]
        for (layer, _), (y, mean, var) in zip(train_layers, fetched["layers"]):
            key = f"step{step}/{LAYERS[layer]}"
            c = y.shape[-1]
            out[f"{key}/mean"], out[f"{key}/var"] = mean.reshape(groups, c), var.reshape(groups, c)
            out[f"{key}/y_mean"] = y.mean(axis=(1, 2))  # (N, C)
            out[f"{key}/y_sq"] = np.square(y).mean(axis=(1, 2))
        for key, g in fetched["grads"].items():
            g = from_tf(g)
            out[f"step{step}/grad/{key}"] = g.reshape(-1)[arrays["grad_index"][key]]
            out[f"step{step}/grad_norm/{key}"] = np.float32(np.linalg.norm(g))
            weights[key] = (weights[key] - LR * g).astype(np.float32)
    for layer, torch_layer in LAYERS.items():
        out[f"running/{torch_layer}/mean"] = sess.run(params[f"{layer}/mean/EMA"])
        out[f"running/{torch_layer}/var"] = sess.run(params[f"{layer}/variance/EMA"])
    for key, var in trainable.items():
        var.load(to_tf(weights[key]), sess)
    out["eval/logits"] = sess.run(eval_logits,
                                  {image: arrays["x_eval"].transpose(0, 2, 3, 1) * 128.0})
    return {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else v
            for k, v in out.items()}


def build_logits(model, image, label, graph):
    """The model rebuilt in eval mode on the same variables; its logits tensor."""
    before = {op.name for op in graph.get_operations()}
    model.build_graph(image, label)
    softmax = [op for op in graph.get_operations() if op.name not in before
               and op.type == "Softmax"]  # tf.nn.softmax(logits, name='output')
    return softmax[0].inputs[0]


def torch_name(tf_name: str) -> str:
    """Their variable name -> bknbench's parameter name."""
    base, _, leaf = tf_name.rpartition("/")
    if base == "linear":
        return {"W": "fc.weight", "b": "fc.bias"}[leaf]
    if base in CONVS:
        return f"{CONVS[base]}.weight"
    return f"{LAYERS[base]}.{ {'gamma': 'weight', 'beta': 'bias'}[leaf] }"


def to_tf(w: np.ndarray) -> np.ndarray:
    """torch layout -> TF: conv (O, I, kh, kw) -> (kh, kw, I, O); linear (O, I) -> (I, O)."""
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    return w.T if w.ndim == 2 else w


def from_tf(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:
        return w.transpose(3, 2, 0, 1)
    return w.T if w.ndim == 2 else w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("authors", type=Path, help="checkout of wanggrun/Kalman-Normalization")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests/models/authors")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain float32 kernels
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tensorpack's tf.layers (pip tf-keras)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.cases.split(","):
        np.savez_compressed(args.out / f"{name}.npz", **run_case(args.authors, name))
        print(f"wrote {args.out / name}.npz")


if __name__ == "__main__":
    main()
