"""Samplers with log-probabilities: Gaussian densities, single steps, rollouts, and exact marginals.

The last two sections drive the samplers with analytic denoisers for Gaussian data (tests/toy_policies.py),
where the distribution every sampler must reproduce is known in closed form.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
from toy_policies import flow_marginal, gaussian_diffusion_policy, gaussian_flow_policy

from reference_impls.models.components import TinyModelConfig, build_scheduler
from reference_impls.models.shapes_model import build_shapes_policy
from reference_impls.sampling import (
    SamplerConfig,
    StepOutput,
    ddim_step,
    ddpm_step,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
    gaussian_log_prob,
    make_schedule,
    rollout,
    transition_log_prob,
)
from reference_impls.sampling.steps import flow_sde_std

# The package re-exports the function ``rollout``, which shadows the submodule of the same name.
rollout_module = importlib.import_module("reference_impls.sampling.rollout")

TINY = TinyModelConfig(block_out_channels=(16, 32, 32), text_hidden_size=32)
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a red circle", "a blue circle"]
KIND_OF = {"ddim": "diffusion", "ddpm": "diffusion", "sde": "flow", "ode": "flow"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tensors are tiny and the CI machine is shared (two threads fighting busy
    cores made one 200-step rollout take 45 s instead of 1 s)."""
    with _single_thread():
        yield


@contextlib.contextmanager
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _normal_log_prob(value: torch.Tensor, mean: torch.Tensor, std, reduction: str) -> torch.Tensor:
    std = torch.as_tensor(std, dtype=mean.dtype).expand_as(mean)
    per_dim = torch.distributions.Normal(mean, std).log_prob(value).flatten(1)
    return per_dim.mean(1) if reduction == "mean" else per_dim.sum(1)


# --------------------------------------------------------------------------------------------------------
# 1. gaussian_log_prob
# --------------------------------------------------------------------------------------------------------

STD_KINDS = {
    "float": 0.37,
    "scalar-tensor": torch.tensor(1.8),
    "per-sample": torch.tensor([0.2, 0.9, 2.5]).view(3, 1, 1, 1),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("std_kind", list(STD_KINDS))
def test_gaussian_log_prob_matches_torch_normal(std_kind: str, reduction: str) -> None:
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 5, generator=gen)
    value = mean + torch.randn(3, 2, 4, 5, generator=gen)
    std = STD_KINDS[std_kind]
    got = gaussian_log_prob(value, mean, std, reduction)
    assert got.shape == (3,)
    torch.testing.assert_close(got, _normal_log_prob(value, mean, std, reduction), rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_sum_is_mean_times_dims() -> None:
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(4, 3, 8, 8, generator=gen)
    value = torch.randn(4, 3, 8, 8, generator=gen)
    std = torch.tensor([0.5, 1.0, 1.5, 3.0]).view(4, 1, 1, 1)
    total = gaussian_log_prob(value, mean, std, "sum")
    average = gaussian_log_prob(value, mean, std, "mean")
    torch.testing.assert_close(total, average * (3 * 8 * 8), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(total, average)  # the two conventions really differ


def test_gaussian_log_prob_rejects_unknown_reduction() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"'median'.*mean.*sum"):
        gaussian_log_prob(x, x, 1.0, "median")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# 2. single steps
# --------------------------------------------------------------------------------------------------------

# Per-sample cumulative alphas (t, t') from the cosine schedule, noisy to clean, including the last step
# that targets alpha_bar[0].
ALPHA_T = torch.tensor([0.05, 0.3, 0.7, 0.999]).view(4, 1, 1, 1)
ALPHA_PREV = torch.tensor([0.2, 0.5, 0.9, 0.99998]).view(4, 1, 1, 1)
SIGMA = torch.tensor([1.0, 0.8, 0.45, 0.1]).view(4, 1, 1, 1)
SIGMA_NEXT = torch.tensor([0.9, 0.6, 0.3, 0.0]).view(4, 1, 1, 1)
SIGMA_CAP = torch.tensor(0.9)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 4, 4, generator=gen), torch.randn(4, 3, 4, 4, generator=gen)


def _step(name: str, output: torch.Tensor, x: torch.Tensor, **kwargs) -> StepOutput:
    if name == "ddim":
        return ddim_step(output, x, ALPHA_T, ALPHA_PREV, 1.0, **kwargs)
    if name == "ddpm":
        return ddpm_step(output, x, ALPHA_T, ALPHA_PREV, **kwargs)
    return flow_sde_step(output, x, SIGMA, SIGMA_NEXT, 0.7, sigma_cap=SIGMA_CAP, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "sde"])
def test_step_log_prob_is_density_of_next_state(name: str, reduction: str) -> None:
    output, x = _inputs()
    out = _step(name, output, x, generator=torch.Generator().manual_seed(3), reduction=reduction)
    assert out.std.shape == (4, 1, 1, 1) and bool((out.std > 0).all())
    assert out.log_prob is not None and out.log_prob.shape == (4,)
    expected = _normal_log_prob(out.next_state, out.mean, out.std, reduction)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "sde"])
def test_step_with_given_next_state_recomputes_its_log_prob(name: str) -> None:
    output, x = _inputs()
    sampled = _step(name, output, x, generator=torch.Generator().manual_seed(3))
    stored = sampled.next_state.clone()
    again = _step(name, output, x, next_state=stored)
    assert again.next_state is stored
    torch.testing.assert_close(again.mean, sampled.mean, rtol=0, atol=0)
    torch.testing.assert_close(again.log_prob, sampled.log_prob, rtol=0, atol=0)
    # Another stored state has another density.
    other = _step(name, output, x, next_state=stored + 0.5 * sampled.std)
    assert not torch.allclose(other.log_prob, sampled.log_prob)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "sde"])
def test_step_sample_is_mean_plus_std_times_noise(name: str) -> None:
    output, x = _inputs()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    out = _step(name, output, x, noise=noise)
    torch.testing.assert_close(out.next_state, out.mean + out.std * noise)
    # generator draws the same noise when given the same seed
    drawn = _step(name, output, x, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(drawn.next_state, out.next_state)


def test_flow_sde_log_prob_gradient_flows_through_the_mean_only() -> None:
    """The sample is detached inside the density: d logp / d v = (noise / std) * d mean / d v / D.

    Without the detach the density of mean + std * noise would not depend on v at all (zero gradient).
    """
    output, x = _inputs()
    sigma, sigma_next = torch.tensor(0.6), torch.tensor(0.45)
    velocity = output.clone().requires_grad_(True)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    out = flow_sde_step(velocity, x, sigma, sigma_next, 0.7, noise=noise)
    out.log_prob.sum().backward()
    g2 = 0.49 * 0.6 / 0.4
    dmean_dv = (1 + g2 * 0.4 / (2 * 0.6)) * (0.45 - 0.6)
    expected = noise / out.std.detach() * dmean_dv / (3 * 4 * 4)
    torch.testing.assert_close(velocity.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddim_with_eta_one_is_the_ddpm_posterior(dtype: torch.dtype) -> None:
    """Same Gaussian to 1e-5 in float64; float32 loses ~1e-4 to cancellation in 1 - a' - sigma^2 when
    a' = 0.99998 (the last step), so it gets 2e-4."""
    output, x = (t.to(dtype) for t in _inputs())
    a_t, a_prev = ALPHA_T.to(dtype), ALPHA_PREV.to(dtype)
    tol = 1e-5 if dtype == torch.float64 else 2e-4
    ddim = ddim_step(output, x, a_t, a_prev, eta=1.0, noise=torch.zeros_like(x))
    ddpm = ddpm_step(output, x, a_t, a_prev, noise=torch.zeros_like(x))
    torch.testing.assert_close(ddim.std, ddpm.std, rtol=0, atol=1e-5)
    torch.testing.assert_close(ddim.mean, ddpm.mean, rtol=0, atol=tol)
    torch.testing.assert_close(ddim.predicted_x0, ddpm.predicted_x0)
    # and the std is the posterior's: beta (1 - a') / (1 - a), beta = 1 - a / a'
    beta = 1 - a_t / a_prev
    torch.testing.assert_close(ddpm.std, (beta * (1 - a_prev) / (1 - a_t)).sqrt())
    half = ddim_step(output, x, a_t, a_prev, eta=0.5, noise=torch.zeros_like(x))
    torch.testing.assert_close(half.std, 0.5 * ddim.std)
    assert not torch.allclose(half.mean, ddim.mean, rtol=0, atol=1e-3)


def test_ddim_with_eta_zero_is_deterministic() -> None:
    output, x = _inputs()
    out = ddim_step(output, x, ALPHA_T, ALPHA_PREV, eta=0.0, generator=torch.Generator().manual_seed(0))
    assert bool((out.std == 0).all())
    assert out.log_prob is None
    x0 = (x - (1 - ALPHA_T).sqrt() * output) / ALPHA_T.sqrt()
    torch.testing.assert_close(out.predicted_x0, x0)
    torch.testing.assert_close(out.next_state, ALPHA_PREV.sqrt() * x0 + (1 - ALPHA_PREV).sqrt() * output)


def test_flow_ode_step_is_an_euler_step() -> None:
    velocity, x = _inputs()
    out = flow_ode_step(velocity, x, SIGMA, SIGMA_NEXT)
    torch.testing.assert_close(out.next_state, x + velocity * (SIGMA_NEXT - SIGMA))
    torch.testing.assert_close(out.predicted_x0, x - SIGMA * velocity)
    assert out.log_prob is None and float(out.std) == 0.0
    stored = torch.ones_like(x)
    assert flow_ode_step(velocity, x, SIGMA, SIGMA_NEXT, next_state=stored).next_state is stored


def test_flow_sde_step_by_hand() -> None:
    """mean = x + [v + a^2 s/(1-s) / (2 s) (x + (1-s) v)] (s' - s), std = a sqrt(s/(1-s)) sqrt(s - s')."""
    x, v, s, s_next, a = 0.3, -0.8, 0.6, 0.5, 0.7
    mean = x + (v + a**2 * s / (1 - s) / (2 * s) * (x + (1 - s) * v)) * (s_next - s)
    std = a * math.sqrt(s / (1 - s)) * math.sqrt(s - s_next)
    assert mean == pytest.approx(0.381225, abs=1e-9)  # 0.3 + (-0.8 + 0.6125 * -0.02) * -0.1
    assert std == pytest.approx(0.7 * math.sqrt(1.5 * 0.1))
    out = flow_sde_step(
        torch.tensor([[v]]),
        torch.tensor([[x]]),
        torch.tensor(s),
        torch.tensor(s_next),
        a,
        noise=torch.tensor([[2.0]]),
    )
    assert float(out.mean) == pytest.approx(mean, abs=1e-6)
    assert float(out.std) == pytest.approx(std, abs=1e-6)
    assert float(out.next_state) == pytest.approx(mean + 2 * std, abs=1e-6)
    assert float(out.predicted_x0) == pytest.approx(x - s * v, abs=1e-6)
    expected_log_prob = -0.5 * 2.0**2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert float(out.log_prob) == pytest.approx(expected_log_prob, abs=1e-5)


def test_flow_sde_step_evaluates_the_coefficient_at_sigma_cap_where_sigma_is_one() -> None:
    velocity, x = _inputs()
    one, s_next, cap = torch.tensor(1.0), torch.tensor(0.9), torch.tensor(0.9)
    out = flow_sde_step(velocity, x, one, s_next, 0.7, sigma_cap=cap, noise=torch.zeros_like(x))
    assert torch.isfinite(out.mean).all()
    assert float(out.std) == pytest.approx(0.7 * math.sqrt(0.9 / 0.1) * math.sqrt(0.1), abs=1e-6)
    assert float(flow_sde_std(one, s_next, 0.7, cap)) == pytest.approx(float(out.std))
    g2 = 0.49 * 0.9 / 0.1
    expected = x + (velocity + g2 / (2 * 0.9) * (x + 0.1 * velocity)) * (0.9 - 1.0)
    torch.testing.assert_close(out.mean, expected)


# --------------------------------------------------------------------------------------------------------
# 3. rollouts of the tiny random ShapeWorld models
# --------------------------------------------------------------------------------------------------------


def _tiny_policy(kind: str):
    policy = build_shapes_policy(kind, TINY, seed=0)
    policy.denoiser.eval()
    policy.text_encoder.eval()
    return policy


@pytest.fixture(scope="module")
def tiny_policies() -> dict:
    with _single_thread():
        return {kind: _tiny_policy(kind) for kind in ("diffusion", "flow")}


def _roll(policies: dict, name: str, seed: int = 0, steps: int = 4, **kwargs):
    config = SamplerConfig(name=name, num_steps=steps, **kwargs)
    return rollout(policies[KIND_OF[name]], PROMPTS, config, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ddim", "ddpm", "sde"])
def test_rollout_records_trajectory(tiny_policies: dict, name: str) -> None:
    traj = _roll(tiny_policies, name, steps=5)
    assert traj.states.shape == (4, 6, 3, 32, 32)
    assert traj.log_probs.shape == (4, 5)
    assert torch.isfinite(traj.states).all() and torch.isfinite(traj.log_probs).all()
    assert bool((traj.log_probs != 0).all())  # every step of a stochastic sampler has a density
    assert traj.images.shape == (4, 3, 32, 32)
    assert float(traj.images.min()) >= 0 and float(traj.images.max()) <= 1
    assert traj.cond.hidden_states.shape[0] == 4 and traj.uncond is None
    assert bool(traj.schedule.stochastic.all())


@pytest.mark.parametrize("name", ["ddim", "sde", "ode"])
def test_rollout_is_reproducible_from_the_seed(tiny_policies: dict, name: str) -> None:
    first, again, other = (_roll(tiny_policies, name, seed=s) for s in (7, 7, 8))
    assert torch.equal(first.states, again.states)
    assert torch.equal(first.log_probs, again.log_probs)
    assert not torch.allclose(first.states[:, 0], other.states[:, 0])
    assert not torch.allclose(first.states[:, -1], other.states[:, -1])
    if name != "ode":
        assert not torch.allclose(first.log_probs, other.log_probs)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "sde"])
def test_transition_log_prob_reproduces_recorded_log_probs(
    tiny_policies: dict, name: str, guidance: float
) -> None:
    """With unchanged weights the PPO ratio exp(new - old) is 1 for every step, also with steps shuffled
    per sample (DDPO) and with classifier-free guidance."""
    policy = tiny_policies[KIND_OF[name]]
    traj = _roll(tiny_policies, name, steps=5, guidance_scale=guidance)
    assert (traj.uncond is None) == (guidance == 1.0)
    rows = torch.arange(4)
    with torch.no_grad():
        for i in range(traj.num_steps):
            out = transition_log_prob(policy, traj, i)
            assert torch.equal(out.next_state, traj.states[:, i + 1])
            ratio = torch.exp(out.log_prob - traj.log_probs[:, i])
            assert float((ratio - 1).abs().max()) < 1e-6, (i, ratio)
            # the stored next state is the recomputed Gaussian's mean plus std * noise
            assert torch.allclose(out.mean, traj.states[:, i + 1], atol=10 * float(out.std.max()))
        perms = torch.stack(
            [torch.randperm(traj.num_steps, generator=torch.Generator().manual_seed(b)) for b in range(4)]
        )
        for j in range(traj.num_steps):
            index = perms[:, j]
            out = transition_log_prob(policy, traj, index)
            ratio = torch.exp(out.log_prob - traj.log_probs[rows, index])
            assert float((ratio - 1).abs().max()) < 1e-6, (index, ratio)
    assert any(len(set(perms[:, j].tolist())) > 1 for j in range(traj.num_steps))  # mixed steps per batch


@pytest.mark.parametrize("name", ["ddim", "sde"])
def test_guidance_changes_the_rollout(tiny_policies: dict, name: str) -> None:
    plain = _roll(tiny_policies, name, seed=3)
    guided = _roll(tiny_policies, name, seed=3, guidance_scale=3.0)
    assert torch.equal(plain.states[:, 0], guided.states[:, 0])
    assert not torch.allclose(plain.states[:, 1], guided.states[:, 1])
    # recomputing a guided trajectory without guidance gives another density
    with torch.no_grad():
        unguided = transition_log_prob(tiny_policies[KIND_OF[name]], guided, 0, guidance_scale=1.0)
    assert float((unguided.log_prob - guided.log_probs[:, 0]).abs().max()) > 1e-4


def test_subset_keeps_transitions(tiny_policies: dict) -> None:
    traj = _roll(tiny_policies, "sde", guidance_scale=3.0)
    part = traj.subset([2, 0])
    assert part.prompts == [PROMPTS[2], PROMPTS[0]]
    assert torch.equal(part.states, traj.states[[2, 0]])
    with torch.no_grad():
        out = transition_log_prob(tiny_policies["flow"], part, torch.tensor([1, 3]))
    expected = traj.log_probs[[2, 0], [1, 3]]
    assert float((torch.exp(out.log_prob - expected) - 1).abs().max()) < 1e-6


@pytest.mark.parametrize("name", ["ddim", "sde"])
def test_perturbed_weights_change_the_ratio(name: str) -> None:
    policy = _tiny_policy(KIND_OF[name])
    traj = rollout(policy, PROMPTS, SamplerConfig(name=name, num_steps=4), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.denoiser.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        for i in range(traj.num_steps):
            ratio = torch.exp(transition_log_prob(policy, traj, i).log_prob - traj.log_probs[:, i])
            assert torch.isfinite(ratio).all()
            assert float((ratio - 1).abs().max()) > 1e-4, (i, ratio)


def test_transition_log_prob_is_differentiable_in_the_weights(tiny_policies: dict) -> None:
    policy = tiny_policies["flow"]
    traj = _roll(tiny_policies, "sde")
    policy.denoiser.zero_grad()
    transition_log_prob(policy, traj, torch.tensor([0, 1, 2, 3])).log_prob.sum().backward()
    grads = [p.grad for p in policy.denoiser.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    policy.denoiser.zero_grad()


def test_ode_rollout_has_no_log_probs(tiny_policies: dict) -> None:
    traj = _roll(tiny_policies, "ode", steps=5)
    assert not bool(traj.schedule.stochastic.any())
    assert torch.equal(traj.log_probs, torch.zeros(4, 5))
    with torch.no_grad():
        out = transition_log_prob(tiny_policies["flow"], traj, 2)
    assert out.log_prob is None
    torch.testing.assert_close(out.mean, traj.states[:, 3])


@pytest.mark.parametrize("name", ["ddim", "ddpm", "sde", "ode"])
def test_stochastic_window_limits_the_stochastic_steps(tiny_policies: dict, name: str) -> None:
    traj = _roll(tiny_policies, name, steps=5, stochastic_window=(1, 3))
    assert traj.schedule.stochastic.tolist() == [False, True, True, False, False]
    assert bool((traj.log_probs[:, 1:3] != 0).all())
    assert torch.equal(traj.log_probs[:, [0, 3, 4]], torch.zeros(4, 3))
    policy = tiny_policies[KIND_OF[name]]
    with torch.no_grad():
        for i in range(5):
            out = transition_log_prob(policy, traj, i)
            if i in (1, 2):
                assert float((torch.exp(out.log_prob - traj.log_probs[:, i]) - 1).abs().max()) < 1e-6
            else:  # deterministic: the stored next state is the mean
                assert out.log_prob is None
                torch.testing.assert_close(out.mean, traj.states[:, i + 1])
        with pytest.raises(ValueError, match="mix"):
            transition_log_prob(policy, traj, torch.tensor([0, 1, 2, 1]))


def test_reduction_sum_scales_recorded_log_probs(tiny_policies: dict) -> None:
    mean = _roll(tiny_policies, "ddpm", seed=4)
    total = _roll(tiny_policies, "ddpm", seed=4, reduction="sum")
    assert torch.equal(mean.states, total.states)
    torch.testing.assert_close(total.log_probs, mean.log_probs * 3 * 32 * 32, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize(
    ("name", "kind", "valid"),
    [
        ("sde", "diffusion", "ddim, ddpm"),
        ("ode", "diffusion", "ddim, ddpm"),
        ("ddim", "flow", "sde, cps, ode"),
        ("ddpm", "flow", "sde, cps, ode"),
    ],
)
def test_wrong_sampler_for_the_model_kind_is_rejected(
    tiny_policies: dict, name: str, kind: str, valid: str
) -> None:
    config = SamplerConfig(name=name, num_steps=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"valid samplers: {valid}"):
        config.validate_for(kind)
    with pytest.raises(ValueError, match=f"valid samplers: {valid}"):
        rollout(tiny_policies[kind], PROMPTS[:1], config)
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(name=("ddim" if kind == "diffusion" else "sde"), num_steps=0).validate_for(kind)


def test_schedules_run_from_noise_to_data(tiny_policies: dict) -> None:
    flow = make_schedule(tiny_policies["flow"], SamplerConfig(name="sde", num_steps=4))
    torch.testing.assert_close(flow.sigma, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(flow.sigma_next, torch.tensor([0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(flow.model_timesteps, flow.sigma * 1000)
    assert float(flow.sigma_cap) == pytest.approx(0.75)
    diffusion = make_schedule(tiny_policies["diffusion"], SamplerConfig(name="ddim", num_steps=4))
    alphas = build_scheduler("diffusion").alphas_cumprod
    assert diffusion.model_timesteps.tolist() == [999, 749, 499, 249]
    torch.testing.assert_close(diffusion.alpha_bar, alphas[[999, 749, 499, 249]])
    torch.testing.assert_close(diffusion.alpha_bar_prev, alphas[[749, 499, 249, 0]])


@pytest.mark.parametrize("steps", [4, 6, 30])
def test_diffusion_schedule_steps_land_where_the_next_step_starts(tiny_policies: dict, steps: int) -> None:
    """Step i must move x to the noise level step i+1 assumes: alpha_bar_prev[i] == alpha_bar[i+1].

    With "trailing" timesteps round(k * 1000 / T) - 1 the gaps are not all equal when T does not divide
    1000 (6 steps: 999, 832, 666, 499, 332, 166), so a fixed stride round(1000 / T) misses the next one.
    """
    schedule = make_schedule(tiny_policies["diffusion"], SamplerConfig(name="ddpm", num_steps=steps))
    torch.testing.assert_close(schedule.alpha_bar_prev[:-1], schedule.alpha_bar[1:], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# 4. flow samplers on Gaussian data: the marginals are known
# --------------------------------------------------------------------------------------------------------

DATA_MEAN = [0.5, -1.0]
DATA_STD = [0.5, 1.5]
N_SAMPLES = 20_000
FLOW_STEPS = 200
MEAN_TOL = 0.03
STD_REL_TOL = 0.03


def _marginal_error(samples: torch.Tensor, mean, std) -> tuple[float, float]:
    """(max |mean error|, max relative std error) over latent dims of (N, D, 1, 1) samples."""
    mean, std = torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
    flat = samples.flatten(1).double()
    mean_err = (flat.mean(0) - mean).abs().max()
    std_err = ((flat.std(0) - std).abs() / std).max()
    return float(mean_err), float(std_err)


def _assert_marginal(samples: torch.Tensor, mean, std) -> None:
    mean_err, std_err = _marginal_error(samples, mean, std)
    assert mean_err < MEAN_TOL and std_err < STD_REL_TOL, (mean_err, std_err)


def _flow_rollout(name: str, steps: int = FLOW_STEPS, n: int = N_SAMPLES):
    policy = gaussian_flow_policy(DATA_MEAN, DATA_STD)
    config = SamplerConfig(name=name, num_steps=steps, noise_level=0.7)
    return rollout(policy, [""] * n, config, torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def flow_sde_trajectory():
    with _single_thread():  # module fixtures are set up before the function-scoped _one_thread
        return _flow_rollout("sde")


def test_flow_ode_reproduces_the_data_marginal() -> None:
    """200 Euler steps of the exact velocity: final mean within 0.03 and std within 3% of N(m, s0^2)
    (the Euler error alone is ~0.7% of the std; 20k samples add ~0.5%)."""
    traj = _flow_rollout("ode")
    assert torch.equal(traj.log_probs, torch.zeros_like(traj.log_probs))
    _assert_marginal(traj.states[:, -1], DATA_MEAN, DATA_STD)


def test_flow_sde_reproduces_the_data_marginal(flow_sde_trajectory) -> None:
    """The Flow-GRPO SDE (a = 0.7, 200 steps) keeps the ODE's marginals: mean within 0.03, std within 3%
    (discretisation error ~0.5% of the std, mostly from the capped first step)."""
    final = flow_sde_trajectory.states[:, -1]
    _assert_marginal(final, DATA_MEAN, DATA_STD)
    assert torch.isfinite(flow_sde_trajectory.log_probs).all()


@pytest.mark.parametrize("k", [40, 100, 160])
def test_flow_sde_intermediate_marginals(flow_sde_trajectory, k: int) -> None:
    """At step k the state follows N((1-s) m, (1-s)^2 s0^2 + s^2) with s = sigma[k] (same tolerances)."""
    s = float(flow_sde_trajectory.schedule.sigma[k])
    assert s == pytest.approx(1 - k / FLOW_STEPS)
    mean, std = flow_marginal(torch.tensor(DATA_MEAN), torch.tensor(DATA_STD), s)
    _assert_marginal(flow_sde_trajectory.states[:, k], mean, std)


def test_flow_sde_with_a_wrong_drift_misses_the_marginal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The marginal test has teeth: the same SDE noise without the score correction in the drift
    (mean = x + v ds) inflates the final std about twofold, and doubling the correction shrinks it ~30%."""

    def make_wrong(score_weight: float):
        def wrong_step(velocity, x_t, sigma, sigma_next, noise_level=0.7, **kwargs):
            right = flow_sde_step(velocity, x_t, sigma, sigma_next, noise_level, **kwargs)
            euler = x_t + velocity * (sigma_next - sigma)
            mean = euler + score_weight * (right.mean - euler)
            noise = (right.next_state - right.mean) / right.std
            return StepOutput(mean + right.std * noise, mean, right.std, right.log_prob, right.predicted_x0)

        return wrong_step

    for weight in (0.0, 2.0):
        monkeypatch.setattr(rollout_module, "flow_sde_step", make_wrong(weight))
        final = _flow_rollout("sde", n=5000).states[:, -1]
        mean_err, std_err = _marginal_error(final, DATA_MEAN, DATA_STD)
        assert std_err > 5 * STD_REL_TOL, (weight, mean_err, std_err)
    monkeypatch.setattr(rollout_module, "flow_sde_step", make_wrong(1.0))  # the wrapper itself is faithful
    _assert_marginal(_flow_rollout("sde", n=5000).states[:, -1], DATA_MEAN, DATA_STD)


# --------------------------------------------------------------------------------------------------------
# 5. diffusion samplers on Gaussian data
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "eta"), [("ddim", 1.0), ("ddpm", 1.0), ("ddim", 0.0)])
def test_diffusion_samplers_reproduce_the_data_marginal(name: str, eta: float) -> None:
    """500 steps of the exact epsilon under the cosine schedule: mean within 0.03, std within 3%.

    The last step targets alpha_bar[0] ~ 1 - 2e-5, so the target is the law of
    sqrt(a0) x0 + sqrt(1 - a0) eps (a 0.002% change of the std). Ancestral sampling with the posterior
    variance underestimates the std by O(1/T) (~0.8% at 500 steps for s0 = 0.5).
    """
    policy = gaussian_diffusion_policy(DATA_MEAN, DATA_STD)
    config = SamplerConfig(name=name, num_steps=500, eta=eta)
    traj = rollout(policy, [""] * 10_000, config, torch.Generator().manual_seed(12))
    a0 = float(policy.scheduler.alphas_cumprod[0])
    m, s0 = torch.tensor(DATA_MEAN), torch.tensor(DATA_STD)
    target_std = (a0 * s0**2 + 1 - a0).sqrt()
    _assert_marginal(traj.states[:, -1], math.sqrt(a0) * m, target_std)
    if eta > 0:  # (a mean-reduced log-density of 2 dims can be exactly 0.0 by chance: allow a few)
        assert torch.isfinite(traj.log_probs).all() and float((traj.log_probs == 0).float().mean()) < 1e-5
    else:
        assert torch.equal(traj.log_probs, torch.zeros_like(traj.log_probs))


def _noisy_denoiser(policy, error: float, seed: int = 0):
    """Add N(0, error^2) to every denoiser output: a stand-in for a trained network's imperfection."""
    call, gen = policy.call_denoiser, torch.Generator().manual_seed(seed)

    def noisy(module, x, model_timestep, cond):
        return call(module, x, model_timestep, cond) + error * torch.randn(x.shape, generator=gen)

    policy.call_denoiser = noisy
    return policy


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_diffusion_samplers_tolerate_small_denoiser_errors(eta: float) -> None:
    """An epsilon error of 0.01 must not blow the samples up when the scheduler says clip_sample=True.

    Data N((0.2, -0.3), (0.3, 0.2)^2) sits inside the pixel range [-1, 1]. With the cosine schedule the first
    trailing step starts at alpha_bar[999] = 2.4e-9, where x0_hat = (x - sqrt(1 - a) eps) / sqrt(a) turns an
    error d in eps into an error d / sqrt(a) ~ 2e4 d in x0_hat and sqrt(a'/a) d ~ 3e3 d in the next state
    (measured today: final std 0.49 / 0.24 instead of 0.21 / 0.13 with eta=1, 7.7 / 4.6 with eta=0).
    diffusers' DDIM/DDPM schedulers clamp x0_hat to [-clip_sample_range, clip_sample_range] when
    ``scheduler.config.clip_sample`` is set; the samplers here ignore the flag.
    The final std must stay within 25% of what the same sampler gives with the exact denoiser.
    """
    mean, std = [0.2, -0.3], [0.3, 0.2]
    config = SamplerConfig(name="ddim", num_steps=10, eta=eta)
    exact = rollout(
        gaussian_diffusion_policy(mean, std, clip_sample=True),
        [""] * 4000,
        config,
        torch.Generator().manual_seed(1),
    )
    noisy_policy = _noisy_denoiser(gaussian_diffusion_policy(mean, std, clip_sample=True), 0.01)
    noisy = rollout(noisy_policy, [""] * 4000, config, torch.Generator().manual_seed(1))
    reference = exact.states[:, -1].flatten(1).std(0)
    got = noisy.states[:, -1].flatten(1).std(0)
    assert float(((got - reference).abs() / reference).max()) < 0.25, (reference, got)


# --------------------------------------------------------------------------------------------------------
# coefficients-preserving sampling (Wang & Yu, 2025)
# --------------------------------------------------------------------------------------------------------
def test_flow_cps_step_by_hand_and_keeps_the_marginal_coefficients() -> None:
    """x' = (1 - s') x0_hat + sqrt(s'^2 - sd^2) eps_hat + sd eps, sd = s' sin(a pi / 2)."""
    x, v, s, s_next, a = 0.3, -0.8, 0.6, 0.5, 0.7
    x0_hat, eps_hat = x - s * v, x + (1 - s) * v  # 0.78, -0.02
    sd = s_next * math.sin(a * math.pi / 2)
    mean = (1 - s_next) * x0_hat + math.sqrt(s_next**2 - sd**2) * eps_hat
    out = flow_cps_step(torch.tensor([[v]]), torch.tensor([[x]]), torch.tensor(s), torch.tensor(s_next), a,
                        noise=torch.tensor([[2.0]]))
    assert float(out.mean) == pytest.approx(mean, abs=1e-6) and float(out.std) == pytest.approx(sd, abs=1e-6)
    assert float(out.next_state) == pytest.approx(mean + 2 * sd, abs=1e-6)
    expected_log_prob = -0.5 * 2.0**2 - math.log(sd) - 0.5 * math.log(2 * math.pi)
    assert float(out.log_prob) == pytest.approx(expected_log_prob, abs=1e-5)
    # With the exact velocity of x = (1 - s) x0 + s eps, the next state is (1 - s') x0 + s' times unit noise:
    # the noise it carries has exactly the marginal's variance s'^2 (the Euler-Maruyama SDE step's does not).
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(200_000, generator=gen), torch.randn(200_000, generator=gen)
    state = (1 - s) * x0 + s * eps
    step = flow_cps_step(eps - x0, state, torch.tensor(s), torch.tensor(s_next), a, generator=gen)
    residual = step.next_state - (1 - s_next) * x0
    assert float(residual.std()) == pytest.approx(s_next, rel=0.01)
    sde = flow_sde_step(eps - x0, state, torch.tensor(s), torch.tensor(s_next), a, generator=gen)
    assert float((sde.next_state - (1 - s_next) * x0).std()) > s_next * 1.02
    # The last step (s' = 0) is deterministic: it lands on x0_hat.
    last = flow_cps_step(torch.tensor([[v]]), torch.tensor([[x]]), torch.tensor(s), torch.tensor(0.0), a)
    assert float(last.std) == 0 and last.log_prob is None and float(last.next_state) == pytest.approx(x0_hat)


def test_cps_rollout_recomputes_its_log_probs_and_its_last_step_is_deterministic(tiny_policies: dict) -> None:
    policy = tiny_policies["flow"]
    traj = rollout(policy, PROMPTS, SamplerConfig("cps", num_steps=5), torch.Generator().manual_seed(0))
    assert traj.schedule.stochastic.tolist() == [True, True, True, True, False]
    with torch.no_grad():
        for i in range(4):
            out = transition_log_prob(policy, traj, i)
            assert torch.equal(out.log_prob, traj.log_probs[:, i])  # the PPO ratio is exactly 1


def test_flow_grpo_trains_with_the_cps_sampler_and_refuses_others(tmp_path) -> None:
    from reference_impls.algorithms import get_method
    from reference_impls.training import build_config

    cls = get_method("flow-grpo")
    with pytest.raises(ValueError, match="--sampler must be sde or cps"):
        build_config(cls.config_class, cls.presets, {"preset": "smoke", "sampler": "ddim"})
    config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "sampler": "cps", "sde_steps": 3})
    method = cls.__new__(cls)
    method.config = config
    assert cls.sampler(method).name == "cps" and cls.sampler(method).stochastic_window == (0, 3)
