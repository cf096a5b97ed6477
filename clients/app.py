"""fedsim's ClientApp: one handler per message type, the same in simulation and deployment.

A node learns which data it holds from ``context.node_config`` (``partition-id``,
or ``data-path`` for a real data holder) and everything else from the experiment
config in ``context.run_config``. What to train in a round (all tensors, LoRA B
only, with a proximal pull or control variates...) comes from the server's
ConfigRecord, so the strategy decides and the client just follows.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.bags import train_bags
from clients.losses import margin_loss, proximal_step, scaffold_step
from clients.trainer import TrainSettings, resolve_device, train_local
from fedsim import records as R
from fedsim.config import Config
from fedsim.experiment import config_from_context, derive_seed
from fedsim.lora import select_keys, set_trainable
from fedsim.models import build_model
from fedsim.node_data import node_data, node_dataset, node_partition_id
from fedsim.privacy.accounting import epsilon

def query(msg: Message, context: Context, config_text: str | None = None) -> Message:
    """Discovery: the server asks which partition this node holds, to sample reproducibly,
    and hands over the experiment, which this node keeps for the rounds to come."""
    sent = msg.content.config_records.get(R.CONFIG, ConfigRecord()).get(R.RUN_CONFIG_KEY)
    if sent:
        context.state[R.CLIENT_STATE] = ConfigRecord({R.RUN_CONFIG_KEY: sent})
    spec = msg.content.config_records.get(R.DATA_SPEC)
    if spec is not None:
        context.state[R.DATA_SPEC] = spec
    pid = node_partition_id(context.node_config)
    return Message(RecordDict({R.METRICS: MetricRecord({R.PARTITION_ID: pid})}), reply_to=msg)


def _load_history(context: Context) -> list[tuple[float, float, int]]:
    rec = context.state.config_records.get(R.ACCOUNTANT_STATE)
    if rec is None:
        return []
    return list(zip(rec["sigma"], rec["q"], rec["steps"]))


def _save_history(context: Context, history: list[tuple[float, float, int]]) -> None:
    context.state[R.ACCOUNTANT_STATE] = ConfigRecord({
        "sigma": [float(h[0]) for h in history], "q": [float(h[1]) for h in history],
        "steps": [int(h[2]) for h in history]})


def settings_for(cfg: Config, task: str) -> TrainSettings:
    c, p = cfg.client, cfg.privacy
    return TrainSettings(task=task, local_epochs=c.local_epochs, local_steps=c.local_steps,
                         batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                         noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
                         device=resolve_device(cfg.runtime.device))


def train(msg: Message, context: Context, config_text: str | None = None) -> Message:
    cfg = config_from_context(context, config_text)
    server_cfg = msg.content.config_records.get(R.CONFIG, ConfigRecord())
    server_round = int(server_cfg.get(R.SERVER_ROUND, 0))
    pid = node_partition_id(context.node_config)
    data = node_dataset(cfg, context.node_config, context.state.config_records.get(R.DATA_SPEC))
    x, y = node_data(cfg, context.node_config, data)
    model = build_model(cfg.model, data, cfg.seed, cfg.output.dir)
    R.load_record(model, msg.content.array_records[R.ARRAYS])
    set_trainable(model, str(server_cfg.get(R.TRAINABLE, "all")))
    settings = settings_for(cfg, data.task)
    seed = derive_seed(cfg.seed, server_round, pid, "train")
    history = _load_history(context)

    extra_loss = post_step = None
    mu = float(server_cfg.get(R.PROXIMAL_MU, 0.0))
    use_scaffold = bool(server_cfg.get(R.USE_SCAFFOLD, False))
    start = ({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
             if mu > 0 or use_scaffold else {})
    if mu > 0:
        post_step = proximal_step(model, start, mu, settings.lr)
    lam = float(server_cfg.get(R.MARGIN_LAMBDA, 0.0))
    if lam > 0:
        # The batch-level (authors') form couples the samples of a batch, so per-sample
        # clipping would no longer bound one sample's influence: under DP-SGD fedsim uses
        # the per-sample-mean form, which is separable.
        mode = "sample" if settings.noise_multiplier > 0 else cfg.client.margin_mode
        extra_loss = margin_loss(lam, mode)
    controls = None
    if use_scaffold:
        controls = _scaffold_controls(msg, context, model)
        post_step = scaffold_step(model, controls[0], controls[1], settings.lr)

    if int(server_cfg.get(R.BAG_SIZE, 0)) > 0:
        result = train_bags(model, x, y, cfg, settings, int(server_cfg[R.BAG_SIZE]),
                            float(server_cfg[R.RHO]), pid, seed, data.num_classes)
    else:
        result = train_local(model, x, y, settings, history, seed=seed,
                             extra_loss=extra_loss, post_step=post_step)
    _save_history(context, result.history)
    eps = epsilon(result.history, cfg.privacy.delta, cfg.privacy.accountant) \
        if settings.noise_multiplier > 0 else float("inf")
    content = RecordDict({
        R.ARRAYS: R.model_to_record(model, select_keys(model, str(server_cfg.get(R.UPLOAD, "all")))),
        R.METRICS: MetricRecord({
            R.NUM_EXAMPLES: result.num_examples, R.UNIT_WEIGHT: 1.0, R.PARTITION_ID: pid,
            R.EPSILON: eps if np.isfinite(eps) else -1.0,  # -1 = no DP (MetricRecord is finite-only)
            # -1 = no loss measured (every Poisson batch was empty); MetricRecord takes no NaN
            R.TRAIN_LOSS: result.mean_loss if np.isfinite(result.mean_loss) else -1.0,
            R.LOCAL_STEPS: result.steps,
            R.SAMPLE_RATE: result.sample_rate}),
    })
    if controls is not None:
        content[R.CONTROL] = _scaffold_update(context, model, start, controls, result.steps, settings.lr)
    return Message(content, reply_to=msg)


def _scaffold_controls(msg: Message, context: Context, model: torch.nn.Module):
    """(c, c_i) as tensors keyed like the trainable parameters; c_i starts at zero."""
    server_c = R.record_to_numpy(msg.content.array_records[R.CONTROL])
    state = context.state.array_records.get(R.CONTROL)
    local_c = R.record_to_numpy(state) if state is not None else {k: np.zeros_like(v) for k, v in server_c.items()}
    as_t = lambda d: {k: torch.as_tensor(v) for k, v in d.items()}  # noqa: E731
    return as_t(server_c), as_t(local_c)


def _scaffold_update(context: Context, model, start, controls, steps: int, lr: float) -> ArrayRecord:
    """SCAFFOLD option II (Karimireddy et al. 2020, eq. 4): c_i+ = c_i - c + (x - y_i)/(K lr).

    The new c_i is stored in this node's state for its next participation; the reply
    carries delta c_i = c_i+ - c_i for the server's c update.
    """
    server_c, local_c = controls
    params = dict(model.named_parameters())
    new_c, delta = {}, {}
    for k in server_c:
        drift = (start[k] - params[k].detach().cpu()) / (steps * lr)
        new_c[k] = (local_c[k] - server_c[k] + drift).numpy()
        delta[k] = new_c[k] - local_c[k].numpy()
    context.state[R.CONTROL] = R.numpy_to_record(new_c)
    return R.numpy_to_record(delta)


def make_client_app(config_text: str | None = None) -> ClientApp:
    """The ClientApp. `config_text` is the experiment TOML for runtimes that deliver no
    run config (Flower's `run_simulation`); `flwr run` and the in-process grid deliver it."""
    client_app = ClientApp()

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context, config_text)

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, config_text)

    return client_app


app = make_client_app()  # what `[tool.flwr.app.components] clientapp` points at
