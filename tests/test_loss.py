import pytest
import torch

from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings, condition_time
from etsdm_dist.diffusion.loss import bucket_losses, diffusion_loss, per_sample_draws, sample_timesteps
from etsdm_dist.diffusion.schedule import make_schedule

torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("B", [1, 7, 10, 64])
def test_stratified_covers_every_stratum(time, B):
    sch = make_schedule("linear", time)
    T = sch.num_timesteps
    for seed in range(5):
        t = sample_timesteps(B, sch, generator=gen(seed), stratified=True, t_eps=0.0)
        ts = t.double().sort().values
        for i in range(B):  # the i-th smallest draw lies in stratum i
            if time == "discrete":
                assert (i * T) // B <= ts[i].item() < (i + 1) * T / B
            else:
                assert i / B - 1e-6 <= ts[i].item() <= (i + 1) / B + 1e-6
    t = sample_timesteps(64, sch, generator=gen(0), stratified=True)
    assert not torch.equal(t, t.sort().values)  # shuffled, not tied to batch position


@pytest.mark.parametrize("stratified", [False, True])
def test_timesteps_uniform_and_in_range(stratified):
    sch = make_schedule()
    t = torch.cat([sample_timesteps(50, sch, generator=gen(s), stratified=stratified) for s in range(200)])
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).double()
    assert (counts - 1000).abs().max() < 150  # 10000 draws; ~5 binomial SDs
    tc = sample_timesteps(10000, make_schedule(time="continuous"), generator=gen(1), t_eps=1e-3)
    assert tc.dtype == torch.float32 and tc.min() >= 1e-3 and tc.max() <= 1.0


class Oracle(torch.nn.Module):
    """Returns the exact eps that produced x_t (it knows x0)."""

    def __init__(self, x0, sch, out_dtype=torch.float32):
        super().__init__()
        self.x0, self.sch, self.out_dtype = x0, sch, out_dtype

    def forward(self, x, t, y=None):
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = self.sch.alpha(t, x.dtype).reshape(shape)
        s = self.sch.sigma(t, x.dtype).reshape(shape)
        return ((x - a * self.x0) / s).to(self.out_dtype)


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_true_eps_gives_zero_loss(time):
    sch = make_schedule("cosine", time)
    x0 = torch.randn(16, 3, 4, 4, generator=gen(2), dtype=torch.float64)
    loss, t = diffusion_loss(Oracle(x0, sch, torch.float64), x0, sch, generator=gen(3))
    assert loss.shape == (16,) and t.shape == (16,)
    assert loss.max().item() < 1e-16
    # and a wrong model does not
    loss_bad, _ = diffusion_loss(lambda x, t, y: torch.zeros_like(x), x0, sch, generator=gen(3))
    assert loss_bad.mean().item() > 0.5


def test_bf16_model_gives_fp32_loss_and_y_passes_through():
    sch = make_schedule()
    x0 = torch.randn(8, 2, 3, generator=gen(4))
    seen = {}

    def net(x, t, y=None):
        seen["y"], seen["t"] = y, t
        return torch.zeros_like(x, dtype=torch.bfloat16)
    y = torch.arange(8)
    loss, t = diffusion_loss(net, x0, sch, y=y, generator=gen(5))
    assert loss.dtype == torch.float32 and loss.shape == (8,)
    assert seen["y"] is y and torch.equal(seen["t"], t)
    # loss of a zero predictor is mean(eps^2) over the non-batch dims: close to 1 on average
    assert 0.5 < loss.mean().item() < 1.5


def test_loss_goes_through_conditioned_model_with_true_t():
    sch = make_schedule()
    x0 = torch.randn(32, 1, generator=gen(6))
    seen = {}

    def net(x, tc):
        seen["tc"] = tc
        return torch.zeros_like(x)
    m = ConditionedModel(net, EtsdmSettings.defaults_for("discrete"))
    g = gen(7)
    _, t = diffusion_loss(m, x0, sch, generator=g)
    assert torch.equal(seen["tc"], condition_time(t, enabled=True, t_tilde=100, n=5, time="discrete"))
    # x_t is noised at the TRUE t: reproduce the draws and compare
    g2 = gen(7)
    t2 = sample_timesteps(32, sch, generator=g2)
    assert torch.equal(t, t2)


def test_same_seed_same_loss():
    sch = make_schedule()
    x0 = torch.randn(8, 3, generator=gen(8))
    m = lambda x, t, y: x * 0.5
    a = diffusion_loss(m, x0, sch, generator=gen(9), stratified=True)
    b = diffusion_loss(m, x0, sch, generator=gen(9), stratified=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_loss_rejects_mismatched_schedule():
    m = ConditionedModel(lambda x, t: x, EtsdmSettings.defaults_for("discrete"))
    with pytest.raises(ValueError, match=r"diffusion\.time"):
        diffusion_loss(m, torch.zeros(2, 1), make_schedule(time="continuous"))


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_bucket_losses_brute_force(time):
    sch = make_schedule("linear", time)
    t = sample_timesteps(500, sch, generator=gen(10))
    loss = torch.rand(500, generator=gen(11))
    t_tilde = 100 if time == "discrete" else 0.1
    st = bucket_losses(loss, t, sch, t_tilde, num_buckets=7)
    span = 1000 if time == "discrete" else 1.0
    for i in range(7):
        lo, hi = st.edges[i].item(), st.edges[i + 1].item()
        assert lo == pytest.approx(i * span / 7) and hi == pytest.approx((i + 1) * span / 7)
        sel = (t.double() >= lo) & (t.double() < hi)
        assert st.counts[i].item() == sel.sum().item()
        assert st.sums[i].item() == pytest.approx(loss[sel].double().sum().item())
    assert st.counts.sum().item() == 500 and st.sums.sum().item() == pytest.approx(loss.double().sum().item())
    early = t.double() < t_tilde
    assert st.early_count.item() == early.sum().item()
    assert st.early_sum.item() == pytest.approx(loss[early].double().sum().item())


def test_bucket_losses_weight_equals_the_selected_subset():
    """weight=valid mask gives the same stats as indexing the valid samples (no host sync), and a
    NaN in a left-out sample does not leak into the sums."""
    from etsdm_dist.diffusion.loss import bucket_losses
    from etsdm_dist.diffusion.schedule import make_schedule

    sched = make_schedule()
    g = torch.Generator().manual_seed(3)
    loss = torch.rand(32, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    valid = torch.rand(32, generator=g) > 0.3
    loss[~valid] = float("nan")
    got = bucket_losses(loss, t, sched, 100.0, weight=valid.float())
    want = bucket_losses(loss[valid], t[valid], sched, 100.0)
    for a, b in zip((got.sums, got.counts, got.early_sum, got.early_count),
                    (want.sums, want.counts, want.early_sum, want.early_count)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- per-sample draws
SPLITS = [(1, 8), (2, 4), (4, 2)]  # micro-batches x micro-batch size of one global batch of 8


def _split_draws(sch, b, *, start, stratified, seed=3, shape=(1, 4, 4), dtype=torch.float32):
    parts = [per_sample_draws(range(start + k * b, start + (k + 1) * b), shape, sch, seed=seed,
                              batch_start=start, batch_images=8, stratified=stratified, dtype=dtype)
             for k in range(8 // b)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("stratified", [False, True])
def test_per_sample_draws_do_not_depend_on_the_split(time, stratified):
    sch = make_schedule("linear", time)
    t1, e1 = _split_draws(sch, 8, start=16, stratified=stratified)
    for n, b in SPLITS[1:]:
        t, e = _split_draws(sch, b, start=16, stratified=stratified)
        assert torch.equal(t, t1) and torch.equal(e, e1), (n, b)
    # A sample's noise is its own stream: the same position in another global batch keeps it
    # (without strata), another position gets other draws.
    t2, e2 = _split_draws(sch, 8, start=24, stratified=stratified)
    assert not torch.equal(e2, e1)
    alone = per_sample_draws([19], (1, 4, 4), sch, seed=3, batch_start=16, batch_images=8)
    assert torch.equal(alone[1][0], e1[3])
    if stratified:  # one draw per stratum of the GLOBAL batch, in a shuffled order
        u = t1.double().sort().values / (sch.num_timesteps if time == "discrete" else 1.0)
        for i in range(8):
            assert i / 8 - 1e-6 <= u[i].item() < (i + 1) / 8 + 1e-6
        assert not torch.equal(t1, t1.sort().values)


def test_split_global_batch_gives_the_same_losses_and_summed_gradients():
    """1x8, 2x4, 4x2: every sample's t, eps and loss are identical (tolerance 0); the summed
    gradients agree to float64 rounding (the sum over samples runs in another order per split)."""
    from etsdm_dist import config as config_mod
    from etsdm_dist.diffusion.build import build_model

    cfg = config_mod.from_dict({"network": {"preset": "tiny", "base_channels": 8, "channel_mult": [1, 2],
                                            "attention_resolutions": [], "groups": 4, "resolution": 8},
                                "diffusion": {"stratified_t": True}})
    torch.manual_seed(0)
    model = build_model(cfg).double()
    sch = make_schedule()
    x0 = torch.rand(8, 1, 8, 8, generator=gen(1), dtype=torch.float64) * 2 - 1

    def run(b):
        model.zero_grad()
        losses, ts = [], []
        for k in range(8 // b):
            sl = slice(k * b, (k + 1) * b)
            draws = per_sample_draws(range(k * b, (k + 1) * b), (1, 8, 8), sch, seed=5, batch_start=0,
                                     batch_images=8, stratified=True, dtype=torch.float64)
            per, t = diffusion_loss(model, x0[sl], sch, draws=draws)
            (per.mean() * (b / 8)).backward()  # the engine's mean over micro-batches and ranks
            losses.append(per.detach())
            ts.append(t)
        return torch.cat(losses), torch.cat(ts), [p.grad.clone() for p in model.parameters()]

    l1, t1, g1 = run(8)
    for _, b in SPLITS[1:]:
        lb, tb, gb = run(b)
        assert torch.equal(tb, t1) and torch.equal(lb, l1)
        for a, c in zip(g1, gb):
            assert torch.allclose(a, c, rtol=1e-12, atol=1e-15 * float(a.abs().max()))
