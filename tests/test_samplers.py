"""sana_core.samplers against diffusers' schedulers, driven by one deterministic velocity function."""
import gc
import re
import weakref

import pytest
import torch
from conftest import rel_err
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler

from sana_core import samplers

SHAPE = (2, 4, 3, 5)


def make_velocity(seed=1):
    """A smooth, time- and state-dependent stand-in for the DiT: v(x, t) for t (B,) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)

    def velocity(x, t):
        t = t.double().view(-1, 1, 1, 1)
        return (a * torch.cos(3 * t) + b * t * t + 0.3 * x.double() * torch.sin(2 * t)).float()
    return velocity


def recording(velocity):
    """velocity_fn that records the latents and times it is called with."""
    seen = []

    def fn(x, t):
        seen.append((x.clone(), t.clone()))
        return velocity(x, t)
    return fn, seen


def run_diffusers(scheduler, noise, velocity, dpm):
    """diffusers' loop: the scheduler's own timesteps (int64 for DPM, float for Euler) go to the model."""
    x, latents, times = noise.clone(), [], []
    for t in scheduler.timesteps:
        latents.append(x)
        times.append(t.item() / 1000)
        x = scheduler.step(velocity(x, (t.float() if dpm else t).expand(x.shape[0]) / 1000), t, x).prev_sample
    return latents + [x], times


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_dpm_solver_matches_diffusers_every_step(steps, shift):
    """Same time grid, same integer timesteps fed to the model, every step's latent equal."""
    velocity, noise = make_velocity(), torch.randn(SHAPE)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    ref, ref_times = run_diffusers(scheduler, noise, velocity, dpm=True)

    assert torch.equal(samplers.schedule("flow_dpm_solver", steps, shift), scheduler.sigmas)
    fn, seen = recording(velocity)
    out = samplers.sample(fn, noise, sampler="flow_dpm_solver", steps=steps, shift=shift)
    assert len(seen) == steps
    for i, (x, t) in enumerate(seen):
        assert t.shape == (SHAPE[0],) and t.dtype == torch.float32
        assert t[0].item() == pytest.approx(ref_times[i], abs=1e-7)
        assert rel_err(x, ref[i]) < 1e-5
    assert rel_err(out, ref[-1]) < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_euler_matches_diffusers_every_step(steps, shift):
    velocity, noise = make_velocity(2), torch.randn(SHAPE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ref, ref_times = run_diffusers(scheduler, noise, velocity, dpm=False)

    assert torch.equal(samplers.schedule("flow_euler", steps, shift), scheduler.sigmas)
    fn, seen = recording(velocity)
    out = samplers.sample(fn, noise, sampler="flow_euler", steps=steps, shift=shift)
    for i, (x, t) in enumerate(seen):
        assert t[0].item() == pytest.approx(ref_times[i], rel=1e-6)
        assert rel_err(x, ref[i]) < 1e-5
    assert rel_err(out, ref[-1]) < 1e-5


def test_flow_euler_grid_differs_from_dpm_grid():
    """diffusers' Euler scheduler shifts twice and does not stop at sigma 1/1000: not the DPM grid."""
    assert not torch.allclose(samplers.schedule("flow_euler", 20, 3.0), samplers.schedule("flow_dpm_solver", 20, 3.0))


def test_integer_timesteps_off_feeds_exact_sigmas():
    fn, seen = recording(make_velocity())
    samplers.sample(fn, torch.randn(SHAPE), sampler="flow_dpm_solver", steps=5, shift=3.0, integer_timesteps=False)
    sigmas = samplers.schedule("flow_dpm_solver", 5, 3.0)
    assert [t[0].item() for _, t in seen] == sigmas[:-1].tolist()
    assert any(s * 1000 != int(s * 1000) for s in sigmas[:-1].tolist())  # the integers would differ


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_scm_matches_diffusers_scm_scheduler(steps):
    """TrigFlow times as SCMScheduler (2 steps: 1.5708, 1.3, 0) and the Sprint loop of diffusers'
    SanaSprintPipeline (flow DiT wrapped into TrigFlow), including the fresh noise per step."""
    velocity, noise = make_velocity(3), torch.randn(SHAPE)
    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    scheduler.set_begin_index(0)  # as the pipeline does
    assert torch.equal(samplers.schedule("scm", steps, shift=None), scheduler.timesteps)
    if steps == 2:
        assert scheduler.timesteps.tolist() == pytest.approx([1.5708, 1.3, 0.0])

    generator = torch.Generator().manual_seed(7)
    latents, sigma_data = noise * 0.5, 0.5  # diffusers' SanaSprintPipeline loop, with `velocity` as its DiT
    for t in scheduler.timesteps[:-1]:
        timestep = t.expand(latents.shape[0])
        scm_t = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        s = scm_t.view(-1, 1, 1, 1)
        model_in = latents / sigma_data * torch.sqrt(s ** 2 + (1 - s) ** 2)
        pred = velocity(model_in, scm_t)
        pred = ((1 - 2 * s) * model_in + (1 - 2 * s + 2 * s ** 2) * pred) / torch.sqrt(s ** 2 + (1 - s) ** 2)
        latents, denoised = scheduler.step(pred.float() * sigma_data, timestep, latents, generator=generator,
                                           return_dict=False)
    ref = denoised / sigma_data

    out = samplers.sample(velocity, noise, sampler="scm", steps=steps, shift=None,
                          generator=torch.Generator().manual_seed(7))
    assert rel_err(out, ref) < 1e-5


def test_scm_flow_time_conversion():
    s = torch.tensor([0.0, 0.3, 1.3, torch.pi / 2])
    t = samplers.trigflow_to_flow_time(s)
    assert torch.allclose(t, torch.sin(s) / (torch.sin(s) + torch.cos(s)))
    assert t[0] == 0 and abs(t[-1] - 1) < 1e-6


@pytest.mark.parametrize("sampler", ["flow_dpm_solver", "flow_euler"])
def test_denoise_starts_part_way_like_comfyui(sampler):
    """denoise 0.5 with 10 steps: the last 10 steps of the 20-step grid, from the noised latent."""
    grid = samplers.schedule(sampler, 10, 3.0, denoise=0.5)
    assert torch.equal(grid, samplers.schedule(sampler, 20, 3.0)[-11:])
    noise, latent = torch.randn(SHAPE), torch.randn(SHAPE)
    fn, seen = recording(make_velocity())
    samplers.sample(fn, noise, sampler=sampler, steps=10, shift=3.0, denoise=0.5, latent=latent)
    assert len(seen) == 10
    assert torch.allclose(seen[0][0], (1 - grid[0]) * latent + grid[0] * noise)
    if sampler == "flow_dpm_solver":  # integer timesteps of the 20-step grid
        assert seen[0][1][0].item() == pytest.approx(int(grid[0].double().item() * 1000) / 1000, abs=1e-6)


def test_scm_denoise_noises_the_latent_in_trigflow():
    noise, latent = torch.randn(SHAPE), torch.randn(SHAPE)
    times = samplers.schedule("scm", 2, None, denoise=0.5)
    assert torch.equal(times, samplers.scm_times(4)[-3:])
    fn, seen = recording(make_velocity())
    samplers.sample(fn, noise, sampler="scm", steps=2, shift=None, denoise=0.5, latent=latent,
                    generator=torch.Generator().manual_seed(0))
    s = times[0]
    t = samplers.trigflow_to_flow_time(s)
    x_trig = torch.cos(s) * latent * 0.5 + torch.sin(s) * noise * 0.5
    assert torch.allclose(seen[0][0], x_trig / 0.5 * torch.sqrt(t ** 2 + (1 - t) ** 2), atol=1e-6)


def test_latent_is_ignored_at_full_denoise():
    """denoise=1 is text-to-image: the start is the noise itself, as in diffusers."""
    noise = torch.randn(SHAPE)
    fn, seen = recording(make_velocity())
    samplers.sample(fn, noise, sampler="flow_dpm_solver", steps=2, shift=3.0, latent=torch.randn(SHAPE))
    assert torch.equal(seen[0][0], noise)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_callback_reports_each_step_with_the_clean_estimate(sampler):
    calls = []
    out = samplers.sample(make_velocity(), torch.randn(SHAPE), sampler=sampler, steps=3, shift=3.0,
                          callback=lambda step, total, x0: calls.append((step, total, x0.clone())))
    assert [(s, n) for s, n, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert all(x0.shape == SHAPE for *_, x0 in calls)
    assert torch.allclose(calls[-1][2], out)  # the last estimate is the result


def test_callback_that_raises_stops_sampling_and_frees_the_latents():
    velocity = make_velocity()
    calls, refs = [], []

    def counting(x, t):
        calls.append(1)
        refs.append(weakref.ref(x))
        return velocity(x, t)

    class Cancelled(Exception):
        pass

    def cancel(step, total, x0):
        if step == 2:
            raise Cancelled

    try:
        samplers.sample(counting, torch.randn(SHAPE), sampler="flow_dpm_solver", steps=10, shift=3.0, callback=cancel)
    except Cancelled:
        pass
    else:
        pytest.fail("the callback's exception did not propagate")
    assert len(calls) == 2  # no model call after the cancelled step
    gc.collect()
    assert all(r() is None for r in refs)  # nothing kept the latents alive


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_nan_in_the_latent_is_an_error_naming_the_cause(sampler):
    def exploding(x, t):
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="float16.*bfloat16"):
        samplers.sample(exploding, torch.randn(SHAPE), sampler=sampler, steps=2, shift=3.0)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_nan_in_the_last_step_is_caught_too(sampler):
    """The check reads each step's flag one step late (no GPU stall); the last step is checked at the end."""
    velocity, calls = make_velocity(), []

    def late_nan(x, t):
        calls.append(1)
        return velocity(x, t) * (float("nan") if len(calls) == 3 else 1.0)

    with pytest.raises(FloatingPointError, match="after step 3 of 3"):
        samplers.sample(late_nan, torch.randn(SHAPE), sampler=sampler, steps=3, shift=3.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be a positive"),
    (dict(steps=-3), "steps must be a positive"),
    (dict(steps=2.5), "steps must be a positive"),
    (dict(sampler="euler_a"), "unknown sampler 'euler_a'; choose one of flow_dpm_solver, flow_euler, scm"),
    (dict(denoise=0.0), "denoise must be in"),
    (dict(denoise=1.5), "denoise must be in"),
    (dict(denoise=0.5), "needs the clean `latent`"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    args = dict(sampler="flow_dpm_solver", steps=4, shift=3.0) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        samplers.sample(make_velocity(), torch.randn(SHAPE), **args)
