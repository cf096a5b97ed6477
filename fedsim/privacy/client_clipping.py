"""Client-side user-level clipping: a client clips its own update before it replies.

``privacy.user_clipping = "client"`` (`fedsim.central_dp`). The server sends the round's clip
C in the train config (``user-clip``); the client scales its whole update, every array it
uploads (the model arrays it trained, minus those it was sent, and SCAFFOLD's control-variate
delta beside them), by min(1, C / norm), the factor the server would apply
(`fedsim.privacy.user_dp.clip_factors`), and reports b_i = 1[norm <= C] (``user-unclipped``)
for adaptive clipping (Andrew et al. 2021). The server then never sees an update of norm
above C: the trust model of a deployment in which clients do not hand the server their raw
update (McMahan et al. 2018 clip on the client).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim import records as R
from fedsim.privacy.user_dp import clip_factors


def clip_own_update(content: RecordDict, instruction: RecordDict) -> None:
    """Clip the update in the reply `content` (in place) to the clip the train `instruction`
    carries; nothing when it carries none (the server clips, or no central DP)."""
    config = R.record_of(instruction, R.CONFIG, ConfigRecord)
    clip = R.plain(config).get(R.USER_CLIP) if config is not None else None
    if clip is None:
        return
    reply = R.plain(content)
    sent = R.plain(R.record_of(instruction, R.ARRAYS, ArrayRecord))
    model = {k: R.from_array(v) for k, v in R.plain(reply[R.ARRAYS]).items()}
    updates = {k: v - R.from_array(sent[k]) for k, v in model.items()}
    extra = ({k: R.from_array(v) for k, v in R.plain(reply[R.ALGORITHM_ARRAYS]).items()}
             if R.ALGORITHM_ARRAYS in reply else {})
    norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in [*updates.values(),
                                                                                       *extra.values()])))
    factor = float(clip_factors(torch.tensor([norm], dtype=torch.float64), float(clip))[0])
    R.plain(reply[R.METRICS])[R.USER_UNCLIPPED] = 1.0 if norm <= clip else 0.0
    if factor < 1.0:
        content[R.ARRAYS] = R.numpy_to_record(
            {k: (R.from_array(sent[k]) + factor * u).astype(model[k].dtype, copy=False) for k, u in updates.items()})
        if extra:
            content[R.ALGORITHM_ARRAYS] = R.numpy_to_record(
                {k: (factor * v).astype(v.dtype, copy=False) for k, v in extra.items()})
