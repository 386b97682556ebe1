"""Evaluation: the standard FID Inception (offline), FID/KID, PSNR/SSIM, the evaluate stage.

- :mod:`cyclegan.evaluate.inception` — loading the FID Inception weights and its preprocessing
- :mod:`cyclegan.evaluate.fid` — FID and KID from features
- :mod:`cyclegan.evaluate.metrics` — PSNR and SSIM against ground truth
- :mod:`cyclegan.evaluate.evaluate` — the ``cyclegan evaluate`` stage
"""
