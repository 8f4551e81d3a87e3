"""Evaluation: the latent-action probe and its references, plots and reports."""
