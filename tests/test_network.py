
import pytest
import torch

from etsdm_dist.diffusion.network import (PRESETS, AttentionBlock, NetworkConfig, ResBlock, UNet, build_network,
                                count_parameters, flops_per_image, timestep_embedding)

torch.set_num_threads(1)

# Expected parameter counts (exact values printed with `pytest -s`).
PARAM_RANGES = {"tiny": (0.3e6, 2e6), "32": (35.5e6, 36.0e6), "64": (100e6, 160e6), "256": (110e6, 118e6)}


def _tiny(**kw):
    torch.manual_seed(0)
    return build_network("tiny", **kw)


def _perturb(net, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def _inputs(b=4, c=1, r=32, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, r, r, generator=g), torch.rand(b, generator=g) * 1000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_and_param_counts_on_meta(name):
    with torch.device("meta"):
        net = build_network(name)
        cfg = net.config
        x = torch.zeros(2, cfg.in_channels, cfg.resolution, cfg.resolution)
        out = net(x, torch.zeros(2))
    assert out.shape == x.shape and out.device.type == "meta"
    n = count_parameters(net)
    flops = flops_per_image(net)
    print(f"\npreset {name}: {n:,} params ({n / 1e6:.2f}M), {flops / 1e9:.2f} GFLOP/img fwd")
    lo, hi = PARAM_RANGES[name]
    assert lo <= n <= hi
    assert flops > 2 * n  # every weight is used at least once per image


def test_exact_ddpm_param_counts():
    with torch.device("meta"):
        assert count_parameters(build_network("32")) == 35_746_307  # DDPM CIFAR-10: 35.7M
        assert count_parameters(build_network("256")) == 113_673_219  # DDPM 256: 114M


def test_tiny_forward_backward_zero_init():
    net = _tiny()
    x, t = _inputs(8)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.count_nonzero(out) == 0  # zero-init output conv
    for m in net.modules():
        if isinstance(m, ResBlock):
            assert torch.count_nonzero(m.conv2.weight) == 0
    (net(x, t) - x).square().mean().backward()  # epsilon-matching loss
    assert net.conv_out.weight.grad is not None and net.conv_out.weight.grad.abs().sum() > 0


def test_determinism_same_seed():
    a, b = _tiny(), _tiny()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    _perturb(a), _perturb(b)
    x, t = _inputs()
    assert torch.equal(a(x, t), b(x, t))


def test_class_conditioning_changes_output():
    net = _perturb(_tiny(num_classes=10)).eval()
    x, t = _inputs()
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.full((4,), 3, dtype=torch.long)
    o0, o1 = net(x, t, y0), net(x, t, y1)
    assert (o0 - o1).abs().max() > 1e-4
    assert torch.equal(o0, net(x, t, y0))
    with pytest.raises(ValueError, match="needs y"):
        net(x, t)


def test_time_conditioning_changes_output():
    net = _perturb(_tiny()).eval()
    x, t = _inputs()
    assert (net(x, t) - net(x, t + 100)).abs().max() > 1e-4


def _capture_emb(net):
    seen = {}
    net.time_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("emb", o.dtype))
    return seen


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_dtype_cast_keeps_time_path_fp32(cast):
    net = _perturb(_tiny(num_classes=4))
    dt = torch.float16 if cast == "half" else torch.bfloat16
    net = net.to(dt) if cast == "to" else getattr(net, cast)()
    for name, p in net.named_parameters():
        want = torch.float32 if name.startswith("time_embed.") else dt
        assert p.dtype == want, name
    seen = _capture_emb(net)
    x, t = _inputs(2, r=16)
    y = torch.arange(2)
    out = net(x.to(dt), t, y)
    assert seen["emb"] == torch.float32
    assert out.dtype == dt and torch.isfinite(out.float()).all()
    assert net(x, t, y).dtype == torch.float32  # output follows input dtype
    net.float()
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_time_path_fp32_compute_without_fp32_storage():
    net = _perturb(_tiny()).keep_time_path_fp32(False).to(torch.bfloat16)
    assert net.time_embed.lin1.weight.dtype == torch.bfloat16
    seen = _capture_emb(net)
    x, t = _inputs(2, r=16)
    assert net(x.bfloat16(), t).dtype == torch.bfloat16
    assert seen["emb"] == torch.float32
    net.keep_time_path_fp32(True)
    assert net.time_embed.lin1.weight.dtype == torch.float32


def test_timestep_embedding_fp32_under_autocast():
    t = torch.tensor([0.0, 1.0, 999.5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = timestep_embedding(t, 64)
    assert e.dtype == torch.float32 and e.shape == (3, 64)
    assert torch.allclose(e[0], torch.cat([torch.ones(32), torch.zeros(32)]))


def test_autocast_bf16_cpu():
    net = _perturb(_tiny())
    x, t = _inputs(2)
    ref = net(x, t)
    seen = _capture_emb(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert seen["emb"] == torch.float32
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    out.square().mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("kw", [{}, {"use_scale_shift_norm": True, "resblock_updown": True, "head_channels": 16}])
def test_channels_last_matches_contiguous(kw):
    net = _perturb(_tiny(**kw)).eval()
    x, t = _inputs()
    ref = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last), t)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_same_gradients():
    def grads(ckpt):
        net = _perturb(_tiny(dropout=0.1, use_scale_shift_norm=True))
        net.gradient_checkpointing = ckpt
        x, t = _inputs()
        torch.manual_seed(5)
        loss = net(x, t).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    l0, g0 = grads(False)
    l1, g1 = grads(True)
    assert torch.allclose(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n


def test_checkpointing_actually_used(monkeypatch):
    import etsdm_dist.diffusion.network as netmod
    calls = []
    orig = netmod.checkpoint
    monkeypatch.setattr(netmod, "checkpoint", lambda *a, **k: calls.append(type(a[0])) or orig(*a, **k))
    net = _tiny(gradient_checkpointing=True)
    x, t = _inputs(2)
    net(x, t).sum().backward()
    assert ResBlock in calls and AttentionBlock in calls
    calls.clear()
    with torch.no_grad():
        net(x, t)
    assert not calls


@pytest.mark.parametrize("overrides, field", [
    ({"channel_mult": ()}, "network.channel_mult"),
    ({"channel_mult": (1, 0)}, "network.channel_mult"),
    ({"resolution": 36, "channel_mult": (1, 2, 2, 2)}, "network.resolution"),
    ({"attention_resolutions": (12,)}, "network.attention_resolutions"),
    ({"base_channels": 30}, "network.groups"),
    ({"num_heads": 3}, "network.num_heads"),
    ({"head_channels": 48}, "network.head_channels"),
    ({"num_heads": 2, "head_channels": 16}, "network.num_heads"),
    ({"dropout": 1.5}, "network.dropout"),
    ({"num_res_blocks": 0}, "network.num_res_blocks"),
    ({"in_channels": 0}, "network.in_channels"),
    ({"num_classes": -1}, "network.num_classes"),
    ({"bogus": 1}, "network.bogus"),
])
def test_validation_errors_name_field(overrides, field):
    with torch.device("meta"), pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_network("tiny", **overrides)


def test_validation_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"allowed values: \[32, 16\]"):
        build_network("tiny", attention_resolutions=(8,))
    with pytest.raises(ValueError, match="network.preset.*allowed values"):
        build_network("1024")


def test_head_override_and_config_api():
    with torch.device("meta"):
        net = build_network("32", head_channels=64)  # disables preset's num_heads automatically
        assert net.config.num_heads == -1
        attn = [m for m in net.modules() if isinstance(m, AttentionBlock)]
        assert attn and all(m.heads == 256 // 64 for m in attn)
        net2 = UNet(NetworkConfig(resolution=16, in_channels=1, base_channels=32, channel_mult=[1, 2],
                                  attention_resolutions=[8], groups=8))
    assert net2.config.out_ch == 1 and count_parameters(net2) > 0


def test_flops_counts_attention_and_scales_with_resolution():
    net = _tiny()
    f32 = flops_per_image(net)
    no_attn = flops_per_image(_tiny(attention_resolutions=()))
    # 4 attention blocks at 16x16, 64 channels: QK^T and AV each 2*N*N*C flops
    n, c = 16 * 16, 64
    assert f32 - no_attn >= 4 * 2 * (2 * n * n * c)
    f64 = flops_per_image(net, resolution=64)
    assert 3.5 * f32 < f64 < 6 * f32


def test_torch_compile_fullgraph_no_breaks():
    net = _perturb(_tiny(num_classes=3)).eval()
    x, t = _inputs(2)
    y = torch.tensor([0, 2])
    ref = net(x, t, y)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x, t, y), ref, atol=1e-5)


# --------------------------------------------------------------------------- one definition of the settings


def test_the_config_section_is_the_network_config():
    from etsdm_dist import config

    assert config.Config.model_fields["network"].annotation is NetworkConfig
    cfg = config.load(None, ["network.preset=tiny"])
    assert isinstance(cfg.network, NetworkConfig)
    assert cfg.network.model_dump() == build_network("tiny").config.model_dump()


def test_every_network_field_is_settable_from_a_config():
    """groups and out_channels (unreachable before) and the rest reach the built network."""
    from etsdm_dist import config
    from etsdm_dist.diffusion import build

    over = ["network.preset=tiny", "network.groups=16", "network.out_channels=2", "network.base_channels=16",
            "network.num_classes=3", "network.use_scale_shift_norm=true", "network.fp32_time_path=false"]
    cfg = config.load("configs/ci_tiny.yaml", over)
    torch.manual_seed(0)
    net = build.build_model(cfg).net
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 16 for m in norms)
    assert net.conv_out.out_channels == 2 and net.conv_in.in_channels == 1
    assert net.conv_in.out_channels == 16 and net.time_embed.keep_fp32 is False
    assert net.config.use_scale_shift_norm and net.config.num_classes == 3
    x = torch.randn(2, 1, 32, 32)
    assert net(x, torch.tensor([1.0, 500.0]), torch.tensor([0, 2])).shape == (2, 2, 32, 32)
    # Every field of the one definition is accepted by the config loader.
    for name, info in NetworkConfig.model_fields.items():
        value = getattr(cfg.network, name)
        assert config.load("configs/ci_tiny.yaml", [*over, f"network.{name}={value}"]).network == cfg.network


def test_preset_fills_only_fields_not_given():
    cfg = NetworkConfig(preset="tiny", base_channels=16)
    assert cfg.base_channels == 16 and cfg.groups == PRESETS["tiny"]["groups"]
    assert cfg.channel_mult == PRESETS["tiny"]["channel_mult"]
    plain = NetworkConfig(preset=None, resolution=16, channel_mult=[1, 2], attention_resolutions=[8])
    assert plain.base_channels == NetworkConfig.model_fields["base_channels"].default
    # The stored (resolved) tree rebuilds the same architecture, even under another preset name.
    resolved = NetworkConfig(preset="tiny").model_dump()
    assert NetworkConfig(**resolved) == NetworkConfig(preset="tiny")
    with torch.device("meta"):
        same = NetworkConfig(**{**resolved, "preset": "256"})
        assert count_parameters(UNet(same)) == count_parameters(build_network("tiny"))


@pytest.mark.parametrize("overrides, field", [
    ({"dropout": float("nan")}, "network.dropout"),
    ({"base_channels": -32}, "network.base_channels"),
    ({"groups": 0}, "network.groups"),
    ({"out_channels": 0}, "network.out_channels"),
    ({"resolution": True}, "network.resolution"),
    ({"num_heads": 0}, "network.num_heads"),
    ({"num_heads": -2}, "network.num_heads"),
])
def test_non_finite_negative_and_bool_values_name_the_field(overrides, field):
    with pytest.raises(ValueError) as e:
        build_network("tiny", **overrides)
    assert str(e.value).startswith(field), str(e.value)


def test_replace_validates():
    cfg = NetworkConfig(preset="tiny")
    assert cfg.replace(groups=16).groups == 16 and cfg.groups == 8
    with pytest.raises(ValueError, match=r"network\.groups"):
        cfg.replace(groups=7)
