"""Config -> the diffusion objects every part needs: the wrapped network and the noise schedule.

Training, sampling jobs and the tests build them here, so a model is the same wherever it is made.
"""
from __future__ import annotations

from etsdm_dist import config


def network_overrides(cfg) -> dict:
    """NetworkConfig fields set in the config (None = keep the preset's value)."""
    n = cfg.network
    out = {}
    for key in ("resolution", "in_channels", "base_channels", "channel_mult", "num_res_blocks",
                "attention_resolutions", "num_heads", "head_channels", "dropout", "num_classes",
                "use_scale_shift_norm", "resblock_updown"):
        value = getattr(n, key)
        if value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    out["gradient_checkpointing"] = n.gradient_checkpointing
    return out


def build_model(cfg):
    """The network wrapped in the E-TSDM time-condition map (the only place f(t) is applied)."""
    from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings
    from etsdm_dist.diffusion.network import build_network

    net = build_network(cfg.network.preset, **network_overrides(cfg))
    settings = EtsdmSettings(enabled=cfg.etsdm.enabled, t_tilde=config.etsdm_t_tilde(cfg),
                             n=cfg.etsdm.n, time=cfg.diffusion.time)
    return ConditionedModel(net, settings)


def build_schedule(cfg):
    from etsdm_dist.diffusion.schedule import make_schedule

    d = cfg.diffusion
    return make_schedule(d.schedule, d.time, d.num_timesteps, d.beta_start, d.beta_end, d.cosine_s)
