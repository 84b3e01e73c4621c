"""Losses against hand-computed values and the PyTorch formulas of BasicSR / NAFNet / Restormer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ir_lora import losses

# One image 1x1x2x1: differences are 0.5 and -1.5.
PRED = jnp.array([[[[1.0], [0.0]]]])
TARGET = jnp.array([[[[0.5], [1.5]]]])


def test_hand_values():
    np.testing.assert_allclose(losses.l1(PRED, TARGET), (0.5 + 1.5) / 2)
    np.testing.assert_allclose(losses.mse(PRED, TARGET), (0.25 + 2.25) / 2)
    want = (math.sqrt(0.25 + 1e-6) + math.sqrt(2.25 + 1e-6)) / 2
    np.testing.assert_allclose(losses.charbonnier(PRED, TARGET), want, rtol=1e-6)
    want = (math.sqrt(0.25 + 0.01) + math.sqrt(2.25 + 0.01)) / 2
    np.testing.assert_allclose(losses.charbonnier(PRED, TARGET, eps=0.1), want, rtol=1e-6)
    # mse = 1.25 -> 10 * log10(1.25 + 1e-8).
    np.testing.assert_allclose(losses.psnr_loss(PRED, TARGET), 10 * math.log10(1.25), rtol=1e-6)


def test_psnr_loss_is_minus_mean_psnr_per_image():
    # Two images with mse 0.01 (20 dB) and 0.0001 (40 dB): the loss is -30.
    target = jnp.zeros((2, 4, 4, 3))
    pred = target.at[0].set(0.1).at[1].set(0.01)
    np.testing.assert_allclose(losses.psnr_loss(pred, target), -30.0, rtol=1e-5)


def test_against_pytorch_formulas():
    k1, k2 = jax.random.split(jax.random.key(0))
    pred = jax.random.uniform(k1, (3, 8, 6, 3))
    target = jax.random.uniform(k2, (3, 8, 6, 3))
    p = torch.from_numpy(np.array(pred)).permute(0, 3, 1, 2).double()
    t = torch.from_numpy(np.array(target)).permute(0, 3, 1, 2).double()
    # NAFNet basicsr/models/losses/losses.py PSNRLoss.forward.
    nafnet = (10 / np.log(10)) * torch.log(((p - t) ** 2).mean(dim=(1, 2, 3)) + 1e-8).mean()
    # Restormer basicsr/models/losses/losses.py CharbonnierLoss.forward (eps=1e-3).
    restormer = torch.mean(torch.sqrt((p - t) * (p - t) + 1e-3 * 1e-3))
    np.testing.assert_allclose(losses.psnr_loss(pred, target), nafnet.item(), rtol=1e-5)
    np.testing.assert_allclose(losses.charbonnier(pred, target), restormer.item(), rtol=1e-5)
    np.testing.assert_allclose(
        losses.l1(pred, target), torch.nn.functional.l1_loss(p, t).item(), rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.mse(pred, target), torch.nn.functional.mse_loss(p, t).item(), rtol=1e-5
    )


def test_get_and_gradients():
    loss = losses.get("charbonnier", eps=0.1)
    np.testing.assert_allclose(loss(PRED, TARGET), losses.charbonnier(PRED, TARGET, eps=0.1))
    assert losses.get("l1") is losses.l1
    grad = jax.grad(losses.get("psnr_loss"))(PRED, TARGET)
    assert np.all(np.isfinite(grad)) and grad.shape == PRED.shape


def test_errors():
    with pytest.raises(ValueError, match=r"Unknown loss 'l3'.*charbonnier"):
        losses.get("l3")
    with pytest.raises(ValueError, match=r"shapes differ: \(1, 1, 2, 1\) vs \(1, 2, 1, 1\)"):
        losses.l1(PRED, TARGET.reshape(1, 2, 1, 1))
