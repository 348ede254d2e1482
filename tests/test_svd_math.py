"""SVD's math: EDM preconditioning against its formulas and diffusers' Euler scheduler, log-normal
sigmas, image-to-video conditioning, the motion-bucket map."""
import json

import numpy as np
import pytest
import torch

from training.conditioning import (
    MotionBucketMap,
    augment_frame,
    concat_condition,
    sample_noise_aug,
    sampled_fps,
    svd_time_ids,
)
from training.objectives import EDM, sample_sigmas

SIGMAS = torch.tensor([0.002, 0.03, 0.5, 1.0, 2.7, 30.0, 700.0], dtype=torch.float64)


def test_svd_edm_coefficients_are_the_formulas():
    s, edm = SIGMAS, EDM()                       # sigma_data 1, v-parameterisation
    torch.testing.assert_close(edm.c_skip(s), 1 / (s ** 2 + 1))
    torch.testing.assert_close(edm.c_out(s), -s / (s ** 2 + 1).sqrt())
    torch.testing.assert_close(edm.c_in(s), 1 / (s ** 2 + 1).sqrt())
    torch.testing.assert_close(edm.c_noise(s), 0.25 * s.log())
    torch.testing.assert_close(edm.weight(s), (1 + s ** 2) / s ** 2)
    # the weight undoes c_out^2: the loss on F is unweighted, at every noise level
    torch.testing.assert_close(edm.weight(s) * edm.c_out(s) ** 2, torch.ones_like(s))


def test_generic_edm_with_sigma_data_half():
    s, edm = SIGMAS, EDM(sigma_data=0.5, v_param=False)
    torch.testing.assert_close(edm.c_skip(s), 0.25 / (s ** 2 + 0.25))
    torch.testing.assert_close(edm.c_out(s), 0.5 * s / (s ** 2 + 0.25).sqrt())
    torch.testing.assert_close(edm.c_in(s), 1 / (s ** 2 + 0.25).sqrt())
    torch.testing.assert_close(edm.weight(s), (s ** 2 + 0.25) / (0.5 * s) ** 2)


def test_edm_matches_diffusers_euler_v_prediction_continuous():
    from diffusers import EulerDiscreteScheduler

    # StableVideoDiffusionPipeline's scheduler settings
    sched = EulerDiscreteScheduler(
        prediction_type="v_prediction",
        timestep_type="continuous",
        use_karras_sigmas=True,
        sigma_min=0.002,
        sigma_max=700.0,
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    )
    sched.set_timesteps(25)
    edm = EDM()
    g = torch.Generator().manual_seed(0)
    for i in (0, 7, 24):
        sigma = sched.sigmas[i]
        t = sched.timesteps[i]
        x = torch.randn(2, 4, 8, 8, generator=g) * float((sigma ** 2 + 1) ** 0.5)
        out = torch.randn(2, 4, 8, 8, generator=g)
        sched._step_index = None
        torch.testing.assert_close(t, edm.c_noise(sigma), atol=1e-6, rtol=1e-6)
        scaled = sched.scale_model_input(x, t)
        torch.testing.assert_close(scaled, edm.model_input(x, sigma.expand(2)), atol=1e-6, rtol=1e-6)
        step = sched.step(out, t, x)
        torch.testing.assert_close(
            step.pred_original_sample, edm.denoise(x, out, sigma.expand(2)), atol=1e-6, rtol=1e-6
        )


def test_edm_loss_is_zero_at_the_target_and_per_video():
    edm = EDM()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 14, 4, 8, 8, generator=g)          # (B, F, C, h, w): one sigma per video
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    noisy = edm.noisy(x0, noise, sigma)
    torch.testing.assert_close(noisy[1, 5], x0[1, 5] + noise[1, 5])
    perfect = (x0 - edm._s(edm.c_skip(sigma), noisy) * noisy) / edm._s(edm.c_out(sigma), noisy)
    assert edm.loss(noisy, perfect, x0, sigma).abs().max() < 1e-9
    loss = edm.loss(noisy, torch.zeros_like(x0), x0, sigma)
    want = edm.weight(sigma) * ((edm._s(edm.c_skip(sigma), noisy) * noisy - x0) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss, want)


def test_log_normal_sigmas_are_seeded_and_have_the_stage_moments():
    a = sample_sigmas(100_000, 0.7, 1.6, torch.Generator().manual_seed(3))
    b = sample_sigmas(100_000, 0.7, 1.6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (100_000,)
    assert abs(a.log().mean().item() - 0.7) < 0.02 and abs(a.log().std().item() - 1.6) < 0.02
    aug = sample_noise_aug(100_000, generator=torch.Generator().manual_seed(4))
    assert abs(aug.log().mean().item() + 3.0) < 0.01 and abs(aug.log().std().item() - 0.5) < 0.01


def test_conditioning_follows_the_pipeline():
    frame = torch.zeros(2, 3, 4, 4)
    noise = torch.ones(2, 3, 4, 4)
    out = augment_frame(frame, torch.tensor([0.02, 0.5]), noise)
    assert out[0].unique().tolist() == [pytest.approx(0.02)] and out[1].unique().tolist() == [0.5]
    lat = torch.randn(2, 14, 4, 5, 6)
    cond = torch.randn(2, 4, 5, 6)
    both = concat_condition(lat, cond)
    assert both.shape == (2, 14, 8, 5, 6)
    assert torch.equal(both[:, :, :4], lat) and all(torch.equal(both[:, f, 4:], cond) for f in range(14))
    # 30 fps footage, every 4th frame: the pipeline is told fps=7.5 and conditions on 6.5
    fps = torch.tensor([sampled_fps(30, 4), sampled_fps(24, 3)])
    ids = svd_time_ids(fps, torch.tensor([127, 40]), torch.tensor([0.02, 0.1]))
    torch.testing.assert_close(ids, torch.tensor([[6.5, 127.0, 0.02], [7.0, 40.0, 0.1]]))


def test_motion_bucket_map_is_monotone_spans_its_range_and_round_trips():
    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.lognormal(1.0, 1.2, 5000), [20.0] * 200])   # heavy tail, many ties
    m = MotionBucketMap.fit(scores)
    grid = np.linspace(scores.min() - 1, scores.max() + 1, 20_001)
    ids = m(grid)
    assert np.all(np.diff(ids) >= 0)                                         # monotone
    assert ids.min() == 0 and ids.max() == 255 and m([scores.min()])[0] == 0 and m([scores.max()])[0] == 255
    assert abs(int(m([np.median(scores)])[0]) - 127) <= 1                    # the default 127 is the median clip
    hist = np.bincount(m(scores), minlength=256)
    assert hist.max() < 0.06 * len(scores)                                   # the tail does not crowd the buckets
    assert m([float("nan")])[0] == 128
    back = MotionBucketMap.from_dict(json.loads(json.dumps(m.to_dict())))      # as the run's file carries it
    assert np.array_equal(back(grid), ids)
    assert len(m.knots) <= 257
    with pytest.raises(ValueError, match="no finite motion_score"):
        MotionBucketMap.fit([None, float("nan")])


def test_tied_scores_share_their_mid_rank():
    m = MotionBucketMap.fit([0.0] * 50 + list(np.linspace(1, 10, 51)))     # half the clips are static
    assert m([0.0])[0] == round(255 * (49 / 2) / 100)                      # the mean rank of the 50 ties
    assert m([10.0])[0] == 255 and m([-5.0])[0] == m([0.0])[0]            # below the fitted range: clamped
