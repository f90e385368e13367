"""Config -> the diffusion objects every part needs: the wrapped network and the noise schedule.

Training, sampling jobs and the tests build them here, so a model is the same wherever it is made.
"""
from __future__ import annotations


def build_model(cfg):
    """The network wrapped in the E-TSDM time-condition map (the only place f(t) is applied).

    `cfg.network` is the network's own NetworkConfig, already validated with its preset applied."""
    from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings
    from etsdm_dist.diffusion.network import UNet

    time = cfg.diffusion.time
    settings = EtsdmSettings(enabled=cfg.etsdm.enabled, t_tilde=cfg.etsdm.t_tilde_for(time),
                             n=cfg.etsdm.n, time=time)
    # The schedule travels with the model: a v network's output becomes eps / x0 at the true t.
    return ConditionedModel(UNet(cfg.network), settings, prediction=cfg.diffusion.prediction,
                            schedule=build_schedule(cfg))


def build_schedule(cfg):
    from etsdm_dist.diffusion.schedule import make_schedule

    d = cfg.diffusion
    return make_schedule(d.schedule, d.time, d.num_timesteps, d.beta_start, d.beta_end, d.cosine_s)


def model_with_weights(cfg, state: dict):
    """build_model(cfg) holding `state` (the wrapper's keys, `net.*`, or the bare network's), in eval
    mode without gradients; ValueError when the weights do not fit the config."""
    model = build_model(cfg)
    target = model if any(k.startswith("net.") for k in state) else model.net
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the stored network config "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.eval().requires_grad_(False)
