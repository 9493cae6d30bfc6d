"""Samplers for SANA's flow-matching DiT: Flow-DPM-Solver, Flow Euler and Sana-Sprint's sCM steps.

Flow matching: x_t = (1 - t) x0 + t noise, the DiT predicts the velocity v = noise - x0, so
x0 = x_t - t v. Every sampler here drives one `velocity_fn(x, t)`: x is the float32 latent
(B, 32, h, w), t the flow time in [0, 1] per sample (B,); it returns the (guided) velocity.
Guidance batching lives in the function the pipeline builds (guidance.sample_latents).

- flow_dpm_solver: DPM-Solver++ (data prediction, multistep, order 2, first order on the first
  and the last step) on alpha_t = 1 - t, sigma_t = t, on the shifted grid
  s = linspace(1, 1/1000, N + 1), sigma = shift (1 - s) / (1 + (shift - 1)(1 - s)), reversed,
  ending at 0. Same grid and arithmetic as diffusers' DPMSolverMultistepScheduler with
  use_flow_sigmas=True, prediction_type="flow_prediction". The DiT sees floor(sigma * 1000)
  (both references feed it integers), the solver uses the float32 sigmas.
- flow_euler: x += (sigma_next - sigma) v on diffusers' FlowMatchEulerDiscreteScheduler(shift)
  grid, which is shifted twice: linspace(1000, 1000 shift(1/1000), N) / 1000, shifted again.
- scm: Sana-Sprint's TrigFlow consistency steps, 1-4 steps from s = pi/2 down to 0 (2 steps:
  [1.5708, 1.3, 0]); the TrigFlow <-> flow conversion is here, the DiT stays a flow model.
"""
import numpy as np
import torch

from .inpaint import LatentInpaint

SAMPLERS = ("flow_dpm_solver", "flow_euler", "scm")
NUM_TRAIN_TIMESTEPS = 1000
SIGMA_DATA = 0.5  # Sana-Sprint's TrigFlow data scale
SCM_MAX_TIME = 1.57080  # TrigFlow start time (about pi/2), diffusers' SCMScheduler default
SCM_INTERMEDIATE_TIME = 1.3  # the middle time of the 2-step schedule


def flow_dpm_solver_sigmas(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas float32 [steps + 1] ending at 0, model times [steps] = floor(sigma * 1000) / 1000).

    Computed in float64 numpy like diffusers (its int64 timesteps truncate sigma64 * 1000),
    then cast, so that grid and integer timesteps match it bit for bit."""
    s = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, steps + 1)
    sigmas = 1.0 - s
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()  # drop the 0 of s=1
    model_times = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64) / NUM_TRAIN_TIMESTEPS
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(model_times.astype(np.float32))


def flow_euler_sigmas(steps: int, shift: float) -> torch.Tensor:
    """float32 sigmas [steps + 1] ending at 0, as FlowMatchEulerDiscreteScheduler(shift=shift)
    .set_timesteps(steps): its init shifts the 1000 training sigmas, set_timesteps spaces the
    steps linearly between the shifted extremes and shifts them again."""
    train = np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy()
    train = torch.from_numpy(train) / NUM_TRAIN_TIMESTEPS
    train = shift * train / (1 + (shift - 1) * train)  # float32, as the scheduler's __init__
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def scm_times(steps: int) -> torch.Tensor:
    """TrigFlow times [steps + 1] from about pi/2 to 0, as diffusers' SCMScheduler: 2 steps pass
    through 1.3, other counts are evenly spaced."""
    if steps == 2:
        return torch.tensor([SCM_MAX_TIME, SCM_INTERMEDIATE_TIME, 0.0]).float()
    return torch.linspace(SCM_MAX_TIME, 0, steps + 1).float()


def schedule(sampler: str, steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas (flow samplers) or TrigFlow times (scm) actually run: float32 [steps + 1].

    denoise < 1 follows ComfyUI's KSampler: the grid of int(steps / denoise) steps, last `steps`."""
    return _schedule(sampler, steps, shift, denoise, integer_timesteps=False)[0]


def _schedule(sampler, steps, shift, denoise, integer_timesteps):
    """(grid [steps + 1], the flow times [steps] the DiT sees, or None for scm)."""
    check_steps(sampler, steps, denoise)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if sampler == "flow_dpm_solver":
        grid, integer_times = flow_dpm_solver_sigmas(total, shift)
        times = integer_times if integer_timesteps else grid[:-1]
    elif sampler == "flow_euler":
        grid = flow_euler_sigmas(total, shift)
        times = grid[:-1]
    else:
        grid, times = scm_times(total), None
    return grid[-(steps + 1):], None if times is None else times[-steps:]


def check_steps(sampler: str, steps: int, denoise: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive whole number, got {steps!r} "
                         f"(typical: 20 for flow_dpm_solver, 28 for flow_euler, 2 for scm)")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise} (1 = start from pure noise)")


def trigflow_to_flow_time(s: torch.Tensor) -> torch.Tensor:
    """TrigFlow time s in [0, pi/2] -> flow time t = sin s / (sin s + cos s)."""
    return torch.sin(s) / (torch.cos(s) + torch.sin(s))


def sample(velocity_fn, noise: torch.Tensor, *, sampler: str, steps: int, shift: float, denoise: float = 1.0,
           latent: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           generator: torch.Generator | None = None, callback=None, integer_timesteps: bool = True) -> torch.Tensor:
    """Run `sampler` from `noise` (B, 32, h, w), unit variance) and return the clean latent (float32).

    velocity_fn(x, t): x float32 (B, 32, h, w), t float32 (B,) flow time in [0, 1] -> velocity.
    shift: flow shift of the time grid (ignored by scm).
    denoise < 1 with `latent`: image-to-image, start part way along the schedule from the noised
    latent (ComfyUI's KSampler semantics: last `steps` of an int(steps / denoise)-step schedule).
    mask (1 or B, 1, h, w) in [0, 1] on the latent grid, with `latent`: inpainting (sana_core.inpaint): generate
    where it is 1, keep `latent` (re-noised to each step's level with `noise`) where it is 0, blend between.
    generator: CPU generator for scm's fresh noise at each step (None: the global one).
    callback(step, total, x0): after each step (from 1), x0 the current clean-latent estimate; an
    exception it raises stops sampling and propagates.
    integer_timesteps: Flow-DPM-Solver feeds the DiT floor(sigma * 1000) / 1000, as diffusers and
    the official code do; False feeds the exact sigmas. flow_euler and scm always feed their float
    times (as their references do).
    """
    grid, times = _schedule(sampler, steps, shift, denoise, integer_timesteps)
    if denoise < 1.0 and latent is None:
        raise ValueError("denoise < 1 needs the clean `latent` to start from (image-to-image)")
    if mask is not None and latent is None:
        raise ValueError("a mask needs the clean `latent` of the image whose unmasked part it keeps")
    x = noise.float()
    clean = latent.to(device=x.device, dtype=torch.float32) if latent is not None else None
    inpaint = None if mask is None else LatentInpaint(mask.to(x.device, torch.float32), clean, x)
    start = clean if denoise < 1.0 else None
    try:
        if sampler == "flow_dpm_solver":
            return _flow_dpm_solver(velocity_fn, x, grid, times.to(x.device), start, callback, inpaint)
        if sampler == "flow_euler":
            return _flow_euler(velocity_fn, x, grid, times.to(x.device), start, callback, inpaint)
        return _scm(velocity_fn, x, grid, start, generator, callback, inpaint)
    except BaseException:
        x = noise = latent = clean = start = inpaint = None  # drop the tensors this frame would keep alive
        raise


def _predict(velocity_fn, x, sigma, t, inpaint):
    """(clean-latent estimate x0, velocity (x - x0) / sigma) at the solver's noise level sigma, the DiT at time t.
    inpaint (sana_core.inpaint.LatentInpaint): the model sees the known region re-noised to sigma and x0 holds
    the known latent there; None: the DiT's own velocity."""
    if inpaint is None:
        v = velocity_fn(x, t)
        return x - sigma * v, v
    mask = inpaint.step_mask(sigma)
    x_in = inpaint.noised(x, sigma, mask)
    x0 = inpaint.denoised(x_in - sigma * velocity_fn(x_in, t), mask)
    return x0, (x - x0) / sigma


def _flow_dpm_solver(velocity_fn, x, sigmas, times, latent, callback, inpaint=None):
    """DPM-Solver++(2M) in data prediction; float32 scalars combined in diffusers' order."""
    steps, check = len(sigmas) - 1, FiniteCheck(len(sigmas) - 1)
    if latent is not None:
        x = (1 - sigmas[0]) * latent + sigmas[0] * x
    lambdas = torch.log(1 - sigmas) - torch.log(sigmas)  # half log-SNR; +inf at sigma = 0
    x0_prev = None
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]  # 0-dim CPU tensors: fine with any device
        x0, _ = _predict(velocity_fn, x, sigma, times[i].expand(x.shape[0]), inpaint)
        if sigma_next == 0:  # the last step is first order, and first order to sigma 0 gives x0
            x = x0
        else:
            h = lambdas[i + 1] - lambdas[i]
            phi = (1 - sigma_next) * (torch.exp(-h) - 1.0)
            x = (sigma_next / sigma) * x - phi * x0
            if x0_prev is not None:  # second order: - 0.5 phi D1, D1 = (x0 - x0_prev) / r0
                r0 = (lambdas[i] - lambdas[i - 1]) / h
                x = x - 0.5 * phi * ((1.0 / r0) * (x0 - x0_prev))
        x0_prev = x0
        check(x, i + 1)
        if callback is not None:
            callback(i + 1, steps, x0)
    check.finish()
    return x


def _flow_euler(velocity_fn, x, sigmas, times, latent, callback, inpaint=None):
    steps, check = len(sigmas) - 1, FiniteCheck(len(sigmas) - 1)
    if latent is not None:
        x = (1 - sigmas[0]) * latent + sigmas[0] * x
    for i in range(steps):
        x0, v = _predict(velocity_fn, x, sigmas[i], times[i].expand(x.shape[0]), inpaint)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        check(x, i + 1)
        if callback is not None:
            callback(i + 1, steps, x0)
    check.finish()
    return x


def _scm(velocity_fn, noise, times, latent, generator, callback, inpaint=None):
    """Sana-Sprint: x_s = cos(s) x0 + sin(s) z in TrigFlow space (data scaled by SIGMA_DATA).
    The flow DiT sees t = sin s / (sin s + cos s) and x / SIGMA_DATA * sqrt(t^2 + (1-t)^2); its
    velocity converts back to the TrigFlow velocity F, x0 = cos(s) x - sin(s) F, then fresh noise
    at the next time (as diffusers' SanaSprintPipeline and SCMScheduler). inpaint acts in flow space, at t."""
    steps, check = len(times) - 1, FiniteCheck(len(times) - 1)
    x = noise * SIGMA_DATA
    if latent is not None:
        x = torch.cos(times[0]).to(x.device) * latent * SIGMA_DATA + torch.sin(times[0]).to(x.device) * x
    for i in range(steps):
        s, s_next = times[i].to(x.device), times[i + 1].to(x.device)
        t = trigflow_to_flow_time(s).expand(x.shape[0])  # (B,)
        t4 = t.view(-1, 1, 1, 1)
        norm = torch.sqrt(t4 ** 2 + (1 - t4) ** 2)
        x_flow = x / SIGMA_DATA * norm
        _, v = _predict(velocity_fn, x_flow, t4, t, inpaint)
        trig_v = ((1 - 2 * t4) * x_flow + (1 - 2 * t4 + 2 * t4 ** 2) * v) / norm
        trig_v = trig_v.float() * SIGMA_DATA
        x0 = torch.cos(s) * x - torch.sin(s) * trig_v
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device) * SIGMA_DATA
        x = torch.cos(s_next) * x0 + torch.sin(s_next) * z
        check(x0, i + 1)
        if callback is not None:
            callback(i + 1, steps, x0 / SIGMA_DATA)
    check.finish()
    return x0 / SIGMA_DATA


class FiniteCheck:
    """Stops sampling when a step's latent holds NaN or inf. Each step's flag is read one step late,
    so that waiting for it never leaves the GPU without queued work."""

    def __init__(self, total: int):
        self.total, self.pending = total, None

    def __call__(self, x: torch.Tensor, step: int) -> None:
        flag = torch.isfinite(x).all()  # stays on the device until read
        self.finish()
        self.pending = (flag, step)

    def finish(self) -> None:
        if self.pending is not None and not self.pending[0].item():
            raise FloatingPointError(
                f"the latent holds NaN or infinite values after step {self.pending[1]} of {self.total}. Likely "
                f"causes: the model runs in float16 and overflowed (load it in bfloat16 or float32: "
                f"dtype=torch.bfloat16), a damaged or mismatched model file, or NaN in the input latent or image. "
                f"No image is made from it.")
        self.pending = None


# ---------------------------------------------------------------------------------------------
# The same samplers in k-diffusion's form (ComfyUI's SAMPLER): sampler(model, x, sigmas, extra_args,
# callback, disable) where model(x, sigma (B,), **extra_args) returns the denoised latent x0 (a flow
# model: x0 = x - sigma v) and x starts already noised to sigmas[0]. They run the loops above on the
# velocity recovered from the denoised latent, v = (x - x0) / sigma, so that the model can be called
# at the references' timestep while the solver's arithmetic keeps the float sigma.

def _velocity_of(model, extra_args):
    """velocity_fn(x, t) for the loops above from a k-diffusion denoiser called at sigma = t."""
    extra_args = extra_args or {}

    def velocity(x, t):  # t (B,) float32 > 0
        t = t.clamp(max=1.0)  # sCM's first time is pi/2 in float32, a hair past t = 1 (k-diffusion grids end at 1)
        return (x - model(x, t, **extra_args)) / t.view(-1, *[1] * (x.dim() - 1))
    return velocity


def _k_callback(callback):
    if callback is None:
        return None
    return lambda step, total, x0: callback({"i": step - 1, "denoised": x0, "x": x0})


def model_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The flow times [N] Flow-DPM-Solver shows the DiT for the sigmas [N + 1]: floor(sigma * 1000) / 1000
    as both references do (floored at 1/1000, so that the velocity can be recovered from x0)."""
    integer = torch.floor(sigmas[:-1].double().cpu() * NUM_TRAIN_TIMESTEPS).clamp_(min=1)
    return (integer / NUM_TRAIN_TIMESTEPS).float()


@torch.no_grad()
def sample_flow_dpm_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, integer_timesteps=True,
                           inpaint=None):
    """Flow-DPM-Solver (DPM-Solver++ 2M in the flow's lambda = log((1 - sigma) / sigma)) in k-diffusion form.
    inpaint (sana_core.inpaint.LatentInpaint), in every k-form sampler: the known region blended at the solver's
    sigmas (the model, called at the integer timesteps, must then not blend it itself)."""
    sigmas = sigmas.float().cpu()
    times = model_timesteps(sigmas) if integer_timesteps else sigmas[:-1]
    return _flow_dpm_solver(_velocity_of(model, extra_args), x.float(), sigmas, times.to(x.device), None,
                            _k_callback(callback), inpaint)


@torch.no_grad()
def sample_flow_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, inpaint=None):
    """Flow Euler, x += (sigma_next - sigma) v, in k-diffusion form (the model sees the float sigmas)."""
    sigmas = sigmas.float().cpu()
    return _flow_euler(_velocity_of(model, extra_args), x.float(), sigmas, sigmas[:-1].to(x.device), None,
                       _k_callback(callback), inpaint)


def scm_sigmas(steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Sana-Sprint's TrigFlow times as flow sigmas (t = sin s / (sin s + cos s)), float32 [steps + 1].
    The first time, 1.5708, is a hair past pi/2 (t = 1.0000037): clamped to 1, where ComfyUI's schedules
    start (timestep ranges, noise scaling); the sampler then starts at s = pi/2."""
    check_steps("scm", steps, denoise)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return trigflow_to_flow_time(scm_times(total))[-(steps + 1):].clamp(max=1.0)


@torch.no_grad()
def sample_scm(model, x, sigmas, extra_args=None, callback=None, disable=None, inpaint=None):
    """Sana-Sprint's sCM steps in k-diffusion form. sigmas: flow sigmas from scm_sigmas (converted back
    to TrigFlow times); x: the flow latent at sigmas[0]. Fresh noise at each step comes from a CPU
    generator seeded with extra_args["seed"] after one draw of x's shape (the initial noise's draw, as
    SanaSampler does)."""
    sigmas = sigmas.float().cpu()
    times = torch.atan2(sigmas, 1 - sigmas)  # TrigFlow time s of each flow time t
    t0 = sigmas[0]
    trig = x.float() * SIGMA_DATA / torch.sqrt(t0 ** 2 + (1 - t0) ** 2).to(x.device)  # flow -> TrigFlow space
    generator = torch.Generator().manual_seed(int((extra_args or {}).get("seed", 0) or 0))
    torch.randn(x.shape, generator=generator)
    return _scm(_velocity_of(model, extra_args), trig / SIGMA_DATA, times, None, generator, _k_callback(callback),
                inpaint)


K_SAMPLERS = {"flow_dpm_solver": sample_flow_dpm_solver, "flow_euler": sample_flow_euler, "scm": sample_scm}
