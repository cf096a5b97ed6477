"""Built-in and user datasets, as numpy arrays with a held-out test split.

Everything here works offline: the built-ins ship inside scikit-learn or are
generated. A dataset is loaded once per process and cached (`fedsim.caches`), because
every simulated client of a run reads the same arrays and only keeps its indices.

A user file (CSV, Parquet, NPZ) is prepared in one place, for the server and for a data
holder that trains on its own file (`fedsim.node_data`) alike: `read_user_file` reads it,
refuses what cannot be trained on and applies the missing-value policy (`data.missing`);
`encode` turns its rows into model inputs with an `Encoding` (numeric columns standardized,
categorical columns one-hot). The server fits the encoding on the training split only
(`fit_encoding`), so nothing of the test split leaks into the inputs, and sends it to data
holders, so identical rows become identical inputs wherever they are read.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.caches import Snapshot, Source, cached, file_source, frozen, module_source, on_disk
from fedsim.config import MAX_WIDTH, WHY_MEMORY, DataConfig
from fedsim.errors import ConfigError, FedsimError
from fedsim.text import resolve_model_dir, tokenize, topic_corpus

log = logging.getLogger("fedsim")


@dataclass(frozen=True)
class Encoding:
    """How raw feature columns become model inputs; fitted on the training split.

    ``columns`` are the file's feature columns in input order: the numeric ones, then the
    categorical ones, which ``categories`` lists with the categories the training split holds
    (sorted). The inputs are the numeric columns, then one 0/1 input per (column, category),
    the layout and names of ``pandas.get_dummies``; a category the training split never saw
    encodes as all zeros. ``shift`` and ``scale`` standardize every input, (x - shift) / scale:
    the training mean and std for numeric inputs, 0 and 1 for one-hot inputs. An NPZ file or a
    built-in has no columns: its array is the input (standardized where ``shift`` is set).
    """

    columns: tuple[str, ...] = ()
    categories: tuple[tuple[str, tuple[str, ...]], ...] = ()
    shift: np.ndarray | None = field(default=None, repr=False)
    scale: np.ndarray | None = field(default=None, repr=False)

    @property
    def numeric(self) -> tuple[str, ...]:
        return self.columns[:len(self.columns) - len(self.categories)]

    @property
    def input_names(self) -> tuple[str, ...]:
        """One name per model input: the numeric column, or ``column_category`` (pandas' naming)."""
        return self.numeric + tuple(f"{col}_{cat}" for col, cats in self.categories for cat in cats)


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
    # The validation split (`hold_out_validation`): training rows held out centrally, the only
    # data model selection may read. None when data.validation_fraction = 0.
    x_val: np.ndarray | None = field(default=None, repr=False)
    y_val: np.ndarray | None = field(default=None, repr=False)
    tokenizer: str = ""  # text data: the model directory that tokenized it (hf-text's default model)
    # How raw rows become model inputs and labels, so that a data holder can transform its own
    # file the same way (`fedsim.node_data`): the feature encoding, the target's standardization
    # (regression) and the original label of class 0, 1, ... (classification).
    encoding: Encoding = field(default_factory=Encoding, repr=False)
    y_shift: float = 0.0
    y_scale: float = 1.0
    label_values: tuple[str, ...] = ()
    # Where y_shift and y_scale come from: "public" (a stated or documented range, or no
    # standardization) or "train" (the training labels' own mean and std: statistics of the
    # private labels that no accountant covers, so label-DP claims refuse them).
    label_stats: str = "public"

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))


@dataclass(frozen=True)
class Rows:
    """A dataset's rows before the split and the encoding: a table of raw feature columns
    (CSV, Parquet) or an array (NPZ, built-ins, tokenized text), labels and natural client ids."""

    features: Any  # pandas.DataFrame or np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    categorical: tuple[str, ...] = ()  # table columns that are one-hot encoded

    def take(self, rows: np.ndarray) -> Rows:
        features = self.features.iloc[rows] if _is_table(self.features) else self.features[rows]
        groups = self.groups[rows] if self.groups is not None else None
        return Rows(features, self.y[rows], groups, self.categorical)


BUILTIN_DESCRIPTIONS = {
    "digits": "scikit-learn digits: 1,797 8x8 images, 10 classes (pixels scaled to [0, 1])",
    "breast-cancer": "scikit-learn breast cancer: 569 samples, 30 features, binary (standardized)",
    "diabetes": "scikit-learn diabetes: 442 samples, 10 features, regression (features standardized, "
                "the target by its documented range)",
    "synthetic": "Synthetic(alpha, beta) of FedProx (Li et al. 2020): 60 features, 10 classes, "
                 "one natural group per client; scales to 1,000+ clients",
    "linear": "Gaussian linear model y = x.theta + noise, d = data.linear_dim (regression)",
    "text-topics": "tiny offline topic corpus: sentences of 4 topics (sports, food, technology, weather), "
                   "tokenized with data.tokenizer; for hf-text (needs .[text])",
}


# Central evaluation needs this many held-out samples at least (and one per class): with 4,
# a model guessing at random scores 100% on a binary task with probability 2^-4 = 6%, with 5
# it is 3%, below the usual 5%; and with fewer samples than classes some class cannot occur.
MIN_TEST_SAMPLES = 5


def _split_rows(n: int, test_fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: a seeded permutation, the first round(fraction * n) rows held out.

    A test split too small to tell a trained model from chance is refused, with the
    fraction that would do."""
    need = max(MIN_TEST_SAMPLES, num_classes)
    n_test = int(round(test_fraction * n))
    if n_test < need:
        fraction = math.ceil(need / n * 1000) / 1000 if n else math.inf
        fix = (f"set data.test_fraction >= {fraction}" if fraction <= 0.5
               else "the data has too few rows for a meaningful held-out split")
        raise ConfigError(f"data.test_fraction: {test_fraction} of {n} samples holds out {n_test}; central "
                          f"evaluation needs at least {need} = max({MIN_TEST_SAMPLES}, classes) test samples "
                          f"(with fewer, some class cannot occur or chance alone scores 100% more than 5% "
                          f"of the time); {fix}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), order[:n_test]


def _standardize(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train-split mean and std (the shift and scale applied to every split and data holder).
    In float32, as always; in float64 where float32 overflows (the squares of values above
    1.8e19 do), so a large value is standardized rather than turned into NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        shift, scale = x_train.mean(0), x_train.std(0) + 1e-8
    if np.isfinite(shift).all() and np.isfinite(scale).all():
        return shift, scale
    x = np.asarray(x_train, np.float64)
    return x.mean(0).astype(np.float32), (x.std(0) + 1e-8).astype(np.float32)


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


# --------------------------------------------------------------------------- user files

def _is_table(features: Any) -> bool:
    return hasattr(features, "columns")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _text(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


def category_text(values: Any) -> np.ndarray:
    """Each value as the text that names its category or class, whatever type a file gave it:
    2, 2.0 and '2' are all '2', True is 'True'. The server and data holders match categories
    and labels by this text, since one file may read a column as numbers and another as text."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":  # a built-in's labels: without pandas
        uniques, codes = np.unique(values, return_inverse=True)  # NaNs are one unique, whose text is 'nan'
        return np.array([_text(u) for u in uniques.tolist()], dtype=object)[codes.reshape(-1)]
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(values), use_na_sentinel=True)
    texts = np.array([_text(u) for u in uniques] + ["nan"], dtype=object)
    return texts[codes]  # a missing value (code -1) reads 'nan'; the missing policy ran before


def _column_kind(series: Any) -> str | None:
    """'numeric', 'categorical' (strings, pandas categoricals, booleans) or None (not supported)."""
    import pandas as pd
    from pandas.api import types

    dtype = series.dtype
    if types.is_object_dtype(dtype) and not _scalar_cells(series):
        return None  # lists, dicts, arrays or bytes in a cell (a Parquet list column): no category of its own
    if (types.is_bool_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype)
            or types.is_string_dtype(dtype) or types.is_object_dtype(dtype)):
        return "categorical"
    if types.is_numeric_dtype(dtype) and not types.is_complex_dtype(dtype):
        return "numeric"
    return None


def _scalar_cells(series: Any) -> bool:
    """Whether every cell of an object column is a text, a number, a boolean or missing."""
    kinds = set(map(type, series.to_numpy()))
    return all(k is type(None) or issubclass(k, (str, int, float, bool, np.generic)) for k in kinds)


def _missing_mask(series: Any) -> np.ndarray:
    """Rows where a column has no value: NaN, None, NA, NaT, or an empty / blank string."""
    import pandas as pd

    if _column_kind(series) == "numeric":
        return series.isna().to_numpy()
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    blank = np.array([isinstance(u, str) and not u.strip() for u in uniques] + [True], dtype=bool)
    return blank[codes]  # code -1 (NA) indexes the trailing True


def _apply_missing_policy(n: int, masks: dict[str, np.ndarray], policy: str, source: str,
                          what: str) -> np.ndarray | None:
    """The rows to keep under ``data.missing`` (None: every row is complete).

    ``masks`` maps each used column to its rows without a value. "drop" keeps the complete
    rows and says so in one log line with the count per column; "error" refuses in one line."""
    incomplete = np.zeros(n, bool)
    for mask in masks.values():
        incomplete |= mask
    dropped = int(incomplete.sum())
    if dropped == 0:
        return None
    counts = [f"{name} {int(mask.sum())}" for name, mask in masks.items() if mask.any()]
    if len(counts) > 10:
        counts = counts[:10] + [f"and {len(counts) - 10} more columns"]
    per_column = ", ".join(counts)
    if policy == "error":
        raise ConfigError(f"data.missing: {source} has missing values (NaN, None or empty) in {dropped} of {n} "
                          f"rows, per column: {per_column}; fill them in, or set data.missing = \"drop\" to "
                          f"drop those rows")
    if dropped == n:
        raise ConfigError(f"{what}: every row of {source} has a missing value (per column: {per_column}); "
                          f"nothing is left to train on")
    log.warning("data: dropped %d of %d rows of %s with missing values (per column: %s); "
                "data.missing = \"error\" refuses them instead", dropped, n, source, per_column)
    return ~incomplete


# Inputs and labels become float32, whose largest value is 3.4e38: a larger one would turn
# into infinity there, and into NaN once standardized.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _refuse_infinite(name: str, values: np.ndarray, source: str, what: str) -> None:
    if np.issubdtype(values.dtype, np.floating):
        bad = int(np.isinf(values).sum())
        if bad:
            raise ConfigError(f"{what}: {name} of {source} holds {bad} infinite value(s); fedsim needs finite "
                              f"numbers (replace them, or leave the cells empty to count them as missing)")
    if np.issubdtype(values.dtype, np.number) and values.size:
        with np.errstate(invalid="ignore"):
            large = np.abs(values.astype(np.float64)) > FLOAT32_MAX
        if large.any():
            raise ConfigError(f"{what}: {name} of {source} holds {int(large.sum())} value(s) beyond float32's range "
                              f"(e.g. {values[large][0]:g}; at most {FLOAT32_MAX:.3g}), which training computes in; "
                              f"rescale the column")


def _array_masks(x: np.ndarray, y: np.ndarray, x_name: str = "x", y_name: str = "y") -> dict[str, np.ndarray]:
    """The missing values of an array dataset: NaN per feature, NaN or an empty string per label."""
    masks: dict[str, np.ndarray] = {}
    flat = x.reshape(len(x), -1)
    if np.issubdtype(flat.dtype, np.floating):
        nan = np.isnan(flat)
        for j in np.flatnonzero(nan.any(0)):
            masks[f"{x_name}[:, {j}]"] = nan[:, j]
    if np.issubdtype(y.dtype, np.floating):
        masks[y_name] = np.isnan(y)
    elif not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
        import pandas as pd

        masks[y_name] = _missing_mask(pd.Series(y, dtype=object))
    return masks


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays 'x', 'y' and (optional) 'group' of an NPZ file, loaded without pickle."""
    import zipfile
    import zlib

    if not zipfile.is_zipfile(path):
        raise ConfigError(f"data.path: {path} is not an NPZ file (not a zip archive of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = {k.lower(): k for k in archive.files}
            if "x" not in keys or "y" not in keys:
                raise ConfigError(f"data.path: an NPZ file needs arrays 'x' and 'y' ({path} has "
                                  f"{', '.join(archive.files) or 'none'})")
            return {k: archive[keys[k]] for k in ("x", "y", "group") if k in keys}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ConfigError(f"data.path: {path} holds pickled Python objects (an object array); fedsim loads "
                              f"NPZ files with allow_pickle=False: save arrays of numbers or strings") from None
        raise ConfigError(f"data.path: {path} is a corrupt NPZ file ({_first_line(exc)})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ConfigError(f"data.path: {path} is a corrupt NPZ file ({_first_line(exc)})") from None


def _npz_rows(cfg: DataConfig, path: Path) -> Rows:
    arrays = _npz_arrays(path)
    x, y = arrays["x"], arrays["y"]
    if len(x) != len(y) or x.ndim == 0 or y.ndim != 1:
        raise ConfigError(f"data.path: {path} needs x with one row per sample and a 1-d y of the same length "
                          f"(x has shape {x.shape}, y {y.shape})")
    if len(y) == 0:
        raise ConfigError(f"data.path: {path} has no rows (x and y are empty)")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.issubdtype(x.dtype, np.complexfloating):
        raise ConfigError(f"data.path: array x of {path} has dtype {x.dtype}; fedsim needs real numbers in an "
                          f"NPZ's x (a CSV or Parquet file may hold categorical columns, which fedsim one-hot encodes)")
    x = x.reshape(len(x), -1)
    _refuse_infinite("array x", x, str(path), "data.path")
    _refuse_infinite("array y", y, str(path), "data.path")
    groups = arrays.get("group")
    rows = Rows(x, y, groups)
    keep = _apply_missing_policy(len(y), _array_masks(x, y), cfg.missing, str(path), "data.path")
    rows = rows.take(keep) if keep is not None else rows
    return Rows(rows.features.astype(np.float32), _labels_of(rows.y), rows.groups)


def _check_width(path: Path) -> None:
    """Refuse a table wider than `MAX_WIDTH` columns from its header alone, before pandas reads
    it (a million columns take minutes and gigabytes to parse)."""
    if path.suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq

            width = len(pq.read_schema(path).names)
        except Exception:  # not a Parquet file: `_read_table` says so
            return
    else:
        with open(path, newline="", errors="replace") as f:
            try:
                header = next(csv.reader(f), [])
            except csv.Error:
                return
            width = len(header)
    if width > MAX_WIDTH:
        raise ConfigError(f"data.path: {path} has {width} columns; at most {MAX_WIDTH} ({WHY_MEMORY}: each "
                          f"column is a model input)")


def _read_table(path: Path) -> Any:
    """A CSV or Parquet file as a DataFrame with string column names; one line for a file
    that cannot be parsed."""
    import pandas as pd

    parquet = path.suffix in (".parquet", ".pq")
    try:
        frame = pd.read_parquet(path) if parquet else pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"data.path: {path} is empty (no header, no rows)") from None
    except (ValueError, ImportError) as exc:  # parser errors, a corrupt Parquet file, undecodable text
        kind = "Parquet" if parquet else "CSV"
        raise ConfigError(f"data.path: {path} is not a readable {kind} file ({_first_line(exc)})") from None
    except Exception as exc:  # pyarrow's own errors (ArrowException) that are no ValueError
        if type(exc).__module__.startswith("pyarrow"):
            raise ConfigError(f"data.path: {path} is not a readable Parquet file ({_first_line(exc)})") from None
        raise
    frame.columns = [str(c) for c in frame.columns]
    if len(frame) == 0:
        raise ConfigError(f"data.path: {path} has no rows (only the columns {', '.join(frame.columns)})")
    return frame


def _labels_of(values: Any) -> np.ndarray:
    """Label values as an array: numbers and booleans as they are, anything else as category text."""
    y = np.asarray(values)
    if y.dtype == bool or (np.issubdtype(y.dtype, np.number) and not np.issubdtype(y.dtype, np.complexfloating)):
        return y
    return category_text(y)


def _feature_columns(frame: Any, cfg: DataConfig, encoding: Encoding | None, source: str,
                     group_column: str) -> tuple[list[str], list[str]]:
    """(feature columns, the categorical ones among them) of a table.

    The experiment's own file: every column but the label, the natural-id column and
    ``data.drop_columns``, each categorical or numeric by its type. A data holder's file: the experiment's columns."""
    if cfg.text_column:
        return [cfg.text_column], []
    if encoding is not None:
        if not encoding.columns:
            raise ConfigError(f"data.path: {source} is a table, but the experiment's inputs are not the columns "
                              f"of a table (its data is an NPZ file or a built-in dataset)")
        absent = [c for c in encoding.columns if c not in frame.columns]
        if absent:
            raise ConfigError(f"data.path: {source} lacks the experiment's feature column(s) "
                              f"{', '.join(map(repr, absent))}")
        return list(encoding.columns), [c for c, _ in encoding.categories]
    unknown = [c for c in cfg.drop_columns if c not in frame.columns]
    if unknown:
        raise ConfigError(f"data.drop_columns: {source} has no column(s) {', '.join(map(repr, unknown))} "
                          f"(columns: {', '.join(frame.columns)})")
    for column, key in ((cfg.label_column, "data.label_column"), (group_column, "data.natural_id_column")):
        if column and column in cfg.drop_columns:
            raise ConfigError(f"data.drop_columns: {column!r} is {key}, which fedsim reads; it cannot be dropped")
    features = [c for c in frame.columns if c not in (cfg.label_column, group_column, *cfg.drop_columns)]
    if not features:
        raise ConfigError(f"data.path: {source} has no feature columns besides the label {cfg.label_column!r}")
    kinds = {c: _column_kind(frame[c]) for c in features}
    unsupported = [c for c in features if kinds[c] is None]
    if unsupported:
        column = unsupported[0]
        raise ConfigError(f"data.path: column {column!r} of {source} has type {frame[column].dtype}; fedsim "
                          f"reads numeric, string, categorical and boolean columns (convert it, or list it "
                          f"in data.drop_columns)")
    return features, [c for c in features if kinds[c] == "categorical"]


def _check_numeric(frame: Any, column: str, source: str) -> None:
    """A numeric feature column: real numbers (a data holder's column that its file typed
    otherwise is converted, or refused naming a value), none infinite."""
    import pandas as pd

    if _column_kind(frame[column]) != "numeric":
        present = ~_missing_mask(frame[column])
        values = pd.to_numeric(frame[column].where(present), errors="coerce")
        bad = frame[column][values.isna() & present]
        if len(bad):
            raise ConfigError(f"data.path: feature column {column!r} of {source} holds {bad.iloc[0]!r}; "
                              f"the experiment's column is numeric")
        frame[column] = values
    _refuse_infinite(f"feature column {column!r}", frame[column].to_numpy(np.float64, na_value=np.nan),
                     source, "data.path")


def read_user_file(cfg: DataConfig, encoding: Encoding | None = None) -> Rows:
    """A user file's rows, checked and with the missing-value policy applied, not yet encoded.

    The server reads the experiment's file (no ``encoding``): every column but the label (and
    the natural-id column) is a feature, numeric or categorical by its type. A data holder
    reads its own file with the experiment's `Encoding`: the same columns, picked by name,
    each of the experiment's kind. Both then `encode` the rows. Used columns with missing
    values are handled by ``data.missing``; anything fedsim cannot train on is refused with one
    line naming the file.
    """
    import pandas as pd

    path = Path(cfg.path)
    if path.is_dir():
        raise ConfigError(f"data.path: {path} is a directory; give a CSV, Parquet or NPZ file")
    if not path.is_file():
        raise ConfigError(f"data.path: file not found: {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"data.path: {path} is empty (0 bytes)")
    if path.suffix == ".npz":
        if encoding is not None and encoding.columns:
            raise ConfigError(f"data.path: {path} is an NPZ file, but the experiment's features are the named "
                              f"columns {', '.join(encoding.columns)} of a CSV or Parquet file")
        return _npz_rows(cfg, path)
    _check_width(path)
    frame = _read_table(path)
    source = str(path)
    for key, column in (("label_column", cfg.label_column), ("text_column", cfg.text_column)):
        if (column or key == "label_column") and column not in frame.columns:  # a label is required
            raise ConfigError(f"data.{key}: {column!r} is not a column of {source}; "
                              f"columns: {', '.join(frame.columns)}")
    group_column = cfg.natural_id_column if cfg.partitioner == "natural-id" else ""
    if group_column and group_column not in frame.columns:
        raise ConfigError(f"data.natural_id_column: {group_column!r} is not a column of {source}")
    features, categorical = _feature_columns(frame, cfg, encoding, source, group_column)
    for column in features:
        if column not in categorical and column != cfg.text_column:
            _check_numeric(frame, column, source)
    label = frame[cfg.label_column]
    if _column_kind(label) == "numeric":
        _refuse_infinite(f"label column {cfg.label_column!r}", label.to_numpy(np.float64, na_value=np.nan),
                         source, "data.label_column")
    used = {*features, cfg.label_column, group_column}
    missing = {c: _missing_mask(frame[c]) for c in frame.columns if c in used}  # in the file's order
    keep = _apply_missing_policy(len(frame), missing, cfg.missing, source, "data.path")
    if keep is not None:
        frame = frame[keep].reset_index(drop=True)
    y = _labels_of(frame[cfg.label_column].to_numpy())
    groups = pd.factorize(frame[group_column])[0] if group_column else None
    if cfg.text_column:
        texts = frame[cfg.text_column].astype(str).tolist()
        x = tokenize(texts, resolve_model_dir(cfg.tokenizer, "data.tokenizer"), cfg.max_length)
        return Rows(x, y, groups)
    return Rows(frame[features], y, groups, tuple(categorical))


def fit_encoding(features: Any, categorical: tuple[str, ...] = (), standardize: bool = True) -> Encoding:
    """The `Encoding` of a training split: each categorical column's categories (sorted), the
    numeric inputs' mean and std. An array (NPZ, built-ins) is standardized per input, or not."""
    if not _is_table(features):
        if not standardize:
            return Encoding()
        shift, scale = _standardize(np.asarray(features, np.float32).reshape(len(features), -1))
        return Encoding(shift=shift, scale=scale)
    numeric = tuple(c for c in features.columns if c not in categorical)
    categories = []
    for column in (c for c in features.columns if c in categorical):
        values = tuple(sorted(set(category_text(features[column]))))
        if len(values) > 20 and len(values) > len(features) / 2:
            log.warning("data: column %r has %d distinct values in %d training rows and becomes %d one-hot "
                        "inputs; if it is an identifier or free text, list it in data.drop_columns (or "
                        "set data.text_column)", column, len(values), len(features), len(values))
        categories.append((column, values))
    shift, scale = _standardize(features[list(numeric)].to_numpy(np.float32))
    width = sum(len(values) for _, values in categories)
    return Encoding(columns=numeric + tuple(c for c, _ in categories), categories=tuple(categories),
                    shift=np.concatenate([shift, np.zeros(width, np.float32)]),
                    scale=np.concatenate([scale, np.ones(width, np.float32)]))


def encode(features: Any, encoding: Encoding) -> np.ndarray:
    """Model inputs (float32) of raw rows: numeric columns, then one-hot categories, standardized."""
    if _is_table(features):
        import pandas as pd

        parts = [features[list(encoding.numeric)].to_numpy(np.float32)]
        for column, values in encoding.categories:
            index = pd.Index(values).get_indexer(category_text(features[column]))
            onehot = np.zeros((len(features), len(values)), np.float32)
            seen = index >= 0  # a category the training split never saw stays all zeros
            onehot[np.flatnonzero(seen), index[seen]] = 1.0
            parts.append(onehot)
        x = np.concatenate(parts, axis=1)
    else:
        x = np.asarray(features)
    if encoding.shift is not None:
        raw = x.reshape(len(x), -1)
        with np.errstate(over="ignore", invalid="ignore"):
            x = (raw - encoding.shift) / encoding.scale
        if not np.isfinite(x).all():  # a large raw value overflowed float32 on the way: in float64
            x = (np.asarray(raw, np.float64) - encoding.shift) / encoding.scale
    return x.astype(np.float32)


MAX_AUTO_CLASSES = 100  # data.task = "auto": integral labels with more distinct values are a regression


def _infer_task(y: np.ndarray, requested: str, what: str = "the label") -> str:
    """``data.task = "auto"``: text and booleans are classes; integral numbers with at most
    `MAX_AUTO_CLASSES` distinct values too; other numbers a regression target. Above that,
    integers that number classes 0..K-1 (or 1..K) are ambiguous and refused; others are
    taken as a regression target, which a warning names."""
    if requested != "auto":
        return requested
    if not np.issubdtype(y.dtype, np.number) or y.dtype == bool:
        return "classification"
    if not np.all(np.mod(y, 1) == 0):
        return "regression"
    values = np.unique(y)
    if len(values) <= MAX_AUTO_CLASSES:
        return "classification"
    if values[0] in (0, 1) and values[-1] - values[0] == len(values) - 1:
        raise ConfigError(f"data.task: {what} holds {len(values)} distinct integers {values[0]:g}..{values[-1]:g}, "
                          f"like class ids; \"auto\" takes integers as classes only up to {MAX_AUTO_CLASSES}: set "
                          f"data.task = \"classification\" or \"regression\"")
    log.warning("data.task: auto takes %s (%d distinct integers) as a regression target; set data.task = "
                "\"regression\" or \"classification\" to say so", what, len(values))
    return "regression"


def _sklearn_data_file(name: str) -> Path | None:
    """One of the data files scikit-learn ships (``sklearn/datasets/data/``), found without
    importing scikit-learn: its import costs about 1.2 s of every run's start, and digits and
    breast-cancer need nothing from it but the file. None if the file is not where it has
    been since scikit-learn 0.2x (the caller then uses scikit-learn's loader)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    return path if path.is_file() else None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits()`` (data as float64 0-16, target as int), read as it reads them."""
    path = _sklearn_data_file("digits.csv.gz")
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data, d.target
    with gzip.open(path, mode="rt", encoding="utf-8") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int, copy=False)


def load_breast_cancer_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_breast_cancer()`` (data float64, target int), read as it reads them."""
    path = _sklearn_data_file("breast_cancer.csv")
    if path is None:
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        return d.data, d.target
    with path.open("r", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)  # n_samples, n_features, class names
        data, target = np.empty((int(header[0]), int(header[1]))), np.empty(int(header[0]), dtype=int)
        for i, row in enumerate(reader):
            data[i] = np.asarray(row[:-1], dtype=np.float64)
            target[i] = int(row[-1])
    return data, target


def _builtin_rows(cfg: DataConfig, num_clients: int, seed: int) -> tuple[Rows, str, tuple[int, ...]]:
    """A built-in dataset's rows, its task and per-sample shape."""
    groups = None
    name = cfg.dataset
    if name == "digits":
        data, target = load_digits_arrays()
        x, y, task, shape = (data / 16.0).astype(np.float32), target, "classification", (1, 8, 8)
    elif name == "breast-cancer":
        data, target = load_breast_cancer_arrays()
        x, y, task, shape = data.astype(np.float32), target, "classification", (30,)
    elif name == "diabetes":
        from sklearn import datasets as skd  # its features are standardized by sklearn's own `scale`

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
        raise ConfigError(f"data.dataset: unknown dataset {name!r}")
    rows = Rows(x, np.asarray(y), groups)
    # The same missing-value policy as for a user file: a NaN never reaches training silently.
    keep = _apply_missing_policy(len(y), _array_masks(x, rows.y), cfg.missing, name, "data.dataset")
    return (rows.take(keep) if keep is not None else rows), task, shape


def _load(cfg: DataConfig, num_clients: int, seed: int) -> Dataset:
    name = cfg.dataset
    is_text = name == "text-topics" or cfg.text_column != ""
    if name == "file":
        rows = read_user_file(cfg)
        task, shape = _infer_task(rows.y, cfg.task, f"label column {cfg.label_column!r} of {cfg.path}"), None
    else:
        rows, task, shape = _builtin_rows(cfg, num_clients, seed)
    if cfg.task != "auto":
        task = cfg.task
    if cfg.classes:
        if task != "classification":
            raise ConfigError("data.classes: only classification datasets have classes")
        keep = np.isin(rows.y, cfg.classes)
        if not keep.any():
            raise ConfigError(f"data.classes: none of {cfg.classes} occurs in {name}")
        rows = rows.take(keep)
    label_values: tuple[str, ...] = ()
    if task == "classification":
        if (np.issubdtype(rows.y.dtype, np.floating) and len(rows.y)
                and not np.all(np.mod(rows.y, 1) == 0)):
            fraction = rows.y[np.mod(rows.y, 1) != 0][0]
            where = f"label column {cfg.label_column!r} of {cfg.path}" if name == "file" else name
            raise ConfigError(f"data.task: \"classification\" needs class labels, but {where} holds fractions "
                              f"such as {fraction:g}; use data.task = \"regression\" (or \"auto\")")
        values, y = np.unique(rows.y, return_inverse=True)
        y, num_classes, label_values = y.astype(np.int64), len(values), tuple(category_text(values))
        if num_classes < 2:
            where = (f"data.label_column: {cfg.label_column!r} of {cfg.path}" if name == "file"
                     else f"data.classes: {name} with data.classes = {cfg.classes}")
            raise ConfigError(f"{where} holds a single class ({label_values[0]}); classification needs at "
                              f"least 2 classes")
    else:
        if not np.issubdtype(rows.y.dtype, np.number):
            raise ConfigError(f"data.label_column: regression needs a numeric label column, "
                              f"got values like {rows.y[0]!r}")
        y = rows.y.astype(np.float32)
        num_classes = 1
    train, test = _split_rows(len(y), cfg.test_fraction, num_classes, seed)
    if len(train) == 0:
        raise FedsimError("data: the training split is empty; lower data.test_fraction")
    standardize = name in ("breast-cancer", "diabetes", "file") and not is_text
    encoding = fit_encoding(rows.take(train).features, rows.categorical, standardize)
    if encoding.shift is not None and len(encoding.shift) > MAX_WIDTH:
        raise ConfigError(f"data.path: {cfg.path} makes {len(encoding.shift)} inputs (its categorical columns "
                          f"one-hot); at most {MAX_WIDTH} ({WHY_MEMORY}): list identifier or free-text columns "
                          f"in data.drop_columns")
    x = encode(rows.features, encoding)
    if shape is None:
        shape = (x.shape[1],)
    y_tr, y_te = y[train], y[test]
    mu, sd, label_stats = 0.0, 1.0, "public"
    if cfg.label_range and task != "regression":
        raise ConfigError(f"data.label_range: standardizes a regression target; {name} is {task} "
                          f"(set data.label_range = [])")
    if task == "regression" and (cfg.label_range or name in ("diabetes", "file")):
        # Standardize the target so one learning rate fits every dataset. By a public range
        # where one is known, so that a label-DP release (bags) does not rest on statistics of
        # the private labels; only a file without a stated range falls back to its training
        # labels' mean and std (MSE then in units of the target's variance).
        public = label_range_of(cfg.label_range) if cfg.label_range else DOCUMENTED_RANGES.get(name)
        if public is not None:
            mu, sd = (public[0] + public[1]) / 2, (public[1] - public[0]) / (2 * STANDARD_HALF_RANGE)
        else:
            label_stats = "train"
            with np.errstate(over="ignore", invalid="ignore"):
                mu, sd = float(y_tr.astype(np.float64).mean()), float(y_tr.astype(np.float64).std() + 1e-8)
        with np.errstate(over="ignore", invalid="ignore"):
            y_tr, y_te = ((y_tr - mu) / sd).astype(np.float32), ((y_te - mu) / sd).astype(np.float32)
        if not (np.isfinite(y_tr).all() and np.isfinite(y_te).all()):  # float32 overflowed: in float64
            y_tr = ((y[train].astype(np.float64) - mu) / sd).astype(np.float32)
            y_te = ((y[test].astype(np.float64) - mu) / sd).astype(np.float32)
    tokenizer = str(resolve_model_dir(cfg.tokenizer, "data.tokenizer")) if is_text else ""
    return Dataset(name=name, task=task, x_train=x[train], y_train=y_tr, x_test=x[test], y_test=y_te,
                   num_classes=num_classes, input_shape=shape,
                   groups_train=rows.groups[train] if rows.groups is not None else None,
                   tokenizer=tokenizer, encoding=encoding, y_shift=mu, y_scale=sd, label_values=label_values,
                   label_stats=label_stats)


# Public target ranges of the built-in regression data. scikit-learn documents diabetes'
# targets as "integer 25 - 346" (`sklearn.datasets.load_diabetes`).
DOCUMENTED_RANGES: dict[str, tuple[float, float]] = {"diabetes": (25.0, 346.0)}
# A public range [a, b] is mapped onto [-3, 3]: a target spread like a normal over its range
# keeps about unit scale, and strategy.bags.label_range = [-3, 3] is then that range itself.
STANDARD_HALF_RANGE = 3.0


def label_range_of(values: list[float]) -> tuple[float, float]:
    """``data.label_range`` checked: two finite numbers a < b."""
    if len(values) != 2 or not all(np.isfinite(values)) or values[0] >= values[1]:
        raise ConfigError(f"data.label_range: must be empty or [a, b] with finite a < b (got {list(values)})")
    return float(values[0]), float(values[1])


def load_dataset(cfg: DataConfig, num_clients: int, seed: int) -> Dataset:
    """The dataset of an experiment, cached per process on a snapshot of `cfg` (`fedsim.caches`)."""
    return _load_cached(frozen(cfg), num_clients, seed)


@cached(maxsize=8)
def _load_cached(cfg: Snapshot, num_clients: int, seed: int) -> Dataset:
    def build() -> Dataset:
        data_cfg = cfg.thaw()
        return hold_out_validation(_load(data_cfg, num_clients, seed), data_cfg.validation_fraction, seed)

    return on_disk("dataset", disk_key(cfg, num_clients, seed), build, Dataset)


def hold_out_validation(data: Dataset, fraction: float, seed: int) -> Dataset:
    """`data` with round(fraction * n) of its n training rows moved to a validation split.

    Selecting the best round on the test split would make the reported test number an
    optimistic, selected one; the validation rows are what selection reads instead. They leave
    the training pool here, before any partitioning, so no client trains on them. Which rows
    is a seeded permutation (its own stream, apart from the test split's), and one row of each
    natural group stays in training, so a natural-id partition keeps all its clients. The
    feature (and regression target) standardization was fit on the training split before this
    hold-out: validation rows share the training split's statistics, the test rows never enter
    them. A split too small to select on is refused, as for the test split."""
    if fraction <= 0:
        return data
    n = len(data.y_train)
    n_val = int(round(fraction * n))
    need = max(MIN_TEST_SAMPLES, data.num_classes)
    if n_val < need:
        fix = (f"set data.validation_fraction >= {math.ceil(need / n * 1000) / 1000}"
               if n and need / n < 0.5 else "the training split is too small to hold out a validation split")
        raise ConfigError(f"data.validation_fraction: {fraction} of {n} training samples holds out {n_val}; "
                          f"model selection needs at least {need} = max({MIN_TEST_SAMPLES}, classes) validation "
                          f"samples; {fix}, or 0 for no validation split")
    order = np.random.default_rng([seed, 0x76616C]).permutation(n)  # 0x76616C: "val", a stream of its own
    if data.groups_train is not None:  # each group's first row in the order stays in training
        _, first = np.unique(data.groups_train[order], return_index=True)
        order = np.delete(order, first)
    val = np.sort(order[:n_val])
    if len(val) < n_val:
        raise ConfigError(f"data.validation_fraction: {fraction} would leave some natural group without a "
                          f"training row; lower it")
    train = np.setdiff1d(np.arange(n), val)
    groups = data.groups_train[train] if data.groups_train is not None else None
    return replace(data, x_train=data.x_train[train], y_train=data.y_train[train], groups_train=groups,
                   x_val=data.x_train[val], y_val=data.y_train[val])


# scikit-learn's files that a built-in dataset is read from
SKLEARN_FILES = {"digits": ("digits.csv.gz",), "breast-cancer": ("breast_cancer.csv",),
                 "diabetes": ("diabetes_data_raw.csv.gz", "diabetes_target.csv.gz")}


def disk_key(cfg: Snapshot, num_clients: int, seed: int) -> tuple | None:
    """The dataset's key on disk (`fedsim.caches.on_disk`): the in-process key, the code that
    builds it (this module, numpy, scikit-learn) and the files it is read from. None, not
    kept on disk, for text data: its tokenizer is a directory of model files."""
    name = cfg.get("dataset")
    if name == "text-topics" or cfg.get("text_column"):
        return None
    sources = [module_source(__name__), module_source("numpy")]
    if name == "file":
        sources.append(file_source("data.path", cfg.get("path")))
    if name in SKLEARN_FILES:
        sources.append(module_source("sklearn"))
        for file in SKLEARN_FILES[name]:
            path = _sklearn_data_file(file)
            sources.append(file_source(file, path) if path is not None else Source(file, None))
    return cfg, num_clients, seed, tuple(sources)
