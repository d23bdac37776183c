"""Evaluation: FID (``fid``), a checkpoint scored on a split (``scores``), sampling, latents
and attention pictures."""
