"""Built-in and user datasets, as numpy arrays with a held-out test split.

Everything here works offline: the built-ins ship inside scikit-learn or are
generated. A dataset is loaded once per process and cached (`fedsim.caches`), because
every simulated client of a run reads the same arrays and only keeps its indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsim.caches import Snapshot, cached, frozen
from fedsim.config import DataConfig
from fedsim.errors import ConfigError, FedsimError
from fedsim.text import resolve_model_dir, tokenize, topic_corpus


@dataclass(frozen=True)
class Dataset:
    """Train/test arrays plus what a model needs to know about them."""

    name: str
    task: str  # "classification" or "regression"
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int  # 1 for regression
    input_shape: tuple[int, ...]  # per-sample shape, e.g. (1, 8, 8) for digits
    groups_train: np.ndarray | None = field(default=None, repr=False)  # natural client ids
    tokenizer: str = ""  # text data: the model directory that tokenized it (hf-text's default model)
    # How raw file rows become model inputs, so a data holder can transform its own file the
    # same way (`fedsim.node_data`): feature columns, standardization, original label values.
    feature_columns: tuple[str, ...] = ()
    x_shift: np.ndarray | None = field(default=None, repr=False)
    x_scale: np.ndarray | None = field(default=None, repr=False)
    y_shift: float = 0.0
    y_scale: float = 1.0
    label_values: tuple[str, ...] = ()  # classification: original label of class 0, 1, ...

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))


BUILTIN_DESCRIPTIONS = {
    "digits": "scikit-learn digits: 1,797 8x8 images, 10 classes (pixels scaled to [0, 1])",
    "breast-cancer": "scikit-learn breast cancer: 569 samples, 30 features, binary (standardized)",
    "diabetes": "scikit-learn diabetes: 442 samples, 10 features, regression (features and target standardized)",
    "synthetic": "Synthetic(alpha, beta) of FedProx (Li et al. 2020): 60 features, 10 classes, "
                 "one natural group per client; scales to 1,000+ clients",
    "linear": "Gaussian linear model y = x.theta + noise, d = data.linear_dim (regression)",
    "text-topics": "tiny offline topic corpus: sentences of 4 topics (sports, food, technology, weather), "
                   "tokenized with data.tokenizer; for hf-text (needs .[text])",
}


def _split(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, test_fraction: float,
           seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = max(1, int(round(test_fraction * len(y))))
    test, train = order[:n_test], np.sort(order[n_test:])
    g = groups[train] if groups is not None else None
    return x[train], y[train], x[test], y[test], g


def _standardize(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train-split mean and std (the shift and scale applied to every split and data holder)."""
    return x_train.mean(0), x_train.std(0) + 1e-8


def synthetic_fedprox(num_groups: int, alpha: float, beta: float, mean_samples: int,
                      seed: int, dim: int = 60, num_classes: int = 10):
    """Synthetic(alpha, beta) from FedProx (Li et al., MLSys 2020, Sec. 5.1).

    Group k draws u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k, b_k ~ N(u_k, 1);
    v_k ~ N(B_k, 1); x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2); y = argmax(softmax(W_k x + b_k)).
    alpha controls how much the local models differ, beta how much local features differ.
    Group sizes follow a lognormal (the paper's power law) with the given mean.
    """
    rng = np.random.default_rng(seed)
    sigma = np.arange(1, dim + 1) ** -1.2
    sizes = np.maximum(10, rng.lognormal(np.log(mean_samples) - 0.5, 1.0, num_groups).astype(int))
    xs, ys, gs = [], [], []
    for k in range(num_groups):
        u = rng.normal(0, np.sqrt(alpha))
        b_mean = rng.normal(0, np.sqrt(beta))
        w = rng.normal(u, 1, (dim, num_classes))
        b = rng.normal(u, 1, num_classes)
        v = rng.normal(b_mean, 1, dim)
        x = rng.normal(v, np.sqrt(sigma), (sizes[k], dim))
        ys.append(np.argmax(x @ w + b, axis=1))
        xs.append(x)
        gs.append(np.full(sizes[k], k))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.concatenate(gs)


def linear_gaussian(n: int, dim: int, noise: float, seed: int):
    """y = x . theta* + N(0, noise^2), x ~ N(0, I_d): the linear setting of Javanmard et al. 2024."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 1, dim) / np.sqrt(dim)
    x = rng.normal(0, 1, (n, dim)).astype(np.float32)
    y = x @ theta + rng.normal(0, noise, n)
    return x, y.astype(np.float32)


def read_user_file(cfg: DataConfig, feature_columns: tuple[str, ...] = ()):
    """(x, y, groups, feature column names) of a CSV, Parquet or NPZ file, unprocessed.

    `feature_columns` (a data holder's file) selects exactly the experiment's features."""
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"data.path: file not found: {path}")
    import pandas as pd

    if path.suffix == ".npz":
        arrays = np.load(path)
        keys = {k.lower(): k for k in arrays.files}
        if "x" not in keys or "y" not in keys:
            raise ConfigError(f"data.path: an NPZ file needs arrays 'x' and 'y' (found {arrays.files})")
        x, y = arrays[keys["x"]], arrays[keys["y"]]
        groups = arrays[keys["group"]] if "group" in keys else None
        return x.reshape(len(x), -1).astype(np.float32), y, groups, ()
    frame = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    for name, column in (("label_column", cfg.label_column), ("text_column", cfg.text_column)):
        if (column or name == "label_column") and column not in frame.columns:  # a label is required
            raise ConfigError(f"data.{name}: {column!r} is not a column of {path.name}; "
                              f"columns: {', '.join(map(str, frame.columns))}")
    groups = None
    if cfg.partitioner == "natural-id":
        if cfg.natural_id_column not in frame.columns:
            raise ConfigError(f"data.natural_id_column: {cfg.natural_id_column!r} is not a column of {path.name}")
        groups = pd.factorize(frame.pop(cfg.natural_id_column))[0]
    if cfg.text_column:
        texts = frame[cfg.text_column].fillna("").astype(str).tolist()
        x = tokenize(texts, resolve_model_dir(cfg.tokenizer, "data.tokenizer"), cfg.max_length)
        return x, frame[cfg.label_column].to_numpy(), groups, ()
    y = frame.pop(cfg.label_column).to_numpy()
    if feature_columns:
        missing = [c for c in feature_columns if c not in frame.columns]
        if missing:
            raise ConfigError(f"data.path: {path.name} lacks the experiment's feature column(s) "
                              f"{', '.join(map(repr, missing))}")
        frame = frame[list(feature_columns)]
    non_numeric = [c for c in frame.columns if not np.issubdtype(frame[c].dtype, np.number)]
    if non_numeric:
        raise ConfigError(f"data.path: feature column {non_numeric[0]!r} is not numeric; "
                          f"if it is text, set data.text_column = {non_numeric[0]!r} (model hf-text)")
    return frame.to_numpy(np.float32), y, groups, tuple(map(str, frame.columns))


def _infer_task(y: np.ndarray, requested: str) -> str:
    if requested != "auto":
        return requested
    if not np.issubdtype(y.dtype, np.number):
        return "classification"
    is_integral = np.all(np.mod(y, 1) == 0)
    return "classification" if is_integral and len(np.unique(y)) <= 100 else "regression"


def _load(cfg: DataConfig, num_clients: int, seed: int) -> Dataset:
    from sklearn import datasets as skd

    groups, columns = None, ()
    name = cfg.dataset
    if name == "digits":
        d = skd.load_digits()
        x, y, task, shape = (d.data / 16.0).astype(np.float32), d.target, "classification", (1, 8, 8)
    elif name == "breast-cancer":
        d = skd.load_breast_cancer()
        x, y, task, shape = d.data.astype(np.float32), d.target, "classification", (30,)
    elif name == "diabetes":
        d = skd.load_diabetes()
        x, y, task, shape = d.data.astype(np.float32), d.target.astype(np.float32), "regression", (10,)
    elif name == "synthetic":
        x, y, groups = synthetic_fedprox(num_clients, cfg.synthetic_alpha, cfg.synthetic_beta,
                                         cfg.synthetic_samples, seed)
        task, shape = "classification", (60,)
    elif name == "linear":
        x, y = linear_gaussian(cfg.synthetic_samples * num_clients, cfg.linear_dim, cfg.linear_noise, seed)
        task, shape = "regression", (cfg.linear_dim,)
    elif name == "text-topics":
        texts, y = topic_corpus(cfg.synthetic_samples * num_clients, seed)
        x = tokenize(texts, resolve_model_dir(cfg.tokenizer, "data.tokenizer"), cfg.max_length)
        task, shape = "classification", (x.shape[1],)
    else:
        x, y, groups, columns = read_user_file(cfg)
        task, shape = _infer_task(y, cfg.task), (x.shape[1],)
    if cfg.task != "auto":
        task = cfg.task
    if cfg.classes:
        if task != "classification":
            raise ConfigError("data.classes: only classification datasets have classes")
        keep = np.isin(y, cfg.classes)
        if not keep.any():
            raise ConfigError(f"data.classes: none of {cfg.classes} occurs in {name}")
        x, y = x[keep], y[keep]
        groups = groups[keep] if groups is not None else None
    label_values: tuple[str, ...] = ()
    if task == "classification":
        values, y = np.unique(y, return_inverse=True)
        y, num_classes, label_values = y.astype(np.int64), len(values), tuple(map(str, values))
    else:
        if not np.issubdtype(np.asarray(y).dtype, np.number):
            raise ConfigError(f"data.label_column: regression needs a numeric label column, "
                              f"got values like {y[0]!r}")
        y = np.asarray(y, dtype=np.float32)
        num_classes = 1
    x_tr, y_tr, x_te, y_te, g_tr = _split(x, y, groups, cfg.test_fraction, seed)
    is_text = name == "text-topics" or cfg.text_column != ""
    x_shift = x_scale = None
    if name in ("breast-cancer", "diabetes", "file") and not is_text:
        x_shift, x_scale = _standardize(x_tr)
        x_tr, x_te = (x_tr - x_shift) / x_scale, (x_te - x_shift) / x_scale
    mu, sd = 0.0, 1.0
    if task == "regression" and name in ("diabetes", "file"):
        # Standardize the target on train statistics so one learning rate fits every dataset;
        # MSE is then in units of the target's variance.
        mu, sd = float(y_tr.mean()), float(y_tr.std() + 1e-8)
        y_tr, y_te = (y_tr - mu) / sd, (y_te - mu) / sd
    if len(y_tr) == 0:
        raise FedsimError("data: the training split is empty; lower data.test_fraction")
    tokenizer = str(resolve_model_dir(cfg.tokenizer, "data.tokenizer")) if is_text else ""
    return Dataset(name=name, task=task, x_train=x_tr.astype(np.float32), y_train=y_tr,
                   x_test=x_te.astype(np.float32), y_test=y_te, num_classes=num_classes, input_shape=shape,
                   groups_train=g_tr, tokenizer=tokenizer, feature_columns=columns, x_shift=x_shift,
                   x_scale=x_scale, y_shift=mu, y_scale=sd, label_values=label_values)


def load_dataset(cfg: DataConfig, num_clients: int, seed: int) -> Dataset:
    """The dataset of an experiment, cached per process on a snapshot of `cfg` (`fedsim.caches`)."""
    return _load_cached(frozen(cfg), num_clients, seed)


@cached(maxsize=8)
def _load_cached(cfg: Snapshot, num_clients: int, seed: int) -> Dataset:
    return _load(cfg.thaw(), num_clients, seed)
